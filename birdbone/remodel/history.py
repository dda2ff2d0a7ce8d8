"""DeltaHistory: every wave of a remodelling run, invertible to the bit without full snapshots.

The scheme: the base weights W are never rewritten during a run (they are re-read from the
source file, whose sha256 the run records). Each wave k stores only what it changed:

* ``pruned``   — the weights this wave removed, one bit per weight (``np.packbits``);
* ``revived``  — the weights this wave gave back, one bit per weight;
* ``reset``    — which revived weights get a value set rather than keeping the accumulated one
  (RigL regrowth starts at 0; rollback restores the original W), with those ``values``
  (float32, only at those positions: setting a value is exact, adding an offset would not be);
* ``lora``     — the healing delta as its LoRA factors A (r × in), B (out × r) and scale, float32.

The weights after wave k are recomputed in one fixed order:

    acc = W;  for j = 1..k:  acc = acc + f32(scale_j · (B_j @ A_j) in float64);  acc[reset_j] = values_j
    M_k = M_{k-1} & ~pruned_k | revived_k;   W_k = acc ⊙ M_k   (pruned weights are exactly 0)

so any wave, and wave 0 (the original), comes back bit for bit. Per wave a tensor costs 2 bits
per weight for the masks (1/16 of its float32 size) plus the LoRA factors (rank 8 on a 576×1536
matrix: 0.7 % of it) plus 4 bytes per reset weight — within the plan's 10 % per wave.
Each wave is one safetensors file written atomically; nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from birdbone.io.atomic import atomic_path
from birdbone.io.errors import BirdboneError, InputError

WAVE_FILE = "wave-{:04d}.safetensors"


@dataclass
class WaveDelta:
    pruned: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool (out, in)
    revived: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool (out, in)
    reset: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool: revived weights whose value is set
    values: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32, the set values in row-major order
    lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)  # name -> (A, B, scale)

    def names(self) -> set[str]:
        return set(self.pruned) | set(self.revived) | set(self.lora) | set(self.reset)


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1))


def _unpack(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.unpackbits(bits, count=n).astype(bool).reshape(shape)


def lora_product(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale · (B @ A) computed in float64, rounded once to float32 (the same bits every time)."""
    return (float(scale) * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)


Weights = tuple[np.ndarray, np.ndarray]  # (float32 weights, bool mask)


def apply_wave(state: dict[str, Weights], d: WaveDelta) -> dict[str, Weights]:
    """One wave on (accumulated weights, mask) per name, in the fixed order: LoRA delta, pruned,
    revived, set values. The only place that order lives: replay and a running loop both use it,
    so a resumed run and an uninterrupted one compute the same bits."""
    out = {}
    for n, (acc, mask) in state.items():
        if n in d.lora:
            acc = acc + lora_product(*d.lora[n])
        if n in d.pruned:
            mask = mask & ~d.pruned[n]
        if n in d.revived:
            mask = mask | d.revived[n]
            acc = acc.copy()
            acc[d.reset[n]] = d.values[n]
        out[n] = (acc, mask)
    return out


def masked(state: dict[str, Weights]) -> dict[str, Weights]:
    """The weights a model uses: accumulated values where the mask lives, exactly 0 elsewhere."""
    return {n: (np.where(m, acc, np.float32(0.0)).astype(np.float32), m) for n, (acc, m) in state.items()}


class DeltaHistory:
    """The waves of one run, in ``folder`` (``wave-0001.safetensors``, ...)."""

    def __init__(self, folder: str | Path, shapes: dict[str, tuple[int, int]]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}

    @property
    def n_waves(self) -> int:
        k = 0
        while (self.folder / WAVE_FILE.format(k + 1)).exists():
            k += 1
        return k

    def append(self, delta: WaveDelta) -> int:
        """Write the next wave atomically; returns its number (1-based)."""
        from safetensors.numpy import save_file

        unknown = delta.names() - set(self.shapes)
        if unknown:
            raise BirdboneError(f"wave names unknown tensors: {sorted(unknown)[:3]}")
        k = self.n_waves + 1
        arrays: dict[str, np.ndarray] = {}
        for name, m in delta.pruned.items():
            self._check_shape(name, m)
            arrays[f"{name}.pruned"] = _pack(m)
        for name, m in delta.revived.items():
            self._check_shape(name, m)
            arrays[f"{name}.revived"] = _pack(m)
            reset = np.asarray(delta.reset.get(name, np.zeros_like(m, dtype=bool)), dtype=bool)
            if (reset & ~m).any():
                raise BirdboneError(f"{name}: a value is set for a weight that is not revived")
            values = np.ascontiguousarray(delta.values.get(name, np.zeros(int(reset.sum()), np.float32)), np.float32).reshape(-1)
            if values.size != int(reset.sum()):
                raise BirdboneError(f"{name}: {values.size} values for {int(reset.sum())} reset weights")
            arrays[f"{name}.reset"] = _pack(reset)
            arrays[f"{name}.values"] = values
        for name, (a, b, scale) in delta.lora.items():
            out_dim, in_dim = self.shapes[name]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
                raise BirdboneError(f"{name}: LoRA factors {a.shape} / {b.shape} do not fit a {out_dim}×{in_dim} weight")
            arrays[f"{name}.lora_A"] = np.ascontiguousarray(a, np.float32)
            arrays[f"{name}.lora_B"] = np.ascontiguousarray(b, np.float32)
            arrays[f"{name}.lora_scale"] = np.array([scale], np.float32)
        meta = {"wave": str(k), "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()})}
        with atomic_path(self.folder / WAVE_FILE.format(k)) as tmp:
            save_file(arrays, str(tmp), metadata=meta)
        return k

    def _check_shape(self, name: str, m: np.ndarray) -> None:
        if tuple(m.shape) != self.shapes[name]:
            raise BirdboneError(f"{name}: mask shape {m.shape} differs from the weight's {self.shapes[name]}")

    def load(self, k: int) -> WaveDelta:
        from safetensors import safe_open

        path = self.folder / WAVE_FILE.format(k)
        if not path.exists():
            raise InputError(path, f"no wave {k} in this run (it has {self.n_waves})")
        d = WaveDelta()
        with safe_open(str(path), "numpy") as f:
            keys = set(f.keys())
            for key in keys:
                name, kind = key.rsplit(".", 1)
                if name not in self.shapes:
                    raise InputError(path, f"holds tensor {name!r}, which the run's model does not have")
                shape = self.shapes[name]
                if kind == "pruned":
                    d.pruned[name] = _unpack(f.get_tensor(key), shape)
                elif kind == "revived":
                    d.revived[name] = _unpack(f.get_tensor(key), shape)
                    d.reset[name] = _unpack(f.get_tensor(f"{name}.reset"), shape)
                    d.values[name] = f.get_tensor(f"{name}.values")
                elif kind == "lora_A":
                    d.lora[name] = (f.get_tensor(key), f.get_tensor(f"{name}.lora_B"),
                                    float(f.get_tensor(f"{name}.lora_scale")[0]))
        return d

    def replay(self, k: int, base: Callable[[str], np.ndarray], names: list[str] | None = None) -> dict[str, Weights]:
        """name -> (accumulated weights, mask) after wave ``k`` (0 = the original), replayed from the
        base weights with :func:`apply_wave`; each wave file is read once."""
        if not 0 <= k <= self.n_waves:
            raise BirdboneError(f"wave {k}: this run has waves 0-{self.n_waves}")
        names = list(self.shapes) if names is None else names
        state = {n: (np.array(base(n), dtype=np.float32, copy=True), np.ones(self.shapes[n], dtype=bool)) for n in names}
        for j in range(1, k + 1):
            state = apply_wave(state, self.load(j))
        return state

    def state_at(self, k: int, base: Callable[[str], np.ndarray], names: list[str] | None = None) -> dict[str, Weights]:
        """name -> (weights, mask) after wave ``k``: the replay with pruned weights exactly 0."""
        return masked(self.replay(k, base, names))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("wave-*.safetensors"))
