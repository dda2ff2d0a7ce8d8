"""Atomic outputs: write into a temporary file beside the target, then rename.

A killed run leaves only ``.birdbone-tmp-<pid>-*`` files, which a later start removes once that
process is gone (:func:`clean_stale_temps`). Inputs are never overwritten: :func:`check_output`
refuses an output path that is an input before the work starts, and every commit checks again
against the inputs the command read (:mod:`birdbone.io.inputs`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from birdbone.io.errors import InputError
from birdbone.io.inputs import landing_on_input, note_written, refuse_nul

TEMP_PREFIX = ".birdbone-tmp-"
# A temp whose process is gone is only removed once untouched this long (a pid can be reused).
STALE_AFTER_S = 60.0


def check_output(out: str | os.PathLike, inputs: list[str | os.PathLike] = (), need_bytes: int = 0) -> Path:
    """Validate an output path before any work starts; returns it resolved."""
    out = Path(out)
    refuse_nul(out)
    refuse_input(out, inputs)
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


def check_output_folder(out: str | os.PathLike, inputs: list | tuple = ()) -> Path:
    """Validate a folder output before any work starts: absent or empty, its parent there, not an input."""
    out = Path(out)
    refuse_nul(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "output folder exists and is not empty")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(out, f"parent folder {parent} does not exist")
    refuse_input(out, inputs)
    return out


def refuse_input(out: str | os.PathLike, inputs: list | tuple = ()) -> None:
    """A one-line error when writing ``out`` would destroy an input of this command."""
    why = landing_on_input(out, inputs)
    if why:
        raise InputError(out, why)


def _owner_alive(temp: Path) -> bool:
    """Whether the process named in a temp's name (``.birdbone-tmp-<pid>-…``) still runs."""
    pid = temp.name[len(TEMP_PREFIX):].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries that a killed run left in ``folder``: only those whose process is gone,
    since a live run's temp folder may not change for minutes (a dissection writes only below it)."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for p in Path(folder).glob(TEMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                if not _owner_alive(p) and now - p.stat().st_mtime > STALE_AFTER_S:
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
    tmp = temp_beside(out)
    try:
        with disk_full_is_an_error(out):
            yield tmp
        refuse_input(out)
        os.replace(tmp, out)
        note_written(out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def disk_full_is_an_error(out: Path) -> Iterator[None]:
    """A full disk while writing ``out`` is the user's to fix: one line, and the temp goes."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise InputError(out, f"no space left on the device ({e.strerror}); nothing was written") from None
        raise
    except Exception as e:
        # writers in other languages (safetensors' Rust) report errno 28 in their own exception types
        if "os error 28" in str(e) or "No space left on device" in str(e):
            raise InputError(out, "no space left on the device; nothing was written") from None
        raise


def temp_beside(out: Path) -> Path:
    return out.resolve().parent / f"{TEMP_PREFIX}{os.getpid()}-{out.name}"


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success it becomes ``out``.
    ``out`` must be absent or empty unless ``replace`` (the caller checked it is ours to replace)."""
    out = Path(out)
    clean_stale_temps(out.resolve().parent)
    tmp = temp_beside(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with disk_full_is_an_error(out):
            yield tmp
        refuse_input(out)
        if out.exists():
            shutil.rmtree(out) if replace else out.rmdir()
        os.replace(tmp, out)
        note_written(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(out: str | os.PathLike, data: bytes) -> None:
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(out: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(out, text.encode("utf-8"))
