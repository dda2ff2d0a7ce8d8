"""Precision budget: ladders of legal types, the two planners, plan files, and llama.cpp writing exactly the plan."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from tests.test_cli import birdbone

from birdbone.io import open_model
from birdbone.io.errors import BirdboneError
from birdbone.io.quantize import quantize_file
from birdbone.remodel.budget import BudgetConfig, StressConfig, usage_scores
from birdbone.remodel.ladder import Ladder, options_for, total
from birdbone.remodel.plan import read_plan, write_plan
from birdbone.remodel.planners import plan_greedy, plan_usage

SMALL = ["--set", "sensitivity.val_tokens=256", "--set", "sensitivity.val_ctx=64", "--set", "sensitivity.passes=2", "--set", "sensitivity.seq=32"]


# -- ladders ------------------------------------------------------------------------------------
def test_ladder_holds_only_types_llama_cpp_writes_without_fallback():
    narrow = [o.type for o in options_for((1536, 576), BudgetConfig().types, {"Q4_1"})]
    assert narrow == ["IQ4_NL", "Q5_0", "Q5_1", "Q8_0", "F16"]  # 576 is not a multiple of 256: no K-quants; Q4_0 ties IQ4_NL
    wide = options_for((576, 1536), BudgetConfig().types, set())
    assert [o.type for o in wide] == ["Q2_K", "Q3_K", "Q4_K", "Q4_1", "Q5_K", "Q5_1", "Q6_K", "Q8_0", "F16"]
    assert [o.nbytes for o in wide] == sorted({o.nbytes for o in wide})  # strictly growing: one type per size
    q8 = next(o for o in wide if o.type == "Q8_0")
    assert q8.nbytes == 576 * 1536 // 32 * 34 and q8.bpw == 8.5


@dataclass
class TableSensitivity:
    """A sensitivity with known numbers, for the planners' logic (the real one is tested end to end below)."""

    per_bit: dict[str, float]  # loss per tensor ∝ per_bit × 2^(−bits)
    exact_rise: dict[str, float]
    rms: dict[str, float]

    def estimate(self, name, type_name):
        from birdbone.io.types import bits_per_weight, tensor_type

        return self.per_bit[name] * 2.0 ** -bits_per_weight(tensor_type(type_name))

    def exact(self, name, type_name):
        return self.exact_rise[name]

    def grad_rms(self):
        return self.rms


def ladders(usage: dict[str, float]) -> dict[str, Ladder]:
    return {n: Ladder(n, (256, 512), options_for((256, 512), BudgetConfig().types, {"Q4_1"}), s) for n, s in usage.items()}


def test_usage_plan_drops_the_least_used_boosts_the_stressed_and_respects_the_cap():
    usage = {"a": 1.0, "b": 0.9, "c": 0.2, "d": 0.5, "e": 0.35}
    sens = TableSensitivity({n: 1.0 for n in usage}, {"a": 0.002, "b": 0.05, "c": 0.0, "d": 0.0, "e": 0.0},
                            {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 9.0})
    ls = ladders(usage)
    q8 = ls["a"].options[ls["a"].at_least(8.0)].nbytes
    q4 = ls["a"].options[ls["a"].base_index(BudgetConfig().base)].nbytes
    cap = 3 * q8 + 2 * q4
    cfg = BudgetConfig(stress=StressConfig(check_top=5), fill=False)
    plan_usage(ls, cap, cfg, sens)
    assert total(ls) <= cap
    assert {n for n, l in ls.items() if l.fortress} == {"b", "e"}  # exact rise 5 % > δ; gradient RMS 9 > 2 × mean
    assert ls["b"].option.type == "F16" and "fortress" in ls["b"].reasons[-1]
    assert ls["a"].exact == 0.002 and not ls["a"].fortress
    assert "round 1" in ls["c"].reasons[1]  # below α₁ = 0.3 first
    # lowering goes by usage: the least used non-fortress is never above a more used one
    order = sorted((l for l in ls.values() if not l.fortress), key=lambda l: l.s)
    assert [l.option.nbytes for l in order] == sorted(l.option.nbytes for l in order)


def test_usage_plan_fill_spends_spare_bytes_on_the_most_used():
    ls = ladders({"a": 1.0, "b": 0.1})
    cap = ls["a"].options[ls["a"].at_least(8.0)].nbytes + ls["b"].options[ls["b"].at_least(8.0)].nbytes - 1
    plan_usage(ls, cap, BudgetConfig(), None)
    assert total(ls) <= cap
    # b fell to the 4-bit base in round 1 (usage 0.1 < α 0.3); fill then raised it as far as the cap allows
    assert (ls["a"].option.type, ls["b"].option.type) == ("Q8_0", "Q6_K")
    assert "round 1" in ls["b"].reasons[1] and ls["b"].reasons[-1].startswith("fill")


def test_greedy_spends_bytes_where_loss_falls_most_and_more_bytes_never_hurt():
    sens = TableSensitivity({"a": 100.0, "b": 1.0, "c": 10.0}, {}, {})
    results = []
    for share in (0.3, 0.45, 0.6):
        ls = ladders({"a": 1.0, "b": 1.0, "c": 1.0})
        cap = int(share * sum(l.options[-1].nbytes for l in ls.values()))
        plan_greedy(ls, cap, sens)
        assert total(ls) <= cap
        assert ls["a"].option.bpw >= ls["c"].option.bpw >= ls["b"].option.bpw
        results.append(sum(sens.estimate(n, l.option.type) for n, l in ls.items()))
    assert results == sorted(results, reverse=True)


def test_greedy_respects_a_time_cap_and_buys_speed_where_it_costs_least():
    """A type slow per weight (here the K-quants) is left where the time cap says so; without the cap
    the same bytes go where the loss falls most."""
    from birdbone.remodel.speed import TimeModel

    sens = TableSensitivity({"a": 100.0, "b": 1.0, "c": 10.0}, {}, {})
    free = ladders({"a": 1.0, "b": 1.0, "c": 1.0})
    cap = int(0.45 * sum(l.options[-1].nbytes for l in free.values()))
    plan_greedy(free, cap, sens)
    types = {n: l.option.type for n, l in free.items()}
    costs = {t: (5e-9 if t.endswith("_K") else 1e-9) for t in BudgetConfig().types}
    tm = TimeModel(costs, 1e-3, {n: int(np.prod(l.shape)) for n, l in free.items()})
    unconstrained = tm.seconds(types)
    cap_s = 1e-3 + 0.8 * (unconstrained - 1e-3)
    timed = ladders({"a": 1.0, "b": 1.0, "c": 1.0})
    plan_greedy(timed, cap, sens, timing=(tm, cap_s))
    after = {n: l.option.type for n, l in timed.items()}
    assert tm.seconds(after) <= cap_s + 1e-12 < unconstrained and total(timed) <= cap
    assert any(r.startswith("speed:") for l in timed.values() for r in l.reasons)  # the slow K-quant start was bought off
    # the loss it pays for the speed is the least it could: more than without the cap, never the worst type everywhere
    loss = lambda ts: sum(sens.estimate(n, t) for n, t in ts.items())  # noqa: E731
    assert loss(after) >= loss(types)
    with pytest.raises(BirdboneError, match="no plan meets both caps"):
        plan_greedy(ladders({"a": 1.0, "b": 1.0, "c": 1.0}), cap, sens, timing=(tm, 1e-4))


def test_a_cap_below_the_smallest_plan_is_an_error():
    ls = ladders({"a": 1.0})
    with pytest.raises(BirdboneError, match="below the smallest legal plan"):
        plan_greedy(ls, ls["a"].options[0].nbytes - 1, TableSensitivity({"a": 1.0}, {}, {}))
    with pytest.raises(BirdboneError, match="below the smallest legal plan"):
        plan_usage(ladders({"a": 1.0}), 10, BudgetConfig(), None)


def test_usage_scores_are_relative_to_the_layer():
    class U:
        in_sum2 = {"blk.0.a": np.array([4.0]), "blk.0.b": np.array([1.0]), "blk.1.a": np.array([0.5]), "output.weight": np.array([2.0])}

        def importance(self, n):
            return self.in_sum2[n]

    s = usage_scores(U(), ["blk.0.a", "blk.0.b", "blk.1.a", "output.weight", "token_embd.weight"])
    assert s == {"blk.0.a": 1.0, "blk.0.b": 0.25, "blk.1.a": 1.0, "output.weight": 1.0, "token_embd.weight": None}


# -- end to end on a tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def usage_dir(tiny_k, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "usage"
    birdbone("profile", tiny_k.gguf_f16, "--tokens", "256", "--ctx", "64", "-o", out)
    return out


@pytest.mark.parametrize("method", ["usage", "greedy"])
def test_budget_plan_quantize_and_llama_cpp_runs_it(tiny_k, usage_dir, tmp_path, method):
    plan_path = tmp_path / "plan.json"
    p = birdbone("budget", tiny_k.gguf_f16, "--usage", usage_dir, "--target-bytes", "Q4_K_M", "--method", method, *SMALL,
                 "-o", plan_path, "--json")
    report = json.loads(p.stdout)
    plan = read_plan(plan_path)
    assert plan.types == report["types"] and plan.method == method
    with open_model(tiny_k.gguf_f16) as m:
        assert set(plan.types) == {n for n, t in m.tensors.items() if len(t.shape) == 2}
    assert all(d["reasons"] for d in plan.detail.values())
    mix = quantize_file(tiny_k.gguf_f16, None, "Q4_K_M", imatrix=usage_dir / "imatrix.gguf", dry_run=True)
    assert "Q4_K_M" in plan.target and plan.header_bytes + plan.tensor_bytes <= mix.file_bytes

    out = tmp_path / "planned.gguf"
    q = json.loads(birdbone("quantize", tiny_k.gguf_f16, "--plan", plan_path, "-o", out, "--eval", "--ctx", "64", "--tokens", "256", "--json").stdout)
    with open_model(out) as m:
        assert {n: m.tensors[n].type for n in plan.types} == plan.types
        assert m.file_bytes <= mix.file_bytes
    assert np.isfinite(q["eval"]["model"]["ppl"]) and q["eval"]["kld_mean"] < 0.5

    cmd = birdbone("budget", "--plan", plan_path, "--emit", "llama-quantize").stdout
    assert cmd.startswith("llama-quantize --imatrix") and cmd.count("--tensor-type") == len(plan.types)
    assert r"'^blk\.0\.attn_q\.weight$=" in cmd and cmd.rstrip().endswith(" OUT.gguf Q8_0")


def test_a_quantized_input_is_planned_from_its_float_form_without_its_own_grid(tiny_k, usage_dir, tmp_path):
    q41 = tmp_path / "q41.gguf"
    quantize_file(tiny_k.gguf_f16, q41, "Q4_1")
    plan_path = tmp_path / "plan.json"
    birdbone("budget", q41, "--usage", usage_dir, "--target-bpw", "6", "--method", "greedy", *SMALL, "-o", plan_path)
    plan = read_plan(plan_path)
    # Q5_1's imatrix-guided scale search lands on half of Q4_1's step: it holds the grid too (here Q6_K as well)
    assert {"Q4_1", "Q5_1"} <= set(plan.excluded) and not set(plan.excluded) & set(plan.types.values())
    assert any("lossless by construction" in n for n in plan.notes) and any("Q5_1 (relative error" in n for n in plan.notes)
    with open_model(plan.source) as m:
        assert {t.type for n, t in m.tensors.items() if len(t.shape) == 2} == {"F16"}
    assert plan.bits_per_weight <= 6.0


def test_a_mixed_quant_input_never_gets_a_tensor_back_on_its_own_grid(tiny_k, usage_dir, tmp_path):
    """A Hub GGUF is a mix (Q4_K here, Q6_K there): the exclusion is per tensor, not the file's main type."""
    mixed = tmp_path / "q4km.gguf"
    quantize_file(tiny_k.gguf_f16, mixed, "Q4_K_M")
    with open_model(mixed) as m:
        stored = {n: t.type for n, t in m.tensors.items() if len(t.shape) == 2}
    assert len(set(stored.values())) >= 2, stored
    plan_path = tmp_path / "plan.json"
    birdbone("budget", mixed, "--usage", usage_dir, "--target-bpw", "7", "--method", "greedy", *SMALL, "-o", plan_path)
    plan = read_plan(plan_path)
    on_own_grid = {n: t for n, t in plan.types.items() if t == stored[n]}
    assert not on_own_grid, on_own_grid
    grids = [n for n in plan.notes if "lossless by construction" in n]
    assert len(grids) == len(set(stored.values())), plan.notes  # one note per grid, each naming its tensors


def test_a_mixed_quant_input_keeps_its_grid_only_where_the_target_mix_keeps_it_too(tiny_k, usage_dir, tmp_path):
    """A Hub Q4_K_M at Q4_K_M's size: llama.cpp's own mix puts most tensors back on their grid (a
    near-lossless rebuild), so the plan may too, on exactly those tensors; at Q4_K_S's size the
    Q6_K tensors that Q4_K_S gives Q5_K stay excluded."""
    from birdbone.remodel.budget import Planner, dry_mix
    from birdbone.remodel.sensitivity import SensitivityConfig

    mixed = tmp_path / "q4km.gguf"
    quantize_file(tiny_k.gguf_f16, mixed, "Q4_K_M")
    with open_model(mixed) as m:
        stored = {n: t.type for n, t in m.tensors.items() if len(t.shape) == 2}
    cfg = BudgetConfig(method="greedy", sensitivity=SensitivityConfig(val_tokens=256, val_ctx=64, passes=2, seq=32))
    planner = Planner.open(mixed, usage_dir, None, cfg)
    for mix in ("Q4_K_M", "Q4_K_S"):
        mix_types = dry_mix(planner.source, mix, planner.imatrix).types
        shared = {n for n, t in stored.items() if mix_types.get(n) == t}
        plan = planner.plan(target_bytes=mix)
        kept = {n for n, t in plan.types.items() if t == stored[n]}
        assert kept and kept <= shared, (mix, kept - shared)  # the rule took effect, and only where the mix keeps the grid
        assert plan.header_bytes + plan.tensor_bytes <= dry_mix(planner.source, mix, planner.imatrix).file_bytes
        assert any(f"allowed back on the {sum(stored[n] == g for n in shared)} tensors" in note for g in {stored[n] for n in shared}
                   for note in plan.notes), plan.notes
    assert shared != set(stored), "Q4_K_S gives some of Q4_K_M's Q6_K tensors another type: the test needs such a tensor"


def test_bad_budget_requests(tiny, tiny_k, usage_dir, tmp_path):
    def error(*args):
        p = birdbone(*args, check=False)
        errors = [line for line in p.stderr.splitlines() if line.startswith("birdbone: error:")]
        assert p.returncode == 2 and len(errors) == 1 and p.stderr.rstrip().endswith(errors[0]), p.stderr
        return errors[0]

    assert "below the smallest legal plan" in error("budget", tiny_k.gguf_f16, "--usage", usage_dir, "--target-bpw", "1", *SMALL)
    assert "another model" in error("budget", tiny.gguf_f16, "--usage", usage_dir, "--target-bpw", "6", *SMALL)
    assert "exactly one of" in error("budget", tiny_k.gguf_f16, "--usage", usage_dir, *SMALL)
    assert "method" in error("budget", tiny_k.gguf_f16, "--usage", usage_dir, "--target-bpw", "6", "--method", "random")
    plan_path = tmp_path / "plan.json"
    birdbone("budget", tiny_k.gguf_f16, "--usage", usage_dir, "--target-bpw", "8", "--method", "greedy", *SMALL, "-o", plan_path)
    out = tmp_path / "out.gguf"
    for model, edit, msg in ((tiny_k, lambda p: p.types.update({"blk.9.attn_q.weight": "Q8_0"}), "lacks"),
                             (tiny, lambda p: p.types.update({"token_embd.weight": "Q4_K"}), "illegal for its row width 64"),
                             (tiny_k, lambda p: p.types.pop("blk.0.ffn_up.weight"), "no type for")):
        bad = read_plan(plan_path)
        edit(bad)
        write_plan(bad, tmp_path / "bad.json")
        assert msg in error("quantize", model.gguf_f16, "--plan", tmp_path / "bad.json", "-o", out)
        assert not out.exists()
    (tmp_path / "junk.json").write_text("{\"a\": 1}")
    assert "not a birdbone precision plan" in error("quantize", tiny_k.gguf_f16, "--plan", tmp_path / "junk.json", "-o", out)
    assert "--plan sets every tensor" in error("quantize", tiny_k.gguf_f16, "--plan", plan_path, "--dry-run")


def test_the_time_model_is_fitted_with_llama_cpp_on_the_model_and_cached(tiny_k):
    """The fit on a tiny model (a smoke test of the mechanism: speed goals live in benchmarks)."""
    from birdbone.io.hashing import user_cache_dir
    from birdbone.io.model_file import open_model
    from birdbone.remodel.plan import planned_names
    from birdbone.remodel.speed import time_model

    with open_model(tiny_k.gguf_f16) as m:
        shapes = {n: m.tensors[n].shape for n in planned_names(m)}
    tm = time_model(tiny_k.gguf_f16, shapes, ("Q4_K", "F16"), threads=2, rounds=1)
    # costs are relative to Q8_0's (every file holds every matrix): Q8_0 is 0, the base holds the rest
    assert set(tm.costs) == {"Q4_K", "F16", "Q8_0", "Q4_0"} and tm.costs["Q8_0"] == 0.0 and tm.base > 0
    assert 0 < tm.seconds({n: "Q8_0" for n in shapes}) == tm.base < 1.0 and tm.seconds({n: "F16" for n in shapes}) > 0
    files = list(user_cache_dir().glob("speed-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["files"]) == 5  # four types and the mix that separates the base
    assert time_model(tiny_k.gguf_f16, shapes, ("Q4_K",), threads=2).costs["Q4_K"] == tm.costs["Q4_K"]  # from the cache


def test_a_time_cap_prices_the_reference_mix_even_in_types_the_plan_may_not_use(tiny_k, usage_dir, tmp_path):
    """no_slower_than=Q4_K_M with Q6_K excluded: Q4_K_M's own mix holds Q6_K, so the time model must
    price it (it raised KeyError on the built-in model, whose Q4_0 mix holds the excluded Q4_1), and
    the plan, which may not use Q6_K, stays under the predicted cap."""
    plan_path = tmp_path / "plan.json"
    birdbone("budget", tiny_k.gguf_f16, "--usage", usage_dir, "--target-bpw", "8", "--method", "greedy", *SMALL,
             "--set", "no_slower_than=Q4_K_M", "--set", "exclude=Q6_K", "-o", plan_path)
    plan = read_plan(plan_path)
    assert "Q6_K" not in plan.types.values()
    assert plan.decode_ms_cap > 0 and plan.decode_ms <= plan.decode_ms_cap * (1 + 1e-9)
    assert any("time cap" in n for n in plan.notes)
