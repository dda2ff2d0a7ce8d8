"""The prune loop end to end on a tiny model: waves, export, bit-exact revert, kill -9 resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from birdbone.io.config import load_config
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.model_file import open_model
from birdbone.remodel.history import DeltaHistory
from birdbone.remodel.prune import PruneConfig, RunState, StopLoss, advance, prunable, run_prune
from tests.test_cli import birdbone

# small enough for CI: 2-step healing on 2×32 tokens, 512 held-out tokens in windows of 64
SMALL = ["--set", "heal.batch=2", "--set", "heal.seq=32", "--set", "eval_tokens=512", "--set", "eval_ctx=64",
         "--set", "calibration_tokens=256", "--heal-steps", "2"]


def tensors(path) -> dict[str, bytes]:
    with open_model(path) as m:
        return {n: m.raw(n).tobytes() for n in m.tensors}


def test_prune_export_and_revert_to_the_bit(tiny, tmp_path):
    run = tmp_path / "run"
    r = json.loads(birdbone("prune", tiny.gguf_f32, "--run-dir", run, "-o", tmp_path / "p.gguf", "--target-density", "0.8",
                            "--score", "wanda", *SMALL, "--json").stdout)
    waves = r["waves"]
    assert waves[0]["wave"] == 0 and waves[0]["density"] == 1.0 and len(waves) >= 3
    assert all(b["density"] < a["density"] for a, b in zip(waves, waves[1:]))
    assert 0.79 <= r["density"] <= 0.83 and r["eval"]["kld_mean"] >= 0
    # structural reinforcement measured every wave (2 layers), stressed layers healed more
    assert all(len(w["layer_own_error"]) == 2 and len(w["layer_grad_norm"]) == 2 for w in waves[1:])
    assert all(w["reinforce_steps"] == (1 if w["stressed_layers"] else 0) for w in waves[1:])
    # the history's size, as a share of the model's fp32 bytes, grows with every wave
    src = tensors(tiny.gguf_f32)
    shares = [w["history_share"] for w in waves[1:]]
    assert 0 < shares[0] and all(b > a for a, b in zip(shares, shares[1:]))
    on_disk = sum(f.stat().st_size for f in (run / "history").glob("wave-*.safetensors"))
    assert shares[-1] == pytest.approx(on_disk / sum(len(b) for b in src.values()))
    # every prunable tensor has at least its mask's zeros; norms and embeddings untouched
    with open_model(tmp_path / "p.gguf") as p:
        w = p.tensor("blk.0.ffn_up.weight")
        assert (w == 0).mean() >= 12 / 64  # rows of 64 keep ceil(0.8 · 64) = 52
        assert p.raw("blk.0.attn_norm.weight").tobytes() == src["blk.0.attn_norm.weight"]
    # the report renders the healing curves; TensorBoard got one event file per wave
    rep = json.loads(birdbone("report", run, "--json").stdout)
    page = (run / "report.html").read_text()
    assert len(rep["waves"]) == len(waves) and page.count("data:image/png;base64,") == 3 and "stressed layers" in page
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == len(waves)
    # wave 0 comes back bit for bit, whatever happened after it
    back = json.loads(birdbone("revert", run, "--to-wave", "0", "--type", "F32", "-o", tmp_path / "w0.gguf", "--json").stdout)
    assert back["density"] == 1.0 and tensors(tmp_path / "w0.gguf") == src
    # and any wave twice gives the same bytes
    birdbone("revert", run, "--to-wave", "2", "--type", "F32", "-o", tmp_path / "a.gguf")
    birdbone("revert", run, "--to-wave", "2", "--type", "F32", "-o", tmp_path / "b.gguf")
    assert tensors(tmp_path / "a.gguf") == tensors(tmp_path / "b.gguf") != src


def test_kill_9_mid_run_resumes_to_identical_bytes(tiny, tmp_path):
    args = [tiny.gguf_f32, "--target-density", "0.6", "--score", "magnitude", *SMALL, "--type", "F32"]
    birdbone("prune", *args, "--run-dir", tmp_path / "whole", "-o", tmp_path / "whole.gguf")
    run = tmp_path / "killed"
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "birdbone", "prune", *map(str, args), "--run-dir", str(run), "-o",
                          str(tmp_path / "killed.gguf")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        state = run / "state.json"
        if state.exists() and json.loads(state.read_text())["waves"] >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "killed.gguf").exists(), "the run finished before it could be killed"
    birdbone("prune", *args, "--run-dir", run, "-o", tmp_path / "killed.gguf")
    assert tensors(tmp_path / "killed.gguf") == tensors(tmp_path / "whole.gguf")
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["density"] for m in resumed] == [m["density"] for m in whole]
    assert [m["ppl"] for m in resumed] == [m["ppl"] for m in whole]


def test_zero_heal_steps_mean_no_healing(tiny, tmp_path):
    """``--heal-steps 0`` trains nothing in any wave (it once trained one step per wave)."""
    r = json.loads(birdbone("prune", tiny.gguf_f32, "--target-density", "0.7", "--score", "magnitude", *SMALL, "--heal-steps", "0",
                            "--set", "reinforce=false", "--type", "F32", "--run-dir", tmp_path / "run", "-o", tmp_path / "p.gguf", "--json").stdout)
    waves = r["waves"][1:]
    assert len(waves) >= 3 and all(w["heal_steps"] == 0 and w["heal_losses"] == [] for w in waves)
    # the history holds no LoRA factors, only masks: each wave is the magnitude mask and nothing else
    with open_model(tmp_path / "p.gguf") as m:
        w = m.tensor("blk.0.ffn_up.weight")
    with open_model(tiny.gguf_f32) as src:
        base = src.tensor("blk.0.ffn_up.weight")
    kept = w != 0
    assert np.array_equal(w[kept], base[kept])  # every surviving weight is exactly its original value


def test_stop_loss_state_machine():
    rule = StopLoss(threshold_pct=3.0, patience=2, rollback_waves=3)
    st = RunState()
    for k, breach in enumerate([True, False, True, True], start=1):  # a lone breach resets
        advance(st, k, breach, rule)
    assert (st.phase, st.rollback_of, st.rollback_left) == ("rollback", 4, 3)
    advance(st, 5, True, rule)
    advance(st, 6, False, rule)  # the guardrail holds again: done
    assert st.phase == "done" and st.waves == 6
    st = RunState(phase="rollback", rollback_left=3, rollback_of=2)
    for k in (3, 4, 5):
        advance(st, k, True, rule)  # never holds: at most rollback_waves waves
    assert st.phase == "done"


def test_rollback_gives_back_a_third_at_original_values(tiny, tmp_path, monkeypatch):
    cfg = load_config(PruneConfig, None, ["target_density=0.5", "score=magnitude", "heal.steps=1", "heal.batch=2", "heal.seq=32",
                                          "eval_tokens=512", "eval_ctx=64"])
    folder = tmp_path / "run"
    state = folder / "state.json"
    # a random tiny model barely suffers from pruning: declare waves 1 and 2 breaches so the
    # stop-loss fires after wave 2; everything after that (rollback, healing, scoring) is real
    import birdbone.remodel.prune as prune_mod

    real = prune_mod.advance
    monkeypatch.setattr(prune_mod, "advance", lambda st, k, breach, rule: real(st, k, k <= 2 or breach, rule))
    run = run_prune(tiny.gguf_f32, folder, cfg)
    phases = [m["phase"] for m in run.metrics]
    assert phases[:4] == ["start", "prune", "prune", "rollback"], phases
    assert json.loads(state.read_text())["phase"] == "done"
    hist = DeltaHistory(folder / "history", {n: s for n, s in run_shapes(tiny.gguf_f32).items()})
    undone, back = hist.load(2).pruned, hist.load(3)
    with open_model(tiny.gguf_f32) as m:
        for n, gone in undone.items():
            revived = back.revived[n]
            assert not (revived & ~gone).any()  # only wave 2's weights come back
            assert abs(int(revived.sum()) - int(np.ceil(gone.sum() / 3))) <= 1
            np.testing.assert_array_equal(back.values[n], m.tensor(n)[revived])  # at their original values
    assert run.metrics[3]["density"] > run.metrics[2]["density"]


def test_rigl_and_qlora_waves(tiny, tmp_path):
    base = ["target_density=0.8", "score=magnitude", "heal.steps=2", "heal.batch=2", "heal.seq=32", "eval_tokens=512", "eval_ctx=64"]
    plain = run_prune(tiny.gguf_f32, tmp_path / "plain", load_config(PruneConfig, None, base))
    rigl = run_prune(tiny.gguf_f32, tmp_path / "rigl", load_config(PruneConfig, None, [*base, "rigl=0.05", "qlora=Q8_0"]))
    # RigL swaps as many weights as it regrows: the density path is the plain one
    assert [m["density"] for m in rigl.metrics] == [m["density"] for m in plain.metrics]
    shapes = run_shapes(tiny.gguf_f32)
    hist = DeltaHistory(tmp_path / "rigl" / "history", shapes)
    d2 = hist.load(2)
    assert d2.revived and all((v == 0).all() for v in d2.values.values())
    with open_model(tiny.gguf_f32) as m:
        state = hist.state_at(2, m.tensor)
    n = next(iter(d2.revived))
    assert (state[n][0][d2.revived[n]] == 0).all() and state[n][1][d2.revived[n]].all()  # alive, born at zero
    with pytest.raises(BirdboneError, match="row granularity"):
        load_config(PruneConfig, None, ["target_density=0.5", "granularity=2:4", "rigl=0.05"])
    with pytest.raises(BirdboneError, match="Q9_9"):
        load_config(PruneConfig, None, ["qlora=Q9_9"])


def run_shapes(path):
    with open_model(path) as m:
        return {n: m.tensors[n].shape for n in prunable(m, ("skeleton", "organ"))}


def test_bad_requests(tiny, tiny_k, tmp_path):
    with pytest.raises(BirdboneError, match="outside \\(0, 1\\]"):
        load_config(PruneConfig, None, ["target_density=1.5"])
    with pytest.raises(BirdboneError, match="wave size 0.3"):
        load_config(PruneConfig, None, ["max_wave=0.3"])
    with pytest.raises(BirdboneError, match="config key 'heal.stepz'|'stepz' does not exist"):
        load_config(PruneConfig, None, ["heal.stepz=3"])
    bad = tmp_path / "c.yaml"
    bad.write_text("target_density: [1, 2\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(PruneConfig, bad)
    cfg = load_config(PruneConfig, None, ["target_density=0.9", "score=magnitude", "heal.steps=0", "eval_tokens=512", "eval_ctx=64"])
    run_prune(tiny.gguf_f32, tmp_path / "run", cfg)
    with pytest.raises(InputError, match="started with another model"):
        run_prune(tiny_k.gguf_f32, tmp_path / "run", cfg)
    with pytest.raises(InputError, match="another config"):
        run_prune(tiny.gguf_f32, tmp_path / "run", load_config(PruneConfig, None, ["target_density=0.8", "eval_tokens=512", "eval_ctx=64"]))
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be.\n" * 20)
    with pytest.raises(InputError, match="short.txt.*too short"):
        run_prune(tiny.gguf_f32, tmp_path / "r3", cfg, short)
    p = birdbone("prune", tiny.gguf_f32, "--run-dir", tmp_path / "r2", "-o", tmp_path / "x.gguf", "--target-density", "0", check=False)
    assert p.returncode == 2 and "outside (0, 1]" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_allocation_from_the_map_spreads_densities_by_alpha(tiny, tmp_path):
    run = tmp_path / "run"
    r = json.loads(birdbone("prune", tiny.gguf_f32, "--run-dir", run, "-o", tmp_path / "p.gguf", "--target-density", "0.8", "--score",
                            "magnitude", "--set", "allocation=alpha", "--set", "allocation_spread=0.1", "--set", "reinforce=false",
                            *SMALL, "--heal-steps", "0", "--json").stdout)
    alloc = json.loads((run / "allocation.json").read_text())
    targets, alpha = alloc["target_density"], alloc["alpha"]
    with open_model(tiny.gguf_f32) as m:
        sizes = {n: m.tensors[n].n_params for n in targets}
    assert abs(sum(targets[n] * sizes[n] for n in sizes) / sum(sizes.values()) - 0.8) < 1e-6
    assert max(targets.values()) - min(targets.values()) > 0.05
    ranked = sorted((a, n) for n, a in alpha.items() if a is not None)
    assert targets[ranked[0][1]] > targets[ranked[-1][1]]  # the most heavy-tailed keeps the most
    final = r["waves"][-1]["tensor_density"]
    for n, d in targets.items():
        assert d - 0.03 <= final[n] <= d + 0.1 / 0.9 * (1 - d) + 0.03, (n, d, final[n])
