"""DeltaHistory: waves of pruning, healing deltas, regrowth and rollback, inverted to the bit."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.model_file import open_model
from birdbone.remodel.history import DeltaHistory, WaveDelta
from birdbone.remodel.masks import score, wave

N_WAVES = 5


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def prunable(m) -> list[str]:
    return [n for n, t in m.tensors.items() if len(t.shape) == 2 and n.startswith("blk.")]


def build_history(folder, gguf) -> tuple[DeltaHistory, dict[str, str]]:
    """Waves 1-3 prune 10 % and heal (random LoRA), wave 4 regrows from zero, wave 5 rolls back."""
    rng = np.random.default_rng(0)
    with open_model(gguf) as m:
        names = prunable(m)
        base = {n: m.tensor(n) for n in names}
    hist = DeltaHistory(folder, {n: base[n].shape for n in names})
    mask = {n: np.ones(base[n].shape, bool) for n in names}
    last_pruned = {}
    for k in range(1, N_WAVES + 1):
        d = WaveDelta()
        for n in names:
            w = base[n]
            if k <= 3:
                gone = wave(score("magnitude", w), mask[n], 0.5)
                d.pruned[n] = gone
                last_pruned[n] = gone
                mask[n] &= ~gone
                a = rng.standard_normal((8, w.shape[1])).astype(np.float32)
                b = rng.standard_normal((w.shape[0], 8)).astype(np.float32) * 1e-3
                d.lora[n] = (a, b, 2.0)
            elif k == 4:  # RigL-style: revive a few dead weights at exactly zero, prune as many live ones
                dead = np.flatnonzero(~mask[n])[:5]
                revive = np.zeros(w.size, bool)
                revive[dead] = True
                revive = revive.reshape(w.shape)
                d.revived[n], d.reset[n], d.values[n] = revive, revive, np.zeros(5, np.float32)
                live = np.flatnonzero(mask[n] & ~revive)[:5]
                kill = np.zeros(w.size, bool)
                kill[live] = True
                d.pruned[n] = kill.reshape(w.shape)
                mask[n] = (mask[n] & ~d.pruned[n]) | revive
            else:  # rollback: a third of wave 3's pruned weights back at their original values
                back = last_pruned[n] & ~mask[n]
                idx = np.flatnonzero(back)[: max(1, back.sum() // 3)]
                restore = np.zeros(w.size, bool)
                restore[idx] = True
                restore = restore.reshape(w.shape)
                d.revived[n], d.reset[n], d.values[n] = restore, restore, w[restore]
                mask[n] |= restore
        assert hist.append(d) == k
    return hist, {n: sha(base[n]) for n in names}


def test_every_wave_inverts_to_the_bit(tiny_k, tmp_path):
    hist, original = build_history(tmp_path / "run", tiny_k.gguf_f16)
    with open_model(tiny_k.gguf_f16) as m:
        state0 = hist.state_at(0, m.tensor)
        assert {n: sha(w) for n, (w, _) in state0.items()} == original
        states = {k: hist.state_at(k, m.tensor) for k in range(N_WAVES + 1)}
        base = {n: m.tensor(n) for n in original}
    for k in range(1, N_WAVES + 1):
        d = hist.load(k)
        for n, (w, mask) in states[k].items():
            assert (w[~mask] == 0).all(), "pruned weights are exactly zero"
            if n in d.reset:
                np.testing.assert_array_equal(w[d.reset[n]], d.values[n])  # set values land exactly
    n = next(iter(original))
    # wave 5 restored original values bit for bit; wave 4 regrew weights at exactly 0
    d5 = hist.load(5)
    assert sha(states[5][n][0][d5.reset[n]]) == sha(base[n][d5.reset[n]])
    assert (states[4][n][0][hist.load(4).reset[n]] == 0).all()
    assert 0.49 < states[3][n][1].mean() < 0.75
    # the history is small next to the model: masks (2 bits) + rank-8 LoRA + reset values
    f32_bytes = sum(w.size * 4 for w, _ in states[0].values())
    assert hist.size_bytes() / N_WAVES < 0.10 * f32_bytes


def test_replay_in_another_process_gives_the_same_bytes(tiny_k, tmp_path):
    hist, _ = build_history(tmp_path / "run", tiny_k.gguf_f16)
    with open_model(tiny_k.gguf_f16) as m:
        here = {n: sha(w) for n, (w, _) in hist.state_at(N_WAVES, m.tensor).items()}
        shapes = {n: list(s) for n, s in hist.shapes.items()}
    code = (
        "import hashlib, json, sys, numpy as np\n"
        "from birdbone.io.model_file import open_model\n"
        "from birdbone.remodel.history import DeltaHistory\n"
        "folder, gguf, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "h = DeltaHistory(folder, {n: tuple(s) for n, s in shapes.items()})\n"
        "with open_model(gguf) as m:\n"
        "    st = h.state_at(h.n_waves, m.tensor)\n"
        "print(json.dumps({n: hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest() for n, (w, _) in st.items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(tiny_k.gguf_f16), json.dumps(shapes)],
                         capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout) == here


def test_bad_waves_are_refused(tmp_path):
    h = DeltaHistory(tmp_path / "h", {"w": (4, 8)})
    with pytest.raises(BirdboneError, match="unknown tensors"):
        h.append(WaveDelta(pruned={"x": np.zeros((4, 8), bool)}))
    with pytest.raises(BirdboneError, match="mask shape"):
        h.append(WaveDelta(pruned={"w": np.zeros((8, 4), bool)}))
    with pytest.raises(BirdboneError, match="do not fit"):
        h.append(WaveDelta(lora={"w": (np.zeros((2, 4), np.float32), np.zeros((4, 2), np.float32), 1.0)}))
    with pytest.raises(BirdboneError, match="not revived"):
        h.append(WaveDelta(revived={"w": np.zeros((4, 8), bool)}, reset={"w": np.ones((4, 8), bool)}))
    assert h.n_waves == 0
    with pytest.raises(InputError, match="no wave 1"):
        h.load(1)
    with pytest.raises(BirdboneError, match="waves 0-0"):
        h.state_at(2, lambda n: np.zeros((4, 8), np.float32))
