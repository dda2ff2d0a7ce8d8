"""kill -9 at any point of every command that writes: nothing that looks complete is partial, the
rerun succeeds, and the dead run's temporaries are cleaned once it is provably gone (prune,
compress and synapse train resume bit-exactly: tests/test_prune.py, test_compress.py,
test_synapse.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from birdbone.io.atomic import TEMP_PREFIX, clean_stale_temps

FRACTIONS = (0.8, 0.95)  # of an uncut run's time: most of it is imports, the writing comes last


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


# verb: (argv with {m} the tiny F16 GGUF, {m32} its F32 form, {organs} a dissection, {usage} a profile; {out}), its check
CASES = {
    "quantize": (["quantize", "{m}", "--type", "Q8_0", "-o", "{out}"], "q.gguf", complete_gguf),
    "dissect": (["dissect", "{m}", "-o", "{out}"], "organs", complete_organs),
    "assemble": (["assemble", "{organs}", "-o", "{out}"], "a.gguf", complete_gguf),
    "graft": (["graft", "--base", "{m}", "--donor", "{m}", "--layers", "0", "-o", "{out}"], "g.gguf", complete_gguf),
    "purify": (["purify", "{m}", "--layers", "0", "-o", "{out}"], "p.gguf", complete_gguf),
    "profile": (["profile", "{m32}", "--ctx", "64", "--tokens", "256", "-o", "{out}"], "usage", complete_profile),
    "budget": (["budget", "{m}", "--usage", "{usage}", "--target-bpw", "6", "-o", "{out}"], "plan.json", complete_plan),
}


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
    from tests.test_cli import birdbone

    root = tmp_path_factory.mktemp("kill-inputs")
    birdbone("dissect", tiny.gguf_f16, "-o", root / "organs")
    birdbone("profile", tiny.gguf_f32, "--ctx", "64", "--tokens", "256", "-o", root / "usage")
    return {"m": tiny.gguf_f16, "m32": tiny.gguf_f32, "organs": root / "organs", "usage": root / "usage"}


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "birdbone", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=dict(os.environ, COLUMNS="200"))


@pytest.mark.parametrize("verb", CASES)
def test_kill_9_anywhere_leaves_nothing_partial(inputs, tmp_path, verb):
    argv, name, check = CASES[verb]
    t0 = time.time()
    whole = tmp_path / "whole"
    whole.mkdir()
    p = start([a.format(**inputs, out=whole / name) for a in argv])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    uncut = time.time() - t0
    check(whole / name)
    for k, fraction in enumerate(FRACTIONS):
        folder = tmp_path / f"cut{k}"
        folder.mkdir()
        out = folder / name
        cmd = [a.format(**inputs, out=out) for a in argv]
        p = start(cmd)
        time.sleep(uncut * fraction)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        finished = out.exists()
        if finished:
            check(out)  # it looks complete, so it is
        rc = start(cmd).wait(timeout=300)
        assert rc == 0 or (rc == 2 and finished), rc  # the rerun succeeds, or refuses a finished folder output
        check(out)
        temps = list(folder.glob(TEMP_PREFIX + "*"))
        for t in temps:  # the killed process's: removed once their process is gone and they are stale
            old = time.time() - 3600
            os.utime(t, (old, old))
        clean_stale_temps(folder)
        assert not list(folder.glob(TEMP_PREFIX + "*")), temps
