"""kill -9 at random points of every one-shot command that writes: nothing that looks complete is
partial, the rerun succeeds, and the dead run's temporaries are cleaned once it is provably gone.
The writers are in ``tests/kill_targets.py``; prune, compress and synapse train resume
bit-exactly in their own tests (test_prune.py, test_compress.py, test_synapse.py), and
``benchmarks/kill_campaign.py`` kills all ten at many more points."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.kill_targets import DEFECTS, ONE_SHOT, WRITERS, command, kill_and_rerun, make_inputs, start

# Kill points drawn at random for every run, one anywhere and one in the last half (most of a run is
# imports; the writing comes last). BIRDBONE_KILL_SEED replays a failing draw.
SEED = int(os.environ.get("BIRDBONE_KILL_SEED") or time.time_ns() % 2**32)


def kill_fractions(verb: str) -> tuple[float, float]:
    rng = random.Random(f"{SEED}-{verb}")
    return rng.uniform(0.0, 1.0), rng.uniform(0.5, 1.0)


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
    return make_inputs(tiny.gguf_f16, tiny.gguf_f32, tmp_path_factory.mktemp("kill-inputs"))


@pytest.mark.parametrize("verb", ONE_SHOT)
def test_kill_9_anywhere_leaves_nothing_partial(inputs, tmp_path, verb):
    w = WRITERS[verb]
    (tmp_path / "whole").mkdir()
    t0 = time.time()
    p = start(command(verb, inputs, tmp_path / "whole" / w.name))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    uncut = time.time() - t0
    w.check(tmp_path / "whole" / w.name)
    for k, fraction in enumerate(kill_fractions(verb)):
        # nothing that looks complete is partial, the rerun succeeds (or refuses a finished folder output) with a
        # complete output, and the killed process's temporaries go once it is gone and they are stale
        row = kill_and_rerun(verb, inputs, tmp_path / f"cut{k}", uncut * fraction, w.bytes_of(tmp_path / "whole" / w.name))
        assert not set(row) & set(DEFECTS), (row, f"killed at {fraction:.3f} of {uncut:.1f} s (BIRDBONE_KILL_SEED={SEED})")
