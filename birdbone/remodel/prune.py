"""The bird-bone loop: shed density in gentle waves, heal, and back off when the model suffers.

One run lives in a folder (a :class:`~birdbone.io.run_folder.RunFolder` of kind ``prune``)::

    run.json        identity: the source's and text's sha256, the resolved config, birdbone's code
    config.json     the resolved PruneConfig and the source file's path and sha256
    calibration.txt the text the scores and healing use (the first 1 − holdout of the text, split
                    by :func:`birdbone.io.text.split_holdout`)
    heldout.txt     the rest: the guardrail's evaluation text, never trained on
    usage/          the source model's profile (imatrix values, activation frequency, gradients)
    history/        DeltaHistory: one file per completed wave
    metrics.jsonl   one line per completed wave (wave 0 = the unpruned model)
    tb/             the same as TensorBoard scalars (per wave, and the loss per healing step)
    state.json      waves done, phase, stop-loss counters

The weights are carried from wave to wave by :func:`~birdbone.remodel.history.apply_wave`, the
same step a replay of the history takes, so an uninterrupted run and one resumed after
``kill -9`` (which replays the committed waves once) compute the same bytes. A wave is committed
by writing its history file, then metrics and state (each atomically); files of a wave that was
not committed are dropped on resume.

Per wave: each tensor loses at most ``max_wave`` of its live weights, lowest score first
(:mod:`masks`), then masked LoRA heals the pruned modules (:mod:`heal`, steps and learning rate
tapering over the expected number of waves), then the held-out text is scored in torch (ppl and
KLD against the source's llama.cpp log-probabilities). Stop-loss: when Δppl against the unpruned
model exceeds ``stop_loss.threshold_pct`` in ``patience`` consecutive waves, pruning stops and
the next ``rollback_waves`` waves each give back a third of the last pruning wave's weights
(highest score first, at their original values), healing after each, until the guardrail holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from birdbone.anatomy.roles import classify
from birdbone.io.inputs import note_input, read_json
from birdbone.io.atomic import write_text_atomic
from birdbone.io.config import config_dict
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.hashing import file_sha256
from birdbone.io.model_file import open_model, resolve_model_path
from birdbone.io.run_folder import RunFolder, read_jsonl, reading_run, sha256_text
from birdbone.io.runtime import tokenize_texts
from birdbone.remodel.config import HealConfig, PruneConfig, StopLoss
from birdbone.remodel.heal import heal, hidden_states, set_weights, token_batches
from birdbone.remodel.history import DeltaHistory, WaveDelta, apply_wave, masked
from birdbone.remodel.masks import allocate_densities, parse_granularity, score, wave
from birdbone.io.progress import Progress, tick, relabel

log = logging.getLogger(__name__)


@dataclass
class RunState:
    waves: int = 0
    phase: str = "prune"  # prune | rollback | done
    breaches: int = 0
    rollback_left: int = 0
    rollback_of: int = 0  # the pruning wave being partly undone

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Run:
    """A prune run folder (:class:`~birdbone.io.run_folder.RunFolder` of kind ``prune``): its
    config, text split, history, metrics and state."""

    def __init__(self, folder: str | Path, source: str | Path, cfg, text: str | Path | None, extra: dict | None = None, kind: str = "prune"):
        from birdbone.io.text import load_text, split_holdout

        self.folder = Path(folder)
        self.source = resolve_model_path(source)
        self.cfg = cfg
        body, name = load_text(text)
        source_sha = file_sha256(self.source)
        self.config = {"source": {"path": str(self.source), "sha256": source_sha}, kind: config_dict(cfg)}
        identity = {"source_sha256": source_sha, "text_sha256": sha256_text(body), "config": config_dict(cfg),
                    **{k: v for k, v in (extra or {}).items() if v is not None}}
        self.rf = RunFolder.open(self.folder, kind, identity, RunState().as_dict())
        if not (self.folder / "heldout.txt").exists():  # new, or killed before its split was written
            calibration, held = split_holdout(body, cfg.holdout)
            self.rf.commit({"calibration.txt": calibration, "heldout.txt": held, "text-source.txt": name + "\n",
                            "config.json": json.dumps(self.config, indent=2)})
        self.state = RunState(**self.rf.state)

    @property
    def metrics(self) -> list[dict]:
        path = self.folder / "metrics.jsonl"
        rows = read_jsonl(path) if path.exists() else []
        with reading_run(self.folder):  # a row without its wave number was edited
            return [m for m in rows if m["wave"] <= self.state.waves]  # rows past the committed state were never committed

    def commit(self, metrics: dict) -> None:
        """The wave's metrics row, then the state: the commit point (its history file is already written)."""
        from birdbone.remodel.report import log_wave

        committed = self.metrics
        earlier = [m for m in committed if m["wave"] < metrics["wave"]]
        new_wave = not committed or committed[-1] != metrics  # the last commit ("done") repeats its wave's row
        self.rf.commit({"metrics.jsonl": "\n".join(json.dumps(m) for m in [*earlier, metrics]) + "\n"}, **self.state.as_dict())
        if new_wave:
            log_wave(self.folder, [*earlier, metrics])

    def drop_uncommitted(self, history: DeltaHistory) -> None:
        for k in range(self.state.waves + 1, history.n_waves + 1):
            log.warning("dropping wave %d: it was not committed before the run stopped", k)
            (history.folder / f"wave-{k:04d}.safetensors").unlink()


def advance(st: RunState, k: int, breach: bool, rule: StopLoss) -> None:
    """The stop-loss as a state machine, after wave ``k`` was scored (``breach``: Δppl too high)."""
    st.waves = k
    if st.phase == "prune":
        st.breaches = st.breaches + 1 if breach else 0
        if st.breaches >= rule.patience:
            st.phase, st.rollback_left, st.rollback_of = "rollback", rule.rollback_waves, k
    elif st.phase == "rollback":
        st.rollback_left -= 1
        if not breach or st.rollback_left <= 0:
            st.phase = "done"


def fake_quantize(w: np.ndarray, qtype: str, name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """What the export will store: w quantized to ``qtype`` (llama.cpp's width fallback) and back."""
    from birdbone.io.quantize import quantize_tensor
    from birdbone.io.types import legal_type, tensor_type

    return quantize_tensor(w, legal_type(tensor_type(qtype), w.shape[-1]), importance, name=name).dequantize()


def layer_of(name: str) -> int:
    return int(name.split(".")[1])


def reinforce(lm, delta: WaveDelta, state: dict, probe, run: Run, cfg: PruneConfig, hcfg: HealConfig,
              tokens: np.ndarray, k: int) -> dict:
    """Structural reinforcement after healing: find the layers under stress on the probe batch (the
    output error a layer adds grew by more than δ since the last wave, or its gradient norm is above
    γ × the mean) and heal their modules for ``reinforce_share`` more steps; their second LoRA delta
    is merged into this wave's. Returns the metrics to record in the wave's row of metrics.jsonl (the precision budget
    measures its own stress: it does not read these)."""
    from birdbone.remodel.heal import dense_gradients, merge_factors, own_errors

    x, reference = probe
    healed = masked(apply_wave(state, delta))
    set_weights(lm, healed)
    own = own_errors(hidden_states(lm, x[:, :-1]), reference)
    previous = run.metrics[-1].get("layer_own_error") if run.metrics else None
    prev = np.asarray(previous) if previous is not None else np.zeros_like(own)
    grads = dense_gradients(lm, list(healed), x)
    norms = np.zeros(len(own))
    for n, g in grads.items():
        norms[layer_of(n)] += float((g[healed[n][1]] ** 2).sum())
    norms = np.sqrt(norms)
    stressed = sorted({int(i) for i in np.flatnonzero(own - prev > cfg.stress_delta)}
                      | {int(i) for i in np.flatnonzero(norms > cfg.stress_gamma * norms.mean())})
    extra = 0
    if stressed and cfg.reinforce_share > 0:
        names = [n for n in healed if layer_of(n) in stressed]
        steps = max(1, math.ceil(cfg.reinforce_share * hcfg.steps))
        extra_cfg = HealConfig(steps, hcfg.lr, hcfg.rank, hcfg.alpha, hcfg.batch, hcfg.seq, hcfg.kd_weight, hcfg.seed + 7919)
        more = heal(lm, names, tokens, extra_cfg)
        for n, factors in more.lora.items():
            delta.lora[n] = merge_factors(delta.lora.get(n), factors)
        extra = steps
        log.info("wave %d: layers %s under stress; %d extra healing steps", k, stressed, steps)
    return {"stressed_layers": stressed, "reinforce_steps": extra, "layer_own_error": own.tolist(), "layer_grad_norm": norms.tolist()}


def regrow(lm, delta: WaveDelta, state: dict, tokens: np.ndarray, cfg: PruneConfig, usage, k: int) -> None:
    """RigL after healing: per row, regrow the pruned weights with the largest dense gradient (at 0)
    and prune as many of the weakest live ones; recorded in this wave's delta."""
    from birdbone.remodel.heal import dense_gradients, token_batches
    from birdbone.remodel.masks import rigl_swap

    healed = masked(apply_wave(state, delta))
    set_weights(lm, healed)
    batch = next(token_batches(tokens, cfg.heal.batch, cfg.heal.seq, cfg.seed + 10_000 + k))
    grads = dense_gradients(lm, list(healed), batch)
    for n, (w, mk) in healed.items():
        revive, kill = rigl_swap(grads[n], _scores(cfg.score, n, w, usage), mk, cfg.rigl)
        if revive.any():
            delta.revived[n] = revive
            delta.reset[n] = revive
            delta.values[n] = np.zeros(int(revive.sum()), np.float32)
            delta.pruned[n] = delta.pruned.get(n, np.zeros_like(mk)) | kill


def prunable(m, roles) -> list[str]:
    return [n for n, t in m.tensors.items() if len(t.shape) == 2 and n.startswith("blk.") and classify(n).role in roles]


def _usage(run: Run, cfg: PruneConfig, progress: Progress | None):
    """The source model's profile on the calibration text (in the run folder: copied from the one
    given to :func:`run_prune`, or profiled here)."""
    from birdbone.measure import profile, write_profile
    from birdbone.measure.usage import read_profile

    folder = run.folder / "usage"
    if not (folder / "usage.safetensors").exists():
        # windows of 512 as llama-imatrix uses, or shorter so that a small budget still gives two
        prof = profile(run.source, run.folder / "calibration.txt", cfg.calibration_tokens, max(16, min(512, cfg.calibration_tokens // 2)),
                       gradients=cfg.score == "taylor", progress=progress)
        write_profile(prof, folder)
    return read_profile(folder)


def _targets(run: Run, cfg: PruneConfig, m, names: list[str], alpha: dict[str, float | None] | None,
             progress: Progress | None) -> dict[str, float]:
    """Each tensor's target density: the config's, or allocated from the source's α (the map's when
    given, else measured here; cached in the run folder)."""
    if cfg.allocation == "uniform":
        return {n: cfg.target_density for n in names}
    path = run.folder / "allocation.json"
    if not path.exists():
        if alpha is None:
            from birdbone.measure import measure_model

            mp = measure_model(m, names=names, progress=relabel(progress, "baseline map (α)"))
            alpha = {t.name: t.alpha for t in mp.tensors}
        alpha = {n: alpha.get(n) for n in names}
        dens = allocate_densities(alpha, {n: m.tensors[n].n_params for n in names}, cfg.target_density, cfg.allocation_spread)
        write_text_atomic(path, json.dumps({"allocation": cfg.allocation, "alpha": alpha, "target_density": dens}, indent=1) + "\n")
    return read_json(path)["target_density"]


def reusable_usage(folder: Path | None, score: str) -> Path | None:
    """A usage profile the wave scores can use as it is (taylor needs its gradients), or None."""
    if folder is None or score == "magnitude":
        return None
    if score == "taylor":
        from birdbone.measure.usage import read_profile

        if not read_profile(folder).grad_abs:
            log.info("%s has no gradients; the taylor score profiles its own", folder)
            return None
    return Path(folder)


def _scores(kind: str, name: str, w: np.ndarray, usage) -> np.ndarray:
    if usage is None:
        return score(kind, w)
    return score(kind, w, importance=usage.importance(name) if name in usage.in_sum2 else None,
                 grad=usage.grad_abs.get(name), act_freq=usage.act_freq.get(name))


def _evaluate(lm, run: Run, cfg: PruneConfig, progress: Progress | None) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate_torch

    ecfg = EvalConfig(ctx=cfg.eval_ctx, tokens=cfg.eval_tokens, decode=0, canary_tokens=0)
    r = evaluate_torch(lm, run.source, run.source, run.folder / "heldout.txt", ecfg, progress)
    return {"ppl": r.model.ppl.ppl, "parent_ppl_llama_cpp": r.parent.ppl.ppl, "kld": r.kld.get("kld_mean"),
            "top1": r.kld.get("top1_agreement")}


def run_prune(source: str | Path, run_dir: str | Path, cfg: PruneConfig, text: str | Path | None = None,
              progress: Progress | None = None, usage: str | Path | None = None, alpha: dict[str, float | None] | None = None) -> Run:
    """Run (or resume) the loop until the target density is reached or the stop-loss ends it.

    ``usage``: a profile of ``source`` to score with (a compress run's profile stage) instead of
    profiling the calibration part again; ``alpha``: per-tensor α (a compress run's map) for
    ``allocation=alpha``. Both become part of the run's identity."""
    import shutil

    import torch

    from birdbone.bridge import load_causal_lm

    usage = reusable_usage(Path(usage) if usage else None, cfg.score)
    extra = {"usage_sha256": file_sha256(usage / "usage.safetensors") if usage else None,
             "alpha": alpha if cfg.allocation != "uniform" else None}
    run = Run(run_dir, source, cfg, text, extra)
    if usage is not None and not (run.folder / "usage").exists():
        shutil.copytree(usage, run.folder / f".birdbone-tmp-usage-{os.getpid()}")
        os.replace(run.folder / f".birdbone-tmp-usage-{os.getpid()}", run.folder / "usage")
    if run.state.phase == "done":
        return run
    torch.manual_seed(cfg.seed)
    gran = parse_granularity(cfg.granularity)
    with open_model(run.source) as m:
        names = prunable(m, cfg.roles)
        if not names:
            raise BirdboneError(f"{run.source}: no prunable weights in roles {cfg.roles}")
        shapes = {n: m.tensors[n].shape for n in names}
        history = DeltaHistory(run.folder / "history", shapes)
        run.drop_uncommitted(history)
        model_fp32_bytes = 4 * m.n_params
        usage = _usage(run, cfg, progress) if cfg.score != "magnitude" else None
        targets = _targets(run, cfg, m, names, alpha, progress)
        lm = load_causal_lm(run.source)
        tokens, held = tokenize_texts(run.source, *((run.folder / f).read_text(encoding="utf-8") for f in ("calibration.txt", "heldout.txt")))
        source_text = (run.folder / "text-source.txt").read_text(encoding="utf-8").strip()
        for part, toks in (("calibration part", tokens), ("held-out tenth", held)):
            need = max(cfg.heal.seq + 2, cfg.eval_ctx * 2 if part.startswith("held") else 0)
            if len(toks) < need:
                raise InputError(Path(source_text), f"too short: its {part} has {len(toks)} tokens, one batch needs {need}")
        # the probe: fixed held-out tokens and the unpruned model's layer outputs on them
        x = next(token_batches(held, cfg.heal.batch, cfg.heal.seq, cfg.seed))
        set_weights(lm, history.state_at(0, m.tensor))
        probe = (x, hidden_states(lm, x[:, :-1]))
        if run.state.waves == 0 and not run.metrics:
            run.commit({"wave": 0, "phase": "start", "density": 1.0, **_evaluate(lm, run, cfg, progress), "seconds": 0.0})
        base_ppl = run.metrics[0]["ppl"]
        state = history.replay(run.state.waves, m.tensor)  # then carried wave by wave, as a replay would
        while run.state.phase != "done":
            k = run.state.waves + 1
            t0 = time.time()
            current = masked(state)
            delta = WaveDelta()
            if run.state.phase == "prune":
                for n in names:
                    w, mask = current[n]
                    gone = wave(_scores(cfg.score, n, w, usage), mask, targets[n], cfg.max_wave, gran)
                    if gone.any():
                        delta.pruned[n] = gone
                if not delta.pruned:
                    run.state.phase = "done"
                    run.commit(run.metrics[-1])
                    break
            else:  # rollback: a third of the pruning wave's weights back, highest score first
                undo = history.load(run.state.rollback_of).pruned
                for n, gone in undo.items():
                    still_gone = gone & ~current[n][1]
                    if not still_gone.any():
                        continue
                    base_w = m.tensor(n)
                    s = np.where(still_gone, _scores(cfg.score, n, base_w, usage), -np.inf).reshape(-1)
                    count = math.ceil(gone.sum() / cfg.stop_loss.rollback_waves)
                    idx = np.argsort(-s, kind="stable")[: min(count, int(still_gone.sum()))]
                    back = np.zeros(s.size, bool)
                    back[idx] = True
                    back = back.reshape(gone.shape)
                    delta.revived[n], delta.reset[n], delta.values[n] = back, back, base_w[back]
            touched = sorted(set(delta.pruned) | set(delta.revived))
            after = masked(apply_wave(state, delta))  # pruned and given back, not healed yet
            set_weights(lm, {n: (fake_quantize(w, cfg.qlora, n), mk) for n, (w, mk) in after.items()} if cfg.qlora else after)
            hcfg = cfg.heal.for_wave(min(k, cfg.expected_waves), cfg.expected_waves)
            healed = heal(lm, touched, tokens, hcfg, progress=tick(progress, f"heal wave {k}")) \
                if hcfg.steps > 0 and touched else None
            if healed:
                delta.lora = healed.lora
            stress = reinforce(lm, delta, state, probe, run, cfg, hcfg, tokens, k) if cfg.reinforce and healed else {}
            if cfg.rigl and run.state.phase == "prune":
                regrow(lm, delta, state, tokens, cfg, usage, k)
            history.append(delta)
            state = apply_wave(state, delta)
            weights = masked(state)
            set_weights(lm, weights)
            metrics = _evaluate(lm, run, cfg, progress)
            n_live = sum(int(mk.sum()) for _, mk in weights.values())
            n_all = sum(mk.size for _, mk in weights.values())
            dppl = 100.0 * (metrics["ppl"] / base_ppl - 1.0)
            history_share = history.size_bytes() / model_fp32_bytes  # of the whole model at fp32
            breach = dppl > cfg.stop_loss.threshold_pct
            phase = run.state.phase
            advance(run.state, k, breach, cfg.stop_loss)
            if run.state.phase == "rollback" and phase == "prune":
                log.warning("stop-loss: Δppl %.2f%% > %.1f%% in %d consecutive waves; rolling back wave %d",
                            dppl, cfg.stop_loss.threshold_pct, run.state.breaches, k)
            run.commit({"wave": k, "phase": phase, "density": n_live / n_all, "dppl_pct": dppl, "breach": breach, **metrics, **stress,
                        "heal_steps": len(healed.losses) if healed else 0, "heal_lr": hcfg.lr,
                        "heal_loss_first": healed.losses[0] if healed else None, "heal_loss_last": healed.losses[-1] if healed else None,
                        "heal_losses": healed.losses if healed else [],
                        "tensor_density": {n: float(weights[n][1].mean()) for n in names},
                        "history_share": history_share, "seconds": round(time.time() - t0, 1)})
            log.info("wave %d (%s): density %.3f, ppl %.3f (%+.2f%%), KLD %.4f; history %.1f %% of the model's fp32 size", k, phase,
                     n_live / n_all, metrics["ppl"], dppl, metrics["kld"] or float("nan"), 100 * history_share)
    return run


def export(run_dir: str | Path, out: str | Path, wave_k: int | None = None, out_type: str = "F16",
           progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the model after wave ``wave_k`` (default: the last) as a GGUF; checks the zeros."""
    from gguf.constants import GGUFValueType

    from birdbone.remodel.rewrite import export_weights

    folder = Path(run_dir)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise InputError(folder, "not a birdbone run folder (no config.json)")
    config = read_json(cfg_path)
    source = Path(config["source"]["path"])
    if not source.exists() or file_sha256(source) != config["source"]["sha256"]:
        raise InputError(source, "the run's source model is missing or has changed since the run started")
    out = Path(out)
    with open_model(source) as m:
        names = prunable(m, tuple(config["prune"]["roles"]))
        history = DeltaHistory(folder / "history", {n: m.tensors[n].shape for n in names})
        state = read_json(folder / "state.json") if (folder / "state.json").exists() else {"waves": 0}
        k = state["waves"] if wave_k is None else wave_k
        if not 0 <= k <= state["waves"]:
            raise BirdboneError(f"wave {k}: this run has committed waves 0-{state['waves']}")
        weights = history.state_at(k, m.tensor)
        meta = {"birdbone.prune.wave": (k, GGUFValueType.UINT32, None),
                "birdbone.prune.source_sha256": (config["source"]["sha256"], GGUFValueType.STRING, None)}

        def count_zeros(path: Path) -> None:
            with open_model(path) as o:
                for n, (_, mask) in weights.items():
                    if int((o.tensor(n) == 0).sum()) < int((~mask).sum()):
                        raise BirdboneError(f"{out}: a pruned weight of {n} is not zero in the written file")

        export_weights(m, out, {n: w for n, (w, _) in weights.items()}, out_type, meta, count_zeros, progress)
    density = sum(int(mk.sum()) for _, mk in weights.values()) / max(1, sum(mk.size for _, mk in weights.values()))
    return {"out": str(out), "wave": k, "type": out_type, "density": density}


def waves_table(metrics: list[dict]):
    """The per-wave table of a prune run (``birdbone prune`` and ``birdbone report``)."""
    from birdbone.io.report import Table, fmt

    table = Table(["wave", "phase", "density", "ppl", "Δppl", "KLD", "heal steps", "history", "s"], title="waves (torch, held-out text)")
    for m in metrics:
        table.add(m["wave"], m["phase"], f"{m['density']:.3f}", f"{m['ppl']:.3f}", fmt(m.get("dppl_pct"), "+.2f", "%"), fmt(m.get("kld"), ".4f"),
                  m.get("heal_steps", "-"), fmt(m.get("history_share"), ".1%"), f"{m.get('seconds', 0):.0f}")
    return table


@dataclass
class PruneReport:
    run_dir: Path
    waves: list[dict]  # the run's metrics, one row per committed wave
    export: dict  # out, wave, type, density
    eval: object  # EvalReport: the exported file in llama.cpp on the held-out text

    def as_dict(self) -> dict:
        return {**self.export, "run_dir": str(self.run_dir), "waves": self.waves, "eval": self.eval.as_dict()}

    def render(self) -> list:
        from birdbone.io.report import Line

        e = self.export
        return [waves_table(self.waves), Line(f"wrote {e['out']} (wave {e['wave']}, density {e['density']:.3f}, {e['type']}); "
                                              "llama.cpp on the held-out text:"), *self.eval.render()]


def prune_model(model: str | Path, out: str | Path, run_dir: str | Path, cfg: PruneConfig = PruneConfig(), text: str | Path | None = None,
                out_type: str = "F16", progress: Progress | None = None, threads: int | None = None) -> PruneReport:
    """``birdbone prune``: run (or resume) the waves, export the last one, and score it in llama.cpp on the held-out text."""
    note_input(text)  # known before any output is written, so none lands on them
    from birdbone.evaluate.compare import EvalConfig, evaluate

    run = run_prune(model, run_dir, cfg, text, progress)
    metrics = run.metrics  # read before the export, so a damaged log writes nothing
    res = export(run_dir, out, None, out_type, tick(progress, "export"))
    ecfg = EvalConfig(ctx=cfg.eval_ctx, tokens=cfg.eval_tokens, decode=0, canary_tokens=0, threads=threads)
    return PruneReport(Path(run_dir), metrics, res, evaluate(out, model, Path(run_dir) / "heldout.txt", ecfg, progress))
