"""A torch / Hugging Face state dict written back to a GGUF that keeps every metadata key of a
parent GGUF (names and q/k row order fixed); the writing itself is
:func:`birdbone.io.gguf_writer.write_like`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from birdbone.bridge.names import to_gguf_tensors
from birdbone.io.families import family_of_arch
from birdbone.io.errors import BirdboneError
from birdbone.io.gguf_writer import write_like
from birdbone.io.model_file import ModelFile

log = logging.getLogger(__name__)


def state_dict_to_gguf(state: dict[str, np.ndarray], parent: ModelFile, out: str | Path, out_type: str = "F16",
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """A Hugging Face state dict (numpy) -> GGUF with the parent's metadata (names and q/k order fixed)."""
    arch = parent.architecture
    family_of_arch(arch)  # outside the table: one line naming the supported ones
    n_layers = int(parent.meta(f"{arch}.block_count"))
    n_head = int(parent.meta(f"{arch}.attention.head_count"))
    n_head_kv = int(parent.meta(f"{arch}.attention.head_count_kv", n_head))
    tensors = to_gguf_tensors(arch, n_layers, n_head, n_head_kv, state)
    if "output.weight" in tensors and "output.weight" not in parent.tensors:
        # tied embeddings: the head is the token embedding, which the parent stores once
        if np.array_equal(tensors["output.weight"], tensors.get("token_embd.weight")):
            del tensors["output.weight"]
        else:
            raise BirdboneError("the model's output head differs from its token embedding, but the parent ties them")
    return write_like(parent, out, tensors, out_type, progress=progress)
