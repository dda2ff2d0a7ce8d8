"""The user cache for expensive derived files, keyed by content hash.

What lives here: the float form of a quantized model (:mod:`birdbone.io.float_form`) and a
parent's log-probabilities on a text (:mod:`birdbone.evaluate.cache`). Entries are written
atomically, so an entry exists only once complete. The folder is ``platformdirs``' user cache
(``~/.cache/birdbone`` on Linux; ``XDG_CACHE_HOME`` moves it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from birdbone.io.atomic import atomic_path, clean_stale_temps
from birdbone.io.hashing import user_cache_dir

log = logging.getLogger(__name__)


def get_or_build(name: str, build: Callable[[Path], None]) -> Path:
    """The cached file ``name``, built by ``build(tmp_path)`` the first time."""
    folder = user_cache_dir()
    clean_stale_temps(folder)
    path = folder / name
    if path.exists():
        return path
    log.info("building cache entry %s", path)
    with atomic_path(path) as tmp:
        build(tmp)
    return path
