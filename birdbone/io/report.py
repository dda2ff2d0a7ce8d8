"""What a verb returns: a result that renders itself, as JSON (``as_dict``) and as blocks to print.

Every public verb function returns an object with ``as_dict()`` (what ``--json`` prints and the
HTTP API returns) and ``render()``: a list of :class:`Table` and :class:`Line` blocks. Only the
CLI turns blocks into terminal output; library code never prints. The number formats every
table shares live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Union


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str | None = None

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])


@dataclass(frozen=True)
class Line:
    text: str
    style: str | None = None  # dim, yellow, red, green, bold: a hint, the CLI may ignore it


Block = Union[Table, Line]


class Result(Protocol):
    def as_dict(self) -> dict: ...

    def render(self) -> list[Block]: ...


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def fmt(x, spec: str = ".4f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def histogram(h: dict[str, int]) -> str:
    """``{"Q4_K": 3, "Q8_0": 1}`` as ``Q4_K×3, Q8_0×1``."""
    return ", ".join(f"{k}×{v}" for k, v in h.items())


@dataclass
class Plain:
    """A result that is only data and a few lines (for small verbs)."""

    data: dict
    lines: list[Block] = field(default_factory=list)

    def as_dict(self) -> dict:
        return self.data

    def render(self) -> list[Block]:
        return self.lines
