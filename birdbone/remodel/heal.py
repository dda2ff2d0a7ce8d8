"""Healing: LoRA through ``peft`` on masked linear layers, so pruned weights stay exactly zero.

A pruned layer becomes a :class:`MaskedLinear` (an ``nn.Linear`` whose weight is multiplied by a
fixed bool mask). peft's stock LoRA adds B·A densely, which would bring pruned weights back the
moment the delta is merged; :class:`MaskedLoraLinear` (registered with peft's custom-module hook)
instead computes ``F.linear(x, (W + s·B·A) ⊙ M)``, so what heals is exactly what will be
exported. The base weights never receive gradients; :func:`heal` returns each module's LoRA
factors for the :class:`~birdbone.remodel.history.DeltaHistory` and leaves the model as it found it.

Names: the history works in GGUF names and llama.cpp's row order; torch modules use Hugging
Face names and order (q/k rows permuted, :func:`birdbone.bridge.names.permute_qk`).
:func:`gguf_modules` maps one to the other and :func:`to_hf_rows` / :func:`to_gguf_rows` move
masks and B factors between the two orders (a row permutation, so LoRA factors stay exact).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from birdbone.io.families import family_of_lm
from birdbone.bridge.names import gguf_linears, permute_qk, qk_rows, unpermute_qk
from birdbone.io.errors import BirdboneError
from birdbone.remodel.config import HealConfig
from birdbone.io.progress import Progress, tick

log = logging.getLogger(__name__)


@dataclass
class HealResult:
    losses: list[float] = field(default_factory=list)
    lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)  # GGUF name -> (A, B, scale), GGUF rows


# -- names and row order ------------------------------------------------------------------------------
def gguf_arch(lm, arch: str | None) -> str:
    """The GGUF architecture whose names a model's weights go by: given, or its family's (a
    default of "llama" once gave a phi3 model the wrong names)."""
    return arch or family_of_lm(lm).arch


def gguf_modules(lm, arch: str | None = None) -> dict[str, str]:
    """GGUF weight name -> Hugging Face module name, for every linear layer of the model."""
    return {g: mod_name for g, (mod_name, _) in gguf_linears(lm, gguf_arch(lm, arch)).items()}


def to_hf_rows(lm, name: str, rows: np.ndarray, arch: str | None = None) -> np.ndarray:
    heads = qk_rows(lm, gguf_arch(lm, arch), name)
    return unpermute_qk(rows, *heads) if heads else rows


def to_gguf_rows(lm, name: str, rows: np.ndarray, arch: str | None = None) -> np.ndarray:
    heads = qk_rows(lm, gguf_arch(lm, arch), name)
    return permute_qk(rows, *heads) if heads else rows


# -- masked layers ------------------------------------------------------------------------------------
class MaskedLinear(torch.nn.Linear):
    """A frozen linear layer whose pruned weights are exactly zero (weight ⊙ mask).

    With ``capture`` set, the masked weight enters the forward pass as a fresh leaf tensor, so a
    backward pass leaves the *dense* gradient ∂L/∂(W ⊙ M) in ``captured.grad`` — pruned positions
    included, which RigL needs to choose what to regrow."""

    capture = False

    def forward(self, x):
        w = self.weight * self.mask
        if self.capture:
            self.captured = w.detach().requires_grad_(True)
            w = self.captured
        return F.linear(x, w, self.bias)


class MaskedLoraLinear(LoraLinear):
    """LoRA whose delta is masked too: y = x · ((W + s·B·A) ⊙ M)ᵀ."""

    def forward(self, x, *args, **kwargs):
        base = self.get_base_layer()
        if self.disable_adapters or self.merged:
            return base(x)
        w = base.weight
        for name in self.active_adapters:
            if name in self.lora_A:
                w = w + self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
        return F.linear(x, w * base.mask, base.bias)


def set_weights(lm, weights: dict[str, tuple[np.ndarray, np.ndarray]], arch: str | None = None) -> None:
    """Load (weights, mask) per GGUF name (llama.cpp row order) into the model's linear layers,
    turning each into a MaskedLinear. Other layers are left alone."""
    modules = gguf_modules(lm, arch)
    missing = [n for n in weights if n not in modules]
    if missing:
        raise BirdboneError(f"the torch model has no linear layer for {missing[:3]}")
    for name, (w, m) in weights.items():
        parent_name, _, child = modules[name].rpartition(".")
        parent = lm.get_submodule(parent_name)
        old = getattr(parent, child)
        w_hf = torch.from_numpy(np.array(to_hf_rows(lm, name, w, arch), dtype=np.float32))  # a copy torch may own
        m_hf = torch.from_numpy(np.array(to_hf_rows(lm, name, m, arch), dtype=bool))
        if tuple(w_hf.shape) != tuple(old.weight.shape):
            raise BirdboneError(f"{name}: weights {tuple(w.shape)} do not fit the layer's {tuple(old.weight.shape)}")
        if not isinstance(old, MaskedLinear):
            new = MaskedLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
            new.weight = torch.nn.Parameter(w_hf, requires_grad=False)
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            new.register_buffer("mask", m_hf)
            setattr(parent, child, new)
        else:
            old.weight.data = w_hf
            old.mask = m_hf


# -- data -----------------------------------------------------------------------------------------------
def token_batches(tokens: np.ndarray, batch: int, seq: int, seed: int) -> Iterator[np.ndarray]:
    """Endless random windows of seq + 1 tokens, (batch, seq + 1) int64, from a seeded generator."""
    if len(tokens) < seq + 2:
        raise BirdboneError(f"the text has {len(tokens)} tokens, too few for one window of {seq + 1}")
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
        yield np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64)


def dense_gradients(lm, names: list[str], x: np.ndarray, arch: str | None = None) -> dict[str, np.ndarray]:
    """∂L/∂W for the MaskedLinear layers ``names`` (GGUF names and row order) on one batch ``x``
    of (batch, seq + 1) tokens, dense: pruned positions get their gradient too."""
    modules = gguf_modules(lm, arch)
    layers = {n: lm.get_submodule(modules[n]) for n in names}
    for layer in layers.values():
        layer.capture = True
    try:
        t = torch.from_numpy(x)
        logits = lm(input_ids=t[:, :-1]).logits.float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1)).backward()
        return {n: to_gguf_rows(lm, n, layer.captured.grad.numpy().astype(np.float32), arch) for n, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.capture = False
            layer.captured = None


def hidden_states(lm, x: np.ndarray) -> list[np.ndarray]:
    """The output of every decoder layer on tokens ``x`` (batch, seq), float32."""
    with torch.no_grad():
        out = lm(input_ids=torch.from_numpy(x), output_hidden_states=True)
    return [h.float().numpy() for h in out.hidden_states[1:]]


def own_errors(states: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    """Per layer, the relative output error it adds: e_i − e_{i−1} (≥ 0), with
    e_i = ‖h_i − h_i⁰‖² / ‖h_i⁰‖² against the unpruned model's outputs h⁰ on the same tokens."""
    e = np.array([float(((h - r) ** 2).sum() / max(float((r ** 2).sum()), 1e-30)) for h, r in zip(states, reference)])
    return np.maximum(np.diff(e, prepend=0.0), 0.0)


def merge_factors(first: tuple[np.ndarray, np.ndarray, float] | None, second: tuple[np.ndarray, np.ndarray, float]
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Two LoRA deltas of one weight as one: A stacked, B side by side with each scale folded in,
    so B·A = s₁B₁A₁ + s₂B₂A₂ (scale 1)."""
    if first is None:
        return second
    (a1, b1, s1), (a2, b2, s2) = first, second
    return np.vstack([a1, a2]), np.hstack([np.float32(s1) * b1, np.float32(s2) * b2]).astype(np.float32), 1.0


# -- healing --------------------------------------------------------------------------------------------
def heal(lm, names: list[str], tokens: np.ndarray, cfg: HealConfig, parent_logits: Callable | None = None,
         arch: str | None = None, progress: Callable[[int, int], None] | None = None) -> HealResult:
    """Train rank-``cfg.rank`` masked LoRA on the MaskedLinear layers ``names`` (GGUF names) for
    ``cfg.steps`` steps of next-token cross-entropy (+ ``kd_weight`` · KL to ``parent_logits(x)``).
    Returns the losses and the factors in GGUF row order; the model is left without adapters."""
    from peft import LoraConfig, get_peft_model

    modules = gguf_modules(lm, arch)
    for n in names:
        if n not in modules or not isinstance(lm.get_submodule(modules[n]), MaskedLinear):
            raise BirdboneError(f"{n}: not a masked layer (call set_weights first)")
    if cfg.kd_weight > 0 and parent_logits is None:
        raise BirdboneError("kd_weight > 0 needs the parent's logits")
    torch.manual_seed(cfg.seed)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                        target_modules=[modules[n] for n in names])
    config._register_custom_module({MaskedLinear: MaskedLoraLinear})
    for p in lm.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method that transformers 5 renamed; harmless
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(lm, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    result = HealResult()
    data = token_batches(tokens, cfg.batch, cfg.seq, cfg.seed)
    model.train()
    try:
        for step in range(cfg.steps):
            x = torch.from_numpy(next(data))
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            if cfg.kd_weight > 0:
                with torch.no_grad():
                    target = F.log_softmax(parent_logits(x[:, :-1]).float(), dim=-1)
                kl = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean") / logits.shape[1]
                loss = loss + cfg.kd_weight * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            if progress:
                progress(step + 1, cfg.steps)
        for n in names:
            layer = model.base_model.model.get_submodule(modules[n])
            a = layer.lora_A["default"].weight.detach().numpy().astype(np.float32)
            b = layer.lora_B["default"].weight.detach().numpy().astype(np.float32)
            result.lora[n] = (a, to_gguf_rows(lm, n, b, arch), float(layer.scaling["default"]))
    finally:
        model.eval()
        model.base_model.unload()  # back to the MaskedLinear layers, nothing merged
    return result


def heal_quantized(source, types: dict[str, str], tokens, cfg, importance: dict[str, np.ndarray] | None = None,
                   roles: tuple[str, ...] = ("skeleton", "organ"), progress: Progress | None = None) -> dict[str, np.ndarray]:
    """A QLoRA-style healing pass for any per-tensor typing (a plan, or the types a llama.cpp mix
    writes): masked LoRA on the linear layers is trained against the base fake-quantized to each
    tensor's type (with its imatrix row), then merged into the float weights, which the caller
    quantizes with the same types again. Returns the merged weights (GGUF names and rows)."""
    from birdbone.bridge import load_causal_lm
    from birdbone.io.model_file import open_model
    from birdbone.remodel.heal import heal, set_weights
    from birdbone.remodel.history import lora_product
    from birdbone.remodel.prune import fake_quantize, prunable

    importance = importance or {}
    with open_model(source) as m:
        arch = m.architecture
        names = [n for n in prunable(m, roles) if n in types]
        weights = {n: m.tensor(n).astype(np.float32) for n in names}
    lm = load_causal_lm(source)
    lm.eval()
    set_weights(lm, {n: (fake_quantize(w, types[n], n, importance.get(n)), np.ones(w.shape, dtype=bool)) for n, w in weights.items()}, arch)
    cb = tick(progress, "healing against the quantized base")
    res = heal(lm, names, tokens, cfg, arch=arch, progress=cb)
    return {n: (weights[n] + lora_product(*res.lora[n])).astype(np.float32) for n in names}
