"""The measure room: each metric on synthetic arrays with known answers, θ_v1 on the cases it is
meant to separate, degenerate tensors, the model map on the tiny model, the reports, and (marked
``builtin``) every tensor of the built-in model."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from birdbone.measure import MeasureConfig, MeasureSkipped, fleet, measure_model, measure_tensor, theta_v1
from birdbone.measure import spectrum as spectrum_mod
from birdbone.measure.basic import bits_per_weight, frobenius_norm, nonfinite_counts, zero_share
from birdbone.measure.distribution import describe_distribution, excess_kurtosis, histogram_entropy, scale_coherence
from birdbone.measure.report import render_html, tensor_row, write_csv, write_html, write_json
from birdbone.measure.spectrum import (
    describe_spectrum,
    effective_rank,
    exact_singular_values,
    explained_variance,
    gram,
    power_law_fit,
    rank_for,
    stable_rank,
)
from birdbone.measure.theta import theta_parts_v1

SHAPE = (1536, 576)  # an ffn_up of the built-in model


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices gain nothing from BLAS threads, and spinning threads slow a busy machine."""
    from birdbone.measure.map import limit_blas_threads

    with limit_blas_threads(1):
        yield


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def synthetic(kind: str, seed: int = 0, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    r = rng(seed)
    SHAPE = shape  # noqa: N806
    if kind == "uniform":
        return r.uniform(-1, 1, SHAPE).astype(np.float32)
    if kind == "gaussian":
        return r.standard_normal(SHAPE).astype(np.float32)
    if kind == "laplace":
        return r.laplace(size=SHAPE).astype(np.float32)
    if kind == "lowrank3":
        return (r.standard_normal((SHAPE[0], 3)) @ r.standard_normal((3, SHAPE[1]))).astype(np.float32)
    if kind == "t3":
        return r.standard_t(3, SHAPE).astype(np.float32)
    if kind == "cauchy":
        return r.standard_cauchy(SHAPE).astype(np.float32)
    raise KeyError(kind)


def pareto(alpha: float, n: int, seed: int) -> np.ndarray:
    """Continuous power law p(x) ∝ x^-alpha on [1, ∞), by inversion."""
    return (1.0 - rng(seed).random(n)) ** (-1.0 / (alpha - 1.0))


# ---- basic ---------------------------------------------------------------------------------------


def test_basic_measures():
    x = np.array([[3.0, 0.0], [0.0, 4.0]], dtype=np.float32)
    assert frobenius_norm(x) == pytest.approx(5.0)
    assert zero_share(x) == 0.5
    assert zero_share(np.array([-0.0, 1.0])) == 0.5
    assert bits_per_weight(18, 32) == 4.5  # one Q4_0 block
    assert bits_per_weight(0, 0) is None
    assert nonfinite_counts(np.array([np.nan, np.inf, -np.inf, 1.0])) == (1, 2)


# ---- distribution --------------------------------------------------------------------------------


def test_kurtosis_known_distributions():
    r = rng(1)
    assert excess_kurtosis(r.standard_normal(1_000_000)) == pytest.approx(0.0, abs=0.03)
    assert excess_kurtosis(r.laplace(size=1_000_000)) == pytest.approx(3.0, abs=0.15)
    assert excess_kurtosis(r.uniform(size=1_000_000)) == pytest.approx(-1.2, abs=0.01)
    assert excess_kurtosis(np.array([-1.0, 1.0] * 10)) == pytest.approx(-2.0)


def test_histogram_entropy():
    assert histogram_entropy(rng(2).uniform(size=1_000_000)) > 0.999
    # two equal spikes: two occupied bins of 256 -> ln 2 / ln 256 = 1/8
    assert histogram_entropy(np.array([0.0, 1.0] * 50)) == pytest.approx(1 / 8)
    spike = np.r_[np.zeros(10_000), 1.0]  # all mass in one bin, one outlier
    assert histogram_entropy(spike) < 0.01
    assert histogram_entropy(np.arange(256.0), bins=256) == pytest.approx(1.0)
    with pytest.raises(MeasureSkipped, match="constant"):
        histogram_entropy(np.ones(10))


def test_scale_coherence():
    even = scale_coherence(np.arange(1000.0))
    assert even.cv == pytest.approx(0.0, abs=1e-9) and even.zero_gap_share == 0.0
    # uniform values: gaps nearly exponential -> CV ≈ 1
    assert scale_coherence(rng(3).uniform(size=200_000)).cv == pytest.approx(1.0, abs=0.02)
    # the sample is fixed-seed, without replacement, at most 100,000 values
    x = rng(4).standard_normal(300_000)
    a, b = scale_coherence(x), scale_coherence(x)
    assert a == b and a.n_sample == 100_000 and a.zero_gap_share == 0.0


def test_scale_coherence_zero_gaps_follow_the_formula():
    # values on a grid: repeats make zero gaps, and CV² = (1 + c'²) / (1 − p) − 1
    grid = np.round(rng(5).standard_normal(50_000) * 8) / 8
    c = scale_coherence(grid)
    p, c_nz = c.zero_gap_share, c.cv_nonzero
    assert p > 0.9
    assert c.cv**2 == pytest.approx((1 + c_nz**2) / (1 - p) - 1, rel=1e-9)
    assert c.cv > scale_coherence(rng(5).standard_normal(50_000)).cv


# ---- θ -------------------------------------------------------------------------------------------


def measured_theta(kind: str) -> float:
    d = describe_distribution(synthetic(kind))
    theta = theta_v1(d.entropy, d.kurtosis, d.coherence, d.n_sample)
    assert 0.0 <= theta <= 90.0
    return theta


def test_theta_orders_the_synthetic_cases():
    th = {k: measured_theta(k) for k in ("uniform", "gaussian", "lowrank3", "laplace", "t3", "cauchy")}
    assert th["uniform"] < 5
    assert th["uniform"] < th["gaussian"] < th["lowrank3"] < th["laplace"] < th["t3"] < th["cauchy"]
    assert 15 < th["gaussian"] < 30 and th["t3"] > 60 and th["cauchy"] > 80


def test_theta_sees_values_not_structure_the_spectrum_does():
    low, noise = synthetic("lowrank3", shape=(768, 288)), synthetic("gaussian", shape=(768, 288))
    shuffled = rng(6).permutation(low.reshape(-1)).reshape(low.shape)
    a, b = measure_tensor(low, "w"), measure_tensor(shuffled, "w")
    # same multiset of values; only the coherence sample (drawn by position) differs, and its CV
    # hangs on the few extreme values it happens to draw
    assert a.theta == pytest.approx(b.theta, abs=3.0)
    assert a.spectrum.rank99 == 3 and b.spectrum.rank99 > 200  # the arrangement is in the spectrum
    n = measure_tensor(noise, "w")
    assert a.spectrum.stable_rank < 3 < 100 < n.spectrum.stable_rank


def test_theta_bounds_and_extremes():
    assert theta_v1(1.0, -1.2, 1.0, 100_000) == 0.0
    n = 100_000
    assert theta_v1(0.0, 1e12, math.sqrt(n - 2), n) == pytest.approx(90.0, abs=1e-6)
    parts = theta_parts_v1(0.85, 3.0, 24.0, n)
    assert parts.u_kurtosis == 0.5  # Laplace's kurtosis is the half-way point
    with pytest.raises(ValueError):
        theta_v1(float("nan"), 0.0, 1.0, 100)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(-2, 1e9), st.floats(0, 1e6), st.integers(4, 10**6))
def test_theta_is_bounded(h, k, c, n):
    assert 0.0 <= theta_v1(h, k, c, n) <= 90.0


# ---- spectrum ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (64, 64)])
def test_singular_values_match_svd(shape, monkeypatch):
    monkeypatch.setattr(spectrum_mod, "GRAM_CHUNK", 1000)  # force many chunks
    x = rng(7).standard_normal(shape).astype(np.float32)
    s = exact_singular_values(x)
    ref = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    assert s.shape == (min(shape),)
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    small = min(shape)
    assert gram(x).shape == (small, small)


def test_rank3_matrix():
    spec = describe_spectrum(synthetic("lowrank3"))
    assert spec.exact and spec.method == "gram_eigh" and spec.n_values == 576
    assert spec.rank99 == 3 and spec.rank95 <= 3 and spec.rank90 <= 3
    assert spec.effective_rank < 3.01
    assert spec.alpha is None and "3 positive eigenvalues" in spec.alpha_skipped


def test_identity_ranks():
    s = exact_singular_values(np.eye(50))
    assert stable_rank(s) == pytest.approx(50)
    assert effective_rank(s) == pytest.approx(50)
    spec = describe_spectrum(np.eye(50))
    assert spec.stable_rank == pytest.approx(50) and spec.rank99 == 50 and spec.rank90 == 45


def test_explained_variance_is_monotone_and_ends_at_one():
    spec = describe_spectrum(synthetic("gaussian"))
    ev = np.array(spec.explained_variance)
    assert np.all(np.diff(ev) >= 0) and ev[-1] == pytest.approx(1.0, abs=1e-12)
    assert ev == pytest.approx(explained_variance(exact_singular_values(synthetic("gaussian"))))
    assert rank_for(np.array([0.5, 0.9, 1.0]), 0.9) == 2
    assert rank_for(np.array([0.5, 0.8]), 0.9) is None


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5])
def test_alpha_recovers_a_pareto_exponent(alpha):
    fit = power_law_fit(pareto(alpha, 5000, seed=int(alpha * 10)))
    assert fit.alpha == pytest.approx(alpha, abs=0.1)
    assert fit.xmin < 1.5 and fit.n_tail > 2000


def crosscheck_spectra() -> dict[str, np.ndarray]:
    return {
        "pareto 2.5": pareto(2.5, 500, 1),
        "lognormal body + pareto 2.2 tail": np.r_[rng(2).lognormal(0, 0.3, 300), 3 * pareto(2.2, 200, 3)],
        "student-t(3) matrix": exact_singular_values(rng(4).standard_t(3, size=(400, 200))) ** 2,
        "gaussian matrix": exact_singular_values(rng(6).standard_normal((600, 300))) ** 2,
    }


def test_alpha_matches_the_powerlaw_package():
    powerlaw = pytest.importorskip("powerlaw")
    for name, eigs in crosscheck_spectra().items():
        ours = power_law_fit(eigs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ours.alpha <= 3:  # powerlaw >= 2.0 bounds alpha to (0, 3) by default
                ref = powerlaw.Fit(eigs, verbose=0)
                assert ours.alpha == pytest.approx(ref.alpha, rel=1e-6), name
                assert ours.xmin == ref.xmin, name
            try:  # unbounded, as WeightWatcher reads alpha (powerlaw >= 2.0 spelling)
                ref = powerlaw.Fit(eigs, verbose=0, parameter_ranges={"alpha": [1, None]})
            except TypeError:
                continue
            assert ours.alpha == pytest.approx(ref.alpha, rel=1e-6), name
            assert ours.xmin == ref.xmin, name


def test_randomized_spectrum_is_flagged_approximate():
    r = rng(8)
    u, _ = np.linalg.qr(r.standard_normal((200, 100)))
    v, _ = np.linalg.qr(r.standard_normal((100, 100)))
    sigma = 0.9 ** np.arange(100)
    x = (u * sigma) @ v.T
    cfg = MeasureConfig(exact_max_side=32, approx_top_k=40)
    spec = describe_spectrum(x, cfg)
    assert not spec.exact and spec.method == "randomized_svd" and spec.n_values == 40
    assert spec.sigma_max == pytest.approx(1.0, rel=1e-4)
    assert spec.effective_rank is None
    ev = np.array(spec.explained_variance)
    assert ev == pytest.approx(np.cumsum(sigma[:40] ** 2) / np.sum(sigma**2), rel=1e-3)
    t = measure_tensor(x.astype(np.float32), "blk.0.attn_q.weight", config=cfg)
    assert t.status["spectrum"] == "approximate" and t.status["alpha"] == "approximate"


# ---- degenerate tensors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "reason", "groups"),
    [
        (np.zeros((0, 5), np.float32), "empty tensor", ("distribution", "theta", "spectrum", "alpha")),
        (np.zeros((8, 8), np.float32), "all values are zero", ("distribution", "theta", "spectrum", "alpha")),
        (np.array([[1.0, np.nan], [0.0, 2.0]], np.float32), "1 NaN and 0 Inf", ("distribution", "theta", "spectrum", "alpha")),
        (np.array([[1.0, np.inf], [0.0, 2.0]], np.float32), "0 NaN and 1 Inf", ("distribution", "theta", "spectrum", "alpha")),
        (np.ones(64, np.float32), "constant", ("distribution", "theta", "spectrum", "alpha")),
        (np.full((4, 4), 0.5, np.float32), "constant", ("distribution", "theta", "alpha")),
        (rng(9).standard_normal(64).astype(np.float32), "1-D tensor", ("spectrum", "alpha")),
        (rng(9).standard_normal((2, 8, 8)).astype(np.float32), "3-D tensor", ("spectrum", "alpha")),
        (rng(9).standard_normal((2, 8)).astype(np.float32), "positive eigenvalues", ("alpha",)),
    ],
    ids=["empty", "zeros", "nan", "inf", "constant-1d", "constant-2d", "1d", "3d", "2-row"],
)
def test_degenerate_tensors_get_none_and_a_reason(x, reason, groups):
    t = measure_tensor(x, "blk.0.attn_norm.weight")
    assert reason in t.reasons[groups[0]], t.reasons
    for g in groups:
        assert t.status[g] == "skipped", (g, t.reasons)
    assert set(t.reasons) == set(groups)
    if "distribution" in groups:
        assert t.distribution is None and t.theta is None
    if "spectrum" in groups:
        assert t.spectrum is None
    if groups[-1] == "alpha" and "spectrum" not in groups:
        assert t.spectrum is not None and t.alpha is None
    assert t.status["basic"] == "exact"
    json.dumps(t.as_dict(), allow_nan=False)


# ---- the model map -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_map(tiny):
    return measure_model(tiny.gguf_f32, jobs=1)


def test_measure_model_on_the_tiny_model(tiny, tiny_map):
    from birdbone.io import open_model

    with open_model(tiny.gguf_f32) as mf:
        names = list(mf.tensors)
    m = tiny_map
    assert [t.name for t in m.tensors] == names
    assert {t.role for t in m.tensors} >= {"skeleton", "organ", "embed", "norm"}
    for t in m.tensors:
        assert t.status["basic"] == "exact" and t.type == "F32" and t.bits_per_weight == 32.0
        if len(t.shape) == 2:
            assert t.status["spectrum"] == "exact" and t.theta is not None
    assert [a.layer for a in m.by_layer()] == [0, 1]
    roles = {a.role: a for a in m.by_role()}
    assert roles["skeleton"].theta_mean is not None and roles["skeleton"].alpha_mean is not None
    d = json.loads(json.dumps(m.as_dict(curves=True), allow_nan=False))
    assert d["theta_version"] == "theta_v1" and len(d["tensors"]) == len(names)
    assert "explained_variance" in d["tensors"][1]["spectrum"] or d["tensors"][1]["spectrum"] is None
    assert "explained_variance" not in json.dumps(m.as_dict())


def test_jobs_and_progress_do_not_change_the_map(tiny, tiny_map):
    seen = []
    m2 = measure_model(tiny.gguf_f32, jobs=2, progress=lambda n, i, total: seen.append((i, total)))
    assert sorted(seen) == [(i, len(m2.tensors)) for i in range(1, len(m2.tensors) + 1)]

    def strip(m):
        d = m.as_dict(curves=True)
        for k in ("seconds", "jobs"):
            d.pop(k)
        for t in d["tensors"]:
            t.pop("seconds")
        return d

    assert strip(m2) == strip(tiny_map)


def test_fleet_and_writers(tiny, tiny_map, tmp_path):
    f16, hf = measure_model(tiny.gguf_f16), measure_model(tiny.hf_dir)
    rows = fleet([tiny_map, f16, hf])
    assert [r.model for r in rows] == [str(tiny.gguf_f32), str(tiny.gguf_f16), str(tiny.hf_dir)]
    assert rows[0].parameters == rows[1].parameters and rows[1].bits_per_weight < rows[0].bits_per_weight
    assert {t.role for t in hf.tensors} >= {"skeleton", "organ", "embed", "norm"}  # Hugging Face names
    # same weights, F16 grid: θ moves a little (zero gaps), the spectrum hardly at all
    a, b = tiny_map.tensor("blk.0.ffn_up.weight"), f16.tensor("blk.0.ffn_up.weight")
    assert abs(a.theta - b.theta) < 1 and a.spectrum.stable_rank == pytest.approx(b.spectrum.stable_rank, rel=1e-2)
    assert rows[0].measured == sum(t.theta is not None for t in tiny_map.tensors) and rows[0].tensors == len(tiny_map.tensors)
    write_json(tiny_map, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["parameters"] == tiny_map.n_params
    write_csv(tiny_map, tmp_path / "m.csv")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].startswith("name,role,layer,organ,shape,type") and len(lines) == len(tiny_map.tensors) + 1
    assert set(tensor_row(tiny_map.tensors[0])) == set(lines[0].split(","))
    write_html(tiny_map, tmp_path / "m.html")
    page = (tmp_path / "m.html").read_text()
    assert page.count("<img") == 3 and "data:image/png;base64," in page and "theta_v1" in page
    assert not list(tmp_path.glob(".birdbone-tmp-*"))


def test_html_with_nothing_to_plot():
    from birdbone.measure.map import ModelMap

    empty = ModelMap("none.gguf", "llama", "gguf", (), MeasureConfig(), 1, 0.0)
    assert empty.overall().tensors == 0 and fleet([empty])[0].theta_mean is None
    assert render_html(empty).count("<img") == 3


# ---- the built-in model --------------------------------------------------------------------------


@pytest.mark.builtin
def test_builtin_every_tensor(builtin_path):
    import importlib.util

    # without threadpoolctl BLAS keeps its own threads, and 2 jobs x 2 BLAS threads on 2 cores spin
    jobs = 2 if importlib.util.find_spec("threadpoolctl") else 1
    m = measure_model(builtin_path, jobs=jobs)
    assert len(m.tensors) == 272
    counts = m.status_counts()
    assert counts["spectrum"] == {"exact": 211, "approximate": 0, "skipped": 61}  # 61 norm vectors
    assert counts["theta"]["exact"] == 272
    embd = m.tensor("token_embd.weight")
    assert embd.type == "Q8_0" and embd.spectrum.exact and embd.spectrum.n_values == 576
    for t in m.tensors:
        if t.spectrum:
            assert t.alpha is not None and 1 < t.alpha < 50
            assert t.spectrum.rank90 <= t.spectrum.rank95 <= t.spectrum.rank99 <= t.spectrum.n_values
    json.dumps(m.as_dict(), allow_nan=False)
