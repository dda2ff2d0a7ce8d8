"""The budget's two planners: pure functions that move tensors along their ladders under a byte cap.

* ``usage`` (the bird-bone plan): every tensor starts at 8 bits; over R rounds the threshold
  α_k = α₁ + (α_R − α₁)(k − 1)/(R − 1) rises and tensors whose usage s_b = ū_b / max ū (within
  their layer, ū the mean squared input activation from ``profile``) is below it drop to the
  4-bit base, until the cap holds; stressed tensors — alone in their type they raise the held-out
  loss by more than δ, or their gradient RMS is above γ × the mean — get Δp more bits (the
  "fortresses"); then the lowest-usage tensors are lowered step by step until the cap holds, and
  spare bytes go to the highest-usage ones (up to 8 bits).
* ``greedy`` (what a skeptic tries first; the default, since it won every measured size):
  every tensor starts at its smallest type; repeatedly upgrade the tensor whose first-order loss
  estimate falls most per byte spent, while it fits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from birdbone.io.errors import BirdboneError
from birdbone.io.progress import Progress
from birdbone.remodel.ladder import Ladder, total
from birdbone.remodel.sensitivity import Sensitivity

if TYPE_CHECKING:
    from birdbone.remodel.budget import BudgetConfig


def plan_usage(ladders: dict[str, Ladder], cap: int, cfg: BudgetConfig, sens: Sensitivity | None,
               progress: Progress | None = None) -> None:
    for l in ladders.values():
        l.move(l.at_least(cfg.p_init), f"start at p_init {cfg.p_init:g} bits")
    for k in range(1, cfg.rounds + 1):
        if total(ladders) <= cap:
            break
        a = cfg.alpha(k)
        for l in ladders.values():
            b = l.base_index(cfg.base)
            if l.s < a and l.i > b:
                l.move(b, f"round {k}: usage {l.s:.3f} < α {a:.3f}, base precision")
    if sens is not None:
        _boost_stressed(ladders, cfg, sens, progress)
    _rebalance(ladders, cap, cfg)
    if cfg.fill:
        _fill(ladders, cap, cfg)


def _boost_stressed(ladders: dict[str, Ladder], cfg: BudgetConfig, sens: Sensitivity, progress: Progress | None) -> None:
    names = list(ladders)
    for j, n in enumerate(names):
        ladders[n].screen = sens.estimate(n, ladders[n].option.type)
        if progress:
            progress("first-order screen", j + 1, len(names))
    top = sorted(names, key=lambda n: -ladders[n].screen)[: cfg.stress.check_top]
    stressed: dict[str, str] = {}
    for j, n in enumerate(top):
        l = ladders[n]
        l.exact = sens.exact(n, l.option.type)
        if l.exact > cfg.stress.delta:
            stressed[n] = f"stressed: alone in {l.option.type} it raises the held-out loss {100 * l.exact:+.2f} % (> δ {100 * cfg.stress.delta:g} %)"
        if progress:
            progress("exact checks", j + 1, len(top))
    rms = sens.grad_rms()
    mean = sum(rms.values()) / max(len(rms), 1)
    for n, g in rms.items():
        if g > cfg.stress.gamma * mean and n not in stressed:
            stressed[n] = f"stressed: gradient RMS {g:.3g} > γ {cfg.stress.gamma:g} × mean {mean:.3g}"
    for n, why in stressed.items():
        l = ladders[n]
        l.fortress = True
        l.move(l.at_least(l.option.bpw + cfg.stress.boost_bits), f"{why}; fortress, +{cfg.stress.boost_bits:g} bits")


def _rebalance(ladders: dict[str, Ladder], cap: int, cfg: BudgetConfig) -> None:
    """Lower the lowest-usage tensor one step at a time until the cap holds: first down to the base
    precision, then below it, fortresses last."""
    tiers = [lambda l: not l.fortress and l.i > l.base_index(cfg.base), lambda l: not l.fortress and l.i > 0, lambda l: l.i > 0]
    while (over := total(ladders) - cap) > 0:
        for tier in tiers:
            cands = [l for l in ladders.values() if tier(l)]
            if cands:
                break
        else:
            raise BirdboneError(f"the cap is {over:,} bytes below the smallest legal plan ({total(ladders):,} bytes of tensors); raise the target")
        l = min(cands, key=lambda l: (l.s, -l.option.nbytes, l.name))
        l.move(l.i - 1, f"rebalance: lowest usage {l.s:.3f}, over the cap")


def _fill(ladders: dict[str, Ladder], cap: int, cfg: BudgetConfig) -> None:
    """Spend what is left under the cap on the highest-usage tensors, one step at a time, up to p_init."""
    spare = cap - total(ladders)
    while True:
        cands = [l for l in ladders.values() if not l.fortress and l.i + 1 < len(l.options)
                 and l.options[l.i + 1].bpw <= l.options[l.at_least(cfg.p_init)].bpw + 1e-9
                 and l.options[l.i + 1].nbytes - l.option.nbytes <= spare]
        if not cands:
            return
        l = max(cands, key=lambda l: (l.s, -(l.options[l.i + 1].nbytes - l.option.nbytes), l.name))
        spare -= l.options[l.i + 1].nbytes - l.option.nbytes
        l.move(l.i + 1, f"fill: usage {l.s:.3f}, spare bytes under the cap")


def plan_greedy(ladders: dict[str, Ladder], cap: int, sens: Sensitivity, progress: Progress | None = None,
                timing: tuple | None = None) -> None:
    """Smallest types first, then the best loss-per-byte upgrade (any step up) while it fits.

    ``timing`` = (a :class:`~birdbone.remodel.speed.TimeModel`, seconds per token): a second cap. A
    plan over it first moves tensors to faster types, most time saved per loss added first, within
    the byte cap; upgrades then also have to fit the time left."""
    names = list(ladders)
    est: dict[str, list[float]] = {}
    for j, n in enumerate(names):
        est[n] = [sens.estimate(n, o.type) for o in ladders[n].options]
        if progress:
            progress("first-order estimates", j + 1, len(names))
    for l in ladders.values():
        l.move(0, "start at the smallest legal type")
    if total(ladders) > cap:
        raise BirdboneError(f"the cap is {total(ladders) - cap:,} bytes below the smallest legal plan ({total(ladders):,} bytes of tensors); raise the target")
    spare = cap - total(ladders)
    tm, time_cap = timing if timing else (None, float("inf"))
    t_of = (lambda n, j: tm.of(n, ladders[n].options[j].type)) if tm else (lambda n, j: 0.0)
    time_spare = time_cap - (tm.seconds({n: l.option.type for n, l in ladders.items()}) if tm else 0.0)
    while time_spare < 0:  # too slow: buy time, least loss per second saved
        best, best_ratio = None, -1.0
        for n, l in ladders.items():
            for j in range(len(l.options)):
                dt, db = t_of(n, j) - t_of(n, l.i), l.options[j].nbytes - l.option.nbytes
                if dt >= 0 or db > spare:
                    continue
                ratio = -dt / max(est[n][j] - est[n][l.i], 1e-30)
                if ratio > best_ratio:
                    best, best_ratio = (n, j), ratio
        if best is None:
            raise BirdboneError(f"no plan meets both caps: the fastest legal types within the byte cap still take "
                                f"{1e3 * (time_cap - time_spare):.2f} ms a token, over the {1e3 * time_cap:.2f} ms cap")
        n, j = best
        l = ladders[n]
        spare -= l.options[j].nbytes - l.option.nbytes
        time_spare -= t_of(n, j) - t_of(n, l.i)
        l.move(j, f"speed: {l.option.type} → {l.options[j].type} saves {1e6 * (t_of(n, l.i) - t_of(n, j)):.1f} µs a token")
    while True:
        best, best_ratio = None, 0.0
        for n, l in ladders.items():
            e0, b0 = est[n][l.i], l.option.nbytes
            for j in range(l.i + 1, len(l.options)):
                db = l.options[j].nbytes - b0
                gain = e0 - est[n][j]
                if db <= spare and gain > 0 and gain / db > best_ratio and t_of(n, j) - t_of(n, l.i) <= time_spare:
                    best, best_ratio = (n, j), gain / db
        if best is None:
            break
        n, j = best
        l = ladders[n]
        spare -= l.options[j].nbytes - l.option.nbytes
        time_spare -= t_of(n, j) - t_of(n, l.i)
        l.move(j, f"greedy: first-order loss {est[n][l.i]:.3g} → {est[n][j]:.3g}, {best_ratio * 2**20:.3g} per MiB")
    for n, l in ladders.items():
        l.screen = est[n][l.i]
