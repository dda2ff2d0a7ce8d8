"""The low-rank scaffold: rebuild matrices rank by rank from their top singular triplets, keep
only the large part of what the scaffold misses, heal, and merge back into dense weights.

Per chosen matrix W (GGUF rows), activation-aware: the SVD is taken of W·diag(a), a the input
channels' RMS activation from ``profile``, and diag(a) is undone on the right factor, so the
triplets rank directions by what the model actually feeds them. Step k = 1..R sets

    W ← W_k + R_k ⊙ [|R_k| > t_k],   W_k = Σ_{i≤k} σ_i u_i v_iᵀ,  R_k = W − W_k,

with t_k relative to the residual itself (``c``·RMS(R_k), or a quantile of |R_k|): a threshold
of 0.1 σ₁ per element, read literally, keeps nothing, since σ₁ is far above any single weight.
When the held-out loss rises more than the stop-loss, t is halved (more residual kept) and the
step redone. Then one *synergy bundle* is micro-healed with masked LoRA on Remodel's taper
(E_k steps at lr_k): the (tensor, rank-i) components of each family of same-shaped tensors are
clustered by their singular-vector profiles into M bundles, and step k heals the modules owning
a component of bundle (k − 1) mod M. At export, scaffold, kept residual and healing deltas merge
into dense weights ("quantize + low-rank merge"): a GGUF llama.cpp runs, in any type.

Nothing here assumes the scaffold helps: ``birdbone scaffold --eval`` and the budget benchmark
measure ppl at the same export type with and without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from birdbone.io.inputs import note_input
from birdbone.io.errors import BirdboneError
from birdbone.remodel.config import ScaffoldConfig
from birdbone.io.progress import Progress, tick

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Triplets:
    """The top singular triplets of W·diag(a), with diag(a) undone on ``vt``: W_k = (u[:, :k]·s[:k]) @ vt[:k]."""

    u: np.ndarray  # (n_out, R)
    s: np.ndarray  # (R,)
    vt: np.ndarray  # (R, n_in), in W's own input space
    energy: float  # Σ σ² over all ranks of the scaled matrix

    def explained(self, k: int) -> float:
        """Share of the (activation-scaled) matrix's energy the first k triplets carry."""
        return float(np.sum(self.s[:k].astype(np.float64) ** 2) / self.energy) if self.energy > 0 else 1.0

    def low_rank(self, k: int) -> np.ndarray:
        return ((self.u[:, :k] * self.s[:k]) @ self.vt[:k]).astype(np.float32)


def triplets(w: np.ndarray, rank: int, importance: np.ndarray | None = None) -> Triplets:
    """SVD of W·diag(a) (a = √importance, the input channels' RMS activation; ones when None)."""
    a = np.ones(w.shape[1]) if importance is None else np.sqrt(np.maximum(importance.astype(np.float64), 0.0)) + 1e-8
    u, s, vt = np.linalg.svd(w.astype(np.float64) * a, full_matrices=False)
    return Triplets(u[:, :rank], s[:rank], vt[:rank] / a, float(np.sum(s ** 2)))


def residual_threshold(r: np.ndarray, cfg: ScaffoldConfig, scale: float = 1.0) -> float:
    if cfg.keep == "rms":
        t = cfg.c * float(np.sqrt(np.mean(r.astype(np.float64) ** 2)))
    else:
        t = float(np.quantile(np.abs(r), cfg.quantile))
    return t * scale


def scaffolded(w: np.ndarray, t: Triplets, k: int, cfg: ScaffoldConfig, scale: float = 1.0) -> tuple[np.ndarray, float]:
    """W_k + R_k ⊙ [|R_k| > threshold], and the share of residual entries kept."""
    wk = t.low_rank(k)
    r = w.astype(np.float32) - wk
    keep = np.abs(r) > residual_threshold(r, cfg, scale)
    return (wk + np.where(keep, r, np.float32(0))).astype(np.float32), float(keep.mean())


def kmeans(x: np.ndarray, m: int, seed: int, iters: int = 50) -> np.ndarray:
    """Labels of Lloyd's k-means with k-means++ seeding (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    m = min(m, len(x))
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, m):
        d2 = np.min([np.sum((x - c) ** 2, axis=1) for c in centers], axis=0)
        centers.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
    c = np.array(centers)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        new = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        if np.array_equal(new, labels) and _ > 0:
            break
        labels = new
        for j in range(m):
            if np.any(labels == j):
                c[j] = x[labels == j].mean(0)
    return labels


def family(name: str) -> str:
    """``blk.7.attn_q.weight`` -> ``attn_q.weight``: tensors of one family share a shape across layers."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name


def synergy_bundles(trips: dict[str, Triplets], m: int, seed: int) -> dict[str, set[int]]:
    """Per tensor, the bundles (0..m-1) its components fall in. Components of one family are
    clustered by their profile [|u_i|; |v_i|] (unit norm; the absolute value drops the sign SVD
    leaves free)."""
    out: dict[str, set[int]] = {n: set() for n in trips}
    fams: dict[tuple, list[str]] = {}
    for n, t in trips.items():
        fams.setdefault((family(n), t.u.shape[0], t.vt.shape[1]), []).append(n)
    for names in fams.values():
        comps, owners = [], []
        for n in names:
            t = trips[n]
            for i in range(len(t.s)):
                p = np.concatenate([np.abs(t.u[:, i]), np.abs(t.vt[i]) / max(np.linalg.norm(t.vt[i]), 1e-30)])
                comps.append(p / max(np.linalg.norm(p), 1e-30))
                owners.append(n)
        labels = kmeans(np.array(comps), m, seed)
        for n, lab in zip(owners, labels):
            out[n].add(int(lab))
    return out


# -- the loop ---------------------------------------------------------------------------------------
@dataclass
class ScaffoldResult:
    weights: dict[str, np.ndarray]  # final dense weights (GGUF rows), merged
    steps: list[dict]
    tensors: dict[str, dict]  # per tensor: explained variance at R, residual kept, bundles
    base_loss: float
    seconds: float


def run_scaffold(source: Path, usage, tokens: np.ndarray, cfg: ScaffoldConfig, layers: set[int] | None = None,
                 progress: Progress | None = None) -> ScaffoldResult:
    """Scaffold the chosen matrices of the float GGUF ``source`` rank by rank, healing one bundle per step."""
    from birdbone.bridge import load_causal_lm
    from birdbone.io.model_file import open_model
    from birdbone.remodel.heal import heal, set_weights
    from birdbone.remodel.history import lora_product
    from birdbone.remodel.prune import layer_of, prunable
    from birdbone.remodel.sensitivity import held_out_split, held_out_loss

    t_start = time.time()
    train, val = held_out_split(tokens, cfg.val_tokens, cfg.val_ctx, cfg.heal.seq + 2)
    with open_model(source) as m:
        arch = m.architecture
        names = [n for n in prunable(m, cfg.roles) if layers is None or layer_of(n) in layers]
        if not names:
            raise BirdboneError("no matrix matches the selection (roles and layers)")
        weights = {n: m.tensor(n).astype(np.float32) for n in names}
    trips = {}
    for j, n in enumerate(names):
        imp = usage.importance(n) if cfg.activation_aware and usage is not None and n in usage.in_sum2 else None
        trips[n] = triplets(weights[n], cfg.rank, imp)
        if progress:
            progress("singular triplets", j + 1, len(names))
    bundle_of = synergy_bundles(trips, cfg.bundles, cfg.seed)
    lm = load_causal_lm(source)
    lm.eval()
    ones = {n: np.ones(weights[n].shape, dtype=bool) for n in names}
    base_loss = held_out_loss(lm, val)
    delta = {n: np.zeros_like(w) for n, w in weights.items()}
    scale, steps, kept = 1.0, [], {}
    for k in range(1, cfg.rank + 1):
        for attempt in range(cfg.max_halvings + 1):
            current = {}
            for n in names:
                current[n], kept[n] = scaffolded(weights[n], trips[n], k, cfg, scale)
            set_weights(lm, {n: (current[n] + delta[n], ones[n]) for n in names}, arch)
            rise = 100.0 * (held_out_loss(lm, val) / base_loss - 1.0)
            if rise <= cfg.stop_loss_pct or attempt == cfg.max_halvings:
                break
            log.info("step %d: held-out loss %+.2f %% > stop-loss %.1f %%: residual threshold halved", k, rise, cfg.stop_loss_pct)
            scale /= 2.0
        bundle = (k - 1) % cfg.bundles
        healed_names = [n for n in names if bundle in bundle_of[n]]
        hcfg = cfg.heal.for_wave(k, cfg.rank)
        after = rise
        if cfg.heal.steps > 0 and healed_names:
            cb = tick(progress, f"step {k}: healing bundle {bundle}")
            res = heal(lm, healed_names, train, hcfg, arch=arch, progress=cb)
            for n, (a, b, s) in res.lora.items():
                delta[n] = (delta[n] + lora_product(a, b, s)).astype(np.float32)
            set_weights(lm, {n: (current[n] + delta[n], ones[n]) for n in healed_names}, arch)
            after = 100.0 * (held_out_loss(lm, val) / base_loss - 1.0)
        steps.append({"step": k, "threshold_scale": scale, "loss_rise_pct": rise, "after_heal_pct": after, "bundle": bundle,
                      "healed": len(healed_names), "heal_steps": hcfg.steps if healed_names and cfg.heal.steps else 0,
                      "mean_explained": float(np.mean([trips[n].explained(k) for n in names])),
                      "mean_residual_kept": float(np.mean(list(kept.values())))})
        log.info("step %d: rank %d, residual kept %.1f %%, held-out loss %+.2f %% → %+.2f %% after healing bundle %d",
                 k, k, 100 * steps[-1]["mean_residual_kept"], rise, after, bundle)
        if progress:
            progress("scaffold steps", k, cfg.rank)
    final = {n: (current[n] + delta[n]).astype(np.float32) for n in names}
    tensors = {n: {"explained": trips[n].explained(cfg.rank), "residual_kept": kept[n], "bundles": sorted(bundle_of[n]),
                   "relative_change": float(np.linalg.norm(final[n] - weights[n]) / max(np.linalg.norm(weights[n]), 1e-30))}
               for n in names}
    return ScaffoldResult(final, steps, tensors, base_loss, time.time() - t_start)


@dataclass
class ScaffoldReport:
    out: Path
    type: str
    source: Path
    config: dict
    result: ScaffoldResult
    evaluations: dict = field(default_factory=dict)  # label -> EvalReport (scaffolded, and the plain model in the same type)

    @property
    def tensors(self) -> dict:
        return self.result.tensors

    @property
    def steps(self) -> list[dict]:
        return self.result.steps

    def as_dict(self) -> dict:
        d = {"out": str(self.out), "type": self.type, "source": str(self.source), "config": self.config, "steps": self.result.steps,
             "tensors": self.result.tensors, "seconds": self.result.seconds}
        if self.evaluations:
            d["eval"] = {label: e.as_dict() for label, e in self.evaluations.items()}
        return d

    def render(self) -> list:
        from birdbone.io.report import Line, Table

        table = Table(["step = rank", "threshold ×", "residual kept", "explained", "held-out loss", "after healing", "bundle"],
                      title="scaffold steps (torch, held-out text)")
        for st in self.result.steps:
            table.add(st["step"], f"{st['threshold_scale']:g}", f"{100 * st['mean_residual_kept']:.1f} %", f"{100 * st['mean_explained']:.1f} %",
                      f"{st['loss_rise_pct']:+.2f} %", f"{st['after_heal_pct']:+.2f} %", st["bundle"])
        blocks = [table, Line(f"wrote {self.out} ({self.type}); {len(self.result.tensors)} matrices, {self.result.seconds:.0f} s")]
        for label, e in self.evaluations.items():
            blocks += [Line(label, "bold"), *e.render()]
        return blocks


def scaffold_model(model: str | Path, out: str | Path, cfg: ScaffoldConfig = ScaffoldConfig(), text: str | Path | None = None,
                   usage: str | Path | None = None, layers: str | None = None, out_type: str = "F16", evaluate_after: bool = False,
                   progress: Progress | None = None) -> ScaffoldReport:
    """``birdbone scaffold``: scaffold the float form of ``model`` and export it; with ``evaluate_after``,
    score it in llama.cpp against the float parent, beside the unscaffolded model in the same type."""
    note_input(text)  # known before any output is written, so none lands on them
    from gguf.constants import GGUFValueType

    from birdbone.anatomy.selection import parse_layers
    from birdbone.io.config import config_dict
    from birdbone.io.float_form import float_source
    from birdbone.io.model_file import open_model
    from birdbone.io.runtime import tokenize_texts
    from birdbone.io.text import load_text
    from birdbone.remodel.rewrite import export_weights

    out = Path(out)
    source, _ = float_source(model, progress)
    if usage is not None:
        from birdbone.measure.usage import read_profile

        prof = read_profile(usage)
    elif cfg.activation_aware:
        from birdbone.measure import profile

        prof = profile(source, text, 4096, 512, progress=progress)
    else:
        prof = None
    tokens, = tokenize_texts(source, load_text(text)[0])
    with open_model(source) as m:
        n_layers = int(m.meta(f"{m.architecture}.block_count", 0) or 0)
    res = run_scaffold(source, prof, tokens, cfg, parse_layers(layers, n_layers), progress)
    with open_model(source) as m:
        export_weights(m, out, res.weights, out_type, {"birdbone.scaffold.rank": (cfg.rank, GGUFValueType.UINT32, None)},
                       progress=tick(progress, "export"))
    report = ScaffoldReport(out, out_type, source, config_dict(cfg), res)
    if evaluate_after:
        report.evaluations = judge_beside_plain(out, source, out_type, progress)
    return report


def judge_beside_plain(out: Path, source: Path, out_type: str, progress: Progress | None) -> dict:
    """The scaffolded file against the float parent, and (for a quantized type) the unscaffolded parent in that type."""
    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.quantize import quantize_file

    cfg = EvalConfig(decode=0, canary_tokens=0)
    evaluations = {"scaffolded": evaluate(out, source, None, cfg, progress)}
    if out_type.upper() not in ("F16", "F32"):
        plain = out.with_name(out.stem + ".plain.gguf")
        quantize_file(source, plain, out_type)
        evaluations[f"plain {out_type}"] = evaluate(plain, source, None, cfg, progress)
        plain.unlink()
    return evaluations
