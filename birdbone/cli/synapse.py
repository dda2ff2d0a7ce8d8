"""The living transformer's verbs: train, enable, eval, sample, chat."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from birdbone.cli.common import CONFIG_OPT, JSON_OPT, SET_OPT, app, err_console, keys_help, progress_bar, show
from birdbone.synapse.config import TrainConfig

synapse_app = typer.Typer(help="The living transformer: a small GPT whose synapses tire and remember (presynaptic depletion, Hebbian fast weights).",
                          no_args_is_help=True)
app.add_typer(synapse_app, name="synapse")


@synapse_app.command("train", help="Train a synaptic GPT (tokenizer included) into a run folder; a killed run resumes exactly. "
                                   "Its text's last tenth is held out. An existing run goes on with its own config unless "
                                   "--config or --set is given.\n\n" + keys_help(TrainConfig))
def synapse_train(
    out: Path = typer.Option(..., "-o", "--out", help="Run folder: created, or resumed when it holds this text and config."),
    text: Optional[Path] = typer.Option(None, "--text", help="Training text; its last tenth is held out (default: the built-in Shakespeare excerpt)."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    from birdbone.synapse.train import train_run

    with progress_bar() as cb:
        show(train_run(out, text, config, sets, cb), as_json)


@synapse_app.command("enable")
def synapse_enable(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train (typically a plain model)."),
    out: Path = typer.Option(..., "-o", "--out", help="New run folder."),
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Turn a checkpoint synaptic: --set model.presynaptic=true / model.hebbian=true / model.stochastic=true.
    New parameters start neutral (gains 0: the model computes what it did); train on with
    birdbone synapse train -o OUT --text (the same text)."""
    from birdbone.synapse.train import enable_run

    show(enable_run(run, out, sets), as_json)


@synapse_app.command("eval")
def synapse_eval(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to score (default: the run's held-out tenth)."),
    windows_limit: int = typer.Option(32, "--windows", help="Context windows scored for perplexity and calibration."),
    trials: int = typer.Option(5, "--trials", help="Passkey trials per (length, depth); recall uses 10×."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Reliability diagram PNG (default: RUN/reliability.png)."),
    as_json: bool = JSON_OPT,
):
    """Perplexity, passkeys inside and beyond the context (fast state carried across chunks),
    calibration (ECE, 15 bins), associative recall and speed; deterministic release, weights hashed
    before and after (unchanged)."""
    from birdbone.synapse.evaluate import eval_run

    show(eval_run(run, text, windows_limit, trials, plot), as_json)


@synapse_app.command("sample")
def synapse_sample(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train."),
    prompt: str = typer.Option("", "--prompt", help="Text to continue."),
    n_tokens: int = typer.Option(64, "--tokens", help="Tokens to generate (greedy)."),
    as_json: bool = JSON_OPT,
):
    """Continue a prompt greedily with a trained synaptic GPT (no KV cache: each step recomputes the
    window exactly as training does)."""
    from birdbone.synapse.chat import sample

    show(sample(run, prompt, n_tokens), as_json)


@synapse_app.command("chat")
def synapse_chat(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train."),
    n_tokens: int = typer.Option(48, "--tokens", help="Most tokens per reply (a reply also ends at a blank line)."),
):
    """Talk to a synaptic GPT in the terminal. The whole transcript is its input, read in chunks with
    the fast state carried, so what its synapses learned persists across turns. /reset starts over,
    /vitals shows calcium, pools and fast-weight norms, /quit leaves."""
    from birdbone.cli.models import talk
    from birdbone.io.chat import ChatSession
    from birdbone.synapse.chat import SynapseChat

    engine = SynapseChat(run)
    err_console.print(f"[dim]{engine.name}. /reset, /vitals, /quit[/dim]")
    talk(ChatSession(engine, None, n_tokens))
