"""sha256 of files, remembered per (path, size, mtime) in the user cache so big inputs are hashed once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from birdbone.io.atomic import write_text_atomic


def user_cache_dir() -> Path:
    from platformdirs import user_cache_dir as _dir

    d = Path(_dir("birdbone", appauthor=False))
    d.mkdir(parents=True, exist_ok=True)
    return d


def file_sha256(path: str | Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    index_path = user_cache_dir() / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    index[key] = h.hexdigest()
    write_text_atomic(index_path, json.dumps(index))
    return index[key]
