"""Quantization with llama.cpp's own code: whole files and single tensors.

* :func:`quantize_file` calls ``llama_model_quantize`` with a file mix (``Q4_K_M`` ...),
  per-tensor overrides by regex, an importance matrix and llama.cpp's dry run.
* :func:`quantize_tensor` calls ggml's ``ggml_quantize_chunk`` on one float array. ggml itself
  writes garbage for a row width that is not a multiple of the type's block, so the width is
  checked here and llama.cpp's fallback rule is applied, with a warning.

birdbone never implements a quantizer of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from birdbone.io.atomic import atomic_path, check_output
from birdbone.io.inputs import note_input
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.llama import capture_log, ggml, lib, probe_loadable
from birdbone.io.types import file_type, legal_type, tensor_type

log = logging.getLogger(__name__)


# -- single tensors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedTensor:
    data: np.ndarray  # uint8, the stored bytes
    type: GGMLQuantizationType  # what was written (after any fallback)
    shape: tuple[int, ...]  # numpy order
    requested: GGMLQuantizationType

    @property
    def fell_back(self) -> bool:
        return self.type != self.requested

    def dequantize(self) -> np.ndarray:
        from gguf.quants import dequantize

        return np.asarray(dequantize(self.data, self.type), dtype=np.float32).reshape(self.shape)


def requires_imatrix(qtype: GGMLQuantizationType) -> bool:
    return bool(ggml().ggml_quantize_requires_imatrix(int(qtype)))


def quantize_tensor(array: np.ndarray, qtype: GGMLQuantizationType | str, imatrix: np.ndarray | None = None,
                    name: str = "tensor") -> QuantizedTensor:
    """Quantize a float array (rows = leading dims, row width = last dim) with ggml."""
    requested = tensor_type(qtype) if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    src = np.ascontiguousarray(array, dtype=np.float32)
    if src.ndim == 0 or src.size == 0:
        raise BirdboneError(f"{name}: cannot quantize an empty or 0-d array")
    if not np.isfinite(src).all():
        raise BirdboneError(f"{name}: holds NaN or Inf; refusing to quantize")
    n_per_row = src.shape[-1]
    nrows = src.size // n_per_row
    qt = legal_type(requested, n_per_row)
    if qt != requested:
        log.warning("%s: row width %d is not a multiple of %s's block of %d; falling back to %s (as llama.cpp does)",
                    name, n_per_row, requested.name, GGML_QUANT_SIZES[requested][0], qt.name)
    imat_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.size != n_per_row:
            raise BirdboneError(f"{name}: importance matrix has {imatrix.size} values, rows have {n_per_row}")
        imat_ptr = imatrix.ctypes.data
    elif requires_imatrix(qt):
        raise BirdboneError(f"{name}: type {qt.name} needs an importance matrix")
    if qt == GGMLQuantizationType.F32:
        return QuantizedTensor(src.view(np.uint8).reshape(-1).copy(), qt, src.shape, requested)
    g = ggml()
    row_size = g.ggml_row_size(int(qt), n_per_row)
    dst = np.empty(nrows * row_size, dtype=np.uint8)
    written = g.ggml_quantize_chunk(int(qt), src.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, imat_ptr)
    if written != dst.size:
        raise BirdboneError(f"{name}: ggml wrote {written} bytes, expected {dst.size}")
    return QuantizedTensor(dst, qt, src.shape, requested)


# -- whole files ------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    out: Path | None
    file_type: str
    types: dict[str, str]  # tensor name -> written type
    tensor_bytes: int
    file_bytes: int
    n_params: int
    fallbacks: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    def type_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for t in self.types.values():
            hist[t] = hist.get(t, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def parse_tensor_types(specs: list[str]) -> list[tuple[str, GGMLQuantizationType]]:
    """``'ffn_down=Q6_K'`` -> (regex, type). The regex is searched in the tensor name, as llama.cpp does."""
    out = []
    for spec in specs:
        if "=" not in spec:
            raise BirdboneError(f"--tensor-type {spec!r}: expected PATTERN=TYPE, e.g. 'ffn_down=Q6_K'")
        pattern, tname = spec.rsplit("=", 1)
        try:
            re.compile(pattern)
        except re.error as e:
            raise BirdboneError(f"--tensor-type {spec!r}: bad regex: {e}") from None
        out.append((pattern, tensor_type(tname)))
    return out


_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[(?P<shape>[^\]]*)\],\s+type\s+=\s+(?P<cur>\S+),\s+(?P<rest>.*)$")
_CONVERT = re.compile(r"\((?P<new>[a-z0-9_]+)\)\s*$", re.I)


def _types_from_log(lines: list[str]) -> dict[str, str]:
    types = {}
    for line in lines:
        m = _TENSOR_LINE.match(line.strip())
        if not m:
            continue
        conv = _CONVERT.search(m["rest"]) if "->" in m["rest"] else None
        types[m["name"]] = (conv["new"] if conv else m["cur"]).upper()
    return types


def quantize_file(src: str | Path, out: str | Path | None, type_name: str = "Q4_K_M",
                  tensor_types: list[str] | None = None, imatrix: str | Path | None = None,
                  dry_run: bool = False, threads: int = 0, allow_requantize: bool = True) -> QuantizeResult:
    """Quantize a GGUF with ``llama_model_quantize``; returns the types llama.cpp wrote."""
    from birdbone.io.model_file import open_model, resolve_model_path

    note_input(imatrix)  # a plan's imatrix too: known before the output check, so -o cannot land on it
    src = resolve_model_path(src)
    ftype_name, ftype = file_type(type_name)
    overrides = parse_tensor_types(tensor_types or [])
    with open_model(src) as m:
        if m.format != "gguf":
            raise InputError(src, "llama.cpp quantizes GGUF files; convert it first (birdbone convert)")
        src_bytes, n_params = m.file_bytes, m.n_params
        header_bytes = src_bytes - m.tensor_bytes
        shapes = {n: t.shape for n, t in m.tensors.items()}
    if not dry_run:
        if out is None:
            raise BirdboneError("an output path is needed (-o/--out) unless --dry-run")
        check_output(out, [src], need_bytes=src_bytes * 2)

    probe_loadable(src)
    llama_cpp = lib()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = allow_requantize
    params.dry_run = dry_run
    keep = []  # ctypes buffers that must outlive the call
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pat, qt) in enumerate(overrides):
            b = ctypes.create_string_buffer(pat.encode())
            keep.append(b)
            arr[i].pattern = ctypes.cast(b, ctypes.c_char_p)
            arr[i].type = int(qt)
        arr[len(overrides)].pattern = None
        keep.append(arr)
        params.tt_overrides = arr
    if imatrix is not None:
        from birdbone.io.imatrix import read_imatrix

        im = read_imatrix(imatrix)
        arr = (llama_cpp.llama_model_imatrix_data * (len(im.values) + 1))()
        for i, (name, vals) in enumerate(sorted(im.values.items())):
            v = np.ascontiguousarray(vals, dtype=np.float32)
            b = ctypes.create_string_buffer(name.encode())
            keep += [v, b]
            arr[i].name = ctypes.cast(b, ctypes.c_char_p)
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(im.values)].name = None
        keep.append(arr)
        params.imatrix = arr

    def run(dst: Path | None) -> list[str]:
        with capture_log() as lines:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst or "/dev/null").encode(), ctypes.byref(params))
        if rc != 0:
            errors = [l for l in lines if "error" in l.lower() or "failed" in l.lower()]
            raise InputError(src, f"llama.cpp could not quantize to {ftype_name}: {errors[-1].strip() if errors else f'return code {rc}'}")
        return lines

    if dry_run:
        lines = run(None)
        types = _types_from_log(lines)
        missing = set(shapes) - set(types)
        if missing:
            raise BirdboneError(f"llama.cpp's dry run did not report {len(missing)} tensors (e.g. {sorted(missing)[0]})")
        tensor_bytes = sum(_nbytes(types[n], shapes[n]) for n in shapes)
        result = QuantizeResult(None, ftype_name, types, tensor_bytes, header_bytes + tensor_bytes, n_params, dry_run=True)
    else:
        out = Path(out)
        with atomic_path(out) as tmp:
            lines = run(tmp)
        with open_model(out) as q:
            types = {n: t.type for n, t in q.tensors.items()}
            result = QuantizeResult(out, ftype_name, types, q.tensor_bytes, q.file_bytes, q.n_params)
    result.fallbacks = [" ".join(l.split("warning:", 1)[-1].split()) for l in lines if "falling back" in l]
    if result.fallbacks:
        log.warning("%d tensor(s) could not take the requested type (row width not a multiple of the block); llama.cpp fell back", len(result.fallbacks))
    return result


def _nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return int(np.prod(shape, dtype=np.int64)) // block * size


@contextlib.contextmanager
def via_float(out: str | Path, out_type: str):
    """Yield (path, float type) to write a float GGUF to: ``out`` itself for F16/F32, or a temporary
    F32 file beside it that llama.cpp then quantizes into ``out`` as ``out_type`` (and removes)."""
    out = Path(out)
    float_type = out_type.upper() if out_type.upper() in ("F16", "F32") else "F32"
    target = out if float_type == out_type.upper() else out.with_name(out.name + ".f32.tmp")
    try:
        yield target, float_type
        if target != out:
            quantize_file(target, out, out_type)
    finally:
        if target != out:
            target.unlink(missing_ok=True)
