"""The integer codes inside llama.cpp's legacy block types, to say how many weights moved on the grid.

Comparing dequantized values overstates a change: a new block scale or minimum alters every
value of its block while the codes may all stay. For the 32-weight block types the layout is
simple enough to read the codes directly (ggml-common.h):

    Q8_0  d(f16) qs[32] int8          Q4_0  d qs[16] (two 4-bit codes per byte)
    Q4_1  d m qs[16]                  Q5_0  d qh[4] qs[16] (5th bit in qh)
    Q5_1  d m qh[4] qs[16]

Other types (K-quants, IQ) return None: their codes are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.constants import GGMLQuantizationType as T

# type -> (block bytes, scale-and-min bytes, has 5th bits)
_LAYOUT = {T.Q8_0: (34, 2, False), T.Q4_0: (18, 2, False), T.Q4_1: (20, 4, False), T.Q5_0: (22, 2, True), T.Q5_1: (24, 4, True)}


@dataclass(frozen=True)
class CodeChange:
    codes: float  # share of weights whose integer code differs
    blocks_rescaled: float  # share of blocks whose scale (or min) differs


def _codes(raw: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    size, head, fifth = _LAYOUT[qtype]
    blocks = raw.reshape(-1, size)
    scales = blocks[:, :head]
    if qtype == T.Q8_0:
        return blocks[:, head:], scales
    qs = blocks[:, head + (4 if fifth else 0):]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    if fifth:
        bits = np.unpackbits(blocks[:, head:head + 4], axis=1, bitorder="little")
        codes = codes | (bits << 4)
    return codes, scales


def code_change(a: np.ndarray, b: np.ndarray, qtype: T) -> CodeChange | None:
    """How two stored tensors of the same legacy type differ, in codes and in block scales."""
    if qtype not in _LAYOUT:
        return None
    ca, sa = _codes(np.asarray(a, np.uint8), qtype)
    cb, sb = _codes(np.asarray(b, np.uint8), qtype)
    return CodeChange(float((ca != cb).mean()), float((sa != sb).any(axis=1).mean()))
