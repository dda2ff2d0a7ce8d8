"""llama.cpp's type vocabulary: tensor types (ggml) and whole-file mixes (llama_ftype).

One table each, by the names llama.cpp's own tools use (``Q4_K_M``, ``q8_0``, ...), so a
user can write any of them in any case.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from birdbone.io.errors import BirdboneError

# llama_ftype values from llama.h (llama-cpp-python 0.3.36): the file-level mixes.
FILE_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}
FILE_TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# Mixes whose low-bit tensors llama.cpp refuses to write without an importance matrix.
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}

# Tensor types a user can name for one tensor (quantizable by ggml).
TENSOR_TYPES: dict[str, GGMLQuantizationType] = {
    t.name: t for t in GGMLQuantizationType
    if t in GGML_QUANT_SIZES and t.name not in {"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"}
}

# llama.cpp's fallback when a row width is not a multiple of a type's block (llama-quant.cpp,
# tensor_type_fallback). A 32-block type that still does not fit becomes F16.
FALLBACK: dict[str, str] = {
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
    **{t: "Q4_0" for t in ("Q2_K", "Q3_K", "TQ1_0", "TQ2_0")},
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def canonical(name: str) -> str:
    return name.strip().upper().replace("-", "_")


def file_type(name: str) -> tuple[str, int]:
    """A whole-file mix by name: returns (canonical name, llama_ftype)."""
    key = canonical(name)
    key = FILE_TYPE_ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise BirdboneError(f"unknown llama.cpp file type {name!r}; known: {', '.join(FILE_TYPES)}")
    return key, FILE_TYPES[key]


def tensor_type(name: str) -> GGMLQuantizationType:
    """A single-tensor type by name (Q6_K, q8_0, F16, ...)."""
    key = canonical(name)
    if key not in TENSOR_TYPES:
        raise BirdboneError(f"unknown tensor type {name!r}; known: {', '.join(TENSOR_TYPES)}")
    return TENSOR_TYPES[key]


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def bits_per_weight(t: GGMLQuantizationType) -> float:
    block, nbytes = GGML_QUANT_SIZES[t]
    return 8.0 * nbytes / block


def legal_type(t: GGMLQuantizationType, row_width: int) -> GGMLQuantizationType:
    """The type llama.cpp would actually write for rows of ``row_width`` values."""
    if row_width % block_size(t) == 0:
        return t
    fb = TENSOR_TYPES[FALLBACK[t.name]] if t.name in FALLBACK else t
    return fb if row_width % block_size(fb) == 0 else GGMLQuantizationType.F16
