"""Every command that writes, as the kill -9 probes run it: its argv on the tiny model, what its
output is called, and the check that an output which looks complete really is.

Shared by the CI matrix (``tests/test_kill_matrix.py``: the seven one-shot writers at two random
points each) and the campaign (``benchmarks/kill_campaign.py``: all ten, many random points).
``resumes`` marks the writers whose run folder picks up after a kill: their rerun must give the
uncut run's bytes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.fixtures.tiny import TINY_RECIPE

SYNAPSE_STEPS = 8
SYNAPSE_SETS = ["--set", f"steps={SYNAPSE_STEPS}", "--set", "vocab=300", "--set", "batch=2", "--set", "seq=32", "--set", "model.n_layer=1",
                "--set", "model.n_embd=32", "--set", "model.intermediate=48", "--set", "model.rank_eligibility=4", "--set", "eval_every=4",
                "--set", "eval_windows=2", "--set", "checkpoint_every=2", "--set", "model.hebbian=true", "--set", "model.presynaptic=true"]
PRUNE_SETS = ["--target-density", "0.6", "--score", "magnitude", "--set", "heal.batch=2", "--set", "heal.seq=32", "--set", "eval_tokens=512",
              "--set", "eval_ctx=64", "--set", "calibration_tokens=256", "--heal-steps", "2", "--type", "F32"]


def complete_gguf(path: Path) -> None:
    from birdbone.io.model_file import open_model

    with open_model(path) as m:
        for n in m.tensors:
            m.raw(n)


def complete_organs(path: Path) -> None:
    from birdbone.anatomy.manifest import load_manifest

    load_manifest(path)


def complete_profile(path: Path) -> None:
    from birdbone.measure.usage import read_profile

    read_profile(path)


def complete_plan(path: Path) -> None:
    from birdbone.remodel.plan import read_plan

    read_plan(path)


def synapse_done(path: Path) -> bool:
    """A synapse run folder is there from its first step; it is complete when its state reached the last step."""
    import json

    state = path / "state.json"
    return state.exists() and json.loads(state.read_text()).get("step") == SYNAPSE_STEPS


def complete_synapse(path: Path) -> None:
    from birdbone.synapse.evaluate import load_run

    load_run(path)


@dataclass(frozen=True)
class Writer:
    argv: list[str]  # {m} the tiny F16 GGUF, {m32} its F32 form, {organs} a dissection, {usage} a profile, {recipe}; {out}
    name: str  # the output's name inside the folder the probe gives it
    check: Callable[[Path], None]
    resumes: bool = False
    compared: tuple[str, ...] = ()  # the files whose bytes a rerun must reproduce (default: all; logs carry times)
    claims_done: Callable[[Path], bool] = Path.exists  # whether the output says it is complete (a run folder exists mid-run)

    def bytes_of(self, out: Path) -> dict[str, str]:
        tree = sha_tree(out)
        return {k: v for k, v in tree.items() if k in self.compared} if self.compared else tree


WRITERS = {
    "quantize": Writer(["quantize", "{m}", "--type", "Q8_0", "-o", "{out}"], "q.gguf", complete_gguf),
    "dissect": Writer(["dissect", "{m}", "-o", "{out}"], "organs", complete_organs),
    "assemble": Writer(["assemble", "{organs}", "-o", "{out}"], "a.gguf", complete_gguf),
    "graft": Writer(["graft", "--base", "{m}", "--donor", "{m}", "--layers", "0", "-o", "{out}"], "g.gguf", complete_gguf),
    "purify": Writer(["purify", "{m}", "--layers", "0", "-o", "{out}"], "p.gguf", complete_gguf),
    "profile": Writer(["profile", "{m32}", "--ctx", "64", "--tokens", "256", "-o", "{out}"], "usage", complete_profile),
    "budget": Writer(["budget", "{m}", "--usage", "{usage}", "--target-bpw", "6", "-o", "{out}"], "plan.json", complete_plan),
    "prune": Writer(["prune", "{m32}", *PRUNE_SETS, "--run-dir", "{out}.run", "-o", "{out}"], "pruned.gguf", complete_gguf, resumes=True),
    "compress": Writer(["compress", "{m}", "-r", "{recipe}", "-o", "{out}"], "c.gguf", complete_gguf, resumes=True),
    "synapse train": Writer(["synapse", "train", *SYNAPSE_SETS, "-o", "{out}"], "syn", complete_synapse, resumes=True,
                            compared=("model.safetensors", "optimizer.safetensors", "tokenizer.json"), claims_done=synapse_done),
}
ONE_SHOT = [v for v, w in WRITERS.items() if not w.resumes]


def make_inputs(f16: Path, f32: Path, root: Path) -> dict[str, Path]:
    """What the writers read, made once under ``root`` (kept when already there): a dissection and
    a profile of the tiny model, and a recipe."""
    inputs = {"m": f16, "m32": f32, "organs": root / "organs", "usage": root / "usage", "recipe": root / "recipe.yaml"}
    if not inputs["recipe"].exists():
        for argv in (["dissect", f16, "-o", inputs["organs"]], ["profile", f32, "--ctx", "64", "--tokens", "256", "-o", inputs["usage"]]):
            p = start([str(a) for a in argv])
            assert p.wait(timeout=300) == 0, p.stderr.read()
        inputs["recipe"].write_text(TINY_RECIPE)
    return inputs


def command(verb: str, inputs: dict[str, Path], out: Path) -> list[str]:
    return [a.format(**inputs, out=out) for a in WRITERS[verb].argv]


def start(argv: list[str]) -> subprocess.Popen:
    """A birdbone process in its own session, so a kill reaches its children too."""
    return subprocess.Popen([sys.executable, "-m", "birdbone", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=dict(os.environ, COLUMNS="200"))


def sha_tree(path: Path) -> dict[str, str]:
    """The bytes of a file, or of every file under a folder, by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)) if p != path else p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


DEFECTS = ("partial", "rerun_failed", "resumed_differently", "temps_left")


def kill_and_rerun(verb: str, inputs: dict, folder: Path, at_s: float, uncut: dict[str, str]) -> dict:
    """One probe: run ``verb`` into ``folder``, SIGKILL its process group at ``at_s`` seconds (unless
    it ended first), rerun it, and judge what is there. The row names every defect found (any of
    :data:`DEFECTS`) beside where the kill landed; ``other_bytes`` is reported, not a defect."""
    from birdbone.io.atomic import TEMP_PREFIX, clean_stale_temps

    w = WRITERS[verb]
    folder.mkdir(parents=True)
    out = folder / w.name
    p = start(command(verb, inputs, out))
    try:
        p.wait(timeout=at_s)
    except subprocess.TimeoutExpired:  # still running at the kill point: the usual case
        pass
    with_output = p.poll() is None
    if with_output:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    row = {"at_s": round(at_s, 3), "killed": with_output, "finished": w.claims_done(out)}
    if row["finished"] and (why := _passes(w.check, out)) is not True:
        row["partial"] = why
    rerun = start(command(verb, inputs, out))
    rc = rerun.wait(timeout=900)
    if not (rc == 0 or (rc == 2 and row["finished"])):
        row["rerun_failed"] = f"exit {rc}: {rerun.stderr.read().decode(errors='replace').strip()[-200:]}"
    elif not _passes(w.check, out):
        row["rerun_failed"] = "the rerun's output fails its completeness check"
    elif w.bytes_of(out) != uncut:
        row["resumed_differently" if w.resumes else "other_bytes"] = True
    for t in folder.glob(TEMP_PREFIX + "*"):  # the killed process's, once it is gone and they are stale
        old = time.time() - 3600
        os.utime(t, (old, old))
    clean_stale_temps(folder)
    if list(folder.glob(TEMP_PREFIX + "*")):
        row["temps_left"] = True
    return row


def _passes(check: Callable[[Path], None], out: Path) -> bool | str:
    """True, or what the completeness check raised (any failure of it is the defect counted)."""
    try:
        check(out)
        return True
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}"
