"""A usage profile: what a model's weights see when it reads a text, and how it is saved.

Numpy only (no torch): :class:`UsageProfile` holds, per weight under its GGUF name, what
llama.cpp's ``llama-imatrix`` accumulates — the sum over tokens of each input channel's squared
activation (``in_sum2``) and the token count — plus the share of tokens on which each input
channel is active (``|a| > eps``), per attention head the mean L2 norm of its slice of the
``attn_output`` input, and optionally the mean ``|dL/dw|`` of each weight. :func:`write_profile`
saves it as ``usage.safetensors``, ``usage.json`` and ``imatrix.gguf`` (llama.cpp's format).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from birdbone.io.atomic import atomic_folder
from birdbone.io.inputs import note_folder_files, read_json

PROFILE_VERSION = 1
PROFILE_FILES = ("usage.safetensors", "usage.json", "imatrix.gguf")


@dataclass
class UsageProfile:
    model: str
    text_name: str
    n_tokens: int  # tokens profiled (= chunks * ctx)
    ctx: int
    chunks: int
    eps: float  # a channel counts as active on a token when |a| > eps
    in_sum2: dict[str, np.ndarray] = field(default_factory=dict)  # gguf weight name -> (n_in,) float32
    counts: dict[str, int] = field(default_factory=dict)  # gguf weight name -> tokens seen
    act_freq: dict[str, np.ndarray] = field(default_factory=dict)  # gguf weight name -> (n_in,) share in [0, 1]
    head_norm: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (n_head,) mean L2 norm
    grad_abs: dict[str, np.ndarray] = field(default_factory=dict)  # gguf weight name -> (n_out, n_in), GGUF row order
    in_sum: dict[str, np.ndarray] = field(default_factory=dict)  # gguf weight name -> (n_in,) sum over tokens (first moment)
    version: int = PROFILE_VERSION

    def importance(self, name: str) -> np.ndarray:
        """Mean squared input activation per channel: what llama.cpp's quantizer weighs by."""
        return self.in_sum2[name] / max(self.counts[name], 1)

    def variance(self, name: str) -> np.ndarray:
        """Per input channel, the variance of its activation over the tokens profiled (FLAP's fluctuation)."""
        if name not in self.in_sum:
            raise KeyError(f"{name}: this profile has no first moments (made by an older birdbone); profile again")
        n = max(self.counts[name], 1)
        mean = self.in_sum[name] / n
        return np.maximum(self.in_sum2[name] / n - mean * mean, 0.0)

    def layer_importance(self) -> dict[int, float]:
        """Per layer, the mean importance over all channels of all its weights."""
        per: dict[int, list[float]] = {}
        for name in self.in_sum2:
            if name.startswith("blk."):
                per.setdefault(int(name.split(".")[1]), []).append(float(self.importance(name).mean()))
        return {k: float(np.mean(v)) for k, v in sorted(per.items())}

    def summary(self) -> dict:
        return {
            "version": self.version,
            "model": self.model,
            "text": self.text_name,
            "tokens": self.n_tokens,
            "ctx": self.ctx,
            "chunks": self.chunks,
            "eps": self.eps,
            "gradients": bool(self.grad_abs),
            "layer_mean_importance": {str(k): v for k, v in self.layer_importance().items()},
            "tensors": {
                name: {
                    "mean_importance": float(self.importance(name).mean()),
                    "max_importance": float(self.importance(name).max()),
                    "mean_act_freq": float(self.act_freq[name].mean()) if name in self.act_freq else None,
                    "mean_grad_abs": float(self.grad_abs[name].mean()) if name in self.grad_abs else None,
                }
                for name in sorted(self.in_sum2)
            },
            # share of the summed head norms each head carries, per layer
            "head_contribution": {
                str(k): (v / max(float(v.sum()), 1e-30)).round(6).tolist() for k, v in sorted(self.head_norm.items())
            },
            "head_norm": {str(k): v.round(6).tolist() for k, v in sorted(self.head_norm.items())},
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything as flat float32 arrays, keyed for ``usage.safetensors``."""
        out = {}
        for name in sorted(self.in_sum2):
            out[f"{name}.in_sum2"] = np.asarray(self.in_sum2[name], dtype=np.float32)
            out[f"{name}.counts"] = np.array([self.counts[name]], dtype=np.float32)
            if name in self.act_freq:
                out[f"{name}.act_freq"] = np.asarray(self.act_freq[name], dtype=np.float32)
            if name in self.grad_abs:
                out[f"{name}.grad_abs"] = np.asarray(self.grad_abs[name], dtype=np.float32)
            if name in self.in_sum:
                out[f"{name}.in_sum"] = np.asarray(self.in_sum[name], dtype=np.float32)
        for layer, v in sorted(self.head_norm.items()):
            out[f"blk.{layer}.attn_output.head_norm"] = np.asarray(v, dtype=np.float32)
        return out


def write_profile(profile: UsageProfile, out_dir: str | Path) -> Path:
    """Write ``usage.safetensors``, ``usage.json`` and ``imatrix.gguf`` into ``out_dir``.

    Everything goes into a temporary folder beside ``out_dir``, renamed onto it at the end, so
    a killed run leaves no half-written profile. An existing ``out_dir`` is replaced only when
    it holds nothing but a previous profile's files.
    """
    from safetensors.numpy import save_file

    from birdbone.io.errors import InputError
    from birdbone.io.imatrix import write_imatrix

    out_dir = Path(out_dir)
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise InputError(out_dir, f"output folder {parent} does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or set(os.listdir(out_dir)) - set(PROFILE_FILES)):
        raise InputError(out_dir, "exists and is not a usage profile folder; refusing to replace it")
    with atomic_folder(out_dir, replace=True) as tmp:
        save_file(profile.arrays(), str(tmp / "usage.safetensors"), metadata={"birdbone.usage.version": str(profile.version)})
        (tmp / "usage.json").write_text(json.dumps(profile.summary(), indent=1) + "\n", encoding="utf-8")
        sums = {k: v[None, :] for k, v in profile.in_sum2.items()}
        counts = {k: np.array([[c]], dtype=np.float32) for k, c in profile.counts.items()}
        write_imatrix(tmp / "imatrix.gguf", sums, counts, [profile.text_name], profile.chunks, profile.ctx)
    return out_dir



def read_profile(folder: str | Path) -> UsageProfile:
    """A profile folder written by :func:`write_profile`, back as a :class:`UsageProfile`."""
    from safetensors import safe_open

    from birdbone.io.errors import InputError

    folder = Path(folder)
    path, summary = folder / "usage.safetensors", folder / "usage.json"
    if not path.exists() or not summary.exists():
        raise InputError(folder, "not a usage profile folder (usage.safetensors and usage.json expected)")
    note_folder_files(folder)  # its imatrix.gguf too: a plan made from it names it
    s = read_json(summary, "usage summary")
    prof = UsageProfile(s["model"], s["text"], s["tokens"], s["ctx"], s["chunks"], s["eps"], version=s["version"])
    with safe_open(str(path), "numpy") as f:
        for key in f.keys():
            name, kind = key.rsplit(".", 1)
            arr = f.get_tensor(key)
            if kind == "in_sum2":
                prof.in_sum2[name] = arr
            elif kind == "counts":
                prof.counts[name] = int(arr[0])
            elif kind == "act_freq":
                prof.act_freq[name] = arr
            elif kind == "grad_abs":
                prof.grad_abs[name] = arr
            elif kind == "in_sum":
                prof.in_sum[name] = arr
            elif kind == "head_norm":
                prof.head_norm[int(name.split(".")[1])] = arr
    return prof
