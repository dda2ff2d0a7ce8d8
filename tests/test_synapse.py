"""The living transformer: a plain llama when every switch is off, mechanisms that act, and no leak of the future."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from birdbone.synapse.model import STOCHASTIC_MODES, SynapticConfig, SynapticGPT

TINY = dict(vocab_size=256, n_layer=2, n_head=4, n_embd=64, intermediate=96, block_size=256, rank_eligibility=8)


def text_bytes() -> torch.Tensor:
    from birdbone.io.text import load_text

    return torch.tensor(list(load_text(None)[0].encode("utf-8")), dtype=torch.long)


TEXT = text_bytes()  # the built-in Shakespeare excerpt, one token per byte


def tokens(T=64, B=2, seed=0):
    """B windows of T bytes of real text, from seeded positions."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(TEXT) - T, (B,), generator=g)
    return torch.stack([TEXT[s : s + T] for s in starts.tolist()])


@pytest.fixture(scope="module")
def trained_plain():
    """A plain model trained a little on the text, so its attention and MLP mean something."""
    torch.manual_seed(0)
    model = SynapticGPT(SynapticConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        x = tokens(129, 8, seed=step)
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def with_switches(plain: SynapticGPT, **switches) -> SynapticGPT:
    """The plain model's weights in a model with mechanisms on (their new parameters at their defaults)."""
    torch.manual_seed(1)
    model = SynapticGPT(dataclasses.replace(plain.cfg, **switches))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".presynaptic." in k or ".fast." in k for k in missing)
    return model


def test_all_switches_off_equals_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = SynapticConfig(**TINY)
    ours = SynapticGPT(cfg).eval()
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate,
                                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                                       max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                                       tie_word_embeddings=True, attn_implementation="eager")).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in ours.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    for p in ref.parameters():  # llama's own init differs: make sure every weight really came from ours
        assert any(torch.equal(p, q) for q in ours.state_dict().values())
    x = tokens(48)
    with torch.no_grad():
        ours_logits, _ = ours(x)
        ref_logits = ref(input_ids=x).logits
    torch.testing.assert_close(ours_logits, ref_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("switch", ["presynaptic", "hebbian"])
def test_each_mechanism_changes_the_training_loss_by_at_least_one_percent(trained_plain, switch):
    x = tokens(129, 4, seed=1000)
    with torch.no_grad():
        _, plain = trained_plain(x[:, :-1], x[:, 1:])
        model = with_switches(trained_plain, **{switch: True}).eval()
        _, bio = model(x[:, :-1], x[:, 1:])
    assert abs(float(bio) / float(plain) - 1.0) >= 0.01, (float(plain), float(bio))


def test_fast_weights_grow_to_a_share_of_the_slow_ones_within_256_tokens(trained_plain):
    model = with_switches(trained_plain, hebbian=True).eval()
    with torch.no_grad():
        model(tokens(256, 2, seed=7))
    for block in model.layers:
        a = block.mlp.fast.fast_matrix(0)
        w = block.mlp.down_proj.weight.detach().t()
        assert a.shape == w.shape
        assert torch.linalg.matrix_rank(a) <= model.cfg.rank_eligibility
        assert float(a.norm() / w.norm()) >= 1e-2
    assert model.vitals()["fast_state_norm"] > 0


def test_depletion_moves_attention_off_a_key_attended_again_and_again(trained_plain):
    model = with_switches(trained_plain, presynaptic=True).eval()
    with torch.no_grad():
        model(tokens(128, 2, seed=3))
    v = model.vitals()
    assert 0.0 < v["rrp_mean"] < 1.0 and v["calcium_mean"] > 0.0


@pytest.mark.parametrize("mode", STOCHASTIC_MODES)
def test_no_position_depends_on_later_tokens_in_training_mode(trained_plain, mode):
    model = with_switches(trained_plain, presynaptic=True, hebbian=True, stochastic=True, stochastic_mode=mode,
                          stochastic_train_frac=0.5).train()
    x = tokens(64, 2, seed=5)
    t = 40
    y = x.clone()
    y[:, t + 1:] = (y[:, t + 1:] + 17) % model.cfg.vocab_size
    torch.manual_seed(123)
    a, _ = model(x)
    torch.manual_seed(123)
    b, _ = model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])
    # the draws are random in training and absent in eval
    torch.manual_seed(124)
    c, _ = model(x)
    assert not torch.allclose(a, c)
    model.eval()
    with torch.no_grad():
        d1, _ = model(x)
        d2, _ = model(x)
    assert torch.equal(d1, d2)


def test_no_forward_pass_changes_a_trained_weight(trained_plain):
    model = with_switches(trained_plain, presynaptic=True, hebbian=True, stochastic=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(tokens(64))
    model.eval()
    with torch.no_grad():
        model(tokens(64, seed=9))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, msg", [({"tau_c": 0.0}, "tau_c"), ({"tau_rrp": -1.0}, "tau_rrp"), ({"top_k": 5, "experts": 4}, "top_k"),
                                      ({"stochastic_mode": "coin"}, "stochastic_mode"), ({"moe": True}, "not built yet"),
                                      ({"n_embd": 66}, "heads")])
def test_degenerate_configs_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SynapticConfig(**{**TINY, **bad})
