"""The thin ctypes layer over the llama.cpp library that llama-cpp-python ships.

birdbone fills llama.cpp's C structs itself (``llama_model_quantize_params`` and the arrays
it points to). A struct whose layout differs from the library's does not raise, it corrupts
memory, so :func:`lib` checks the layout once before anything is called: the exact
llama-cpp-python version, the struct sizes and field offsets we were written against, and
the defaults the library itself fills in (a shifted field reads back as garbage).

llama.cpp's C log goes through ``llama_log_set`` into :mod:`logging` (logger
``birdbone.llama``), so nothing reaches stdout and ``--json`` output always parses.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from pathlib import Path
from typing import Iterator

from birdbone.io.errors import BirdboneError

EXPECTED_VERSION = "0.3.36"
log = logging.getLogger("birdbone.llama")

# (struct name, sizeof, {field: offset}) on a 64-bit platform, from llama.h of 0.3.36.
_EXPECTED_LAYOUT = {
    "llama_model_quantize_params": (64, {
        "nthread": 0, "ftype": 4, "output_tensor_type": 8, "token_embedding_type": 12,
        "allow_requantize": 16, "quantize_output_tensor": 17, "only_copy": 18, "pure": 19,
        "keep_split": 20, "dry_run": 21, "imatrix": 24, "kv_overrides": 32, "tt_overrides": 40,
        "prune_layers": 48, "max_buf_size": 56,
    }),
    "llama_model_tensor_override": (16, {"pattern": 0, "type": 8}),
    "llama_model_imatrix_data": (24, {"name": 0, "data": 8, "size": 16}),
}
GGML_TYPE_COUNT = 43
LLAMA_FTYPE_MOSTLY_Q8_0 = 7

_lock = threading.Lock()
_state: dict = {}


class _LogBridge:
    """Collects llama.cpp's log pieces into lines; sends them to logging and to any captures."""

    # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continue. llama.cpp warns per tensor
    # (fallbacks, overrides); birdbone summarises those itself, so they go to INFO here.
    LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}

    def __init__(self):
        self.partial = ""
        self.level = logging.INFO
        self.captures: list[list[str]] = []

    def __call__(self, level: int, text: bytes, _user) -> None:
        piece = text.decode("utf-8", errors="replace") if text else ""
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line at its level
            self.level = self.LEVELS.get(level, logging.DEBUG)
        self.partial += piece
        while "\n" in self.partial:
            line, self.partial = self.partial.split("\n", 1)
            for cap in self.captures:
                cap.append(line)
            if line.strip():
                log.log(self.level, "%s", line)


def _check_layout(llama_cpp) -> None:
    import llama_cpp as pkg

    version = getattr(pkg, "__version__", "?")
    if version != EXPECTED_VERSION:
        raise BirdboneError(
            f"llama-cpp-python {version} is installed but birdbone calls the C structs of {EXPECTED_VERSION}; "
            f"install llama-cpp-python=={EXPECTED_VERSION}")
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        raise BirdboneError("birdbone needs a 64-bit Python")
    for name, (size, offsets) in _EXPECTED_LAYOUT.items():
        struct = getattr(llama_cpp, name)
        got = {f: getattr(struct, f).offset for f in offsets}
        if ctypes.sizeof(struct) != size or got != offsets:
            raise BirdboneError(f"llama_cpp.{name} layout differs from llama.h {EXPECTED_VERSION}: size {ctypes.sizeof(struct)}, offsets {got}")
    d = llama_cpp.llama_model_quantize_default_params()
    canary = (d.nthread, d.ftype, d.output_tensor_type, d.token_embedding_type, d.quantize_output_tensor, d.dry_run, d.max_buf_size)
    if canary != (0, LLAMA_FTYPE_MOSTLY_Q8_0, GGML_TYPE_COUNT, GGML_TYPE_COUNT, True, False, 8 * 2**30):
        raise BirdboneError(f"llama.cpp's default quantize params read back wrong ({canary}): the library and its ctypes bindings disagree")


def lib():
    """The checked ``llama_cpp`` module, with the backend initialised and the log bridged."""
    with _lock:
        if "llama_cpp" not in _state:
            import llama_cpp

            _check_layout(llama_cpp)
            bridge = _LogBridge()
            callback = llama_cpp.llama_log_callback(bridge)
            llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _state.update(llama_cpp=llama_cpp, bridge=bridge, callback=callback)
        return _state["llama_cpp"]


@contextlib.contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines emitted inside the block (used to read dry-run sizes)."""
    lib()
    lines: list[str] = []
    bridge = _state["bridge"]
    bridge.captures.append(lines)
    try:
        yield lines
    finally:
        if bridge.partial:
            lines.append(bridge.partial)
        bridge.captures.remove(lines)


def ggml():
    """The ggml library (ctypes) with the prototypes birdbone calls declared."""
    with _lock:
        if "ggml" in _state:
            return _state["ggml"]
    llama_cpp = lib()
    libdir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("libggml.*"))
    if not candidates:
        raise BirdboneError(f"{libdir}: llama-cpp-python ships no ggml library")
    g = ctypes.CDLL(str(candidates[0]))
    g.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    g.ggml_quantize_chunk.restype = ctypes.c_size_t
    g.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    g.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    g.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    g.ggml_row_size.restype = ctypes.c_size_t
    g.ggml_blck_size.argtypes = [ctypes.c_int]
    g.ggml_blck_size.restype = ctypes.c_int64
    g.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    g.ggml_validate_row_data.restype = ctypes.c_bool
    with _lock:
        _state["ggml"] = g
    return g


# llama.cpp checks a model's hyper-parameters with GGML_ASSERT, which aborts the whole process
# (block_count 0 or over 512, for one). Its loader is run first in a child that reads only the
# header and vocabulary (``vocab_only``), so an abort there becomes a one-line error here.
_PROBE = r"""
import ctypes, sys
import llama_cpp as L
quiet = L.llama_log_callback(lambda level, text, user: None)  # kept referenced: llama.cpp calls it
L.llama_log_set(quiet, ctypes.c_void_p(0))
L.llama_backend_init()
p = L.llama_model_default_params()
p.use_mmap = True  # tensors mapped, not read: the header checks are what is probed
m = L.llama_model_load_from_file(sys.argv[1].encode(), p)
if m:
    L.llama_model_free(m)
sys.exit(0 if m else 3)
"""
_probed: dict[tuple, str | None] = {}


def probe_loadable(path: str | Path, force: bool = False) -> None:
    """Raise a one-line :class:`InputError` when llama.cpp would abort loading ``path`` (its
    header fails an assertion); a file whose loader merely fails is left to the caller's own
    error. Once per file version and process. A file this process wrote itself is trusted unless
    ``force`` (its metadata came from a probed parent; the probe costs a child process, about
    half a second); a file assembled from a user's manifest is not, so validation forces it."""
    import os
    import subprocess
    import sys

    from birdbone.io.errors import InputError

    from birdbone.io.inputs import written_here

    path = Path(path)
    if written_here(path) and not force:
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _probed:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
        try:
            p = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=300, env=env)
        except subprocess.TimeoutExpired:
            raise InputError(path, "llama.cpp did not finish reading this file's header in 300 s") from None
        aborted = p.returncode < 0 or p.returncode == 134
        found = [line.strip() for line in p.stderr.splitlines() if "GGML_ASSERT" in line or "error" in line.lower()]
        _probed[key] = (found[0].split(": ", 1)[-1] if found else f"signal {-p.returncode}") if aborted else None
    if _probed[key]:
        raise InputError(path, f"llama.cpp aborts on this file: {_probed[key][:200]}")
