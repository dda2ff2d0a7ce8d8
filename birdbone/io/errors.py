"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import os
import reprlib
from typing import Any


class BirdboneError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 2


class InputError(BirdboneError):
    """A file that cannot be used: names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error message may show it: a bounded repr, cut to ``limit`` characters."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel = limit, limit, 3
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
