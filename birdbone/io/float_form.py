"""The float form of a model: what every remodelling stage starts from and is judged against.

A quantized GGUF's float form is its weights dequantized and stored as F16 (cached by content
hash): the original float weights are not in the file, so this is the best parent there is, and
its weights still sit on the input's quantization grid (:func:`source_grid`), which later
stages must not mistake for skill. A float GGUF is its own float form.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from birdbone.io.errors import InputError
from birdbone.io.progress import Progress, tick

FLOAT_TYPES = ("F32", "F16", "BF16")


def source_grid(m) -> str | None:
    """The quantized type most of a GGUF's matrices are stored in, or None for a float file."""
    from birdbone.io.types import TENSOR_TYPES

    kinds = Counter(t.type for t in m.tensors.values() if len(t.shape) >= 2)
    quantized = [(c, k) for k, c in kinds.items() if k in TENSOR_TYPES and k not in FLOAT_TYPES]
    return max(quantized)[1] if quantized else None


def source_grids(m) -> dict[str, str]:
    """Each quantized matrix's stored type (a Hub GGUF is a mix: Q4_K here, Q6_K there); empty
    for a float file. What a plan must not give a tensor back: its own grid, lossless by construction."""
    from birdbone.io.types import TENSOR_TYPES

    return {n: t.type for n, t in m.tensors.items() if len(t.shape) >= 2 and t.type in TENSOR_TYPES and t.type not in FLOAT_TYPES}


def float_form(model: str | Path, progress: Progress | None = None) -> Path:
    """The F16 form of a quantized GGUF (cached by content hash): its dequantized weights."""
    from birdbone.io.cache import get_or_build
    from birdbone.io.gguf_writer import write_like
    from birdbone.io.hashing import file_sha256
    from birdbone.io.model_file import open_model, resolve_model_path

    src = resolve_model_path(model)
    key = file_sha256(src)[:20]

    def build(tmp: Path) -> None:
        with open_model(src) as m:
            write_like(m, tmp, {name: (lambda name=name: m.tensor(name)) for name in m.tensors}, "F16",
                       progress=tick(progress, "dequantize to F16"))

    return get_or_build(f"f16-{key}.gguf", build)


def float_source(model: str | Path, progress: Progress | None = None) -> tuple[Path, str | None]:
    """The float GGUF to remodel and quantize (a quantized input's F16 form, a float input itself)
    and the input's own grid (None for a float input)."""
    from birdbone.io.model_file import open_model, resolve_model_path

    path = resolve_model_path(model)
    with open_model(path) as m:
        if m.format != "gguf":
            raise InputError(path, "this works on GGUF files; convert it first (birdbone convert --type F16)")
        grid = source_grid(m)
    return (float_form(path, progress) if grid else path), grid


def describe_parent(parent: Path) -> str | None:
    """A note when ``parent`` is a cached float form (its original float weights are not shipped)."""
    from birdbone.io.hashing import user_cache_dir

    if parent.parent.resolve() == user_cache_dir().resolve() and parent.name.startswith("f16-"):
        return "the parent is the F16 form of a quantized file: its weights dequantized (the original float weights are not in the file)"
    return None
