"""The CI slice of the fuzz campaign (benchmarks/fuzz.py runs ≥ 100k per reader): every reader,
a few hundred mutants each. Every outcome must be a one-line error or an acceptance; the
mutants must reach both (a mutator that only breaks files tests nothing past the first check)."""

from __future__ import annotations

import pytest

from tests.fuzz_targets import TARGETS, Seeds, run_target

SLICE = 300


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return Seeds(tmp_path_factory.mktemp("fuzz-seeds")).build()


@pytest.mark.parametrize("reader", TARGETS)
def test_every_mutant_is_a_clean_error_or_accepted(seeds, tmp_path, reader):
    r = run_target(reader, seeds, tmp_path, seed=1, n=SLICE)
    c = r["counts"]
    assert c["other"] == 0, r["examples"]
    assert c.get("unwritable", 0) < SLICE * 0.05, c
    assert c["clean"] >= SLICE * 0.05 and c["accepted"] >= SLICE * 0.05, c
