"""Pruning scores and waves: quotas, targets, N:M reached progressively, bad requests refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from birdbone.io.errors import BirdboneError
from birdbone.remodel.masks import density, parse_granularity, score, wave

RNG = np.random.default_rng(0)


def run_waves(scores, target, granularity="row", max_wave=0.1, limit=200):
    mask = np.ones(scores.shape, bool)
    history = []
    g = parse_granularity(granularity)
    for _ in range(limit):
        gone = wave(scores, mask, target, max_wave, g)
        if not gone.any():
            break
        assert not (gone & ~mask).any(), "a wave removed a weight that was already gone"
        history.append((mask.sum(axis=1), int(gone.sum()), gone.sum(axis=1)))
        mask = mask & ~gone
    return mask, history


def test_row_waves_shed_at_most_a_tenth_and_stop_at_the_target():
    s = RNG.random((16, 96))
    mask, history = run_waves(s, 0.5)
    assert density(mask) == pytest.approx(0.5)
    assert all((per_row <= np.floor(0.1 * live)).all() for live, _, per_row in history)
    assert all((per_row == per_row[0]).all() for _, _, per_row in history)  # every row the same share
    assert (mask.sum(axis=1) == 48).all()
    # the survivors are each row's highest scores
    for r in range(16):
        assert s[r, mask[r]].min() > s[r, ~mask[r]].max()


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4"])
def test_nm_is_reached_progressively(spec):
    n, m = map(int, spec.split(":"))
    s = RNG.random((8, 64))
    mask, history = run_waves(s, n / m, spec)
    assert len(history) > 2  # not in one shot
    groups = mask.reshape(8, 64 // m, m).sum(axis=2)
    assert (groups == n).all()
    # within every group the survivors are the group's top-n scores
    gs = s.reshape(8, 64 // m, m)
    gm = mask.reshape(8, 64 // m, m)
    assert (np.where(gm, gs, np.inf).min(axis=2) >= np.where(gm, -np.inf, gs).max(axis=2)).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(8, 80), st.floats(0.05, 1.0), st.floats(0.01, 0.1))
def test_waves_never_overshoot(rows, cols, target, max_wave):
    s = np.random.default_rng(rows * cols).random((rows, cols))
    mask, history = run_waves(s, target, max_wave=max_wave, limit=400)
    assert (mask.sum(axis=1) >= np.ceil(target * cols - 1e-9)).all()
    for live, _, per_row in history:
        assert (per_row <= np.floor(max_wave * live)).all()


def test_scores():
    w = RNG.standard_normal((4, 6)).astype(np.float32)
    imp = np.array([0, 1, 4, 9, 16, 25], np.float32)
    np.testing.assert_allclose(score("wanda", w, importance=imp), np.abs(w) * np.sqrt(imp))
    np.testing.assert_allclose(score("taylor", w, grad=2 * w), 2 * w * w)
    np.testing.assert_allclose(score("usage", w, act_freq=imp / 25), np.abs(w) * imp / 25)
    np.testing.assert_allclose(score("magnitude", w), np.abs(w))


@pytest.mark.parametrize("call, message", [
    (lambda: wave(np.ones((2, 8)), np.ones((2, 8), bool), 0.0), "outside \\(0, 1\\]"),
    (lambda: wave(np.ones((2, 8)), np.ones((2, 8), bool), 0.5, 0.2), "wave size 0.2"),
    (lambda: wave(np.ones((2, 10)), np.ones((2, 10), bool), 0.5, 0.1, parse_granularity("2:4")), "multiple of 4"),
    (lambda: wave(np.ones((2, 8)), np.ones((2, 8), bool), 0.7, 0.1, parse_granularity("2:4")), "means density 0.5"),
    (lambda: parse_granularity("4:2"), "N:M"),
    (lambda: score("wanda", np.ones((2, 3))), "needs per-input-channel"),
    (lambda: score("wanda", np.ones((2, 3)), importance=np.ones(4)), "4 channel values"),
    (lambda: score("entropy", np.ones((2, 3))), "choose one of"),
])
def test_bad_requests(call, message):
    with pytest.raises(BirdboneError, match=message):
        call()


def test_rigl_swap_keeps_density_and_regrows_by_gradient():
    from birdbone.remodel.masks import rigl_swap

    s = RNG.random((6, 40))
    mask = s > 0.5
    grad = RNG.standard_normal((6, 40))
    revive, kill = rigl_swap(grad, s, mask, 0.05)
    assert not (revive & mask).any() and not (kill & ~mask).any()
    assert (revive.sum(axis=1) == kill.sum(axis=1)).all() and revive.sum() > 0
    for r in range(6):
        if revive[r].any():  # the regrown have the row's largest |grad| among the dead
            assert np.abs(grad[r, revive[r]]).min() >= np.abs(grad[r, ~mask[r] & ~revive[r]]).max()
            assert s[r, kill[r]].max() <= s[r, mask[r] & ~kill[r]].min()
    with pytest.raises(BirdboneError, match="outside \\[0, 0.05\\]"):
        rigl_swap(grad, s, mask, 0.2)


@pytest.mark.parametrize("spec, target", [("row", 0.5), ("row", 0.7), ("2:4", 0.5)])
def test_one_shot_matches_the_waves_endpoint(spec, target):
    from birdbone.remodel.masks import one_shot

    s = RNG.random((8, 64))
    waved, _ = run_waves(s, target, spec)
    np.testing.assert_array_equal(one_shot(s, target, parse_granularity(spec)), waved)


def test_allocation_keeps_the_mean_and_orders_by_alpha():
    from birdbone.remodel.masks import allocate_densities

    alpha = {"a": 2.0, "b": 3.0, "c": 6.0, "d": None}
    sizes = {"a": 100, "b": 300, "c": 50, "d": 200}
    dens = allocate_densities(alpha, sizes, 0.5, 0.2)
    assert abs(sum(dens[n] * sizes[n] for n in sizes) / sum(sizes.values()) - 0.5) < 1e-9
    assert dens["a"] > dens["b"] > dens["c"] and all(0 < d <= 1 for d in dens.values())
    assert allocate_densities(alpha, sizes, 0.5, 0.0) == {n: 0.5 for n in sizes}
    near_one = allocate_densities(alpha, sizes, 0.95, 0.2)
    assert max(near_one.values()) <= 1.0 and abs(sum(near_one[n] * sizes[n] for n in sizes) / sum(sizes.values()) - 0.95) < 1e-6
