"""Session fixtures shared by the whole suite: tiny models built in code, an isolated cache.

Nothing here downloads anything: the tiny models are random llamas with a BPE tokenizer
trained on birdbone's Shakespeare excerpt; the built-in model comes from an installed package.
"""

from __future__ import annotations

import os

import pytest

# Before torch is imported anywhere: the CI machine has 2 cores, and the suite must not
# reach for the network (transformers / huggingface_hub honour these).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fixtures.tiny import TinyModel, make_tiny_llama  # noqa: E402



@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """birdbone's cache (platformdirs' user cache) goes to a temporary folder, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(autouse=True)
def _input_scope():
    """Each test is a command of its own: the inputs it reads are noted apart from other tests'."""
    from birdbone.io.inputs import input_scope

    with input_scope():
        yield


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """Two threads (the CI machine's cores), float32 default: set once, as early as possible."""
    import torch

    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float32)
    yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    """Random llama, hidden 64 (4 heads, 2 kv heads, 2 layers): HF folder, F32 and F16 GGUF."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_k(tmp_path_factory) -> TinyModel:
    """Random llama, hidden 256: rows fit llama.cpp's 256-wide K-quant blocks."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_k"), hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, seed=1)


@pytest.fixture(scope="session")
def builtin_path():
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF (tests using it are marked ``builtin``)."""
    from birdbone.io.builtin import builtin_model_path

    return builtin_model_path()
