"""Data flows one way: each room imports only the rooms before it (docs/architecture.md)."""

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "birdbone"
ALLOWED = {
    "io": {"io"},
    "anatomy": {"io", "anatomy", "evaluate"},  # evaluate: the instrument that judges what a verb wrote
    "bridge": {"io", "bridge"},
    "measure": {"io", "anatomy", "bridge", "measure"},
    "evaluate": {"io", "bridge", "evaluate"},
    "remodel": {"io", "anatomy", "bridge", "measure", "evaluate", "remodel"},
    "synapse": {"io", "synapse"},
    "recipe": {"io", "anatomy", "bridge", "measure", "evaluate", "remodel", "recipe"},
}
IMPORT = re.compile(r"^\s*(?:from|import)\s+birdbone\.(\w+)", re.M)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_room_imports_only_earlier_rooms(room):
    for path in (PACKAGE / room).glob("*.py"):
        used = set(IMPORT.findall(path.read_text()))
        assert used <= ALLOWED[room], f"{path.name} imports {sorted(used - ALLOWED[room])}"
