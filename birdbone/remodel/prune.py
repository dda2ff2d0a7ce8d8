"""The bird-bone loop: shed density in gentle waves, heal, and back off when the model suffers.

One run lives in a folder::

    config.json     resolved PruneConfig + the source file's sha256 (a resume must match both)
    calibration.txt the text the scores and healing use (the first 1 − holdout of the text)
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from birdbone.anatomy.roles import classify
from birdbone.io.atomic import write_text_atomic
from birdbone.io.config import config_dict
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.hashing import file_sha256
from birdbone.io.model_file import open_model, resolve_model_path
from birdbone.io.runtime import tokenize_texts
from birdbone.remodel.heal import HealConfig, heal, hidden_states, set_weights, token_batches
from birdbone.remodel.history import DeltaHistory, WaveDelta, apply_wave, masked
from birdbone.remodel.masks import ALLOCATIONS, MAX_WAVE, SCORES, allocate_densities, check_wave, parse_granularity, score, wave

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StopLoss:
    threshold_pct: float = 3.0  # Δppl vs the unpruned model that counts as suffering (the plan's 3 %)
    patience: int = 2  # consecutive suffering waves before pruning stops
    rollback_waves: int = 3  # N_rb: waves that each give back a third of the last wave's weights

    def __post_init__(self):
        if self.threshold_pct <= 0 or self.patience < 1 or self.rollback_waves < 1:
            raise ValueError(f"stop_loss out of range: {self}")


@dataclass(frozen=True)
class PruneConfig:
    target_density: float = 0.7
    max_wave: float = MAX_WAVE
    score: str = "wanda"
    granularity: str = "row"  # row, or N:M such as 2:4
    roles: tuple[str, ...] = ("skeleton", "organ")
    heal: HealConfig = field(default_factory=HealConfig)
    stop_loss: StopLoss = field(default_factory=StopLoss)
    holdout: float = 0.1  # share of the text kept for the guardrail
    eval_tokens: int = 2048
    eval_ctx: int = 256
    calibration_tokens: int = 4096  # profiled for the wanda / usage / taylor scores
    reinforce: bool = True  # extra healing for layers under stress (recorded for the precision budget)
    stress_delta: float = 0.01  # δ: a layer is stressed when the output error it adds grew by more than this
    stress_gamma: float = 2.0  # γ: ... or its gradient norm is above γ × the mean over layers
    reinforce_share: float = 0.5  # extra steps for stressed layers, as a share of the wave's healing steps
    rigl: float = 0.0  # share of each row's pruned weights regrown per wave after healing (≤ 0.05; 0: off)
    qlora: str = ""  # heal against the base fake-quantized to this llama.cpp type (e.g. Q4_K); "": float
    allocation: str = "uniform"  # uniform, or alpha: per-tensor densities from the baseline map's α (AlphaPruning)
    allocation_spread: float = 0.1  # alpha: densities span target ± this before the mean is restored
    seed: int = 0

    def __post_init__(self):
        check_wave(self.max_wave, self.target_density)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and parse_granularity(self.granularity).kind != "row":
            raise ValueError("allocation from the map works with row granularity (N:M fixes every tensor's density)")
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r}: choose one of {', '.join(SCORES)}")
        g = parse_granularity(self.granularity)
        if g.implied_density is not None and not math.isclose(g.implied_density, self.target_density):
            raise ValueError(f"granularity {self.granularity} means target_density {g.implied_density:g}")
        if not set(self.roles) <= {"skeleton", "organ", "other"}:
            raise ValueError(f"roles {self.roles}: prunable roles are skeleton, organ, other (never embed or norm)")
        if not 0.0 <= self.rigl <= 0.05:
            raise ValueError(f"rigl {self.rigl} is outside [0, 0.05]")
        if self.rigl and g.kind != "row":
            raise ValueError("rigl regrowth works with row granularity only")
        if self.qlora:
            from birdbone.io.types import tensor_type

            tensor_type(self.qlora)
        if not 0.0 < self.holdout < 0.5 or self.eval_tokens < 2 * self.eval_ctx or self.eval_ctx < 16:
            raise ValueError("holdout must be in (0, 0.5) and eval_tokens at least two windows of eval_ctx (≥ 16)")

    @property
    def expected_waves(self) -> int:
        """R: waves of max_wave each needed to reach the target (the healing taper's horizon)."""
        lowest = self.target_density - (self.allocation_spread if self.allocation != "uniform" else 0.0)
        if lowest >= 1.0:
            return 1
        return max(1, math.ceil(math.log(max(lowest, 1e-3)) / math.log(1.0 - self.max_wave)))


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
    """A run folder: its config, text split, history, metrics and state."""

    def __init__(self, folder: str | Path, source: str | Path, cfg: PruneConfig, text: str | Path | None):
        self.folder = Path(folder)
        self.source = resolve_model_path(source)
        self.cfg = cfg
        self.config = {"source": {"path": str(self.source), "sha256": file_sha256(self.source)}, "prune": config_dict(cfg)}
        path = self.folder / "config.json"
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("source", {}).get("sha256") != self.config["source"]["sha256"]:
                raise InputError(self.folder, f"this run folder belongs to another model ({old.get('source', {}).get('path')})")
            if old.get("prune") != self.config["prune"]:
                raise InputError(self.folder, "this run folder was started with another config; use a new --run-dir")
        else:
            if self.folder.exists() and any(self.folder.iterdir()):
                raise InputError(self.folder, "run folder exists and is not a birdbone run (no config.json)")
            self.folder.mkdir(parents=True, exist_ok=True)
            self._split_text(text)
            write_text_atomic(path, json.dumps(self.config, indent=2))
        self.state = RunState(**json.loads((self.folder / "state.json").read_text())) if (self.folder / "state.json").exists() else RunState()

    def _split_text(self, text) -> None:
        from birdbone.io.text import load_text

        body, name = load_text(text)
        cut = int(len(body) * (1.0 - self.cfg.holdout))
        nl = body.find("\n", cut)
        cut = nl + 1 if nl >= 0 else cut
        write_text_atomic(self.folder / "calibration.txt", body[:cut])
        write_text_atomic(self.folder / "heldout.txt", body[cut:])
        (self.folder / "text-source.txt").write_text(name + "\n", encoding="utf-8")

    @property
    def metrics(self) -> list[dict]:
        path = self.folder / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def commit(self, metrics: dict) -> None:
        from birdbone.remodel.report import log_wave

        earlier = [m for m in self.metrics if m["wave"] < metrics["wave"]]
        new_wave = len(earlier) == len(self.metrics)
        write_text_atomic(self.folder / "metrics.jsonl", "\n".join(json.dumps(m) for m in [*earlier, metrics]) + "\n")
        write_text_atomic(self.folder / "state.json", json.dumps(self.state.as_dict(), indent=2))
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
    is merged into this wave's. Returns the metrics to record (the precision budget reads them)."""
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
    """The source model's profile on the calibration text (cached in the run folder)."""
    from birdbone.measure import profile, write_profile
    from birdbone.measure.usage import read_profile

    folder = run.folder / "usage"
    if not (folder / "usage.safetensors").exists():
        # windows of 512 as llama-imatrix uses, or shorter so that a small budget still gives two
        prof = profile(run.source, run.folder / "calibration.txt", cfg.calibration_tokens, max(16, min(512, cfg.calibration_tokens // 2)),
                       gradients=cfg.score == "taylor", progress=progress)
        write_profile(prof, folder)
    return read_profile(folder)


def _targets(run: Run, cfg: PruneConfig, m, names: list[str], progress: Progress | None) -> dict[str, float]:
    """Each tensor's target density: the config's, or allocated from the source's α (cached in the run folder)."""
    if cfg.allocation == "uniform":
        return {n: cfg.target_density for n in names}
    path = run.folder / "allocation.json"
    if not path.exists():
        from birdbone.measure import measure_model

        cb = (lambda name, i, total: progress("baseline map (α)", i, total)) if progress else None
        mp = measure_model(m, names=names, progress=cb)
        alpha = {t.name: t.alpha for t in mp.tensors}
        dens = allocate_densities(alpha, {n: m.tensors[n].n_params for n in names}, cfg.target_density, cfg.allocation_spread)
        write_text_atomic(path, json.dumps({"allocation": cfg.allocation, "alpha": alpha, "target_density": dens}, indent=1) + "\n")
    return json.loads(path.read_text())["target_density"]


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
              progress: Progress | None = None) -> Run:
    """Run (or resume) the loop until the target density is reached or the stop-loss ends it."""
    import torch

    from birdbone.bridge import load_causal_lm

    run = Run(run_dir, source, cfg, text)
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
        targets = _targets(run, cfg, m, names, progress)
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
            healed = heal(lm, touched, tokens, hcfg, progress=(lambda i, n_, k=k: progress(f"heal wave {k}", i, n_)) if progress else None) \
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
    config = json.loads(cfg_path.read_text())
    source = Path(config["source"]["path"])
    if not source.exists() or file_sha256(source) != config["source"]["sha256"]:
        raise InputError(source, "the run's source model is missing or has changed since the run started")
    out = Path(out)
    with open_model(source) as m:
        names = prunable(m, tuple(config["prune"]["roles"]))
        history = DeltaHistory(folder / "history", {n: m.tensors[n].shape for n in names})
        state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {"waves": 0}
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
