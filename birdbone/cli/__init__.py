"""The ``birdbone`` command: a thin skin over the public functions of the rooms.

Each verb maps its flags to one call and renders the result the call returns (``--json``: the
result's ``as_dict()``; otherwise its tables and lines). No verb holds logic of its own, and no
function here is longer than 30 lines. Every verb takes the model as an optional first argument
(default ``builtin``), writes to ``-o/--out``, and reports as JSON with ``--json``.

Errors a user can fix print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import sys

from birdbone.cli.common import app
from birdbone.io.errors import BirdboneError

# the verbs register themselves on ``app`` as their modules load
from birdbone.cli import models, anatomy, remodel, recipe, synapse  # noqa: E402,F401,I001

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except BirdboneError as e:
        sys.stderr.write(f"birdbone: error: {' '.join(str(e).split())}\n")  # one line, never wrapped
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("birdbone: interrupted\n")
        sys.exit(130)
