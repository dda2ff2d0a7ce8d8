"""Structured density loss on tiny models: cut units out, write llama and deci files llama.cpp runs
with torch's logits, open them again in torch, shed units in waves and revert them bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from birdbone.bridge import load_causal_lm
from birdbone.bridge.shaped import cut_lm, load_shaped_lm
from birdbone.io.dims import Dims, check_dims, read_dims
from birdbone.io.errors import BirdboneError
from birdbone.io.model_file import open_model
from birdbone.io.runtime import LlamaRuntime
from birdbone.remodel.heal import set_weights
from birdbone.remodel.surgery import Keep, keep_from_masks, unit_masks, write_structured
from tests.fixtures.tiny import make_tiny_llama
from tests.test_cli import birdbone

TOKENS = np.array([5, 17, 33, 2, 100, 7, 8, 9, 250, 11, 64, 3], dtype=np.int64)
# logits of the same model in llama.cpp and torch differ by ~2e-4 here (the unmodified model's own
# round trip); a unit cut wrongly moves them by orders of magnitude more
TOL = 2e-3


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """Three layers, so one can go and an attention-free one can sit in the middle."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny3"), hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2, seed=0)


def dims_of(path) -> Dims:
    with open_model(path) as m:
        return read_dims(m)


def masked_logits(src, keep: Keep) -> np.ndarray:
    """The full-size torch model with the removed units masked: what the prune loop computes."""
    lm = load_causal_lm(src)
    masks = unit_masks(keep)
    with open_model(src) as m:
        set_weights(lm, {n: (m.tensor(n), masks[n]) for n in masks})
    if not keep.hidden.all():
        lm.model.embed_tokens.weight.data[:, ~torch.from_numpy(keep.hidden)] = 0
    with torch.no_grad():
        return lm(input_ids=torch.from_numpy(TOKENS[None])).logits[0].numpy()


def llama_logits(path) -> np.ndarray:
    with LlamaRuntime(path, n_ctx=64) as rt:
        return rt.logits(TOKENS)


CUTS = {
    "nothing": lambda k: None,
    "ffn channels": lambda k: k.ffn[1].__setitem__(slice(0, 40), False),
    "a kv group": lambda k: k.groups[2].__setitem__(1, False),
    "one query head per group": lambda k: [k.heads[1].__setitem__(j, False) for j in (1, 3)],
    "a layer": lambda k: k.layers.__setitem__(1, False),
    "all attention of a layer": lambda k: k.heads[2].__setitem__(slice(None), False),
    "hidden channels": lambda k: k.hidden.__setitem__(slice(0, 8), False),
}
ARCH = {"nothing": "llama", "ffn channels": "deci", "a kv group": "deci", "one query head per group": "deci", "a layer": "llama",
        "all attention of a layer": "deci", "hidden channels": "llama"}


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_structured_file_runs_in_llama_cpp_with_torch_s_logits(tiny3, tmp_path, cut):
    dims = dims_of(tiny3.gguf_f32)
    keep = Keep.everything(dims)
    CUTS[cut](keep)
    out = write_structured(tiny3.gguf_f32, tmp_path / "s.gguf", keep, out_type="F32")
    with open_model(tiny3.gguf_f32) as src:
        full = src.n_params
    with open_model(out) as m:
        assert m.architecture == ARCH[cut]
        assert (m.n_params < full) == (cut != "nothing")  # the file really is smaller
        written = read_dims(m)
    assert written == keep.kept_dims()
    got = llama_logits(out)
    np.testing.assert_allclose(got, masked_logits(tiny3.gguf_f32, keep), atol=TOL, rtol=0)
    # ... and the file opens again in torch with the same logits
    with torch.no_grad():
        back = load_shaped_lm(out)(input_ids=torch.from_numpy(TOKENS[None])).logits[0].numpy()
    np.testing.assert_allclose(back, got, atol=TOL, rtol=0)


def test_cutting_nothing_from_a_torch_model_changes_nothing_bit_for_bit(tiny3):
    lm = load_causal_lm(tiny3.gguf_f32)
    same = cut_lm(lm, Keep.everything(dims_of(tiny3.gguf_f32)))
    x = torch.from_numpy(TOKENS[None])
    with torch.no_grad():
        assert torch.equal(lm(input_ids=x).logits, same(input_ids=x).logits)
    for (n, a), (_, b) in zip(lm.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("cut", ["ffn channels", "a kv group", "a layer", "all attention of a layer", "hidden channels"])
def test_torch_surgery_equals_the_masked_model(tiny3, cut):
    dims = dims_of(tiny3.gguf_f32)
    keep = Keep.everything(dims)
    CUTS[cut](keep)
    with torch.no_grad():
        cut_logits = cut_lm(load_causal_lm(tiny3.gguf_f32), keep)(input_ids=torch.from_numpy(TOKENS[None])).logits[0].numpy()
    # exact but for RMSNorm's epsilon when hidden channels go (its share of the mean square changes)
    np.testing.assert_allclose(cut_logits, masked_logits(tiny3.gguf_f32, keep), atol=1e-5 if cut != "hidden channels" else TOL, rtol=0)


def test_masks_and_keep_round_trip(tiny3):
    dims = dims_of(tiny3.gguf_f32)
    keep = Keep.everything(dims)
    for f in CUTS.values():
        f(keep)
    back = keep_from_masks(dims, unit_masks(keep))
    assert back.as_dict() == keep.settled().as_dict()
    assert Keep.from_dict(json.loads(json.dumps(keep.as_dict()))).as_dict() == keep.as_dict()


def test_widths_llama_cpp_cannot_run_are_refused_in_one_line():
    d = Dims(64, 16, (4, 4), (2, 2), (128, 128))
    with pytest.raises(BirdboneError, match="layer 0 would have no attention"):
        check_dims(Dims(64, 16, (0, 4), (0, 2), (128, 128)))
    with pytest.raises(BirdboneError, match="no FFN channel"):
        check_dims(Dims(64, 16, (4, 4), (2, 2), (128, 0)))
    with pytest.raises(BirdboneError, match="whole number of queries per group"):
        check_dims(Dims(64, 16, (4, 3), (2, 2), (128, 128)))
    with pytest.raises(BirdboneError, match="arch llama takes every layer's shapes from layer 0"):
        check_dims(Dims(64, 16, (4, 2), (2, 2), (128, 128)), "llama")
    check_dims(d, "llama")
    keep = Keep.everything(d)
    keep.heads[1][1] = False  # one group keeps 1 head, the other 2
    with pytest.raises(BirdboneError, match="every group must keep as many"):
        keep.check()


# -- the loop -------------------------------------------------------------------------------------------
SMALL = ["--set", "heal.batch=2", "--set", "heal.seq=32", "--set", "eval_tokens=512", "--set", "eval_ctx=64", "--set", "calibration_tokens=512",
         "--set", "ffn_multiple=16", "--heal-steps", "2"]


@pytest.fixture(scope="module")
def shed(tiny3, tmp_path_factory):
    """One structural run to 50 % of the block parameters, a layer dropped first: (output, run folder, JSON report)."""
    folder = tmp_path_factory.mktemp("shed")
    r = json.loads(birdbone("structure", tiny3.gguf_f32, "--target", "0.5", "--drop-layers", "1", *SMALL, "--type", "F32",
                            "--run-dir", folder / "run", "-o", folder / "out.gguf", "--json").stdout)
    return folder / "out.gguf", folder / "run", r


def test_structural_waves_shed_at_most_a_tenth_and_ship_a_smaller_file(shed, tiny3):
    out, run, r = shed
    waves = r["waves"]
    assert waves[0]["phase"] == "start" and len(waves) >= 4
    densities = [w["density"] for w in waves]
    assert all(b < a for a, b in zip(densities, densities[1:]))  # every wave removes something
    # at most a tenth of what is left, or one unit that is larger than that (a layer of three is a third)
    assert all(a - b <= 0.1 * a + 1e-9 or len(w["units"]) == 1 for a, b, w in zip(densities, densities[1:], waves[1:]))
    assert abs(densities[-1] - 0.5) < 0.05
    assert r["removed"]["layers"] and waves[1]["widths"]["n_layer"] == 2  # the layer went first
    assert all(w["heal_steps"] > 0 for w in waves[1:])
    with open_model(out) as m, open_model(tiny3.gguf_f32) as src:
        assert m.n_params < 0.8 * src.n_params and m.meta("birdbone.structure")
        dims = read_dims(m)
    assert dims.n_layer == 2 and all(ff % 16 == 0 for ff in dims.n_ff)  # FFN widths rounded to the multiple
    assert r["eval"]["model"]["ppl"] > 1 and r["eval"]["kld_mean"] > 0


def test_a_structural_wave_reverts_bit_for_bit(shed, tiny3, tmp_path):
    out, run, r = shed
    birdbone("revert", run, "--to-wave", "0", "--type", "F32", "-o", tmp_path / "w0.gguf")
    with open_model(tmp_path / "w0.gguf") as a, open_model(tiny3.gguf_f32) as b:
        assert a.architecture == "llama" and list(a.tensors) == list(b.tensors)
        assert all(a.raw(n).tobytes() == b.raw(n).tobytes() for n in a.tensors)  # the source, every unit back
    last = r["wave"]
    birdbone("revert", run, "--to-wave", str(last), "--type", "F32", "-o", tmp_path / "last.gguf")
    with open_model(tmp_path / "last.gguf") as a, open_model(out) as b:
        assert all(a.raw(n).tobytes() == b.raw(n).tobytes() for n in a.tensors)  # replayed from the history: the same bytes
    birdbone("revert", run, "--to-wave", "2", "--type", "F32", "-o", tmp_path / "w2.gguf")
    with open_model(tmp_path / "w2.gguf") as a:
        assert read_dims(a).n_layer == 2 and a.n_params > open_model(out).n_params  # wave 2 kept more than the last
    d = json.loads(birdbone("diff", tiny3.gguf_f32, out, "--json").stdout)
    assert d["structure"]["layers"] == r["removed"]["layers"] and d["structure"]["ffn"]


def test_structure_refuses_impossible_targets(tiny3, tmp_path):
    def error(*args):
        p = birdbone("structure", tiny3.gguf_f32, "--run-dir", tmp_path / "r", "-o", tmp_path / "x.gguf", *args, check=False)
        assert p.returncode == 2, p.stderr
        return p.stderr.strip().splitlines()[-1]

    assert "outside (0, 1]" in error("--target", "1.5")
    assert "larger than the model" in error("--hidden", "96", *SMALL)
    assert "not a multiple of hidden_multiple" in error("--hidden", "50")
    assert "at least one must stay" in error("--drop-layers", "3", *SMALL)


def test_a_structured_file_handed_to_a_verb_that_cannot_hold_it_is_one_line(tiny3, tmp_path):
    keep = Keep.everything(dims_of(tiny3.gguf_f32))
    keep.ffn[1][:32] = False
    deci = write_structured(tiny3.gguf_f32, tmp_path / "d.gguf", keep, out_type="F32")
    p = birdbone("convert", deci, "-o", tmp_path / "hf", check=False)
    assert p.returncode == 2 and "structured (deci) GGUF" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    # the verbs that can read it do: measure, and a torch profile through the shaped loader
    assert json.loads(birdbone("measure", deci, "--json").stdout)["architecture"] == "deci"
    r = json.loads(birdbone("profile", deci, "-o", tmp_path / "usage", "--tokens", "128", "--ctx", "64", "--json").stdout)
    assert r["weights"] == 21  # 3 layers × 7 matrices


def test_loo_ranks_by_measured_loss_per_parameter_across_layers():
    """FFN channels keep wanda's order within a layer and take their layer's measured probe across
    layers: a layer that minds removal keeps more; heads measured alone compete in the same unit."""
    from birdbone.remodel.config import StructureConfig
    from birdbone.remodel.structure import Unit, calibrated_ffn, ranking

    wanda = {0: np.array([1.0, 2.0, 3.0, 4.0]), 1: np.array([1.0, 2.0, 3.0, 4.0])}
    cal = calibrated_ffn(wanda, {0: 0.5, 1: 0.01})  # layer 0's weakest quarter costs 0.5 nats, layer 1's 0.01
    assert cal[0][0] == pytest.approx(0.5) and cal[1][0] == pytest.approx(0.01)
    assert list(np.argsort(cal[0])) == list(np.argsort(wanda[0]))  # the order within a layer is wanda's
    dims = Dims(8, 2, (2, 2), (1, 1), (4, 4))
    units = {Unit("ffn", i, j): float(v) for i, c in cal.items() for j, v in enumerate(c)}
    units[Unit("qhead", 0, 0)] = -0.01  # measured noise below zero counts as almost nothing
    z = ranking(units, dims, StructureConfig(score="loo"), Keep.everything(dims))
    order = sorted(z, key=z.get)
    assert order[0] == Unit("qhead", 0, 0) and order.index(Unit("ffn", 1, 3)) < order.index(Unit("ffn", 0, 0))


def test_a_group_brought_back_keeps_every_group_as_wide_as_the_others():
    """Rollback restores units strongest first: a key/value group can come back while a query-head
    packet of its layer stays out; the group then gets the heads the other groups have, no more."""
    from birdbone.remodel.structure import Unit, head_order, remove, restore

    d = Dims(64, 8, (8,), (2,), (128,))
    order = head_order({0: np.arange(8, dtype=float)}, d)
    keep = Keep.everything(d)
    remove(keep, Unit("qhead", 0, 0), order)  # every group loses its weakest head
    remove(keep, Unit("group", 0, 1), order)
    restore(keep, Unit("group", 0, 1), order)
    keep.check()  # llama.cpp's rule: as many heads in every group
    assert keep.heads[0].sum() == 6 and keep.groups[0].all()
    restore(keep, Unit("qhead", 0, 0), order)
    assert keep.heads[0].all()
