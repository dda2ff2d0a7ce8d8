"""The CI slice of the fuzz campaign (benchmarks/fuzz.py runs ≥ 100k per reader): every reader,
a few hundred mutants each. Every outcome must be a one-line error or an acceptance; the
mutants must reach both (a mutator that only breaks files tests nothing past the first check)."""

from __future__ import annotations

import pytest

from tests.fuzz_targets import NEEDS_RUNS, TARGETS, Seeds, run_target

SLICE = 300
FOLDER_SLICE = 100  # the run-folder targets replay and export a model per input


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return Seeds(tmp_path_factory.mktemp("fuzz-seeds")).build().build_runs()


@pytest.mark.parametrize("reader", TARGETS)
def test_every_mutant_is_a_clean_error_or_accepted(seeds, tmp_path, reader):
    n = FOLDER_SLICE if reader in NEEDS_RUNS else SLICE
    r = run_target(reader, seeds, tmp_path, seed=1, n=n)
    c = r["counts"]
    assert c["other"] == 0, r["examples"]
    assert c.get("unwritable", 0) < n * 0.05, c
    assert c["clean"] >= n * 0.05 and c["accepted"] >= n * 0.05, c


def test_the_campaigns_watchdog_charges_crashes_and_hangs_and_loses_no_input(tmp_path):
    """benchmarks/fuzz.py on a target that aborts on some inputs and sleeps forever on others."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "fuzz.py"
    env = dict(os.environ, BIRDBONE_FUZZ_SELFTEST="1")
    p = subprocess.run([sys.executable, script, "--readers", "selftest", "--inputs", "40", "--chunk", "25", "--hang-s", "1",
                        "--out", tmp_path / "fz"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]  # defects found: the campaign fails
    r = json.loads((tmp_path / "fz.json").read_text())["readers"]["selftest"]
    c = r["counts"]
    assert c["crash"] > 0 and c["hang"] > 0 and c["clean"] + c["accepted"] + c["other"] + c["crash"] + c["hang"] == 40, c


def test_a_run_folder_naming_a_path_no_file_system_takes(seeds, tmp_path):
    """The campaign's find: a damaged run's config.json whose source is a 300-character name."""
    import json
    import shutil

    from birdbone.io.errors import InputError
    from birdbone.recipe.runs import revert_run

    run = tmp_path / "run"
    shutil.copytree(seeds.root / "prune-run", run)
    config = json.loads((run / "config.json").read_text())
    config["source"]["path"] = "x" * 300
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="damaged or was edited"):
        revert_run(run, tmp_path / "w.gguf", to_wave=1, out_type="F32")
