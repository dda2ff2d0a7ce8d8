"""Quality against density for the bird-bone loop, on the built-in model, against the fair baseline.

Trajectories (one ``birdbone prune`` run each, to density 0.5 with the stop-loss off, calibration
and healing text ../shared/data/wikitext-2-tok/valid.txt):

* ``magnitude``      magnitude scores, healing on
* ``wanda``          Wanda scores, healing on
* ``wanda-noheal``   Wanda, no healing
* ``wanda-rigl``     Wanda, healing, RigL regrowth of 5 % per wave
* ``wanda-2:4``      Wanda, 2:4 reached progressively
* ``wanda-alpha``    Wanda with per-tensor densities allocated from the map's α (only with --configs)
* ``healed-parent``  the control for healing itself: no pruning, the first wave's healing steps
* ``oneshot``        the baseline a user would pick instead: Wanda one-shot to each checkpoint density,
                     then the same total number of healing steps the ``wanda`` trajectory had spent
                     by then, in one go

At each checkpoint density (0.9, 0.8, 0.7, 0.6, 0.5: the wave closest to it) the model is
exported as F16 and scored by llama.cpp on the first ``--tokens`` tokens of wiki.test.raw (ctx
512): ppl, KLD against the F16 parent, and the wall time spent to get there. llama.cpp has no
sparse types, so no file is smaller than the dense F16.

    python benchmarks/prune_heal.py [--heal-steps 20] [--configs wanda,oneshot] [--tokens 8192]

Writes benchmarks/results/prune_heal.{json,md}; run folders and GGUFs go to results/work/prune/.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
WORK = HERE / "results" / "work" / "prune"
OUT = HERE / "results" / "prune_heal"
CHECKPOINTS = (0.9, 0.8, 0.7, 0.6, 0.5)
TRAJECTORIES = {
    "magnitude": ["score=magnitude"],
    "wanda": ["score=wanda"],
    "wanda-noheal": ["score=wanda", "heal.steps=0", "reinforce=false"],
    "wanda-rigl": ["score=wanda", "rigl=0.05"],
    "wanda-2:4": ["score=wanda", "granularity=2:4"],
    "wanda-alpha": ["score=wanda", "allocation=alpha"],  # not in the default set: run it with --configs wanda-alpha
}
log = logging.getLogger("prune_heal")


def settings(args) -> list[str]:
    return [f"heal.steps={args.heal_steps}", f"eval_tokens={args.eval_tokens}", f"calibration_tokens={args.calibration_tokens}",
            "target_density=0.5", "stop_loss.threshold_pct=1e9", f"seed={args.seed}"]


def score_file(path: Path, parent: Path, args) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate

    r = evaluate(path, parent, DATA / "wikitext-2-raw" / "wiki.test.raw",
                 EvalConfig(ctx=512, tokens=args.tokens, decode=0, canary_tokens=0, threads=args.threads))
    return {"ppl": r.model.ppl.ppl, "dppl_pct": r.delta_ppl_pct, "kld": r.kld["kld_mean"], "top1": r.kld["top1_agreement"],
            "parent_ppl": r.parent.ppl.ppl}


def trajectory(name: str, extra: list[str], parent: Path, args) -> dict:
    from birdbone.io.config import load_config
    from birdbone.remodel.prune import PruneConfig, export, run_prune

    cfg = load_config(PruneConfig, None, [*settings(args), *extra])
    run_dir = WORK / name
    t0 = time.time()
    run = run_prune("builtin", run_dir, cfg, DATA / "wikitext-2-tok" / "valid.txt")
    metrics = run.metrics
    points = []
    for d in CHECKPOINTS:
        # the wave closest to the checkpoint (waves of 10 % land on 0.90, 0.81, 0.73, ...)
        hit = min(metrics, key=lambda m: abs(m["density"] - d))
        if abs(hit["density"] - d) > 0.05:
            continue
        out = WORK / f"{name}-{d:.1f}.gguf"
        export(run_dir, out, hit["wave"], "F16")
        seconds = sum(m.get("seconds", 0.0) for m in metrics if m["wave"] <= hit["wave"])
        heal_steps = sum(m.get("heal_steps", 0) + m.get("reinforce_steps", 0) for m in metrics if m["wave"] <= hit["wave"])
        points.append({"target": d, "wave": hit["wave"], "density": hit["density"], "seconds": seconds, "heal_steps": heal_steps,
                       "torch_heldout_ppl": hit["ppl"], **score_file(out, parent, args)})
        out.unlink()
        log.info("%s at %.1f: wave %d, ppl %.3f, KLD %.4f", name, d, hit["wave"], points[-1]["ppl"], points[-1]["kld"])
    return {"config": extra, "waves": len(metrics) - 1, "seconds": round(time.time() - t0, 1), "points": points}


def heal_and_score(m, parent: Path, names: list[str], weights: dict, tokens, steps: int, out: Path, args) -> dict:
    """Heal masked weights for ``steps`` steps (one go), export as F16 and score in llama.cpp."""
    from birdbone.bridge import load_causal_lm
    from birdbone.io.gguf_writer import write_like
    from birdbone.remodel.heal import HealConfig, heal, set_weights
    from birdbone.remodel.history import lora_product

    lm = load_causal_lm(parent)
    set_weights(lm, weights)
    healed = heal(lm, names, tokens, HealConfig(steps=max(1, steps), seed=args.seed)) if steps else None
    tensors = {n: (lambda n=n: m.tensor(n)) for n in m.tensors}
    for n, (w, mask) in weights.items():
        if healed:
            w = np.where(mask, w + lora_product(*healed.lora[n]), np.float32(0)).astype(np.float32)
        tensors[n] = w
    write_like(m, out, tensors, "F16")
    try:
        return score_file(out, parent, args)
    finally:
        out.unlink()


def calibration(parent: Path):
    from birdbone.io.runtime import tokenize_texts

    return tokenize_texts(parent, (WORK / "wanda" / "calibration.txt").read_text(encoding="utf-8"))[0]  # the waves' own calibration part


def oneshot(parent: Path, wanda: dict, args) -> dict:
    """Wanda one-shot to each checkpoint density, then as many healing steps as the waves spent."""
    from birdbone.io.model_file import open_model
    from birdbone.measure.usage import read_profile
    from birdbone.remodel.masks import one_shot, score
    from birdbone.remodel.prune import prunable

    usage = read_profile(WORK / "wanda" / "usage")  # the same calibration profile as the waves
    tokens = calibration(parent)
    points = []
    with open_model(parent) as m:
        names = prunable(m, ("skeleton", "organ"))
        for p in wanda["points"]:
            t0 = time.time()
            weights = {}
            for n in names:
                w = m.tensor(n)
                mask = one_shot(score("wanda", w, importance=usage.importance(n)), p["density"])
                weights[n] = (np.where(mask, w, np.float32(0)).astype(np.float32), mask)
            scored = heal_and_score(m, parent, names, weights, tokens, p["heal_steps"], WORK / f"oneshot-{p['target']:.1f}.gguf", args)
            points.append({"target": p["target"], "density": float(np.mean([mk.mean() for _, mk in weights.values()])),
                           "heal_steps": p["heal_steps"], "seconds": round(time.time() - t0, 1), **scored})
            log.info("oneshot at %.1f: ppl %.3f, KLD %.4f", p["target"], points[-1]["ppl"], points[-1]["kld"])
    return {"config": ["wanda one-shot + the waves' healing steps"], "points": points}


def healed_parent(parent: Path, wanda: dict, args) -> dict:
    """The control for healing's own effect: the unpruned parent, healed as long as the first wave was."""
    from birdbone.io.model_file import open_model
    from birdbone.remodel.prune import prunable

    steps = wanda["points"][0]["heal_steps"]
    t0 = time.time()
    with open_model(parent) as m:
        names = prunable(m, ("skeleton", "organ"))
        weights = {n: (m.tensor(n).astype(np.float32), np.ones(m.tensors[n].shape, dtype=bool)) for n in names}
        scored = heal_and_score(m, parent, names, weights, calibration(parent), steps, WORK / "healed-parent.gguf", args)
    point = {"target": 1.0, "density": 1.0, "heal_steps": steps, "seconds": round(time.time() - t0, 1), **scored}
    log.info("healed parent (%d steps): ppl %.3f, KLD %.4f", steps, point["ppl"], point["kld"])
    return {"config": [f"no pruning, {steps} healing steps (the first wave's, reinforcement included)"], "points": [point]}


def markdown(res: dict) -> str:
    lines = ["# Prune and heal: quality against density (built-in model)", "",
             f"`{res['command']}` · wiki.test.raw first {res['args']['tokens']} tokens, ctx 512, llama.cpp, F16 exports · "
             f"parent F16 ppl {res['parent_ppl']:.3f} · healing {res['args']['heal_steps']} steps of 4×128 tokens in the first wave, tapering.", "",
             "| trajectory | " + " | ".join(f"{d:.0%}" for d in CHECKPOINTS) + " | wall time to 50 % |", "|---|" + "---:|" * (len(CHECKPOINTS) + 1)]
    for name, t in res["trajectories"].items():
        if name == "healed-parent":
            continue
        by = {p["target"]: p for p in t["points"]}
        cells = [f"{by[d]['ppl']:.2f} ({by[d]['kld']:.3f}) @{by[d]['density']:.2f}" if d in by else "–" for d in CHECKPOINTS]
        last = by.get(0.5)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {last['seconds'] / 60:.0f} min |" if last else f"| {name} | " + " | ".join(cells) + " | – |")
    lines += ["", "Cells: perplexity (KLD vs the F16 parent) @ the density actually reached (the wave closest to the column's). The 2:4 trajectory only reaches 50 %; its earlier columns are "
              "intermediate waves on the way to 2:4.", ""]
    hp = res["trajectories"].get("healed-parent")
    if hp:
        p = hp["points"][0]
        lines += [f"Healing alone (no pruning, {p['heal_steps']} steps on the calibration text): ppl {p['ppl']:.2f} (KLD {p['kld']:.3f}) — "
                  "what healing on wikitext does to an instruct model by itself.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join([*(t for t in TRAJECTORIES if t != "wanda-alpha"), "oneshot", "healed-parent"]))
    ap.add_argument("--heal-steps", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens the guardrail scores per wave (torch)")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192, help="wiki.test.raw tokens llama.cpp scores per checkpoint")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("birdbone.llama", "gguf", "birdbone.evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    from birdbone.io.float_form import float_form

    WORK.mkdir(parents=True, exist_ok=True)
    parent = float_form("builtin")
    res = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").exists() else {}
    res.update({"command": "python benchmarks/prune_heal.py " + " ".join(sys.argv[1:]), "args": vars(args),
                "machine": {"python": platform.python_version(), "cpu_count": len(__import__("os").sched_getaffinity(0))}})
    res.setdefault("trajectories", {})
    for name in args.configs.split(","):
        if name in ("oneshot", "healed-parent"):
            if "wanda" not in res["trajectories"]:
                raise SystemExit(f"{name} needs the wanda trajectory first (its healing-step counts and profile)")
            res["trajectories"][name] = (oneshot if name == "oneshot" else healed_parent)(parent, res["trajectories"]["wanda"], args)
        else:
            res["trajectories"][name] = trajectory(name, TRAJECTORIES[name], parent, args)
        res["trajectories"][name]["command"] = f"python benchmarks/prune_heal.py --configs {name} " + " ".join(
            a for a in sys.argv[1:] if not a.startswith("--configs") and a != args.configs)  # rows of one file may come from several runs
        res["parent_ppl"] = next(iter(next(iter(res["trajectories"].values()))["points"]), {}).get("parent_ppl")
        OUT.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        OUT.with_suffix(".md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
