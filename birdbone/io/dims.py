"""The widths of a llama-family model, per layer, and the GGUF keys that say them to llama.cpp.

A model whose layers all have the same widths is written under arch ``llama`` (scalar keys). One
whose layers differ is written under arch ``deci``, where ``feed_forward_length``,
``attention.head_count`` and ``attention.head_count_kv`` are per-layer arrays (llama.cpp's
``llama_model_deci``; under ``llama`` the loader takes every shape from layer 0). The rules below
are llama.cpp's (vendored 0c1e57098; read and probed, see the notes in :func:`check_dims`): a
file that breaks one of them loads with an error, or worse, aborts the process at the first decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGUFValueType as V

from birdbone.io.errors import BirdboneError

LLAMA_FAMILY = ("llama", "mistral", "deci")
# keys of the llama family that travel to the other arch name unchanged (arch prefix aside)
PER_LAYER = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")


@dataclass(frozen=True)
class Dims:
    """Per-layer widths: ``n_head[i]`` query heads, ``n_kv[i]`` key/value heads and ``n_ff[i]``
    FFN channels in layer i; one head size and one hidden width for the whole model."""

    n_embd: int
    head_dim: int
    n_head: tuple[int, ...]
    n_kv: tuple[int, ...]
    n_ff: tuple[int, ...]

    @property
    def n_layer(self) -> int:
        return len(self.n_ff)

    @property
    def uniform(self) -> bool:
        return len(set(zip(self.n_head, self.n_kv, self.n_ff))) == 1

    @property
    def arch(self) -> str:
        """The llama.cpp architecture that loads these widths."""
        return "llama" if self.uniform and self.n_head[0] > 0 else "deci"

    def layer_params(self, i: int) -> int:
        """Weights of layer i's matrices (q, k, v, o; gate, up, down)."""
        e, d = self.n_embd, self.head_dim
        attn = (2 * self.n_head[i] * d + 2 * self.n_kv[i] * d) * e if self.n_kv[i] else 0
        return attn + 3 * self.n_ff[i] * e


def _layer_values(m, arch: str, key: str, n_layer: int, default=None) -> tuple[int, ...]:
    value = m.meta(f"{arch}.{key}", default)
    if value is None:
        raise BirdboneError(f"{m.path}: no {arch}.{key} in its metadata")
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) or hasattr(value, "tolist") else [int(value)] * n_layer
    if len(values) != n_layer:
        raise BirdboneError(f"{m.path}: {arch}.{key} has {len(values)} entries for {n_layer} layers")
    return tuple(values)


def read_dims(m) -> Dims:
    """The widths of a llama-family GGUF (``llama``, ``mistral`` or ``deci``), from its metadata."""
    arch = m.architecture
    if arch not in LLAMA_FAMILY:
        raise BirdboneError(f"{m.path}: per-layer widths are read for the llama family ({', '.join(LLAMA_FAMILY)}), not {arch!r}")
    n_layer = int(m.meta(f"{arch}.block_count"))
    n_embd = int(m.meta(f"{arch}.embedding_length"))
    n_head = _layer_values(m, arch, "attention.head_count", n_layer)
    n_kv = _layer_values(m, arch, "attention.head_count_kv", n_layer, m.meta(f"{arch}.attention.head_count"))
    n_ff = _layer_values(m, arch, "feed_forward_length", n_layer)
    head_dim = int(m.meta(f"{arch}.attention.key_length", 0) or m.meta(f"{arch}.rope.dimension_count", 0) or n_embd // max(n_head[0], 1))
    return Dims(n_embd, head_dim, n_head, n_kv, n_ff)


def check_dims(d: Dims, arch: str | None = None) -> None:
    """Refuse widths llama.cpp cannot run, each with a one-line reason.

    Measured on llama.cpp 0c1e57098 (deci): the head size comes from layer 0, so layer 0 needs
    attention; a last layer with no FFN aborts the first decode; a layer whose query heads are not
    a multiple of its key/value heads aborts in the attention matmul; ``n_ff = 0`` drops a layer
    whole, attention included. Under ``llama`` every layer takes layer 0's shapes."""
    arch = arch or d.arch
    if d.n_layer == 0:
        raise BirdboneError("no layer is left: a model needs at least one")
    for i, (h, kv, ff) in enumerate(zip(d.n_head, d.n_kv, d.n_ff)):
        if ff == 0:
            raise BirdboneError(f"layer {i} would keep no FFN channel: llama.cpp's deci drops such a layer whole, attention included; "
                                "keep a small FFN or remove the layer")
        if (h == 0) != (kv == 0):
            raise BirdboneError(f"layer {i} would have {h} query heads and {kv} key/value heads: attention needs both or neither")
        if kv and h % kv:
            raise BirdboneError(f"layer {i} would have {h} query heads over {kv} key/value heads: llama.cpp needs a whole number of queries per group")
    if d.n_head[0] == 0:
        raise BirdboneError("layer 0 would have no attention: llama.cpp takes the head size from layer 0")
    if arch == "llama" and 0 in d.n_head:
        i = d.n_head.index(0)
        raise BirdboneError(f"layer {i} would keep its FFN but no attention head: arch llama has no attention-free layers "
                            "(write deci, or remove the whole layer)")
    if arch == "llama" and not d.uniform:
        raise BirdboneError("the layers' widths differ: arch llama takes every layer's shapes from layer 0 (write deci)")


def dims_metadata(d: Dims, arch: str) -> dict:
    """The width keys of ``arch`` for ``d`` (per-layer arrays under deci), as (value, type, item type)
    (:func:`birdbone.io.gguf_writer.write_gguf`'s metadata). The head size is always explicit: llama.cpp's
    default, width / heads of layer 0, is wrong once heads are removed."""
    keys = {f"{arch}.block_count": (d.n_layer, V.UINT32, None), f"{arch}.embedding_length": (d.n_embd, V.UINT32, None),
            f"{arch}.attention.key_length": (d.head_dim, V.UINT32, None), f"{arch}.attention.value_length": (d.head_dim, V.UINT32, None),
            f"{arch}.rope.dimension_count": (d.head_dim, V.UINT32, None)}
    for key, values in zip(PER_LAYER, (d.n_ff, d.n_head, d.n_kv)):
        keys[f"{arch}.{key}"] = (values[0], V.UINT32, None) if arch == "llama" else (list(values), V.ARRAY, V.INT32)
    return keys
