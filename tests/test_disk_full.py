"""A full disk mid-write: a one-line error, nothing partial, the user's files intact. The writers
run against a small tmpfs this test mounts (CI runs as root); where mounting is impossible the
test is skipped and says why."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from birdbone.io.atomic import TEMP_PREFIX


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"DISK-FULL TEST NOT RUN: cannot mount a tmpfs here ({p.stderr.strip() or 'mount failed'}); run as root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """A user's file that takes all but ``leave`` bytes of the disk."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "users-file.bin"
    filler.write_bytes(os.urandom(max(free - leave, 0)))
    return filler


@pytest.mark.parametrize("verb, leave", [
    (["dissect", "{m}", "-o", "{mnt}/organs"], 64 * 1024),  # 220 KB of organs into 64 KB
    (["profile", "{m32}", "--ctx", "64", "--tokens", "256", "-o", "{mnt}/usage"], 8 * 1024),
    (["quantize", "{m}", "--type", "Q8_0", "-o", "{mnt}/q.gguf"], 64 * 1024),  # refused before the work: not enough space
    (["budget", "{m}", "--usage", "{usage}", "--target-bpw", "6", "-o", "{mnt}/plan.json"], 0),
])
def test_a_full_disk_is_a_one_line_error_and_nothing_is_lost(tiny, tmp_path, small_disk, verb, leave):
    from tests.test_cli import birdbone

    usage = tmp_path / "usage"
    if "{usage}" in verb:
        birdbone("profile", tiny.gguf_f32, "--ctx", "64", "--tokens", "256", "-o", usage)
    filler = fill(small_disk, leave)
    before = hashlib.sha256(filler.read_bytes()).hexdigest()
    argv = [a.format(m=tiny.gguf_f16, m32=tiny.gguf_f32, mnt=small_disk, usage=usage) for a in verb]
    p = subprocess.run([sys.executable, "-m", "birdbone", *argv], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, COLUMNS="200"))
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert "space" in lines[0], lines[0]
    assert sorted(x.name for x in small_disk.iterdir()) == ["users-file.bin"]  # no output, no temp
    assert hashlib.sha256(filler.read_bytes()).hexdigest() == before
    assert not list(small_disk.glob(TEMP_PREFIX + "*"))
