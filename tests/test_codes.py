"""Reading legacy block codes: a change of codes is told apart from a change of block scale."""

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from birdbone.io.codes import code_change
from birdbone.io.quantize import quantize_tensor


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_code_change(qtype):
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    a = quantize_tensor(x, qtype).data
    same = code_change(a, a, qtype)
    assert same.codes == 0.0 and same.blocks_rescaled == 0.0
    scaled = code_change(a, quantize_tensor(x * 1.01, qtype).data, qtype)  # scales move, codes mostly stay
    assert scaled.blocks_rescaled > 0.9 and scaled.codes < 0.2
    y = x.copy()
    y[0, :32] = y[0, :32][::-1].copy()  # one block's weights reversed: same scale, codes move
    moved = code_change(a, quantize_tensor(y, qtype).data, qtype)
    assert moved.blocks_rescaled == 1 / 32 or moved.blocks_rescaled == 0.0
    assert 16 / x.size < moved.codes <= 32 / x.size
    assert code_change(a, a, T.Q4_K) is None
