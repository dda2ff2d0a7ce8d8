"""Low-rank scaffold: activation-aware triplets, residual thresholds, bundles, and the loop end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_cli import birdbone

from birdbone.io import open_model
from birdbone.remodel.scaffold import ScaffoldConfig, kmeans, scaffolded, synergy_bundles, triplets

SMALL = ["--set", "val_tokens=512", "--set", "val_ctx=64", "--set", "heal.steps=2", "--set", "heal.seq=32", "--set", "heal.batch=2"]


def matrix(seed=0, shape=(24, 40)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) @ np.diag(np.linspace(2, 0.1, shape[1]))).astype(np.float32)


def test_full_rank_triplets_rebuild_the_matrix_with_the_activation_scaling_undone():
    w = matrix()
    imp = np.random.default_rng(1).uniform(0.01, 100, w.shape[1])
    t = triplets(w, min(w.shape), imp)
    np.testing.assert_allclose(t.low_rank(min(w.shape)), w, atol=1e-4)
    ex = [t.explained(k) for k in range(1, min(w.shape) + 1)]
    assert ex == sorted(ex) and ex[-1] == pytest.approx(1.0)
    # activation-aware: the first direction follows the loud channels, not the raw matrix's
    loud = np.zeros(w.shape[1]) + 1e-4
    loud[7] = 1e4
    assert np.argmax(np.abs(triplets(w, 1, loud).vt[0] * np.sqrt(loud))) == 7


def test_residual_kept_follows_the_rule_and_the_halving():
    w = matrix(2)
    t = triplets(w, 3)
    _, kept_q = scaffolded(w, t, 2, ScaffoldConfig(keep="quantile", quantile=0.75))
    assert kept_q == pytest.approx(0.25, abs=0.01)
    out, kept_all = scaffolded(w, t, 2, ScaffoldConfig(keep="rms", c=0.0))
    assert kept_all > 0.99 and np.allclose(out, w, atol=1e-5)
    out, kept_none = scaffolded(w, t, 2, ScaffoldConfig(keep="rms", c=1e6))
    assert kept_none == 0.0 and np.allclose(out, t.low_rank(2))
    _, k1 = scaffolded(w, t, 2, ScaffoldConfig(keep="rms", c=1.0))
    _, k_half = scaffolded(w, t, 2, ScaffoldConfig(keep="rms", c=1.0), scale=0.5)
    assert k_half > k1  # a halved threshold keeps more residual


def test_bundles_cluster_components_within_a_family():
    x = np.vstack([np.random.default_rng(0).normal(c, 0.01, (10, 3)) for c in (0.0, 5.0)])
    labels = kmeans(x, 2, seed=0)
    assert len(set(labels[:10])) == 1 and len(set(labels[10:])) == 1 and labels[0] != labels[10]
    np.testing.assert_array_equal(labels, kmeans(x, 2, seed=0))
    trips = {f"blk.{i}.attn_q.weight": triplets(matrix(i), 3) for i in range(3)}
    trips["blk.0.ffn_up.weight"] = triplets(matrix(9, (40, 24)), 3)
    b = synergy_bundles(trips, 2, seed=0)
    assert set(b) == set(trips) and all(v <= {0, 1} and v for v in b.values())


def test_scaffold_cli_writes_a_file_llama_cpp_runs_and_reports_steps(tiny_k, tmp_path):
    out = tmp_path / "scaffold.gguf"
    r = json.loads(birdbone("scaffold", tiny_k.gguf_f16, "-o", out, "--layers", "1", "--set", "rank=2", "--set", "stop_loss_pct=1e-9",
                            "--set", "max_halvings=1", *SMALL, "--json").stdout)
    assert [s["step"] for s in r["steps"]] == [1, 2]
    assert r["steps"][0]["threshold_scale"] == 0.5  # the stop-loss fired and halved the threshold
    assert set(r["tensors"]) == {n for n in r["tensors"] if n.startswith("blk.1.")} and len(r["tensors"]) == 7
    with open_model(out) as m, open_model(tiny_k.gguf_f16) as p:
        assert m.meta("birdbone.scaffold.rank") == 2
        changed = [n for n in p.tensors if not np.array_equal(m.tensor(n), p.tensor(n))]
        assert changed and all(n.startswith("blk.1.") for n in changed)
    ev = json.loads(birdbone("eval", out, "--parent", tiny_k.gguf_f16, "--ctx", "64", "--tokens", "256", "--json").stdout)
    assert np.isfinite(ev["model"]["ppl"])


def test_bad_scaffold_requests(tiny_k, tmp_path):
    for sets, msg in ((["rank=0"], "rank"), (["keep=median"], "keep"), (["val_tokens=999999"], "tokens")):
        p = birdbone("scaffold", tiny_k.gguf_f16, "-o", tmp_path / "x.gguf", "--layers", "1", *[a for s in sets for a in ("--set", s)], check=False)
        assert p.returncode == 2 and msg in p.stderr.strip().splitlines()[-1], p.stderr
    assert not (tmp_path / "x.gguf").exists()
