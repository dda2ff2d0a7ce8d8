"""Progress reports: library code never prints, it calls ``progress(label, done, total)``.

Long work takes a :data:`Progress` (or ``None``). A function that counts one thing takes a
:data:`Tick` ``(done, total)`` instead; :func:`tick` makes one from a ``Progress`` and a label,
and :func:`relabel` puts every report of a ``Progress`` under one label.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, int], None]
Tick = Callable[[int, int], None]


def tick(progress: Progress | None, label: str) -> Tick | None:
    """``(done, total)`` reports under ``label``; None when nobody listens."""
    if progress is None:
        return None
    return lambda done, total: progress(label, done, total)


def relabel(progress: Progress | None, label: str) -> Progress | None:
    """Every report of a ``Progress`` under ``label`` (an inner function's own labels hidden)."""
    if progress is None:
        return None
    return lambda _inner, done, total: progress(label, done, total)
