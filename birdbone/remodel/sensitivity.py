"""How much a model minds one tensor being quantized: a first-order screen and an exact check.

The precision budget needs, for every (tensor, type) pair, how much the loss rises when that
tensor alone is stored in that type. Measuring it exactly costs one evaluation per pair, so
:class:`Sensitivity` screens every pair with the diagonal empirical Fisher from a few backward
passes — ΔL ≈ ½ Σ F ⊙ (Q(W) − W)², the quantization error from llama.cpp's own quantizer (with the
importance matrix, as the export will use it) — and checks exactly, in torch on a held-out
slice, only the pairs the screen puts on top.

Everything is keyed by GGUF tensor name and kept in llama.cpp's row order (q/k permuted), so
quantization blocks are the rows the export will quantize.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from birdbone.io.errors import BirdboneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityConfig:
    passes: int = 16  # backward passes for the Fisher diagonal (one window each)
    seq: int = 128  # tokens per backward pass
    val_tokens: int = 2048  # held-out tokens for the exact check (the text's last ones)
    val_ctx: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.passes < 1 or self.seq < 8 or self.val_tokens < self.val_ctx or self.val_ctx < 16:
            raise ValueError("passes ≥ 1, seq ≥ 8 and val_tokens ≥ val_ctx ≥ 16")


@dataclass
class Sensitivity:
    """Per GGUF weight: the Fisher diagonal, the weight itself (GGUF rows) and its imatrix row."""

    lm: object  # the float torch model, for exact checks
    arch: str
    base_loss: float  # mean next-token loss on the validation slice, float weights
    val: np.ndarray  # (windows, val_ctx + 1) validation tokens
    fisher: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    importance: dict[str, np.ndarray | None]
    _est: dict[tuple[str, str], float] = field(default_factory=dict)
    _exact: dict[tuple[str, str], float] = field(default_factory=dict)

    def grad_rms(self) -> dict[str, float]:
        """Root mean square gradient per tensor (per element, so size alone does not make it stand out)."""
        return {n: float(np.sqrt(f.mean())) for n, f in self.fisher.items()}

    def quantized(self, name: str, type_name: str) -> np.ndarray:
        from birdbone.io.quantize import quantize_tensor

        return quantize_tensor(self.weights[name], type_name, self.importance.get(name), name=name).dequantize()

    def estimate(self, name: str, type_name: str) -> float:
        """½ Σ F ⊙ (Q(W) − W)², relative to the base loss (a screen, not a calibrated loss)."""
        key = (name, type_name)
        if key not in self._est:
            err = self.quantized(name, type_name) - self.weights[name]
            self._est[key] = float(0.5 * np.sum(self.fisher[name] * err * err, dtype=np.float64)) / max(self.base_loss, 1e-12)
        return self._est[key]

    def exact(self, name: str, type_name: str) -> float:
        """The validation loss's relative rise with this tensor alone stored as ``type_name`` (torch)."""
        key = (name, type_name)
        if key not in self._exact:
            param = _parameters(self.lm, self.arch)[name]
            saved = param.data.clone()
            try:
                param.data = _from_gguf_rows(self.lm, name, self.quantized(name, type_name), self.arch, saved)
                self._exact[key] = held_out_loss(self.lm, self.val) / self.base_loss - 1.0
            finally:
                param.data = saved
        return self._exact[key]


def _parameters(lm, arch: str) -> dict:
    """GGUF name -> the torch parameter behind it (tied weights appear once, under their first name)."""
    from birdbone.bridge.names import gguf_matrices

    return gguf_matrices(lm, arch)


def _from_gguf_rows(lm, name: str, w: np.ndarray, arch: str, like):
    import torch

    from birdbone.remodel.heal import to_hf_rows

    return torch.from_numpy(np.ascontiguousarray(to_hf_rows(lm, name, w, arch))).to(like.dtype)


def held_out_loss(lm, windows: np.ndarray) -> float:
    """Mean next-token loss of a torch model over (n, ctx + 1) token windows."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        for x in windows:
            t = torch.from_numpy(x[None, :])
            logits = lm(input_ids=t[:, :-1]).logits.float()
            total += float(F.cross_entropy(logits[0], t[0, 1:]))
    return total / len(windows)


def held_out_split(tokens: np.ndarray, val_tokens: int, val_ctx: int, min_train: int) -> tuple[np.ndarray, np.ndarray]:
    """The text's tokens less the last ``val_tokens``, and those as (n, val_ctx + 1) windows."""
    if len(tokens) < val_tokens + min_train:
        raise BirdboneError(f"the text has {len(tokens)} tokens; at least {val_tokens + min_train} are needed "
                            f"({val_tokens} held out, {min_train} to train on)")
    train, held = tokens[:-val_tokens], tokens[-val_tokens:]
    n_val = len(held) // (val_ctx + 1)
    if n_val < 1:
        raise BirdboneError(f"{val_tokens} held-out tokens make no window of {val_ctx + 1}")
    return train, held[: n_val * (val_ctx + 1)].reshape(n_val, val_ctx + 1).astype(np.int64)


def measure_sensitivity(source, tokens: np.ndarray, names: list[str], importance: dict[str, np.ndarray | None],
                        cfg: SensitivityConfig, progress: Callable[[str, int, int], None] | None = None) -> Sensitivity:
    """Load ``source`` (a float GGUF) in torch, hold out the last ``val_tokens`` of ``tokens`` and
    accumulate the Fisher diagonal of ``names`` over ``passes`` random windows of the rest."""
    import torch
    import torch.nn.functional as F

    from birdbone.bridge import load_causal_lm
    from birdbone.io.model_file import open_model
    from birdbone.remodel.heal import to_gguf_rows, token_batches

    train, val = held_out_split(tokens, cfg.val_tokens, cfg.val_ctx, cfg.seq + 2)

    with open_model(source) as m:
        arch = m.architecture
        weights = {n: m.tensor(n).astype(np.float32) for n in names}
    lm = load_causal_lm(source)
    lm.eval()
    params = _parameters(lm, arch)
    missing = [n for n in names if n not in params]
    if missing:
        raise BirdboneError(f"the torch model has no parameter for {missing[:3]}")
    for p in lm.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    batches = token_batches(train, 1, cfg.seq, cfg.seed)
    for i in range(cfg.passes):
        x = torch.from_numpy(next(batches))
        for n in names:
            params[n].grad = None
        logits = lm(input_ids=x[:, :-1]).logits.float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        for n in names:
            fisher[n] += params[n].grad.float() ** 2
        if progress:
            progress("gradients", i + 1, cfg.passes)
    for n in names:
        params[n].grad = None
        params[n].requires_grad_(False)
    fisher_np = {n: to_gguf_rows(lm, n, (f / cfg.passes).numpy(), arch) for n, f in fisher.items()}
    base = held_out_loss(lm, val)
    return Sensitivity(lm, arch, base, val, fisher_np, weights, dict(importance))
