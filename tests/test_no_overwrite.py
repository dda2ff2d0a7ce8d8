"""No verb can overwrite any of its inputs: every verb × every kind of input it reads, with
``-o`` (or ``--csv``/``--html``/``--plot``) pointed at that input. Each case must refuse with a
one-line error naming the output, and leave every input byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from birdbone.cli import app
from birdbone.io.errors import BirdboneError

runner = CliRunner()


@pytest.fixture(scope="module")
def kit(tiny, tmp_path_factory):
    """One of each input kind, made once: a GGUF, an HF folder, an imatrix, a plan, a text, a
    recipe, a config, an organ folder, a prune run and a synapse run."""
    from birdbone.anatomy.dissect import dissect
    from birdbone.io.imatrix import write_imatrix
    from birdbone.io.model_file import open_model
    from tests.test_cli import birdbone
    from tests.test_synapse import PLAIN_SETS

    root = tmp_path_factory.mktemp("kit")
    shutil.copy(tiny.gguf_f16, root / "m.gguf")
    shutil.copy(tiny.gguf_f32, root / "m32.gguf")
    shutil.copytree(tiny.hf_dir, root / "hf")
    with open_model(root / "m.gguf") as m:
        mats = {n: t for n, t in m.tensors.items() if len(t.shape) == 2}
    write_imatrix(root / "im.gguf", {n: np.ones((1, t.ne[0]), np.float32) for n, t in mats.items()},
                  {n: np.ones((1, 1), np.float32) for n in mats}, ["kit"], 1, 64)
    (root / "text.txt").write_text(Path(__file__).with_name("conftest.py").read_text() * 20)
    shutil.copy(Path(__file__).parents[1] / "birdbone" / "recipes" / "gentle.yaml", root / "recipe.yaml")
    (root / "prune.yaml").write_text("heal:\n  steps: 0\n")
    (root / "cfg.yaml").write_text("{}\n")
    dissect(root / "m.gguf", root / "organs")
    birdbone("prune", root / "m32.gguf", "--run-dir", root / "run", "-o", root / "pruned.gguf", "--target-density", "0.9", "--score", "magnitude",
             "--heal-steps", "0", "--text", root / "text.txt", "--set", "eval_tokens=256", "--set", "eval_ctx=64", "--set", "calibration_tokens=256",
             "--set", "heal.seq=32", "--type", "F32")
    birdbone("synapse", "train", "-o", root / "syn", *PLAIN_SETS, "--text", root / "text.txt")
    birdbone("profile", root / "m32.gguf", "-o", root / "usage", "--ctx", "64", "--tokens", "256", "--text", root / "text.txt")
    birdbone("budget", root / "m.gguf", "--method", "usage", "--usage", root / "usage", "--target-bpw", "6", "-o", root / "plan.json")
    return root


def organ_file(root: Path) -> str:
    return next(str(p) for p in sorted((root / "organs").rglob("*")) if p.is_file() and p.name != "manifest.json")


# (verb and flags with {kit paths}, the input the output is pointed at)
CASES = {
    "diff -o model": ["diff", "{m}", "{m32}", "-o", "{m}"],
    "measure --csv model": ["measure", "{m}", "--csv", "{m}"],
    "measure --html model": ["measure", "{m}", "--html", "{m}"],
    "quantize -o model": ["quantize", "{m}", "-o", "{m}", "--type", "Q8_0"],
    "quantize -o imatrix": ["quantize", "{m}", "--imatrix", "{im}", "-o", "{im}", "--type", "Q8_0"],
    "quantize -o plan": ["quantize", "{m}", "--plan", "{plan}", "-o", "{plan}"],
    "quantize --plan -o the plan's imatrix": ["quantize", "{m}", "--plan", "{plan}", "-o", "{usage}/imatrix.gguf"],
    "quantize --eval -o text": ["quantize", "{m}", "--type", "Q8_0", "--eval", "--text", "{text}", "-o", "{text}"],
    "convert -o --like": ["convert", "{hf}", "--like", "{m}", "-o", "{m}"],
    "convert -o into the HF input": ["convert", "{hf}", "--like", "{m}", "-o", "{hf}/model.safetensors"],
    "convert -o the HF input": ["convert", "{m}", "-o", "{hf}"],
    "dissect -o the organ input": ["dissect", "{m}", "-o", "{organs}"],
    "assemble -o manifest": ["assemble", "{organs}", "-o", "{organs}/manifest.json"],
    "assemble -o an organ file": ["assemble", "{organs}", "-o", "{organ_file}"],
    "graft -o base manifest": ["graft", "--base", "{organs}", "--donor", "{m}", "--layers", "0", "-o", "{organs}/manifest.json"],
    "purify -o manifest": ["purify", "{organs}", "-o", "{organs}/manifest.json", "--layers", "0"],
    "purify -o model": ["purify", "{m}", "-o", "{m}", "--layers", "0"],
    "budget -o imatrix": ["budget", "{m}", "--usage", "{usage}", "--target-bpw", "6", "-o", "{usage}/imatrix.gguf"],
    "budget -o model": ["budget", "{m}", "--method", "usage", "--usage", "{usage}", "--target-bpw", "6", "-o", "{m}"],
    "budget -o its plan": ["budget", "{m}", "--plan", "{plan}", "-o", "{plan}"],
    "profile -o text": ["profile", "{m32}", "--text", "{text}", "-o", "{text}", "--ctx", "64", "--tokens", "256"],
    "structure -o text": ["structure", "{m32}", "--text", "{text}", "-o", "{text}", "--run-dir", "{tmp}/s"],
    "synapse train -o text": ["synapse", "train", "--text", "{text}", "-o", "{text}"],
    "report -o run state": ["report", "{run}", "-o", "{run}/state.json"],
    "revert -o into the run": ["revert", "{run}", "--to-wave", "1", "-o", "{run}/wave-1.gguf"],
    "prune -o text": ["prune", "{m32}", "--text", "{text}", "-o", "{text}", "--run-dir", "{tmp}/r"],
    "prune -o config": ["prune", "{m32}", "--config", "{prune_cfg}", "-o", "{prune_cfg}", "--run-dir", "{tmp}/r"],
    "compress -o recipe": ["compress", "{m32}", "-r", "{recipe}", "-o", "{recipe}", "--run-dir", "{tmp}/c"],
    "compress -o text": ["compress", "{m32}", "--text", "{text}", "-o", "{text}", "--run-dir", "{tmp}/c"],
    "scaffold -o text": ["scaffold", "{m32}", "--text", "{text}", "-o", "{text}"],
    "synapse eval --plot into the run": ["synapse", "eval", "{syn}", "--plot", "{syn}/config.json", "--text", "{text}"],
    "synapse enable -o into the run": ["synapse", "enable", "{syn}", "-o", "{syn}/enabled", "--set", "model.hebbian=true"],
    "diff -o the second model": ["diff", "{m}", "{m32}", "-o", "{m32}"],
    "dissect -o model": ["dissect", "{m}", "-o", "{m}"],
    "assemble -o text": ["assemble", "{organs}", "--text", "{text}", "-o", "{text}"],
    "graft -o donor": ["graft", "--base", "{organs}", "--donor", "{m}", "--layers", "0", "-o", "{m}"],
    "graft -o text": ["graft", "--base", "{m}", "--donor", "{m32}", "--layers", "0", "--text", "{text}", "-o", "{text}"],
    "purify -o text": ["purify", "{m}", "--layers", "0", "--text", "{text}", "-o", "{text}"],
    "profile -o model": ["profile", "{m32}", "-o", "{m32}", "--ctx", "64", "--tokens", "256"],
    "profile -o config": ["profile", "{m32}", "--config", "{cfg}", "-o", "{cfg}", "--ctx", "64", "--tokens", "256"],
    "budget -o text": ["budget", "{m}", "--usage", "{usage}", "--target-bpw", "6", "--text", "{text}", "-o", "{text}"],
    "budget -o config": ["budget", "{m}", "--usage", "{usage}", "--target-bpw", "6", "--config", "{cfg}", "-o", "{cfg}"],
    "scaffold -o model": ["scaffold", "{m32}", "-o", "{m32}"],
    "scaffold -o usage": ["scaffold", "{m32}", "--usage", "{usage}", "-o", "{usage}/imatrix.gguf"],
    "scaffold -o config": ["scaffold", "{m32}", "--config", "{cfg}", "-o", "{cfg}"],
    "structure -o model": ["structure", "{m32}", "-o", "{m32}", "--run-dir", "{tmp}/s"],
    "structure -o config": ["structure", "{m32}", "--config", "{cfg}", "-o", "{cfg}", "--run-dir", "{tmp}/s"],
    "structure -o into its run": ["structure", "{m32}", "--run-dir", "{run}", "-o", "{run}/state.json"],
    "prune -o model": ["prune", "{m32}", "-o", "{m32}", "--run-dir", "{tmp}/r"],
    "prune -o into its run": ["prune", "{m32}", "--run-dir", "{run}", "-o", "{run}/state.json"],
    "compress -o model": ["compress", "{m32}", "-o", "{m32}", "--run-dir", "{tmp}/c"],
    "compress -o eval text": ["compress", "{m32}", "--eval-text", "{text}", "-o", "{text}", "--run-dir", "{tmp}/c"],
    "compress -o into its run": ["compress", "{m32}", "--run-dir", "{run}", "-o", "{run}/state.json"],
    "synapse eval --plot text": ["synapse", "eval", "{syn}", "--text", "{text}", "--plot", "{text}"],
    "synapse train -o config": ["synapse", "train", "--config", "{cfg}", "-o", "{cfg}"],
}


def sha_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_no_verb_overwrites_its_input(kit, tmp_path, case):
    root = tmp_path / "kit"
    shutil.copytree(kit, root)  # copied, not written by birdbone: this test's command did not make them
    subs = {"m": root / "m.gguf", "m32": root / "m32.gguf", "hf": root / "hf", "im": root / "im.gguf", "plan": root / "plan.json",
            "text": root / "text.txt", "recipe": root / "recipe.yaml", "prune_cfg": root / "prune.yaml", "cfg": root / "cfg.yaml", "organs": root / "organs",
            "organ_file": organ_file(root), "run": root / "run", "syn": root / "syn", "usage": root / "usage", "tmp": tmp_path}
    plan = json.loads((root / "plan.json").read_text())
    assert plan["imatrix"]
    plan["imatrix"] = str(root / "usage" / "imatrix.gguf")  # the copy's own, so no case can reach the module's kit
    (root / "plan.json").write_text(json.dumps(plan))
    argv = [a.format(**{k: str(v) for k, v in subs.items()}) for a in CASES[case]]
    before = sha_tree(root)
    r = runner.invoke(app, argv)
    assert isinstance(r.exception, BirdboneError), (r.exception, r.output)
    assert "\n" not in str(r.exception)
    assert sha_tree(root) == before  # every input intact, nothing added beside them


# -- the table covers every verb's signature ---------------------------------------------------

OUTPUT_FLAGS = ("--out", "--csv", "--html", "--plot")
NAMED_BY_STRING = ("--recipe", "--parent")  # str options that name a file (a built-in name is the other choice)


def commands():
    import typer

    def walk(c, words=()):
        if hasattr(c, "commands"):
            for name, sub in c.commands.items():
                yield from walk(sub, (*words, name))
        else:
            yield " ".join(words), c

    return dict(walk(typer.main.get_command(app)))


def flag(p) -> str:
    return next((o for o in p.opts if o.startswith("--")), p.name)


def path_params(c) -> list:
    """The parameters of a command that name a file or folder: Path-typed ones, the model arguments
    (a path or ``builtin``), and the string options that name a file."""
    import typing

    hints = typing.get_type_hints(c.callback)
    return [p for p in c.params if "Path" in str(hints.get(p.name)) or flag(p) in NAMED_BY_STRING
            or (p.param_type_name == "argument" and hints.get(p.name) in (str, list[str]))]


def required_pairs() -> set[tuple[str, str, str]]:
    """(verb, output flag, input parameter) for every verb that writes and every input it reads."""
    pairs = set()
    for verb, c in commands().items():
        params = [flag(p) for p in path_params(c)]
        outs = [f for f in params if f in OUTPUT_FLAGS]
        pairs |= {(verb, o, i) for o in outs for i in params if i not in OUTPUT_FLAGS}
    return pairs


def covered_pairs(subs: dict[str, str]) -> set[tuple[str, str, str]]:
    """What the cases point at: an output flag whose value is an input parameter's path, or a path inside it."""
    cmds, pairs = commands(), set()
    for argv in CASES.values():
        words = 2 if f"{argv[0]} {argv[1]}" in cmds else 1
        verb, c = " ".join(argv[:words]), cmds[" ".join(argv[:words])]
        values = c.make_context(verb, [a.format(**subs) for a in argv[words:]], resilient_parsing=True).params
        by_flag = {flag(p): values.get(p.name) for p in path_params(c)}
        for o in OUTPUT_FLAGS:
            target = str(by_flag.get(o) or "")
            for i, v in by_flag.items():
                named = [str(x) for x in (v if isinstance(v, (list, tuple)) else [v]) if x]
                if target and i not in OUTPUT_FLAGS and any(target == n or target.startswith(n + "/") for n in named):
                    pairs.add((verb, o, i))
    return pairs


def test_the_table_covers_every_input_of_every_verb_that_writes():
    subs = {k: f"/kit/{k}" for k in ("m", "m32", "hf", "im", "plan", "text", "recipe", "prune_cfg", "cfg", "organs", "organ_file", "run", "syn",
                                     "usage", "tmp")}
    subs["organ_file"] = "/kit/organs/blk.0/attn_q.weight.bin"
    missing = sorted(required_pairs() - covered_pairs(subs))
    assert not missing, f"no case points an output at these inputs: {missing}"
