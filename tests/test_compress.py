"""Recipes and ``birdbone compress`` on a tiny model: validation before work, the same bytes from two
processes and through kill -9 and resume, provenance, diff, revert, Ollama and DVC files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from birdbone.io.config import load_config
from birdbone.io.errors import BirdboneError
from birdbone.io.model_file import open_model
from birdbone.recipe.config import Recipe, diff_recipes, load_recipe
from tests.fixtures.tiny import TINY_RECIPE
from tests.test_cli import birdbone


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(scope="module")
def straight(tiny, tiny_recipe, tmp_path_factory):
    """One uninterrupted compress run: (output, run folder, JSON report)."""
    folder = tmp_path_factory.mktemp("straight")
    out = folder / "out.gguf"
    r = json.loads(birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", out, "--ollama", "--json").stdout)
    return out, folder / "out.run", r


def error(*args) -> str:
    p = birdbone(*args, check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    return p.stderr.strip().splitlines()[-1]


# -- recipes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gentle", "bird-bone", "hollow"])
def test_shipped_recipes_load_and_show_round_trips(name, tmp_path):
    r = load_recipe(name)
    assert r.name == name and r.stages[-2:] == ("export", "verify") and r.has("budget")
    shown = tmp_path / "shown.yaml"
    shown.write_text(birdbone("recipe", "show", name).stdout)
    assert load_recipe(shown).sha256 == r.sha256  # show prints every default: it loads back to the same recipe


def test_recipe_errors_name_file_line_and_column(tmp_path):
    def bad(text: str) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(text)
        return error("recipe", "check", path)

    typo = bad("stages: [profile, export]\nwaves:\n  max_wavee: 0.1\n")
    assert "r.yaml:3:3: waves: config key 'max_wavee' does not exist (known: target_density, max_wave," in typo
    assert "r.yaml:2:3: waves.max_wave: expected a number" in bad("waves:\n  max_wave: lots\n")
    assert "r.yaml:2:3:" in bad("waves:\n  max_wave: 0.5\n") and "max_wave" in bad("waves:\n  max_wave: 0.5\n")
    assert "r.yaml:1:1:" in bad("stages: [profile, prune, export]\n") and "unknown stage 'prune'" in bad("stages: [profile, prune, export]\n")
    # guardrails that cannot be evaluated
    assert "add profile" in bad("stages: [export, verify]\nverify: {reference: Q4_K_M}\n")
    assert "canary_tokens 0" in bad("verify: {min_canary: 0.5, canary_tokens: 0}\n")
    assert "unknown llama.cpp file type 'Q9_X'" in bad("verify: {reference: Q9_X}\n")
    assert "export stage is required" in bad("stages: [profile, verify]\n")
    # --set goes through the same typed model
    with pytest.raises(BirdboneError, match="max_wave"):
        load_recipe("bird-bone", ["waves.max_wave=0.2"])
    assert load_recipe("bird-bone", ["waves.max_wave=0.05"]).waves.max_wave == 0.05


def test_recipes_diff_after_defaults(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("stages: [profile, budget, export]\n")
    b.write_text("stages: [export, budget, profile]\nbudget: {method: greedy}\nwaves: {max_wave: 0.1}\n")  # order and defaults do not count
    changes = diff_recipes(load_recipe(a), load_recipe(b))
    assert changes == []
    b.write_text("stages: [profile, budget, export]\nbudget: {method: usage}\n")
    r = json.loads(birdbone("diff", a, b, "--json").stdout)
    assert r["changes"] == [{"key": "budget.method", "a": "greedy", "b": "usage"}]
    assert load_config(Recipe, a).seed == load_config(Recipe, a).waves.seed == load_config(Recipe, a).scaffold.seed == 0


def test_compress_refuses_bad_requests_before_any_work(tiny, tiny_recipe, tmp_path):
    run = tmp_path / "run"
    assert "must not be inside the run folder" in error("compress", tiny.gguf_f16, "-r", tiny_recipe, "--run-dir", run, "-o", run / "x.gguf")
    assert not run.exists()
    assert "same file as an input" in error("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", tiny.gguf_f16, "--run-dir", run)
    assert "no such recipe" in error("compress", tiny.gguf_f16, "-r", "gentel", "-o", tmp_path / "x.gguf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "not a compress run folder" in error("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", tmp_path / "x.gguf", "--run-dir", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# -- the pipeline -----------------------------------------------------------------------------------
def test_compress_runs_every_stage_and_records_what_it_did(straight, tiny_recipe):
    out, run, r = straight
    assert list(r["stages"]) == ["map", "profile", "waves", "budget", "export", "verify"] and r["passed"] is True
    assert r["stages"]["waves"]["waves"] >= 3 and 0.69 <= r["stages"]["waves"]["density"] <= 0.72
    names = [g["guardrail"] for g in r["verify"]["guardrails"]]
    assert names == ["KLD mean ≤", "bytes ≤ Q4_K_M", "ppl ≤ Q4_K_M + 0.5 %"]
    checks = {g["guardrail"]: g for g in r["verify"]["guardrails"]}
    assert all(g["passed"] == (g["value"] <= g["limit"]) for g in checks.values())
    assert checks["KLD mean ≤"]["value"] == r["verify"]["eval"]["kld_mean"] > 0
    assert checks["bytes ≤ Q4_K_M"]["limit"] == r["verify"]["reference"]["model"]["file_bytes"]
    recipe = load_recipe(tiny_recipe)
    with open_model(out) as m:
        assert m.meta("birdbone.recipe.sha256") == recipe.sha256 and m.meta("birdbone.verify.passed") is True
        assert m.meta("birdbone.parent.sha256") == json.loads((run / "run.json").read_text())["identity"]["input_sha256"]
        assert json.loads(m.meta("birdbone.stage_summary"))["budget"]["method"] == "greedy"
        # pruned weights stay zero in the quantized output
        assert (m.tensor("blk.0.ffn_up.weight") == 0).mean() >= 0.25
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["packages"]["llama-cpp-python"] and prov["command"][1] == "compress" and set(prov["seconds"]) == set(r["stages"])
    diff = json.loads((run / "diff.json").read_text())
    assert diff["changed"] > 0 and diff["bytes_b"] < diff["bytes_a"] and sum(row["pruned"] for row in diff["by_role"]) > 0
    assert (run / "diff.md").read_text().startswith("# diff:") and (run / "diff.json").stat().st_size < 200_000
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    modelfile = out.with_name("out.Modelfile").read_text()
    assert "FROM ./out.gguf" in modelfile


def test_compress_is_reproducible_across_processes_and_through_kill_9(straight, tiny, tiny_recipe, tmp_path):
    out, _, _ = straight
    again = tmp_path / "again.gguf"
    birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", again)
    assert again.read_bytes() == out.read_bytes()
    killed, run = tmp_path / "killed.gguf", tmp_path / "killed.run"
    p = subprocess.Popen([sys.executable, "-m", "birdbone", "compress", str(tiny.gguf_f16), "-r", str(tiny_recipe), "-o", str(killed)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    state = run / "waves" / "state.json"
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text()).get("waves", 0) >= 1):
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = json.loads((run / "state.json").read_text())["done"]
    assert "waves" not in done and not killed.exists()  # killed inside the healing waves
    birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", killed)
    assert killed.read_bytes() == out.read_bytes()
    # a finished run folder refuses another recipe
    other = tmp_path / "other.yaml"
    other.write_text(TINY_RECIPE.replace("seed: 3", "seed: 4"))
    assert "another recipe" in error("compress", tiny.gguf_f16, "-r", other, "-o", killed, "--run-dir", run)


def test_revert_a_compress_run_to_a_wave_or_a_stage(straight, tiny, tmp_path):
    out, run, _ = straight
    birdbone("revert", run, "--to-wave", "0", "--type", "F16", "-o", tmp_path / "w0.gguf")
    d = json.loads(birdbone("diff", tiny.gguf_f16, tmp_path / "w0.gguf", "--json").stdout)
    assert d["changed"] == 0 and d["tensors"] == 20
    birdbone("revert", run, "--to-stage", "export", "-o", tmp_path / "exported.gguf")
    with open_model(tmp_path / "exported.gguf") as a, open_model(out) as b:
        assert all(a.raw(n).tobytes() == b.raw(n).tobytes() for n in a.tensors)  # the output is the export, stamped
    birdbone("revert", run, "--to-stage", "waves", "-o", tmp_path / "waves.gguf")
    d = json.loads(birdbone("diff", tiny.gguf_f16, tmp_path / "waves.gguf", "--json").stdout)
    assert d["changed"] == 14 and sum(row["pruned"] for row in d["by_role"]) > 0
    assert "not finished" in error("revert", run, "--to-stage", "scaffold", "-o", tmp_path / "s.gguf")
    # two waves of the run, replayed from the history
    d = json.loads(birdbone("diff", f"{run}@1", f"{run}@2", "--json").stdout)
    assert d["a"].endswith("@1") and d["changed"] == 14 and sum(row["pruned"] for row in d["by_role"]) > 0


def test_a_failing_guardrail_writes_the_file_marked_and_exits_3(straight, tiny, tiny_recipe, tmp_path):
    out, run, _ = straight
    failing = tmp_path / "fail.yaml"
    failing.write_text(TINY_RECIPE.replace("max_kld: 0.01", "max_kld: 0.0"))
    p = birdbone("compress", tiny.gguf_f16, "-r", failing, "-o", tmp_path / "f.gguf", "--json", check=False)
    assert p.returncode == 3, p.stderr
    assert json.loads(p.stdout)["passed"] is False
    with open_model(tmp_path / "f.gguf") as m:
        assert m.meta("birdbone.verify.passed") is False


def test_dvc_loads_the_stage_compress_writes(tiny, tiny_recipe, tmp_path, monkeypatch):
    from dvc.repo import Repo

    repo_dir = tmp_path / "proj"
    repo_dir.mkdir()
    Repo.init(str(repo_dir), no_scm=True)
    (repo_dir / "dvc.yaml").write_text("stages:\n  other:\n    cmd: echo hi\n")
    monkeypatch.chdir(repo_dir)
    birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", repo_dir / "m.gguf", "--dvc")
    stages = {s.name: s for s in Repo(str(repo_dir)).index.stages}
    assert set(stages) == {"other", "compress-m"}  # the user's stage is kept
    st = stages["compress-m"]
    assert st.cmd.startswith("birdbone compress ") and "-o m.gguf" in st.cmd
    assert {str(Path(o.def_path)) for o in st.outs} == {"m.gguf", "m.run"}
    assert str(tiny_recipe) in {str(d.def_path) for d in st.deps}


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tiny_recipe, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    r = json.loads(birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", tmp_path / "x.gguf", "--dry-run", "--json").stdout)
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, no output
    steps = {s["stage"]: s for s in r["steps"]}
    assert list(steps) == ["map", "profile", "waves", "budget", "export", "verify"] and r["done"] == []
    # later steps read what earlier ones wrote: waves score with the profile and allocate from the map only when asked
    assert "profile" in steps["waves"]["reads"] and "map.json" not in steps["waves"]["reads"]
    assert steps["budget"]["model"] == "waves.gguf" and "profile-waves" in steps["budget"]["writes"]
    assert steps["export"]["reads"] == ["waves.gguf", "plan.json", "profile-waves"] and steps["verify"]["writes"] == ["verify.json"]
    alpha = json.loads(birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", tmp_path / "x.gguf", "--dry-run", "--json",
                                "--set", "waves.allocation=alpha").stdout)
    assert "map.json" in {s["stage"]: s for s in alpha["steps"]}["waves"]["reads"]
    text = birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", tmp_path / "x.gguf", "--dry-run").stdout
    assert "dry run, nothing written" in text and "waves.gguf" in text and "target_density: 0.7" in text


def test_a_finished_run_lists_its_stages_as_done_in_the_plan(straight, tiny, tiny_recipe):
    out, run, _ = straight
    r = json.loads(birdbone("compress", tiny.gguf_f16, "-r", tiny_recipe, "-o", out, "--dry-run", "--json").stdout)
    assert r["done"] == ["map", "profile", "waves", "budget", "export", "verify"]


def test_the_waves_stage_scores_with_the_profile_stage_s_usage(straight):
    _, run, _ = straight
    # the prune run inside copied the profile instead of profiling again
    assert (run / "waves" / "usage" / "usage.safetensors").read_bytes() == (run / "profile" / "usage.safetensors").read_bytes()
    identity = json.loads((run / "waves" / "run.json").read_text())["identity"]
    assert identity["usage_sha256"] and "alpha" not in identity


@pytest.mark.builtin
def test_the_readme_main_job_meets_its_guardrails(tmp_path):
    """The README's main job as written there (compress the built-in model with the gentle recipe),
    plus the check the README suggests: verify against Q4_K_M made with the same importance matrix.
    The README's guardrails: Δppl ≤ 15 %, KLD ≤ 0.15; no larger than Q4_K_M and no worse in ppl."""
    p = birdbone("compress", "-o", tmp_path / "smollm2.gguf", "--set", "verify.reference=Q4_K_M", "--json", check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    checks = {g["guardrail"]: g for g in r["verify"]["guardrails"]}
    assert set(checks) == {"Δppl % ≤", "KLD mean ≤", "bytes ≤ Q4_K_M", "ppl ≤ Q4_K_M"} and r["passed"] is True
    assert checks["Δppl % ≤"]["limit"] == 15.0 and checks["KLD mean ≤"]["limit"] == 0.15
    ev = r["verify"]["eval"]
    assert 35.0 < ev["pct_of_parent_bytes"] < 40.0  # Q4_K_M's size class (38.9 % of F16 here)
    with open_model(tmp_path / "smollm2.gguf") as m:
        assert m.meta("birdbone.recipe.name") == "gentle" and m.meta("birdbone.verify.passed") is True


TINY_HOLLOW = """\
name: hollow-tiny
seed: 1
stages: [profile, structure, budget, export, verify]
profile: {tokens: 256, ctx: 64}
structure: {target: 0.7, ffn_multiple: 32, heal: {steps: 3, batch: 2, seq: 32, kd_weight: 1.0}, eval_tokens: 256, eval_ctx: 64,
            calibration_tokens: 256, stop_loss: {threshold_pct: 1000.0}}
budget: {method: greedy, target_bytes: Q4_K_M, sensitivity: {val_tokens: 256, val_ctx: 64, passes: 2, seq: 32}}
verify: {tokens: 256, ctx: 64, canary_tokens: 4, decode: 4, reference: Q4_K_M}
"""


def test_the_hollow_loop_ships_a_smaller_structured_file(tiny, tmp_path):
    """profile → structure (distilled healing) → budget on the smaller model → export → verify, on a tiny model
    (a random one, which any cut hurts: the stop-loss is set aside so the run reaches its target)."""
    recipe = tmp_path / "hollow.yaml"
    recipe.write_text(TINY_HOLLOW)
    r = json.loads(birdbone("compress", tiny.gguf_f16, "-r", recipe, "-o", tmp_path / "h.gguf", "--json").stdout)
    s = r["stages"]["structure"]
    # target 0.7; FFN widths round up to multiples of 32 of 128, so the plan lands within a rounding of it
    assert s["arch"] == "deci" and 0.65 < s["block_params"] <= 0.76 and s["ffn_removed"] > 0
    checks = {g["guardrail"]: g for g in r["verify"]["guardrails"]}
    # the budget planned the smaller model at its own Q4_K_M size: far below the parent's Q4_K_M
    assert checks["bytes ≤ Q4_K_M"]["value"] < 0.95 * checks["bytes ≤ Q4_K_M"]["limit"]
    with open_model(tmp_path / "h.gguf") as m:
        assert m.architecture == "deci" and json.loads(m.meta("birdbone.structure"))["ffn"]
    plan = json.loads(birdbone("compress", tiny.gguf_f16, "-r", recipe, "-o", tmp_path / "h.gguf", "--dry-run", "--json").stdout)
    assert [s["stage"] for s in plan["steps"]] == ["profile", "structure", "budget", "export", "verify"] and len(plan["done"]) == 5
    assert {s["stage"]: s for s in plan["steps"]}["budget"]["model"] == "structure.gguf"
    # the reference is the parent quantized with the parent's own imatrix
    assert "profile" in {s["stage"]: s for s in plan["steps"]}["verify"]["reads"]
