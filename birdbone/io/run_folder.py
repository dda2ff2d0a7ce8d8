"""A run folder: the memory of a long job (prune, compress, synapse train) that survives a kill.

Every run folder has two files of its own:

    run.json    what the run is: its kind, its identity (input hashes and resolved config) and the
                code that made it (birdbone's version and a hash of its source files)
    state.json  where it stands: the kind's own record, rewritten atomically after each step

:meth:`RunFolder.open` creates a folder (``run.json`` first, so a folder killed a moment later is
still recognised as ours) or reopens one: a different identity is a one-line error naming what
changed, and so is different code, since other code may compute other bytes and a resumed run
promises the same bytes as an uninterrupted one. A step is committed by writing its files
(each atomically), then ``state.json`` last: whatever a kill leaves behind the last
``state.json`` was never committed, and the kind's resume drops it.

The holdout split every run uses is :func:`birdbone.io.text.split_holdout`.
"""

from __future__ import annotations

import functools
import hashlib
import contextlib
import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from birdbone.io.inputs import read_json
from birdbone.io.atomic import write_text_atomic
from birdbone.io.errors import InputError, shown

RUN_FILE = "run.json"
# identity keys in words, for the one-line error a resume with other inputs gets
WORDS = {"source_sha256": "model", "input_sha256": "model", "text_sha256": "text", "calibration_sha256": "calibration text",
         "verify_sha256": "verify text", "recipe_sha256": "recipe", "config": "config", "usage_sha256": "usage profile"}
STATE_FILE = "state.json"


@functools.lru_cache(maxsize=1)
def code_identity() -> dict:
    """birdbone's version and the sha256 of its source files (paths and bytes, in a fixed order)."""
    from birdbone import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return {"version": __version__, "source_sha256": h.hexdigest()}


def plain(data):
    """JSON-normal form (tuples as lists, keys as strings), so a saved identity compares equal."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class StaleRun(InputError):
    """The folder was made by other code: resuming could write other bytes than it promised."""


@dataclass
class RunFolder:
    path: Path
    kind: str  # prune | compress | synapse
    identity: dict
    state: dict = field(default_factory=dict)
    created: bool = False  # True when open() made the folder

    @classmethod
    def open(cls, path: str | Path, kind: str, identity: dict, initial_state: dict | None = None) -> "RunFolder":
        """Create the run folder, or check it belongs to this ``kind`` and ``identity`` and load its state."""
        path = Path(path)
        identity = plain(identity)
        marker = path / RUN_FILE
        if marker.is_file():
            saved = read_run(path)
            if saved.get("kind") != kind:
                raise InputError(path, f"is a {saved.get('kind')} run folder, not a {kind} one")
            old = saved.get("identity", {})
            changed = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            if changed:
                words = list(dict.fromkeys(WORDS.get(k, k.removesuffix("_sha256")) for k in changed))
                raise InputError(path, f"this run was started with another {' and '.join(words)}; use a new run folder")
            if saved.get("code") != plain(code_identity()):
                was = saved.get("code", {})
                raise StaleRun(path, f"this run was made by other birdbone code (version {was.get('version')}, source "
                                     f"{str(was.get('source_sha256'))[:12]}) and may not resume to the same bytes; use a new run folder")
            state = read_json(path / STATE_FILE) if (path / STATE_FILE).exists() else dict(initial_state or {})
            check_state(path, state, initial_state or {})
            return cls(path, kind, identity, state, created=False)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            older = " (made by an earlier birdbone)" if (path / STATE_FILE).exists() or (path / "config.json").exists() else ""
            raise InputError(path, f"exists and is not a {kind} run folder{older}; refusing to write into it (use a new run folder)")
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, json.dumps({"kind": kind, "identity": identity, "code": code_identity()}, indent=1) + "\n")
        run = cls(path, kind, identity, dict(initial_state or {}), created=True)
        run.save()
        return run

    def file(self, name: str) -> Path:
        return self.path / name

    def save(self) -> None:
        write_text_atomic(self.path / STATE_FILE, json.dumps(self.state, indent=1) + "\n")

    def commit(self, files: dict[str, str] | None = None, **state) -> None:
        """Write ``files`` (name → text, each atomically), then the state with ``state`` applied: the commit point."""
        for name, text in (files or {}).items():
            write_text_atomic(self.path / name, text)
        self.state.update(state)
        self.save()


@contextlib.contextmanager
def reading_run(path: str | Path) -> Iterator[None]:
    """Reading a finished run (report, revert, diff, eval): a file of it that does not hold what
    birdbone wrote there (damaged, edited, cut short) is a one-line error naming the run, never a
    traceback. The run folder is ours, so this is the one boundary for all its files."""
    from safetensors import SafetensorError

    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, EOFError, RecursionError, UnicodeDecodeError,
            SafetensorError) as e:
        raise InputError(path, f"this run folder is damaged or was edited ({type(e).__name__}: {shown(str(e), 120)}); "
                               "use a new run folder") from None
    except OSError as e:
        # a path the run recorded that no file system takes (too long, a loop, a folder for a file)
        if e.errno not in (errno.ENAMETOOLONG, errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
            raise
        raise InputError(path, f"this run folder is damaged or was edited (it names {shown(str(e.filename))}: {e.strerror}); "
                               "use a new run folder") from None


def json_kind(value) -> str:
    """A JSON value's kind, bool apart from number (an edited ``"waves": true`` is not a count)."""
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "null")


def check_state(path: Path, state, initial: dict) -> None:
    """A resumed state holds every key its kind starts with, each of the same JSON kind: so the
    kind's resume code meets what it wrote, and an edited state is one line, not a traceback."""
    if not isinstance(state, dict):
        raise InputError(path / STATE_FILE, "is damaged or was edited (not a JSON object); use a new run folder")
    for key, first in initial.items():
        if key not in state or json_kind(state[key]) != json_kind(first):
            raise InputError(path / STATE_FILE, f"is damaged or was edited ({key}: {shown(state.get(key))}, "
                                                f"expected a {json_kind(first)}); use a new run folder")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a run's JSON-lines log (metrics, lineage); a damaged line names the file."""
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict):
            raise InputError(path, f"is damaged or was edited (line {k} is not a JSON object); use a new run folder")
        rows.append(row)
    return rows


def read_run(path: str | Path) -> dict:
    """The ``run.json`` of a run folder (kind, identity, code); a one-line error when there is none."""
    path = Path(path)
    if not (path / RUN_FILE).exists():
        raise InputError(path, "not a birdbone run folder (no run.json)")
    run = read_json(path / RUN_FILE, "run.json")
    if not isinstance(run, dict):
        raise InputError(path / RUN_FILE, "is not a run record (a JSON object)")
    return run


def run_kind(path: str | Path) -> str | None:
    """The kind of run a folder holds, or None when it is not a run folder."""
    try:
        return read_run(path).get("kind")
    except InputError:
        return None
