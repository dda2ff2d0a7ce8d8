"""Healing: masked layers carry GGUF weights faithfully, LoRA heals, pruned weights stay zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from birdbone.bridge import load_causal_lm
from birdbone.io.errors import BirdboneError
from birdbone.io.model_file import open_model
from birdbone.io.runtime import LlamaRuntime
from birdbone.remodel.heal import HealConfig, MaskedLinear, gguf_modules, heal, set_weights, token_batches
from birdbone.remodel.history import DeltaHistory, WaveDelta
from birdbone.remodel.masks import score, wave


@pytest.fixture(scope="module")
def setup(tiny):
    lm = load_causal_lm(tiny.gguf_f32).eval()
    with open_model(tiny.gguf_f32) as m:
        names = [n for n in gguf_modules(lm) if n.startswith("blk.")]
        base = {n: m.tensor(n) for n in names}
    from tests.fixtures.tiny import shakespeare_text

    with LlamaRuntime(tiny.gguf_f32, n_ctx=64) as rt:
        tokens = rt.tokenize(shakespeare_text()[:20000], add_special=False)
    return lm, names, base, tokens


def logits(lm, x):
    with torch.no_grad():
        return lm(input_ids=torch.from_numpy(x)).logits.numpy()


def test_gguf_weights_load_into_masked_layers_faithfully(setup):
    lm, names, base, tokens = setup
    x = tokens[None, :32].astype(np.int64)
    before = logits(lm, x)
    set_weights(lm, {n: (base[n], np.ones(base[n].shape, bool)) for n in names})
    assert all(isinstance(lm.get_submodule(gguf_modules(lm)[n]), MaskedLinear) for n in names)
    # q/k rows go back to Hugging Face order: the same function as before
    np.testing.assert_allclose(logits(lm, x), before, rtol=1e-5, atol=1e-5)


def test_heal_keeps_pruned_weights_zero_and_lowers_the_loss(setup, tmp_path):
    lm, names, base, tokens = setup
    masks = {n: ~wave(score("magnitude", base[n]), np.ones(base[n].shape, bool), 0.5) for n in names}
    pruned = {n: (np.where(masks[n], base[n], 0).astype(np.float32), masks[n]) for n in names}
    set_weights(lm, pruned)
    frozen = {n: lm.get_submodule(gguf_modules(lm)[n]).weight.detach().clone() for n in names}
    res = heal(lm, names, tokens, HealConfig(steps=12, lr=1e-2, batch=2, seq=32, seed=1))
    assert len(res.losses) == 12 and np.mean(res.losses[-3:]) < np.mean(res.losses[:3])
    # the model is back to its masked base layers, untouched
    for n in names:
        layer = lm.get_submodule(gguf_modules(lm)[n])
        assert isinstance(layer, MaskedLinear) and torch.equal(layer.weight, frozen[n])
    # the history replays the healed weights: pruned ones exactly zero, and the function is the
    # one healing trained (masked LoRA), whatever the q/k row order
    hist = DeltaHistory(tmp_path / "h", {n: base[n].shape for n in names})
    hist.append(WaveDelta(pruned={n: ~masks[n] for n in names}, lora=res.lora))
    healed = hist.state_at(1, lambda n: base[n])
    for n, (w, m) in healed.items():
        assert (w[~m] == 0).all() and not np.array_equal(w, pruned[n][0])
    x = next(token_batches(tokens, 2, 32, seed=1))
    set_weights(lm, healed)
    loss_healed = torch.nn.functional.cross_entropy(torch.from_numpy(logits(lm, x[:, :-1])).reshape(-1, lm.config.vocab_size),
                                                    torch.from_numpy(x[:, 1:]).reshape(-1))
    set_weights(lm, pruned)
    loss_pruned = torch.nn.functional.cross_entropy(torch.from_numpy(logits(lm, x[:, :-1])).reshape(-1, lm.config.vocab_size),
                                                    torch.from_numpy(x[:, 1:]).reshape(-1))
    assert loss_healed < loss_pruned


def test_heal_refuses_plain_layers_and_short_text(setup, tiny):
    lm, names, base, tokens = setup
    plain = load_causal_lm(tiny.gguf_f32)
    with pytest.raises(BirdboneError, match="not a masked layer"):
        heal(plain, names[:1], tokens, HealConfig(steps=1))
    with pytest.raises(BirdboneError, match="too few"):
        next(token_batches(tokens[:10], 2, 32, 0))
    with pytest.raises(BirdboneError, match="out of range"):
        HealConfig(rank=0)


def test_taper():
    c = HealConfig(steps=40, lr=2e-4)
    assert [c.for_wave(k, 5).steps for k in (1, 2, 5)] == [40, 32, 8]
    assert c.for_wave(3, 5).lr == pytest.approx(2e-4 * 0.6)
    assert [c.for_wave(k, 5).steps for k in (5, 6, 9)] == [8, 1, 1]  # past the horizon: one step, never none
    assert [HealConfig(steps=0).for_wave(k, 5).steps for k in (1, 2, 5, 9)] == [0, 0, 0, 0]  # zero means zero, in every wave


def test_merge_factors_adds_the_deltas():
    from birdbone.remodel.heal import merge_factors
    from birdbone.remodel.history import lora_product

    rng = np.random.default_rng(0)
    f1 = (rng.standard_normal((8, 12)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32), 2.0)
    f2 = (rng.standard_normal((4, 12)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32), 0.5)
    np.testing.assert_allclose(lora_product(*merge_factors(f1, f2)), lora_product(*f1) + lora_product(*f2), rtol=1e-5, atol=1e-6)
    assert merge_factors(None, f2) is f2
