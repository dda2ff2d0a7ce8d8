"""Torch side: a ``transformers`` causal LM from a GGUF (transformers' own GGUF loading), and
any torch / Hugging Face state dict written back to a GGUF that keeps the parent's metadata.
"""

from birdbone.bridge.to_gguf import state_dict_to_gguf, write_like
from birdbone.bridge.to_torch import load_causal_lm

__all__ = ["load_causal_lm", "state_dict_to_gguf", "write_like"]
