"""Choosing tensors by layer range, role and name pattern (graft, purify, and later remodel)."""

from __future__ import annotations

import re
from typing import Iterable

from birdbone.anatomy.roles import ROLES, classify
from birdbone.io.errors import BirdboneError


def parse_layers(spec: str | None, n_layers: int | None) -> set[int] | None:
    """``'5-20'``, ``'3'``, ``'1,4-6'`` -> layer indices; checked against the model's block count."""
    if spec is None:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise BirdboneError(f"--layers {spec!r}: expected ranges like 5-20 or 1,4-6")
        a, b = int(m[1]), int(m[2] or m[1])
        if b < a:
            raise BirdboneError(f"--layers {spec!r}: range {a}-{b} runs backwards")
        out.update(range(a, b + 1))
    if n_layers is not None and max(out) >= n_layers:
        raise BirdboneError(f"--layers {spec!r}: the model has layers 0-{n_layers - 1}")
    return out


def select(body, layers: set[int] | None, roles: Iterable[str] | None, pattern: str | None) -> list[str]:
    """Names of ``body.entries`` in every given filter (None: no filter), in the body's order."""
    roles = set(roles) if roles else None
    if roles and not roles <= set(ROLES):
        raise BirdboneError(f"--roles: unknown role(s) {sorted(roles - set(ROLES))}; known: {', '.join(ROLES)}")
    rx = re.compile(pattern) if pattern else None
    chosen = []
    for name in body.entries:
        a = classify(name)
        if layers is not None and a.layer not in layers:
            continue
        if roles is not None and a.role not in roles:
            continue
        if rx is not None and not rx.search(name):
            continue
        chosen.append(name)
    return chosen
