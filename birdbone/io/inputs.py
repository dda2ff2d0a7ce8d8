"""What a command reads: only regular files, documents of a bounded size, and every input noted,
so that no output of the same command can land on it.

Readers of a user's files (models, imatrix, text, plans, configs and recipes, organ and run
folders) call :func:`note_input`; :func:`landing_on_input` is asked by every writer
(:func:`birdbone.io.atomic.check_output` before the work starts, the atomic commit before the
rename). What the process wrote itself is not an input when read back (quantize reads its own
output; a notebook may rewrite a file it made and scored). The record is per process, or per
:func:`input_scope` (a server runs each job in one, tests run each test in one).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from birdbone.io.errors import InputError, shown

# JSON/YAML documents (configs, manifests, plans, recipes, indexes, run state) are small; a
# bigger one is a mistake or an attack, and reading it whole would cost the machine's memory.
MAX_DOCUMENT_BYTES = 64 * 2**20


class _Noted:
    def __init__(self) -> None:
        self.paths: set[Path] = set()  # resolved file paths
        self.inodes: set[tuple[int, int]] = set()  # (device, inode): hard links and other spellings
        self.folders: set[Path] = set()  # folders read as a whole: nothing may be written inside
        self.written: set[Path] = set()  # what this process made: its own, never protected from it


_PROCESS = _Noted()
_SCOPE: contextvars.ContextVar[_Noted | None] = contextvars.ContextVar("birdbone_inputs", default=None)


def _noted() -> _Noted:
    return _SCOPE.get() or _PROCESS


@contextlib.contextmanager
def input_scope() -> Iterator[None]:
    """A fresh record of inputs for one job in a long-lived process."""
    token = _SCOPE.set(_Noted())
    try:
        yield
    finally:
        _SCOPE.reset(token)


def note_input(*paths: str | os.PathLike | None, folder: bool = False) -> None:
    """Record files this command reads (or, with ``folder``, a folder none of whose contents may be written)."""
    noted = _noted()
    for p in paths:
        if p is None:
            continue
        _record(noted, Path(p), folder)


def _record(rec: _Noted, p: Path, folder: bool = False) -> None:
    with contextlib.suppress(OSError, ValueError):
        st = p.stat()
        if p.resolve() in rec.written:
            return
        if folder or stat.S_ISDIR(st.st_mode):
            rec.folders.add(p.resolve())
        else:
            rec.paths.add(p.resolve())
            rec.inodes.add((st.st_dev, st.st_ino))


def note_folder_files(folder: str | os.PathLike, own: tuple[str, ...] = ()) -> None:
    """Record every file below ``folder`` but the names in ``own`` (the verb's default outputs there)."""
    root = Path(folder)
    with contextlib.suppress(OSError):
        note_input(*(p for p in root.rglob("*") if p.is_file() and str(p.relative_to(root)) not in own))


def note_written(out: str | os.PathLike) -> None:
    """Record a file or folder this process has just committed."""
    with contextlib.suppress(OSError, ValueError):
        _noted().written.add(Path(out).resolve())


def written_here(path: str | os.PathLike) -> bool:
    """Whether this process (or scope) committed ``path`` itself."""
    try:
        return Path(path).resolve() in _noted().written
    except (OSError, ValueError):
        return False


def landing_on_input(out: str | os.PathLike, inputs: list | tuple = ()) -> str | None:
    """Why writing ``out`` would destroy an input (noted, or one of ``inputs``), or None when it would not."""
    out = Path(out)
    try:
        target = out.resolve()
        st = out.stat()
        inode = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        inode = None
    except (OSError, ValueError):
        return None  # checked as a path by the writer
    noted = _noted()
    extra = _Noted()
    for p in inputs:
        if p is not None:
            _record(extra, Path(p))
    for rec in (noted, extra):
        if target in rec.paths or (inode is not None and inode in rec.inodes):
            return "output path is the same file as an input; refusing to overwrite it"
        for folder in rec.folders:
            if target == folder or folder in target.parents:
                return f"output path lies inside the input folder {folder}; refusing to write into it"
    return None


def refuse_nul(path: str | os.PathLike) -> None:
    """No file system takes a NUL in a path; say so in one line before anything tries."""
    if "\0" in str(path):
        raise InputError(repr(str(path)), "path holds a NUL byte")


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed); a one-line error for anything else."""
    p = Path(path)
    try:
        st = p.stat()
    except ValueError:
        raise InputError(repr(str(p)), "path holds a NUL byte") from None
    except FileNotFoundError:
        raise InputError(p, "no such file") from None
    except OSError as e:
        raise InputError(p, f"cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(p, f"is a folder, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(p, f"is not a regular file (a FIFO, device or socket); refusing to read it as a {what}")
    return p


def folder_member(folder: str | os.PathLike, path: str | os.PathLike, what: str = "file") -> Path:
    """``path``, a file a folder names (a shard, an organ, a config), if it stays in that folder.

    The symlink policy: a path the user names is followed wherever it points (they chose it), but
    a file a folder names must resolve inside the folder, or, for a Hugging Face cache snapshot
    (``models--org--name/snapshots/REV/``), inside that repository's ``blobs/`` store, where the
    cache keeps the real files. So a downloaded or forged folder cannot make birdbone read
    elsewhere."""
    folder, p = Path(folder), Path(path)
    try:
        if "\0" in str(p) or any(len(part.encode("utf-8", errors="surrogateescape")) > 255 for part in p.parts):
            raise ValueError
        root, target = folder.resolve(), p.resolve()
        target.exists()  # a name the file system refuses raises here
    except (OSError, ValueError):
        raise InputError(folder, f"names a {what} {shown(str(p.name))} that is no usable file name") from None
    if target == root or root in target.parents:
        return p
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").resolve() in target.parents:
        return p
    raise InputError(p, f"this {what} of {folder} leads outside it (to {target}); a folder's files must stay inside it")


def read_document(path: str | os.PathLike, what: str = "file", limit: int = MAX_DOCUMENT_BYTES) -> str:
    """A small text document (JSON, YAML), size-bounded and UTF-8 checked."""
    p = regular_file(path, what)
    with open(p, "rb") as fh:
        data = fh.read(min(os.fstat(fh.fileno()).st_size, limit) + 1)  # bounded even if the file grows while we read
    if len(data) > limit:
        raise InputError(p, f"is larger than {limit // 2**20} MiB, too big for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(p, f"is not UTF-8 text (byte {e.start})") from None


def parse_json(text: str, where: str | os.PathLike, what: str = "JSON") -> Any:
    """JSON text, with one-line errors for bad syntax and for nesting too deep to parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(where, f"invalid JSON ({what}): {e}" if what != "JSON" else f"invalid JSON: {e}") from None
    except RecursionError:
        raise InputError(where, f"invalid JSON ({what}): nested too deep") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON document from disk: a regular file, bounded in size and depth; one-line errors."""
    return parse_json(read_document(path, what), path, what)


# A config expands YAML aliases into this many values at most: anchors that refer to anchors
# (a "billion laughs") build an exponential structure from a few hundred bytes.
MAX_YAML_VALUES = 100_000
# configs and recipes are written by hand: a megabyte is already absurd
MAX_YAML_BYTES = 2**20


def parse_yaml(text: str, where: str | os.PathLike, what: str = "YAML") -> Any:
    """YAML text (safe types only) with one-line errors: bad syntax, duplicate keys, nesting too
    deep, and aliases that expand to more than :data:`MAX_YAML_VALUES` values."""
    import yaml

    class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's scanner: a long scalar takes ms, not minutes
        pass

    def mapping(loader, node):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise InputError(where, f"invalid {what}: key {shown(key)} appears twice (line {seen[key] + 1} and "
                                            f"{key_node.start_mark.line + 1})")
            except TypeError:
                raise InputError(where, f"invalid {what}: a key must be text or a number, not {shown(key)}") from None
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=True)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise InputError(where, f"not valid YAML ({' '.join(str(e).split())[:300]})") from None
    except RecursionError:
        raise InputError(where, f"invalid {what}: nested too deep") from None
    _count_values(data, where, what)
    return data


def _count_values(data: Any, where, what: str) -> None:
    """Walk ``data`` as it would print (shared values counted each time), stopping at the limit."""
    left = MAX_YAML_VALUES
    stack = [data]
    while stack:
        node = stack.pop()
        left -= 1
        if left < 0:
            raise InputError(where, f"invalid {what}: expands to more than {MAX_YAML_VALUES:,} values (YAML aliases?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def read_yaml(path: str | os.PathLike, what: str = "YAML file", limit: int = MAX_YAML_BYTES) -> Any:
    return parse_yaml(read_document(path, what, limit), path, what)

