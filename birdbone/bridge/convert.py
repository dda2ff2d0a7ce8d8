"""``birdbone convert``: GGUF <-> safetensors / Hugging Face folder, and GGUF type changes.

* GGUF -> GGUF: every tensor dequantized and written as F32 / F16 / BF16 / Q8_0 (1-D stays F32).
* GGUF -> Hugging Face folder: transformers' GGUF loading, then ``save_pretrained`` (safetensors)
  with the tokenizer transformers rebuilds from the GGUF.
* GGUF -> ``.safetensors`` file: the weights only, under Hugging Face names.
* safetensors / HF folder -> GGUF: the metadata from config.json by the family table and the
  vocabulary from tokenizer.json (:mod:`birdbone.bridge.from_hf`), or every key from ``like``
  (a GGUF of the same architecture and shapes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from birdbone.io.atomic import atomic_folder, check_output, check_output_folder
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.model_file import open_model, resolve_model_path
from birdbone.io.progress import tick

log = logging.getLogger(__name__)
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0")
TORCH_TYPES = ("F32", "F16", "BF16")


def output_kind(out: Path) -> str:
    if out.suffix == ".gguf":
        return "gguf"
    if out.suffix == ".safetensors":
        return "safetensors"
    return "hf"


def convert(model: str | Path, out: str | Path, out_type: str = "F16", like: str | Path | None = None, progress=None) -> Path:
    src = resolve_model_path(model)
    out = Path(out)
    out_type = out_type.upper()
    kind = output_kind(out)
    with open_model(src) as m:
        size = m.file_bytes
        src_format = m.format
    if kind == "hf":
        check_output_folder(out, [src, like])
    else:
        check_output(out, [src, like], need_bytes=size * 4)
    if kind == "gguf":
        if out_type not in GGUF_TYPES:
            raise BirdboneError(f"GGUF output type {out_type!r}: choose one of {', '.join(GGUF_TYPES)} (for K-quants use birdbone quantize)")
        return _to_gguf(src, src_format, out, out_type, like, progress)
    if out_type not in TORCH_TYPES:
        raise BirdboneError(f"{kind} output type {out_type!r}: choose one of {', '.join(TORCH_TYPES)}")
    if src_format != "gguf":
        raise BirdboneError(f"{src} is already {src_format}; convert writes safetensors / HF folders from GGUF files")
    with open_model(src) as m:
        if m.architecture == "deci":  # a saved config could not say the per-layer widths: loading it back would fail
            raise InputError(src, "is a structured (deci) GGUF: its layers have their own widths, which no Hugging Face "
                                  "config can hold; keep it as GGUF (birdbone and llama.cpp read it)")
    return _gguf_to_torch(src, out, kind, out_type)


def _to_gguf(src: Path, src_format: str, out: Path, out_type: str, like, progress) -> Path:
    from birdbone.bridge.to_gguf import state_dict_to_gguf, write_like

    cb = tick(progress, "write")
    if src_format == "gguf":
        if like is not None:
            raise BirdboneError("--like is for safetensors / HF input; a GGUF carries its own metadata")
        with open_model(src) as m:
            return write_like(m, out, {n: (lambda n=n: m.tensor(n)) for n in m.tensors}, out_type, progress=cb)
    if like is None:  # metadata from config.json, the vocabulary from tokenizer.json
        from birdbone.bridge.from_hf import hf_to_gguf

        return hf_to_gguf(src, out, out_type, cb)
    like_path = resolve_model_path(like)
    with open_model(src) as m, open_model(like_path) as parent:
        if parent.format != "gguf":
            raise InputError(like_path, "--like must be a GGUF")
        state = {n: m.tensor(n) for n in m.tensors}
        return state_dict_to_gguf(state, parent, out, out_type, progress=cb)


def _gguf_to_torch(src: Path, out: Path, kind: str, out_type: str) -> Path:
    import torch

    from birdbone.bridge.to_torch import load_causal_lm

    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[out_type]
    lm = load_causal_lm(src).to(dtype)
    if kind == "safetensors":
        from safetensors.torch import save_file

        from birdbone.io.atomic import atomic_path

        state = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
        if getattr(lm.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # stored once, as Hugging Face does
        with atomic_path(out) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        return out
    with atomic_folder(out) as tmp:  # out checked absent or empty above
        lm.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(src, tmp)
    return out


def _save_tokenizer(src: Path, folder: Path) -> None:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.save_pretrained(str(folder))
    except Exception as e:  # the weights are still useful without it; say so
        log.warning("%s: transformers could not rebuild the tokenizer from the GGUF (%s); the folder has weights and config only", src, e)


class Conversion:
    """``birdbone convert``'s result: what was written, in which type."""

    def __init__(self, out: Path, type_: str):
        self.out, self.type = out, type_.upper()

    def as_dict(self) -> dict:
        return {"out": str(self.out), "type": self.type}

    def render(self) -> list:
        from birdbone.io.report import Line

        return [Line(f"wrote {self.out} ({self.type})")]


def convert_model(model: str | Path = "builtin", out: str | Path = "out.gguf", out_type: str = "F16", like: str | Path | None = None,
                  progress=None) -> Conversion:
    """``birdbone convert``: GGUF ↔ safetensors / Hugging Face folder, or another float type."""
    return Conversion(convert(model, out, out_type, like, progress), out_type)
