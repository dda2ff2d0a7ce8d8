"""Write tensors back to a GGUF that keeps every metadata key of a parent GGUF.

Used for torch models (healed, pruned, fine-tuned), for safetensors / Hugging Face folders
converted ``--like`` a parent, and for dequantized F16 parents. The parent decides the
tensor order, names and shapes; every tensor must be present with the parent's shape.
1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

from birdbone.bridge.names import check_supported, to_gguf_tensors
from birdbone.io.errors import BirdboneError
from birdbone.io.gguf_writer import FILE_TYPE_OF, TensorSpec, copy_metadata, write_gguf
from birdbone.io.model_file import ModelFile
from birdbone.io.quantize import quantize_tensor
from birdbone.io.types import tensor_type

log = logging.getLogger(__name__)
OUT_TYPES = tuple(FILE_TYPE_OF)


def _encode(arr: np.ndarray, qtype: GGMLQuantizationType, name: str) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return quantize_tensor(arr, qtype, name=name).data


def write_like(parent: ModelFile, out: str | Path, tensors: dict[str, np.ndarray | Callable[[], np.ndarray]],
               out_type: str = "F16", metadata_updates: dict | None = None,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``tensors`` (GGUF names -> float arrays or loaders) with ``parent``'s metadata and order."""
    if parent.format != "gguf":
        raise BirdboneError(f"{parent.path}: the metadata parent must be a GGUF")
    out_type = out_type.upper()
    if out_type not in FILE_TYPE_OF:
        raise BirdboneError(f"output type {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    qtype = tensor_type(out_type)
    missing = [n for n in parent.tensors if n not in tensors]
    extra = [n for n in tensors if n not in parent.tensors]
    if missing or extra:
        raise BirdboneError(f"tensors do not match the parent {parent.path.name}: missing {missing[:5]}, unexpected {extra[:5]}")
    specs = []
    for name, info in parent.tensors.items():
        src = tensors[name]
        t = GGMLQuantizationType.F32 if len(info.shape) == 1 else qtype

        def load(src=src, name=name, info=info, t=t):
            arr = src() if callable(src) else src
            arr = np.asarray(arr, dtype=np.float32)
            if arr.shape != info.shape:
                raise BirdboneError(f"{name}: shape {arr.shape} differs from the parent's {info.shape}")
            if not np.isfinite(arr).all():
                raise BirdboneError(f"{name}: holds NaN or Inf; refusing to write it")
            return _encode(arr, t, name)

        specs.append(TensorSpec(name, info.shape, t, load))
    meta = copy_metadata(parent.metadata)
    meta["general.file_type"] = (FILE_TYPE_OF[out_type], GGUFValueType.UINT32, None)
    for key, val in (metadata_updates or {}).items():
        meta[key] = val
    return write_gguf(out, parent.architecture, meta, specs, progress)


def state_dict_to_gguf(state: dict[str, np.ndarray], parent: ModelFile, out: str | Path, out_type: str = "F16",
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """A Hugging Face state dict (numpy) -> GGUF with the parent's metadata (names and q/k order fixed)."""
    arch = parent.architecture
    check_supported(arch)
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
