"""Structured density loss: score every removable unit, allocate a global target over layers,
and shed the units in waves with healing, so the exported file is smaller and llama.cpp faster.

Three parts, kept apart as FLAP keeps them (scores, allocation, surgery):

* **Scores** (:func:`score_units`), from the source's usage profile (first and second moments of
  every matrix input) and, for the measured kinds, the torch model on calibration windows:

  - FFN channel (a gate/up row with its down column): *activation* (Minitron: the RMS of the
    channel's activation) or *fluctuation* (FLAP: the activation's variance × the down column's
    squared norm: how much the output would move if the channel were replaced by its mean);
  - query head: activation (the mean L2 norm of its slice of the attention output) or fluctuation
    (the same sum over its channels, with ``attn_output``'s columns); *loo* measures the held-in
    loss with the unit masked. A *group* (key/value head with its query heads) and a *qhead*
    packet (one query head from every group of a layer: GQA needs each group to keep as many)
    add up their heads, or are measured;
  - layer: *influence* (ShortGPT: 1 − cos(input, output) of the block) or *loo*;
  - hidden channel (Minitron): the same measures summed over every matrix that reads it.

* **Allocation** (:func:`allocate`): whole layers first (``drop_layers``, lowest layer score),
  the hidden width (``hidden``), then width units ranked globally by their score standardized
  within their kind (FLAP's global search), removed until the kept block parameters reach the
  target; each layer's FFN width is then rounded to ``ffn_multiple`` (32 keeps the legacy
  types' blocks whole, 256 K-quants'). The allocation is non-uniform over layers by construction.

* **Surgery** is :mod:`birdbone.remodel.surgery`: the loop masks the removed units on the
  full-size model (so the existing DeltaHistory records and reverts them bit for bit) and the
  export cuts them out (arch ``llama`` or ``deci``).

The loop (:func:`run_structure`) runs in a run folder of kind ``structure``: each wave removes
at most ``max_wave`` of the remaining block parameters (the removal order: layers, hidden
channels, then width units by standardized score), then heals with masked LoRA distilled from
the parent (``heal.kd_weight``: KL to the source model's logits on calibration batches, beside
cross-entropy), then scores the held-out text; the stop-loss and the ⅓-per-wave rollback are the
bird-bone loop's (:mod:`birdbone.remodel.prune`). ``oneshot`` removes everything in one wave and
heals for the steps all the waves would have had.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birdbone.io.inputs import note_input, read_json
from birdbone.io.atomic import write_text_atomic
from birdbone.io.dims import Dims
from birdbone.io.errors import BirdboneError
from birdbone.io.progress import Progress, tick
from birdbone.remodel.config import StructureConfig
from birdbone.remodel.surgery import Keep, keep_from_masks, unit_masks

log = logging.getLogger(__name__)
WIDTH_KINDS = ("ffn", "qhead", "group")


@dataclass(frozen=True)
class Unit:
    kind: str  # layer | hidden | ffn | group | qhead
    layer: int  # -1 for hidden channels
    index: int  # channel, group, or packet rank (0: the weakest query head of every group)

    def key(self) -> str:
        return f"{self.kind}:{self.layer}:{self.index}"

    @classmethod
    def parse(cls, key: str) -> "Unit":
        kind, layer, index = key.split(":")
        return cls(kind, int(layer), int(index))


# -- applying units to a Keep ---------------------------------------------------------------------
def head_order(head_scores: dict[int, np.ndarray], dims: Dims) -> dict[int, np.ndarray]:
    """Per layer, (groups, heads per group) query-head indices, weakest first within each group."""
    out = {}
    for i in range(dims.n_layer):
        h, kv = dims.n_head[i], dims.n_kv[i]
        if not h:
            continue
        r = h // kv
        s = head_scores[i].reshape(kv, r)
        out[i] = np.argsort(s, axis=1, kind="stable") + np.arange(kv)[:, None] * r
    return out


def remove(keep: Keep, unit: Unit, order: dict[int, np.ndarray]) -> None:
    """Take ``unit`` out of ``keep`` (in place)."""
    i, j = unit.layer, unit.index
    if unit.kind == "layer":
        keep.layers[i] = False
    elif unit.kind == "hidden":
        keep.hidden[j] = False
    elif unit.kind == "ffn":
        keep.ffn[i][j] = False
    elif unit.kind == "group":
        keep.groups[i][j] = False
    elif unit.kind == "qhead":
        keep.heads[i][order[i][:, j]] = False
    else:
        raise BirdboneError(f"unknown unit kind {unit.kind!r}")


def restore(keep: Keep, unit: Unit, order: dict[int, np.ndarray]) -> None:
    """Put ``unit`` back (the inverse of :func:`remove`)."""
    i, j = unit.layer, unit.index
    if unit.kind == "layer":
        keep.layers[i] = True
    elif unit.kind == "hidden":
        keep.hidden[j] = True
    elif unit.kind == "ffn":
        keep.ffn[i][j] = True
    elif unit.kind == "group":
        keep.groups[i][j] = True
        # its heads come back as the other kept groups have theirs: a query-head packet still out stays out
        # (llama.cpp needs as many heads in every group)
        mates = [g for g in np.flatnonzero(keep.groups[i]) if g != j]
        keep.heads[i][order[i][j]] = keep.heads[i][order[i][mates[0]]] if mates else True
    elif unit.kind == "qhead":
        keep.heads[i][order[i][:, j]] = True


def block_params(keep: Keep) -> int:
    d = keep.kept_dims()
    return sum(d.layer_params(i) for i in range(d.n_layer))


def unit_params(dims: Dims, unit: Unit) -> int:
    """Block parameters a unit holds in the full model (the wave sizer's estimate)."""
    e, hd = dims.n_embd, dims.head_dim
    i = unit.layer
    if unit.kind == "layer":
        return dims.layer_params(i)
    if unit.kind == "ffn":
        return 3 * e
    if unit.kind == "group":
        return (2 * dims.n_head[i] // dims.n_kv[i] + 2) * hd * e
    if unit.kind == "qhead":
        return 2 * dims.n_kv[i] * hd * e
    if unit.kind == "hidden":
        return sum(dims.layer_params(k) for k in range(dims.n_layer)) // e
    raise BirdboneError(f"unknown unit kind {unit.kind!r}")


# -- scores -----------------------------------------------------------------------------------------
def _col_norm2(w: np.ndarray) -> np.ndarray:
    return (w.astype(np.float64) ** 2).sum(axis=0)


def width_scores(m, prof, dims: Dims, kind: str) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    """(FFN channel scores per layer, query-head scores per layer, hidden channel scores), by
    ``kind``: activation (Minitron: the RMS of the unit's activation), fluctuation (FLAP: its
    variance × the output column's squared norm) or wanda (Wanda-sp: its mean square × the column's
    squared norm: the expected squared change of the block's output when the unit is zeroed)."""
    ffn, heads, hidden = {}, {}, np.zeros(dims.n_embd)
    hd = dims.head_dim
    moment = prof.variance if kind == "fluctuation" else prof.importance
    for i in range(dims.n_layer):
        down, o = f"blk.{i}.ffn_down.weight", f"blk.{i}.attn_output.weight"
        if kind == "activation":
            ffn[i] = np.sqrt(prof.importance(down))
            if dims.n_head[i]:
                heads[i] = np.asarray(prof.head_norm[i], dtype=np.float64)
            for name in (f"blk.{i}.attn_q.weight", f"blk.{i}.ffn_gate.weight"):
                if name in prof.in_sum2:
                    hidden += np.sqrt(prof.importance(name))
            continue
        ffn[i] = moment(down) * _col_norm2(m.tensor(down))
        if dims.n_head[i]:
            heads[i] = (moment(o) * _col_norm2(m.tensor(o))).reshape(-1, hd).sum(axis=1)
        for reader in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            name, source = f"blk.{i}.{reader}.weight", f"blk.{i}.{'attn_q' if reader.startswith('attn') else 'ffn_gate'}.weight"
            if name in m.tensors and source in prof.in_sum2:
                hidden += moment(source) * _col_norm2(m.tensor(name))
    return ffn, heads, hidden


def measured_loss(lm, windows: np.ndarray) -> float:
    """Mean next-token loss of ``lm`` over (n, ctx + 1) windows."""
    from birdbone.remodel.sensitivity import held_out_loss

    return held_out_loss(lm, windows)


FFN_PROBE = 0.25  # the share of a layer's FFN channels (its weakest, by wanda) whose removal is measured


def loo_scores(lm, base_weights: dict, dims: Dims, units: list[Unit], order: dict, windows: np.ndarray, arch: str,
               progress: Progress | None = None, ffn_order: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """Δloss of each unit masked alone (layers, groups, qhead packets), in the full-size torch model;
    with ``ffn_order`` (per layer, FFN channels weakest first), also ``ffnprobe:i:0``: the Δloss of
    removing layer i's weakest quarter of FFN channels."""
    from birdbone.remodel.heal import set_weights

    everything = Keep.everything(dims)
    full = unit_masks(everything)
    set_weights(lm, {n: (base_weights[n], full[n]) for n in full}, arch)
    base = measured_loss(lm, windows)
    probes = [Unit("ffnprobe", i, 0) for i in sorted(ffn_order or {})]
    out = {}
    for j, u in enumerate([*units, *probes]):
        k = everything.copy()
        if u.kind == "ffnprobe":
            k.ffn[u.layer][ffn_order[u.layer][: int(FFN_PROBE * len(ffn_order[u.layer]))]] = False
        else:
            remove(k, u, order)
        masks = unit_masks(k)
        changed = [n for n in masks if not np.array_equal(masks[n], full[n])]
        set_weights(lm, {n: (base_weights[n], masks[n]) for n in changed}, arch)
        out[u.key()] = measured_loss(lm, windows) - base
        set_weights(lm, {n: (base_weights[n], full[n]) for n in changed}, arch)
        if progress:
            progress("leave-one-out", j + 1, len(units) + len(probes))
    return out


def calibrated_ffn(ffn: dict[int, np.ndarray], probes: dict[int, float], floor: float = 1e-6) -> dict[int, np.ndarray]:
    """FFN channel scores in Δloss: within a layer wanda's proportions, across layers the measured
    Δloss of removing the layer's weakest quarter (so a layer that minds more keeps more)."""
    out = {}
    for i, s in ffn.items():
        weakest = np.sort(s)[: int(FFN_PROBE * len(s))]
        out[i] = s * (max(probes[i], floor) / max(float(weakest.sum()), 1e-30))
    return out


def influence_scores(lm, windows: np.ndarray) -> np.ndarray:
    """ShortGPT's block influence: per layer, 1 − cos(input, output) averaged over tokens."""
    import torch

    sums = None
    n = 0
    with torch.no_grad():
        for x in windows:
            hs = lm(input_ids=torch.from_numpy(x[None, :-1]), output_hidden_states=True).hidden_states
            cos = torch.stack([torch.nn.functional.cosine_similarity(a[0].float(), b[0].float(), dim=-1).mean() for a, b in zip(hs[:-1], hs[1:])])
            sums = (1.0 - cos) if sums is None else sums + (1.0 - cos)
            n += 1
    return (sums / max(n, 1)).numpy().astype(np.float64)


def standardized(values: dict[str, float]) -> dict[str, float]:
    """z-scores within one kind of unit (FLAP standardizes before ranking kinds together)."""
    v = np.array(list(values.values()), dtype=np.float64)
    mu, sd = v.mean(), v.std()
    return {k: (x - mu) / (sd if sd > 0 else 1.0) for k, x in values.items()}


def score_units(source: Path, prof, tokens: np.ndarray, cfg: StructureConfig, progress: Progress | None = None) -> dict:
    """Every unit's score: ``{"units": {key: score}, "kinds": {key: kind}, "head_scores": {layer: list}}``,
    higher meaning more needed. Written to the run folder as it is (``scores.json``)."""
    from birdbone.bridge import load_causal_lm
    from birdbone.io.dims import read_dims
    from birdbone.io.model_file import open_model
    from birdbone.remodel.prune import prunable

    with open_model(source) as m:
        arch, dims = m.architecture, read_dims(m)
        ffn, heads, hidden = width_scores(m, prof, dims, "wanda" if cfg.score == "loo" else cfg.score)
        weights = {n: m.tensor(n).astype(np.float32) for n in prunable(m, ("skeleton", "organ"))}
    order = head_order(heads, dims)
    units: dict[str, float] = {}
    for i in range(dims.n_layer):
        units.update({Unit("ffn", i, j).key(): float(s) for j, s in enumerate(ffn[i])})
        if i in order:
            r = dims.n_head[i] // dims.n_kv[i]
            units.update({Unit("group", i, g).key(): float(heads[i][dims.n_head[i] // dims.n_kv[i] * g:][:r].sum()) for g in range(dims.n_kv[i])})
            units.update({Unit("qhead", i, p).key(): float(heads[i][order[i][:, p]].sum()) for p in range(r - 1)})
    units.update({Unit("hidden", -1, c).key(): float(s) for c, s in enumerate(hidden)})
    need_torch = cfg.score == "loo" or cfg.drop_layers
    if need_torch:
        lm = load_causal_lm(source)
        n = cfg.loo_windows
        usable = (len(tokens) - 1) // (cfg.eval_ctx + 1)
        windows = tokens[: min(n, usable) * (cfg.eval_ctx + 1)].reshape(-1, cfg.eval_ctx + 1).astype(np.int64)
        measured = [Unit("layer", i, 0) for i in range(dims.n_layer)] if cfg.drop_layers and cfg.layer_score == "loo" else []
        ffn_order = None
        if cfg.score == "loo":
            measured += [Unit.parse(k) for k in units if k.startswith(("group:", "qhead:"))]
            ffn_order = {i: np.argsort(ffn[i], kind="stable") for i in ffn} if "ffn" in cfg.units else None
        found = loo_scores(lm, weights, dims, measured, order, windows, arch, progress, ffn_order) if measured or ffn_order else {}
        if ffn_order:
            calibrated = calibrated_ffn(ffn, {i: found.pop(Unit("ffnprobe", i, 0).key()) for i in ffn})
            units.update({Unit("ffn", i, j).key(): float(v) for i, c in calibrated.items() for j, v in enumerate(c)})
        units.update(found)
        if cfg.drop_layers and cfg.layer_score == "influence":
            units.update({Unit("layer", i, 0).key(): float(s) for i, s in enumerate(influence_scores(lm, windows))})
    return {"units": units, "head_scores": {str(i): heads[i].tolist() for i in heads}, "score": cfg.score, "layer_score": cfg.layer_score}


# -- allocation ------------------------------------------------------------------------------------------
def removal_order(scores: dict, dims: Dims, cfg: StructureConfig) -> tuple[Keep, list[Unit]]:
    """The final :class:`Keep` the target asks for and the units it removes, in the order the waves
    take them: layers, hidden channels, then width units by standardized score."""
    units = {Unit.parse(k): v for k, v in scores["units"].items()}
    order = head_order({int(i): np.array(v) for i, v in scores["head_scores"].items()}, dims)
    keep = Keep.everything(dims)
    removed: list[Unit] = []
    layer_units = sorted((u for u in units if u.kind == "layer"), key=lambda u: units[u])
    for u in layer_units[: cfg.drop_layers]:
        remove(keep, u, order)
        removed.append(u)
    if not keep.layers.any():
        raise BirdboneError(f"drop_layers {cfg.drop_layers}: the model has {dims.n_layer} layers; at least one must stay")
    if cfg.hidden:
        if cfg.hidden >= dims.n_embd:
            raise BirdboneError(f"hidden {cfg.hidden}: the model is {dims.n_embd} wide; the target is larger than the model")
        hidden = sorted((u for u in units if u.kind == "hidden"), key=lambda u: units[u])[: dims.n_embd - cfg.hidden]
        for u in hidden:
            remove(keep, u, order)
        removed += hidden
    full = sum(dims.layer_params(i) for i in range(dims.n_layer))
    goal = cfg.target * full
    z = ranking(units, dims, cfg, keep)
    current = block_params(keep)
    for u in sorted(z, key=lambda u: (z[u], u.kind, u.layer, u.index)):
        if current <= goal:
            break
        if not allowed(keep, u, cfg, order):
            continue
        p = unit_params(dims, u)
        if current - p < goal and goal - (current - p) > current - goal:
            continue  # it would overshoot by more than it is missing: a smaller unit fits better
        before = current
        remove(keep, u, order)
        current = block_params(keep) if u.kind != "ffn" else current - 3 * int(keep.hidden.sum())
        if current < before:
            removed.append(u)
    keep, removed = round_ffn(keep, removed, units, cfg)
    if cfg.arch == "llama":
        keep, removed = uniform(keep, removed, units, order, cfg)
    keep.check(None if cfg.arch == "auto" else cfg.arch)
    return keep, removed


def uniform(keep: Keep, removed: list[Unit], units: dict[Unit, float], order: dict, cfg: StructureConfig) -> tuple[Keep, list[Unit]]:
    """The same widths in every kept layer (so arch llama can load the file): each kind keeps the
    mean count the global allocation gave it, per layer its strongest units."""
    k = keep.settled()
    rows = [int(i) for i in np.flatnonzero(k.layers)]
    ff = int(round(np.mean([k.ffn[i].sum() for i in rows]) / cfg.ffn_multiple)) * cfg.ffn_multiple or cfg.ffn_multiple
    groups = max(1, int(round(np.mean([k.groups[i].sum() for i in rows]))))
    per = max(1, int(round(np.mean([k.heads[i].sum() / max(k.groups[i].sum(), 1) for i in rows]))))
    new = Keep.everything(keep.dims)
    new.layers, new.hidden = keep.layers.copy(), keep.hidden.copy()
    out = [u for u in removed if u.kind in ("layer", "hidden")]
    for i in rows:
        for kind, count, n in (("ffn", ff, keep.dims.n_ff[i]), ("group", groups, keep.dims.n_kv[i]),
                               ("qhead", keep.dims.n_head[i] // keep.dims.n_kv[i] - per, 0)):
            if kind == "qhead":
                for p in range(count):
                    remove(new, Unit("qhead", i, p), order)
                    out.append(Unit("qhead", i, p))
                continue
            weakest = sorted(range(n), key=lambda j: units.get(Unit(kind, i, j), 0.0))[: n - count]
            for j in weakest:
                remove(new, Unit(kind, i, j), order)
                out.append(Unit(kind, i, j))
    z = {u: units.get(u, 0.0) for u in out}
    return new, [u for u in out if u.kind in ("layer", "hidden")] + sorted((u for u in out if u.kind not in ("layer", "hidden")), key=lambda u: z[u])


def ranking(units: dict[Unit, float], dims: Dims, cfg: StructureConfig, keep: Keep) -> dict[Unit, float]:
    """Width units, lowest first. Wanda-sp scores are in one unit across kinds (the squared change of
    the block's output) and loo's are all Δloss (heads measured, FFN channels calibrated by their
    layer's measured probe), so both rank by damage per parameter removed (a measured Δloss below
    zero is noise: it counts as almost nothing); the others, which have no common unit, by their
    log standardized within each kind (FLAP's global search; the log,
    because the scores span orders of magnitude and a few large ones would push every other unit of
    their kind below the mean)."""
    pool = {u: s for u, s in units.items() if u.kind in cfg.units and keep.layers[u.layer]}
    if cfg.score in ("wanda", "loo"):
        return {u: max(s, 1e-9 if cfg.score == "loo" else 0.0) / unit_params(dims, u) for u, s in pool.items()}
    out: dict[Unit, float] = {}
    for kind in cfg.units:
        of_kind = {u.key(): math.log(max(s, 1e-30)) for u, s in pool.items() if u.kind == kind}
        out.update({Unit.parse(k): v for k, v in standardized(of_kind).items()} if of_kind else {})
    return out


def allowed(keep: Keep, u: Unit, cfg: StructureConfig, order: dict) -> bool:
    """Whether removing ``u`` leaves widths llama.cpp runs and the configured rounding can hold."""
    i = u.layer
    if not keep.layers[i]:
        return False
    k = keep.settled()
    if u.kind == "ffn":
        return bool(k.ffn[i][u.index]) and int(k.ffn[i].sum()) > cfg.ffn_multiple
    first = int(np.flatnonzero(k.layers)[0])
    if u.kind == "group":
        return bool(k.groups[i][u.index]) and int(k.groups[i].sum()) > (max(cfg.min_groups, 1) if i == first else cfg.min_groups)
    if u.kind == "qhead":
        kept_groups = np.flatnonzero(k.groups[i])
        per_group = int(k.heads[i][k.group_of(i) == kept_groups[0]].sum()) if kept_groups.size else 0
        return per_group > 1 and bool(k.heads[i][order[i][:, u.index]].any())
    return False


def round_ffn(keep: Keep, removed: list[Unit], units: dict[Unit, float], cfg: StructureConfig) -> tuple[Keep, list[Unit]]:
    """Each layer's FFN width to the nearest multiple of ``ffn_multiple``: removed channels with the
    highest scores come back, or the weakest kept ones go."""
    if cfg.ffn_multiple <= 1:
        return keep, removed
    gone = set(removed)
    for i in np.flatnonzero(keep.layers):
        kept = int(keep.ffn[i].sum())
        n = len(keep.ffn[i])
        want = min(n, max(cfg.ffn_multiple, int(round(kept / cfg.ffn_multiple)) * cfg.ffn_multiple))
        channels = sorted(range(n), key=lambda j: units[Unit("ffn", int(i), j)])
        if want > kept:  # give back the strongest removed
            for j in [j for j in reversed(channels) if not keep.ffn[i][j]][: want - kept]:
                keep.ffn[i][j] = True
                gone.discard(Unit("ffn", int(i), j))
        elif want < kept:
            for j in [j for j in channels if keep.ffn[i][j]][: kept - want]:
                keep.ffn[i][j] = False
                gone.add(Unit("ffn", int(i), j))
    ordered = [u for u in removed if u in gone] + sorted((u for u in gone if u not in set(removed)), key=lambda u: units[u])
    return keep, ordered


def waves_of(removed: list[Unit], dims: Dims, cfg: StructureConfig) -> list[list[Unit]]:
    """The removal list cut into waves, each at most ``max_wave`` of the block parameters left."""
    if cfg.oneshot:
        return [removed] if removed else []
    left = float(sum(dims.layer_params(i) for i in range(dims.n_layer)))
    out, current, taken = [], [], 0.0
    for u in removed:
        p = unit_params(dims, u)
        if current and taken + p > cfg.max_wave * left:
            out.append(current)
            left -= taken
            current, taken = [], 0.0
        current.append(u)
        taken += p
    if current:
        out.append(current)
    return out


# -- the loop ----------------------------------------------------------------------------------------------
def run_structure(source: str | Path, run_dir: str | Path, cfg: StructureConfig, text: str | Path | None = None,
                  progress: Progress | None = None, usage: str | Path | None = None):
    """Run (or resume) structured waves with distilled healing until the plan's units are gone or
    the stop-loss ends it; returns the :class:`~birdbone.remodel.prune.Run`."""
    import torch

    from birdbone.bridge import load_causal_lm
    from birdbone.io.dims import read_dims
    from birdbone.io.hashing import file_sha256
    from birdbone.io.model_file import open_model
    from birdbone.io.runtime import tokenize_texts
    from birdbone.remodel.heal import heal, set_weights
    from birdbone.remodel.history import DeltaHistory, WaveDelta, apply_wave, masked
    from birdbone.remodel.prune import Run, _evaluate, advance, prunable

    preflight(source, cfg)
    run = Run(run_dir, source, cfg, text, {"usage_sha256": file_sha256(Path(usage) / "usage.safetensors") if usage else None}, kind="structure")
    if run.state.phase == "done":
        return run
    torch.manual_seed(cfg.seed)
    with open_model(run.source) as m:
        arch, dims = m.architecture, read_dims(m)
        names = prunable(m, ("skeleton", "organ"))
        history = DeltaHistory(run.folder / "history", {n: m.tensors[n].shape for n in names})
        run.drop_uncommitted(history)
        prof = _structure_profile(run, cfg, usage, progress)
        # a long text is cut before it is tokenized (at most ~8 characters a token), then to text_tokens
        calibration = (run.folder / "calibration.txt").read_text(encoding="utf-8")[: 8 * cfg.text_tokens]
        tokens, held = tokenize_texts(run.source, calibration, (run.folder / "heldout.txt").read_text(encoding="utf-8"))
        tokens = tokens[: cfg.text_tokens]
        plan = _plan(run, prof, tokens, dims, cfg, progress)
        waves = [[Unit.parse(k) for k in w] for w in plan["waves"]]
        order = head_order({int(i): np.array(v) for i, v in plan["head_scores"].items()}, dims)
        lm = load_causal_lm(run.source)
        teacher = load_causal_lm(run.source) if cfg.heal.kd_weight > 0 else None
        set_weights(lm, history.state_at(0, m.tensor), arch)
        if run.state.waves == 0 and not run.metrics:
            run.commit({"wave": 0, "phase": "start", "density": 1.0, **_evaluate(lm, run, cfg, progress), "seconds": 0.0})
        base_ppl = run.metrics[0]["ppl"]
        state = history.replay(run.state.waves, m.tensor)
        keep = keep_from_masks(dims, {n: mk for n, (_, mk) in masked(state).items()})
        while run.state.phase != "done":
            k = run.state.waves + 1
            t0 = time.time()
            current = masked(state)
            delta = WaveDelta()
            if run.state.phase == "prune":
                pruned_so_far = sum(1 for w in run.metrics if w.get("units")) if run.metrics else 0
                if pruned_so_far >= len(waves):
                    run.state.phase = "done"
                    run.commit(run.metrics[-1])
                    break
                units = waves[pruned_so_far]
                for u in units:
                    remove(keep, u, order)
            else:  # rollback: a third of the last pruning wave's units back, strongest first
                last = next(w for w in reversed(run.metrics) if w["wave"] == run.state.rollback_of)
                # the units earlier rollback waves of this breach already brought back are not restored twice
                restored = {x for w in run.metrics if w["wave"] > run.state.rollback_of for x in w.get("restored", [])}
                back = sorted((Unit.parse(x) for x in last["units"]), key=lambda u: -plan["scores"].get(u.key(), 0.0))
                units = [u for u in back if u.key() not in restored][: math.ceil(len(back) / cfg.stop_loss.rollback_waves)]
                for u in units:
                    restore(keep, u, order)
            new = unit_masks(keep)
            for n, (w, mk) in current.items():
                if run.state.phase == "prune":
                    gone = mk & ~new[n]
                    if gone.any():
                        delta.pruned[n] = gone
                else:
                    back = new[n] & ~mk
                    if back.any():
                        base_w = m.tensor(n)
                        delta.revived[n], delta.reset[n], delta.values[n] = back, back, base_w[back]
            after = masked(apply_wave(state, delta))
            set_weights(lm, after, arch)
            _mask_embedding(lm, keep)
            touched = sorted(set(delta.pruned) | set(delta.revived))
            hcfg = healing_for(cfg, k)
            teacher_logits = (lambda x: teacher(input_ids=x).logits) if teacher is not None else None
            healed = heal(lm, sorted(set(touched) | {n for n in names if new[n].any()}), tokens, hcfg, teacher_logits, arch,
                          progress=tick(progress, f"heal wave {k}")) if hcfg.steps > 0 else None
            if healed:
                delta.lora = healed.lora
            history.append(delta)
            state = apply_wave(state, delta)
            set_weights(lm, masked(state), arch)
            metrics = _evaluate(lm, run, cfg, progress)
            dppl = 100.0 * (metrics["ppl"] / base_ppl - 1.0)
            breach = dppl > cfg.stop_loss.threshold_pct
            phase = run.state.phase
            advance(run.state, k, breach, cfg.stop_loss)
            d = keep.kept_dims()
            run.commit({"wave": k, "phase": phase, "density": block_params(keep) / max(1, sum(dims.layer_params(i) for i in range(dims.n_layer))),
                        "dppl_pct": dppl, "breach": breach, **metrics, "units": [u.key() for u in units] if phase == "prune" else [],
                        "restored": [u.key() for u in units] if phase != "prune" else [],
                        "widths": {"n_layer": d.n_layer, "n_embd": d.n_embd, "n_head": list(d.n_head), "n_kv": list(d.n_kv), "n_ff": list(d.n_ff)},
                        "heal_steps": len(healed.losses) if healed else 0, "heal_lr": hcfg.lr,
                        "heal_loss_first": healed.losses[0] if healed else None, "heal_loss_last": healed.losses[-1] if healed else None,
                        "heal_losses": healed.losses if healed else [], "history_share": history.size_bytes() / (4 * m.n_params),
                        "seconds": round(time.time() - t0, 1)})
            log.info("structure wave %d (%s): %d units, block params %.3f, ppl %.3f (%+.2f%%)", k, phase, len(units),
                     run.metrics[-1]["density"], metrics["ppl"], dppl)
    return run


def healing_for(cfg: StructureConfig, k: int):
    """Wave k's healing: the bird-bone taper over the waves the target needs, or, one-shot, all of
    their steps in one go (the fair baseline: the same total healing)."""
    from dataclasses import replace

    horizon = max(1, math.ceil(math.log(cfg.target) / math.log(1.0 - cfg.max_wave))) if cfg.target < 1.0 else 1
    if cfg.oneshot:
        total = sum(cfg.heal.for_wave(j, horizon).steps for j in range(1, horizon + 1))
        return replace(cfg.heal, steps=total if cfg.heal.steps else 0, seed=cfg.heal.seed + k)
    return cfg.heal.for_wave(min(k, horizon), horizon)


def preflight(source: str | Path, cfg: StructureConfig) -> Dims:
    """The requests no model of these widths can meet, refused before any work starts."""
    from birdbone.io.dims import read_dims
    from birdbone.io.model_file import open_model

    with open_model(source) as m:
        if m.format != "gguf":
            raise BirdboneError(f"{m.path}: structured pruning works on GGUF files; convert it first (birdbone convert --type F16)")
        dims = read_dims(m)
    if cfg.hidden and cfg.hidden >= dims.n_embd:
        raise BirdboneError(f"hidden {cfg.hidden}: the model is {dims.n_embd} wide; the target is larger than the model")
    if cfg.drop_layers >= dims.n_layer:
        raise BirdboneError(f"drop_layers {cfg.drop_layers}: the model has {dims.n_layer} layers; at least one must stay")
    if cfg.arch == "llama" and "group" in cfg.units and min(dims.n_kv) == 1:
        raise BirdboneError("arch llama with group removal: a layer's last key/value group would take its attention, and llama has no attention-free layers")
    if any(ff % cfg.ffn_multiple for ff in dims.n_ff) and cfg.ffn_multiple > 1:
        log.info("FFN widths %s are not multiples of %d: the rounding will change them", sorted(set(dims.n_ff)), cfg.ffn_multiple)
    return dims


def _mask_embedding(lm, keep: Keep) -> None:
    """Zero the embedding's removed hidden channels (the embedding is not a masked layer)."""
    if keep.hidden.all():
        return
    import torch

    emb = lm.get_input_embeddings()
    with torch.no_grad():
        emb.weight[:, torch.from_numpy(~keep.settled().hidden)] = 0.0


def _structure_profile(run, cfg: StructureConfig, usage, progress):
    """The source's profile with first moments (copied from ``usage`` when it has them, else made here)."""
    import os
    import shutil

    from birdbone.measure import profile, write_profile
    from birdbone.measure.usage import read_profile

    folder = run.folder / "usage"
    if not (folder / "usage.safetensors").exists():
        if usage is not None and read_profile(usage).in_sum:
            tmp = run.folder / f".birdbone-tmp-usage-{os.getpid()}"
            shutil.copytree(usage, tmp)
            os.replace(tmp, folder)
        else:
            prof = profile(run.source, run.folder / "calibration.txt", cfg.calibration_tokens,
                           max(16, min(512, cfg.calibration_tokens // 2)), progress=progress)
            write_profile(prof, folder)
    return read_profile(folder)


def _plan(run, prof, tokens: np.ndarray, dims: Dims, cfg: StructureConfig, progress) -> dict:
    """Scores and the wave plan, computed once and kept in the run folder (``structure.json``)."""
    path = run.folder / "structure.json"
    if not path.exists():
        scores = score_units(run.source, prof, tokens, cfg, progress)
        keep, removed = removal_order(scores, dims, cfg)
        waves = waves_of(removed, dims, cfg)
        data = {"score": cfg.score, "layer_score": cfg.layer_score, "scores": scores["units"], "head_scores": scores["head_scores"],
                "final": keep.as_dict(), "removed": keep.removed(), "waves": [[u.key() for u in w] for w in waves],
                "block_params_kept": block_params(keep) / sum(dims.layer_params(i) for i in range(dims.n_layer))}
        write_text_atomic(path, json.dumps(data) + "\n")
    return read_json(path)


def export_structure(run_dir: str | Path, out: str | Path, wave_k: int | None = None, out_type: str = "F16",
                     progress: Progress | None = None) -> dict:
    """Write the model after structural wave ``wave_k`` (default: the last) with its removed units
    cut out (arch llama or deci); wave 0 is the source, every unit in place."""
    from gguf.constants import GGUFValueType

    from birdbone.io.dims import read_dims
    from birdbone.io.errors import InputError
    from birdbone.io.hashing import file_sha256
    from birdbone.io.model_file import open_model
    from birdbone.io.run_folder import read_run
    from birdbone.remodel.history import DeltaHistory
    from birdbone.remodel.prune import prunable
    from birdbone.remodel.surgery import write_structured

    folder = Path(run_dir)
    if read_run(folder).get("kind") != "structure":
        raise InputError(folder, "not a structure run folder")
    config = read_json(folder / "config.json")
    source = Path(config["source"]["path"])
    if not source.exists() or file_sha256(source) != config["source"]["sha256"]:
        raise InputError(source, "the run's source model is missing or has changed since the run started")
    state = read_json(folder / "state.json")
    k = state["waves"] if wave_k is None else wave_k
    if not 0 <= k <= state["waves"]:
        raise BirdboneError(f"wave {k}: this run has committed waves 0-{state['waves']}")
    with open_model(source) as m:
        dims = read_dims(m)
        names = prunable(m, ("skeleton", "organ"))
        weights = DeltaHistory(folder / "history", {n: m.tensors[n].shape for n in names}).state_at(k, m.tensor)
    keep = keep_from_masks(dims, {n: mk for n, (_, mk) in weights.items()})
    meta = {"birdbone.structure.wave": (k, GGUFValueType.UINT32, None),
            "birdbone.structure.source_sha256": (config["source"]["sha256"], GGUFValueType.STRING, None)}
    write_structured(source, out, keep, {n: w for n, (w, _) in weights.items()}, out_type, meta, tick(progress, "export"))
    d = keep.kept_dims()
    return {"out": str(out), "wave": k, "type": out_type, "density": block_params(keep) / sum(dims.layer_params(i) for i in range(dims.n_layer)),
            "arch": d.arch, "removed": keep.removed()}


@dataclass
class StructureReport:
    run_dir: Path
    waves: list[dict]
    export: dict  # out, wave, type, density, arch, removed
    eval: object  # EvalReport: the exported file in llama.cpp on the held-out text

    def as_dict(self) -> dict:
        return {**self.export, "run_dir": str(self.run_dir), "waves": self.waves, "eval": self.eval.as_dict()}

    def render(self) -> list:
        from birdbone.io.report import Line, Table, fmt

        table = Table(["wave", "phase", "block params", "layers", "heads", "FFN", "hidden", "ppl", "Δppl", "KLD", "heal steps", "s"],
                      title="structural waves (torch, held-out text)")
        for w in self.waves:
            d = w.get("widths") or {}
            table.add(w["wave"], w["phase"], f"{w['density']:.3f}", d.get("n_layer", "-"), sum(d.get("n_head", [])) or "-", sum(d.get("n_ff", [])) or "-",
                      d.get("n_embd", "-"), f"{w['ppl']:.3f}", fmt(w.get("dppl_pct"), "+.2f", "%"), fmt(w.get("kld"), ".4f"), w.get("heal_steps", "-"),
                      f"{w.get('seconds', 0):.0f}")
        e, r = self.export, self.export["removed"]
        gone = (f"{len(r['layers'])} layers, {sum(len(v) for v in r['heads'].values())} query heads ({sum(len(v) for v in r['groups'].values())} groups), "
                f"{sum(r['ffn'].values())} FFN channels, {len(r['hidden'])} hidden channels removed")
        return [table, Line(f"wrote {e['out']} (arch {e['arch']}, wave {e['wave']}, {100 * e['density']:.1f} % of the block parameters, {e['type']}): {gone}"),
                Line("llama.cpp on the held-out text:"), *self.eval.render()]


def structure_model(model: str | Path, out: str | Path, run_dir: str | Path, cfg: StructureConfig = StructureConfig(),
                    text: str | Path | None = None, out_type: str = "F16", progress: Progress | None = None,
                    threads: int | None = None, usage: str | Path | None = None) -> StructureReport:
    """``birdbone structure``: run (or resume) the structural waves, export the last one with its
    units cut out, and score it in llama.cpp on the held-out text against the source."""
    note_input(text)  # known before any output is written, so none lands on them
    from birdbone.evaluate.compare import EvalConfig, evaluate

    run = run_structure(model, run_dir, cfg, text, progress, usage)
    res = export_structure(run_dir, out, None, out_type, progress)
    ecfg = EvalConfig(ctx=cfg.eval_ctx, tokens=cfg.eval_tokens, decode=32, canary_tokens=0, threads=threads)
    return StructureReport(Path(run_dir), run.metrics, res, evaluate(out, run.source, Path(run_dir) / "heldout.txt", ecfg, progress))
