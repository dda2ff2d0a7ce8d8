"""Remodel: purification transforms on signals they should clean, and purify_model on files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from birdbone.anatomy.validate import validate
from birdbone.io.errors import BirdboneError
from birdbone.io.hashing import file_sha256
from birdbone.io.model_file import open_model
from birdbone.remodel import fft_purify, haar_purify, purify_model
from tests.test_cli import birdbone

RNG = np.random.default_rng(7)
WIDTH = 576


def sines(rows: int = 16) -> np.ndarray:
    t = np.arange(WIDTH)
    return np.stack([np.sin(2 * np.pi * (1 + r % 4) * t / WIDTH + r) for r in range(rows)])


def steps(rows: int = 16) -> np.ndarray:
    return np.repeat(RNG.standard_normal((rows, 9)), WIDTH // 9, axis=1)


def error_after(transform, clean: np.ndarray, strength: float) -> tuple[float, float]:
    noisy = (clean + 0.1 * RNG.standard_normal(clean.shape)).astype(np.float32)
    return float(np.linalg.norm(noisy - clean)), float(np.linalg.norm(transform(noisy, strength) - clean))


@pytest.mark.parametrize("transform", [fft_purify, haar_purify])
def test_strength_zero_is_identity(transform):
    x = RNG.standard_normal((8, 300)).astype(np.float32)
    np.testing.assert_allclose(transform(x, 0.0), x, atol=1e-5)


def test_fft_cleans_smooth_rows_haar_cleans_steps():
    # each transform removes most of the noise from the signals its basis describes sparsely
    before, after = error_after(fft_purify, sines(), 1.0)
    assert after < 0.2 * before
    before, after = error_after(haar_purify, steps(), 1.0)
    assert after < 0.4 * before
    # and a stronger setting removes more
    assert error_after(haar_purify, steps(), 1.0)[1] < error_after(haar_purify, steps(), 0.3)[1]


def test_haar_restores_mean_and_std():
    x = (3.0 + 2.0 * RNG.standard_normal((32, WIDTH))).astype(np.float32)
    y = haar_purify(x, 0.8)
    assert abs(y.mean() - x.mean()) < 1e-4 and abs(y.std() / x.std() - 1) < 1e-5
    assert np.linalg.norm(y - x) > 0.05 * np.linalg.norm(x)


def test_fft_keeps_the_energy_core():
    # a row that is one pure tone is all core: nothing is attenuated
    x = sines(4)[:, :].astype(np.float32)
    np.testing.assert_allclose(fft_purify(x, 1.0), x, atol=1e-4)


@pytest.mark.parametrize("bad", [np.zeros(10, np.float32), np.zeros((2, 2, 2), np.float32)])
def test_transforms_refuse_non_matrices(bad):
    with pytest.raises(BirdboneError, match="2-D"):
        fft_purify(bad, 0.5)


def test_strength_outside_range_is_refused():
    with pytest.raises(BirdboneError, match="outside"):
        haar_purify(np.ones((2, 8), np.float32), 1.5)


def test_purify_model_in_input_types(tiny_k, tmp_path):
    out = tmp_path / "p.gguf"
    res = purify_model(tiny_k.gguf_f16, out, "haar", 0.5, roles=["organ"], layers="1")
    assert sorted(res.tensors) == ["blk.1.ffn_down.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
    assert set(res.types.values()) == {"F16"}
    with open_model(out) as p, open_model(tiny_k.gguf_f16) as src:
        for n in src.tensors:
            same = p.raw(n).tobytes() == src.raw(n).tobytes()
            assert same == (n not in res.tensors), n
        assert p.meta("birdbone.purify.method") == "haar"
        assert p.meta("birdbone.purify.source_sha256") == file_sha256(tiny_k.gguf_f16)
        assert list(p.meta("birdbone.purify.tensors")) == res.tensors
    assert all(0.01 < c < 1.0 for c in res.relative_change.values())
    assert all(isinstance(res.theta_after[n], float) for n in res.tensors)
    validate(out)


def test_purify_model_to_another_type(tiny_k, tmp_path):
    out = tmp_path / "q.gguf"
    res = purify_model(tiny_k.gguf_f32, out, "fft", 0.3, roles=["skeleton", "organ"], out_type="Q8_0")
    assert len(res.tensors) == 14 and set(res.types.values()) == {"Q8_0"}
    with open_model(out) as p:
        assert p.tensors["blk.0.attn_q.weight"].type == "Q8_0"
        assert p.tensors["blk.0.attn_norm.weight"].type == "F32"  # 1-D tensors are never touched
    validate(out)


def test_purify_refuses_bad_requests(tiny, tmp_path):
    with pytest.raises(BirdboneError, match="choose one of fft, haar"):
        purify_model(tiny.gguf_f16, tmp_path / "x.gguf", "wavelet")
    with pytest.raises(BirdboneError, match="no 2-D weight"):
        purify_model(tiny.gguf_f16, tmp_path / "x.gguf", "fft", roles=["norm"])
    with pytest.raises(BirdboneError, match="input"):
        purify_model(tiny.gguf_f16, tiny.gguf_f16, "fft")
    assert not (tmp_path / "x.gguf").exists()


def test_purify_cli_json(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be or not to be, that is the question. " * 200)
    r = json.loads(birdbone("purify", tiny.gguf_f16, "-o", tmp_path / "p.gguf", "--method", "fft", "--strength", "1",
                            "--roles", "organ", "--text", text, "--tokens", "1024", "--ctx", "256", "--json").stdout)
    assert len(r["tensors"]) == 6 and r["eval"]["kld_mean"] > 0
    assert r["eval"]["parent"]["path"].endswith("tiny-f16.gguf")
