"""The ``birdbone`` command: help for every verb, JSON that parses, one-line errors, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from birdbone.cli import app

VERBS = ["inspect", "quantize", "eval", "convert", "generate", "chat", "dissect", "assemble", "graft", "measure", "profile", "purify", "prune", "revert", "report", "budget", "scaffold", "compress", "diff"]
runner = CliRunner()


def birdbone(*args, check=True):
    """Run the real console entry point in a fresh process (llama.cpp's C log included)."""
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "birdbone", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    r = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output) > 200
    if verb != "chat":
        assert "--json" in r.output
    if verb in ("quantize", "convert", "dissect", "assemble", "graft", "profile", "purify", "prune", "revert", "budget"):
        assert "--out" in r.output


def test_inspect_json_parses(tiny):
    p = birdbone("inspect", tiny.gguf_f16, "--json")
    info = json.loads(p.stdout)
    assert info["architecture"] == "llama" and info["n_tensors"] == len(info["tensors"])
    assert info["types"]["F32"] >= 5
    assert info["anatomy"]["roles"]["skeleton"]["n_tensors"] == 8 and info["tensors"][0]["role"]


def test_dissect_assemble_graft_json(tiny, tmp_path):
    d = json.loads(birdbone("dissect", tiny.gguf_f16, "-o", tmp_path / "organs", "--json").stdout)
    assert d["tensors"] == 20 and d["roles"]["organ"] == 6
    text = tmp_path / "t.txt"
    text.write_text("To be or not to be, that is the question. " * 300)
    a = json.loads(birdbone("assemble", tmp_path / "organs", "-o", tmp_path / "back.gguf", "--text", text, "--json").stdout)
    assert a["identical_to_source"] and a["validation"]["n_tokens"] == 8 and a["eval"]["model"]["ppl"] > 1
    g = json.loads(birdbone("graft", "--base", tiny.gguf_f16, "--donor", tmp_path / "organs", "-o", tmp_path / "g.gguf",
                            "--layers", "1", "--roles", "organ", "--text", text, "--json").stdout)
    assert len(g["tensors"]) == 3 and g["validation"]["n_tokens"] == 8 and g["eval"]["kld_mean"] is not None


def test_quantize_json_parses_and_llama_log_stays_off_stdout(tiny_k, tmp_path):
    out = tmp_path / "q.gguf"
    p = birdbone("-v", "-v", "quantize", tiny_k.gguf_f16, "-o", out, "--type", "Q4_K_M", "--tensor-type", "ffn_down=Q8_0", "--json")
    report = json.loads(p.stdout)  # llama.cpp's chatty log must not reach stdout
    assert "llama_model_quantize" in p.stderr or "quant" in p.stderr
    assert report["types"]["blk.1.ffn_down.weight"] == "Q8_0" and out.exists()
    dry = json.loads(birdbone("quantize", tiny_k.gguf_f16, "--type", "Q4_K_M", "--tensor-type", "ffn_down=Q8_0", "--dry-run", "--json").stdout)
    assert dry["types"] == report["types"] and dry["dry_run"]


def test_eval_json_parses(tiny, tmp_path):
    p = birdbone("eval", tiny.gguf_f16, "--parent", tiny.gguf_f32, "--ctx", "64", "--tokens", "256", "--decode", "4", "--canary-tokens", "4", "--json")
    r = json.loads(p.stdout)
    assert r["kld_mean"] >= 0 and r["model"]["ppl"] > 1 and r["model"]["speed"]["decode_tok_s"] > 0


def test_measure_json_and_fleet(tiny, tmp_path):
    one = json.loads(birdbone("measure", tiny.gguf_f16, "--json", "--html", tmp_path / "r.html").stdout)
    assert one["theta_version"] == "theta_v1" and len(one["tensors"]) == 20
    assert "<img" in (tmp_path / "r.html").read_text()
    both = json.loads(birdbone("measure", tiny.gguf_f16, tiny.gguf_f32, "--json", "--csv", tmp_path / "fleet.csv").stdout)
    assert [r["parameters"] for r in both["fleet"]] == [one["parameters"]] * 2
    assert (tmp_path / "fleet.csv").read_text().count("\n") == 3


def test_profile_writes_an_imatrix_llama_cpp_takes(tiny_k, tmp_path):
    r = json.loads(birdbone("profile", tiny_k.gguf_f16, "-o", tmp_path / "usage", "--ctx", "64", "--tokens", "256", "--json").stdout)
    assert r["weights"] == 14 and r["tokens"] == 256
    q = json.loads(birdbone("quantize", tiny_k.gguf_f16, "-o", tmp_path / "iq2.gguf", "--type", "IQ2_XXS",
                            "--imatrix", tmp_path / "usage" / "imatrix.gguf", "--json").stdout)
    assert q["types"]["blk.0.ffn_up.weight"] == "IQ2_XXS"


def test_generate_json(tiny):
    r = json.loads(birdbone("generate", tiny.gguf_f16, "--prompt", "Hello", "-n", "5", "--json").stdout)
    assert r["n_tokens"] <= 5 and isinstance(r["reply"], str)


@pytest.mark.parametrize("args, message", [
    (["inspect", "/no/such/model.gguf"], "no such file"),
    (["quantize", "{txt}", "-o", "{tmp}/o.gguf"], "unknown model format"),
    (["quantize", "{gguf}", "-o", "{tmp}/o.gguf", "--type", "Q9_X"], "unknown llama.cpp file type"),
    (["quantize", "{gguf}", "-o", "{gguf}"], "same file as an input"),
    (["quantize", "{gguf}", "-o", "{tmp}/o.gguf", "--tensor-type", "ffn=Q9"], "unknown tensor type"),
    (["eval", "{gguf}", "--text", "{tmp}/missing.txt"], "no such file"),
    (["convert", "{hf}", "-o", "{tmp}/o.gguf"], "--like"),
    (["graft", "--base", "{gguf}", "--donor", "{gguf32}", "-o", "{tmp}/g.gguf", "--layers", "7-9"], "the model has layers 0-1"),
    (["graft", "--base", "{gguf}", "--donor", "{gguf32}", "-o", "{tmp}/g.gguf", "--layers", "0"], "type base F16, donor F32"),
    (["assemble", "{tmp}", "-o", "{tmp}/a.gguf"], "no manifest.json"),
])
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, args, message):
    txt = tmp_path / "notes.txt"
    txt.write_text("not a model")
    before = sorted(p.name for p in tmp_path.iterdir())
    subs = {"{txt}": str(txt), "{tmp}": str(tmp_path), "{gguf}": str(tiny.gguf_f16), "{gguf32}": str(tiny.gguf_f32), "{hf}": str(tiny.hf_dir)}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    p = birdbone(*argv, check=False)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_chat_reads_turns(tiny):
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "birdbone", "chat", str(tiny.gguf_f16), "-n", "4"], input="Hello\n/reset\nAgain\n/exit\n",
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
