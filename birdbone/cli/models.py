"""Verbs on one model file: inspect, quantize, eval, convert, generate, chat."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from birdbone.cli.common import (CONFIG_OPT, JSON_OPT, MODEL_ARG, SET_OPT, G, app, configure, err_console, keys_help, opt, out_console,
                                 progress_bar, show)
from birdbone.evaluate.compare import EvalConfig


@app.command()
def inspect(model: str = MODEL_ARG, as_json: bool = JSON_OPT,
            tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="Include the per-tensor table.")):
    """Architecture, parameters, bytes and the per-tensor table (name, shape, type, bytes)."""
    from birdbone.anatomy.inspect import inspect_model

    show(inspect_model(model, tensors), as_json)


@app.command()
def quantize(
    model: str = MODEL_ARG,
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output GGUF (not needed with --dry-run)."),
    type_: str = typer.Option("Q4_K_M", "--type", help="llama.cpp file type: Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, IQ4_XS, F16, ..."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="Per-tensor override REGEX=TYPE, e.g. 'ffn_down=Q6_K' (repeatable; first match wins)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp GGUF format or legacy .dat)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report the types and sizes llama.cpp would write."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A precision plan from birdbone budget: one type per tensor (quantizes the model's float form; "
                                                             "uses the plan's importance matrix unless --imatrix)."),
    evaluate_after: bool = typer.Option(False, "--eval", help="Evaluate the output against the input (the built-in model: its F16 form) and print the table."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text for --eval (default: the built-in Shakespeare excerpt)."),
    ctx: Optional[int] = opt(EvalConfig, "ctx"),
    tokens: Optional[int] = opt(EvalConfig, "tokens"),
    as_json: bool = JSON_OPT,
):
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize), by a file mix or by a plan."""
    from birdbone.remodel.quantize import quantize_model

    cfg = configure(EvalConfig, None, [], ctx=ctx, tokens=tokens, threads=G.threads) if evaluate_after else None
    with progress_bar() as cb:
        show(quantize_model(model, out, type_, tensor_type, imatrix, plan, dry_run, cfg, text, G.threads, cb), as_json)


@app.command("eval", help="Perplexity, KL divergence vs a parent, canary agreement and speed, in llama.cpp.\n\n" + keys_help(EvalConfig))
def eval_(
    model: str = MODEL_ARG,
    parent: Optional[str] = typer.Option(None, "--parent", help="Reference model for KLD and Δppl ('builtin' = the built-in model's F16 form). Default for the built-in model: its F16 form."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text to score (default: the built-in Shakespeare excerpt)."),
    ctx: Optional[int] = opt(EvalConfig, "ctx"),
    tokens: Optional[int] = opt(EvalConfig, "tokens"),
    decode: Optional[int] = opt(EvalConfig, "decode"),
    canary_tokens: Optional[int] = opt(EvalConfig, "canary_tokens"),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    from birdbone.evaluate.compare import evaluate

    cfg = configure(EvalConfig, config, sets, ctx=ctx, tokens=tokens, decode=decode, canary_tokens=canary_tokens, threads=G.threads)
    with progress_bar() as cb:
        show(evaluate(model, parent, text, cfg, cb), as_json)


@app.command()
def convert(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output: NAME.gguf, NAME.safetensors (weights only), or a folder (Hugging Face layout)."),
    type_: str = typer.Option("F16", "--type", help="F16, F32, BF16, or Q8_0 (GGUF only)."),
    like: Optional[Path] = typer.Option(None, "--like", help="GGUF whose tokenizer and metadata a safetensors / HF model takes (llama family)."),
    as_json: bool = JSON_OPT,
):
    """Convert GGUF <-> safetensors / Hugging Face folder, or change a GGUF's float type."""
    from birdbone.bridge.convert import convert_model

    with progress_bar() as cb:
        show(convert_model(model, out, type_, like, cb), as_json)


@app.command()
def generate(
    model: str = MODEL_ARG,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message (or raw text with --raw)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    raw: bool = typer.Option(False, "--raw", help="Continue the prompt as plain text instead of through the chat template."),
    ctx: int = typer.Option(2048, "--ctx", help="Context window."),
    as_json: bool = JSON_OPT,
):
    """Generate a reply through llama.cpp with the model's chat template."""
    from birdbone.io.chat import generate as run

    show(run(model, prompt, max_tokens, temperature, raw, ctx, G.seed, G.threads), as_json)


@app.command()
def chat(
    model: str = MODEL_ARG,
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Tokens per reply at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    ctx: int = typer.Option(2048, "--ctx", help="Context window; the conversation is re-encoded each turn."),
):
    """Talk to a model in the terminal (llama.cpp, the model's chat template). /reset clears, /exit quits."""
    from birdbone.io.chat import ChatSession, LlamaChat

    engine = LlamaChat(model, ctx, temperature, G.seed, G.threads)
    err_console.print(f"[dim]{engine.name}: type a message; /reset clears the conversation, /exit quits.[/dim]")
    talk(ChatSession(engine, system, max_tokens))


def talk(session) -> None:
    """The terminal loop over a :class:`~birdbone.io.chat.ChatSession`: a line in, its reply or notice out
    (replies and asked-for output on stdout, notices on stderr)."""
    from birdbone.io.chat import ContextFull

    while True:
        try:
            turn = session.turn(input("> "))
        except (EOFError, KeyboardInterrupt):
            return
        if turn.kind == "quit":
            return
        if turn.notice is not None:
            (out_console if turn.kind == "info" else err_console).print(turn.notice.text, style=turn.notice.style, markup=False, highlight=False)
        try:
            for piece in turn.pieces or ():
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextFull as e:
            err_console.print(f"[yellow]{e}; /reset to start over[/yellow]")
            continue
        if turn.pieces is not None:
            sys.stdout.write("\n")
