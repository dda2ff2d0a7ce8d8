"""Logits of a ``transformers`` model on token ids, for the same scoring the llama.cpp side uses."""

from __future__ import annotations

import numpy as np


def torch_logits(lm, tokens: np.ndarray) -> np.ndarray:
    """(n,) token ids -> (n, n_vocab) float32 logits, one forward pass, no gradient."""
    import torch

    with torch.inference_mode():
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
        return lm(input_ids=ids).logits[0].float().numpy()


def state_dict_numpy(lm) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in lm.state_dict().items()}
