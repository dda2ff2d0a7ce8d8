"""The ``birdbone`` command: help for every verb, JSON that parses, one-line errors, exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from birdbone.cli import app

VERBS = ["inspect", "quantize", "eval", "convert", "generate", "chat", "dissect", "assemble", "graft", "measure", "profile", "purify", "prune",
         "structure", "revert", "report", "budget", "scaffold", "compress", "diff", "recipe show", "recipe check", "synapse train", "synapse enable",
         "synapse eval", "synapse sample", "synapse chat"]
WRITERS = {"quantize", "convert", "dissect", "assemble", "graft", "profile", "purify", "prune", "structure", "revert", "budget", "scaffold", "compress",
           "diff", "synapse train", "synapse enable"}
runner = CliRunner()


def birdbone(*args, check=True):
    """Run the real console entry point in a fresh process (llama.cpp's C log included)."""
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "birdbone", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def test_every_verb_is_listed():
    """No verb escapes the help test: the list above is every command and sub-command the app has."""
    from birdbone.cli import app
    from typer.main import get_command

    root = get_command(app)
    found = {f"{g} {c}" if g else c for g, group in [("", root), *((n, cmd) for n, cmd in root.commands.items() if hasattr(cmd, "commands"))]
             for c, cmd in group.commands.items() if not hasattr(cmd, "commands")}
    assert found == set(VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    r = runner.invoke(app, [*verb.split(), "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output) > 200
    if verb not in ("chat", "synapse chat"):
        assert "--json" in r.output
    if verb in WRITERS:
        assert "--out" in r.output


def test_cli_functions_are_thin():
    """The CLI holds no logic: no function in birdbone/cli is over 30 lines (docstring excluded)."""
    import ast
    from pathlib import Path

    long = []
    for path in (Path(__file__).resolve().parents[1] / "birdbone" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if ast.get_docstring(node):
                    n -= node.body[0].end_lineno - node.body[0].lineno + 1
                if n > 30:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long


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
    # -vv routes llama.cpp's own log to stderr: its line for each tensor, with the type it converts to
    assert re.search(r"blk\.1\.ffn_down\.weight.*q8_0", p.stderr, re.I), p.stderr[-2000:]
    quiet = birdbone("quantize", tiny_k.gguf_f16, "-o", tmp_path / "q2.gguf", "--type", "Q4_K_M", "--json")
    assert not re.search(r"blk\.1\.ffn_down\.weight", quiet.stderr)  # ... and only at -vv
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
    """The reply is llama.cpp's greedy continuation of the chat-templated prompt, token for token."""
    from birdbone.io.runtime import LlamaRuntime, Message

    r = json.loads(birdbone("generate", tiny.gguf_f16, "--prompt", "Hello", "-n", "5", "--json").stdout)
    with LlamaRuntime(tiny.gguf_f16, n_ctx=2048) as rt:
        expected = rt.greedy(rt.chat_tokens([Message("user", "Hello")]), 5)
        assert len(expected) == 5  # the random tiny model does not stop early on this prompt
        assert r["n_tokens"] == 5 and r["reply"] == rt.detokenize(expected)
        raw = json.loads(birdbone("generate", tiny.gguf_f16, "--prompt", "Hello", "-n", "3", "--raw", "--json").stdout)
        assert raw["n_tokens"] == 3 and raw["reply"] == rt.detokenize(rt.greedy(rt.tokenize("Hello", add_special=True), 3))


@pytest.mark.parametrize("args, message", [
    (["inspect", "/no/such/model.gguf"], "no such file"),
    (["quantize", "{txt}", "-o", "{tmp}/o.gguf"], "unknown model format"),
    (["quantize", "{gguf}", "-o", "{tmp}/o.gguf", "--type", "Q9_X"], "unknown llama.cpp file type"),
    (["quantize", "{gguf}", "-o", "{gguf}"], "same file as an input"),
    (["quantize", "{gguf}", "-o", "{tmp}/o.gguf", "--tensor-type", "ffn=Q9"], "unknown tensor type"),
    (["eval", "{gguf}", "--text", "{tmp}/missing.txt"], "no such file"),
    (["convert", "{gguf}", "-o", "{tmp}/o.gguf", "--like", "{gguf32}"], "--like is for safetensors / HF input"),
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
    """Each turn's reply is the model's greedy reply to the conversation so far; /reset forgets it."""
    from birdbone.io.chat import ChatSession, LlamaChat

    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "birdbone", "chat", str(tiny.gguf_f16), "-n", "4"], input="Hello\nAgain\n/reset\nAgain\n/exit\n",
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    engine = LlamaChat(tiny.gguf_f16)
    session = ChatSession(engine, max_tokens=4)
    first = session.send("Hello")
    prompt_1 = engine.last_prompt
    second = session.send("Again")
    prompt_2 = engine.last_prompt
    assert len(session.messages) == 4 and session.messages[-1].content == second.strip()
    assert prompt_2.startswith(prompt_1) and "Hello" in prompt_2 and prompt_2.rstrip().endswith("assistant")  # turn 2 continues turn 1
    session.turn("/reset")
    fresh = session.send("Again")
    assert "Hello" not in engine.last_prompt and len(engine.last_prompt) < len(prompt_2)  # /reset forgot turn 1
    assert p.stdout == f"> {first}\n> {second}\n> > {fresh}\n> "  # the prompt, each reply; /reset prints only to stderr
