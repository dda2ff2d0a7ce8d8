"""Outputs appear whole or not at all; inputs are never overwritten; killed runs are cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from birdbone.io.atomic import TEMP_PREFIX, atomic_path, check_output, clean_stale_temps
from birdbone.io.errors import InputError


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_a_dead_runs_old_temps_are_cleaned(tmp_path):
    """A live run's temp may sit untouched for minutes (a dissection writes only below its temp
    folder): its process is alive, so it stays, however old; a dead run's goes once it is old."""
    dead = dead_pid()
    stale, fresh = tmp_path / f"{TEMP_PREFIX}{dead}-a.gguf", tmp_path / f"{TEMP_PREFIX}{dead}-b.gguf"
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-c"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    live.mkdir()
    (live / "organ.bin").write_bytes(b"z")
    old = time.time() - 3600
    for p in (stale, live):
        os.utime(p, (old, old))
    assert clean_stale_temps(tmp_path) == [stale]
    assert fresh.exists() and live.exists() and not stale.exists()


def test_a_long_dissection_keeps_its_temp_while_another_command_writes_beside_it(tmp_path, tiny):
    """The probe's case: a dissection older than the stale age loses nothing to a quantize beside it."""
    from birdbone.anatomy.dissect import dissect
    from birdbone.io.quantize import quantize_file

    def slow(done, total):
        if done == 1:
            for t in tmp_path.glob(TEMP_PREFIX + "*"):
                os.utime(t, (time.time() - 3600,) * 2)  # looks an hour old
            quantize_file(tiny.gguf_f16, tmp_path / "q.gguf", "Q8_0")  # cleans stale temps beside it

    dissect(tiny.gguf_f16, tmp_path / "organs", progress=slow)
    assert (tmp_path / "organs" / "manifest.json").exists() and (tmp_path / "q.gguf").exists()


def test_check_output_refuses_input_and_full_disk(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="same file as an input"):
        check_output(src, [src])
    with pytest.raises(InputError, match="same file as an input"):
        check_output(tmp_path / "." / "m.gguf", [src])
    with pytest.raises(InputError, match="not enough disk space"):
        check_output(tmp_path / "o.gguf", [src], need_bytes=2**62)
    with pytest.raises(InputError, match="does not exist"):
        check_output(tmp_path / "no" / "o.gguf", [src])


def test_importing_birdbone_is_lean():
    """The CLI's import must not pull torch or transformers (they load only when a verb needs them)."""
    code = "import sys, birdbone.cli, birdbone.io, birdbone.evaluate.compare; print(sorted(m for m in ('torch','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
