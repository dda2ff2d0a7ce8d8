"""Atomic outputs: write into a temporary file beside the target, then rename.

A killed run leaves only ``.birdbone-tmp-*`` files, which the next start removes
(:func:`clean_stale_temps`). Inputs are never overwritten: :func:`check_output` refuses an
output path that is one of the inputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from birdbone.io.errors import InputError

TEMP_PREFIX = ".birdbone-tmp-"
# A temp file untouched for this long belongs to a run that died.
STALE_AFTER_S = 60.0


def check_output(out: str | os.PathLike, inputs: list[str | os.PathLike] = (), need_bytes: int = 0) -> Path:
    """Validate an output path before any work starts; returns it resolved."""
    out = Path(out)
    for inp in inputs:
        # resolve() catches other spellings of one path; samefile() catches hard links
        if inp is not None and (out.resolve() == Path(inp).resolve()
                                or (out.exists() and Path(inp).exists() and os.path.samefile(out, inp))):
            raise InputError(out, "output path is the same file as an input; refusing to overwrite it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(out, f"output folder {parent} does not exist")
    if out.is_dir():
        raise InputError(out, "output path is a folder, expected a file name")
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise InputError(out, f"not enough disk space: need {need_bytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")
    clean_stale_temps(parent)
    return out


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files that a killed run left in ``folder``."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for p in Path(folder).glob(TEMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_AFTER_S:
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success rename it onto ``out``."""
    out = Path(out)
    tmp = out.with_name(f"{TEMP_PREFIX}{os.getpid()}-{out.name}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(out: str | os.PathLike, data: bytes) -> None:
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(out: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(out, text.encode("utf-8"))
