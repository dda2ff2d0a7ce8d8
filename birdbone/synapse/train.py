"""Training a :class:`SynapticGPT` from a text file into a run folder that survives a kill.

A run folder holds ``config.json`` (the resolved config, the text's sha256), ``tokenizer.json``
(a byte-level BPE trained on the text's training part), ``model.safetensors`` and
``optimizer.safetensors`` + ``optimizer.json`` (never pickles), ``state.json`` (the step),
``metrics.jsonl`` and TensorBoard events in ``tb/``. Batches and stochastic release are seeded
by (seed, step), so a resumed run continues exactly as an uninterrupted one would.

The training mix includes synthetic recall windows — key–value lists queried at the end, and a
passkey hidden in corpus text — so memory can be learned at all (``recall_share`` of each batch's
windows; ``recall_packing`` packs a window with episodes, each list asked several times).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from birdbone.io.inputs import note_input, read_json, regular_file
from birdbone.io.atomic import write_text_atomic
from birdbone.io.errors import BirdboneError, InputError, shown
from birdbone.synapse.config import TrainConfig
from birdbone.synapse.model import SynapticGPT
from birdbone.io.progress import Progress

log = logging.getLogger(__name__)
SPECIALS = ("<|endoftext|>",)
SWITCHES = ("model.presynaptic", "model.stochastic", "model.hebbian")


# -- tokenizer --------------------------------------------------------------------------------------
def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok


def load_tokenizer(run: Path):
    from tokenizers import Tokenizer

    path = run / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(regular_file(path, "tokenizer")))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        if isinstance(e, InputError):
            raise
        raise InputError(path, f"not a tokenizer file this run wrote ({shown(str(e), 120)})") from None


def encode(tok, text: str) -> np.ndarray:
    return np.array(tok.encode(text).ids, dtype=np.int64)


# -- synthetic recall ---------------------------------------------------------------------------------
def recall_text(rng: np.random.Generator, filler: str, queries: int = 1) -> tuple[str, str]:
    """(context, answer): a key–value list queried at its end (after ``queries - 1`` answered
    queries), or a passkey hidden in corpus text."""
    if rng.random() < 0.5:
        pairs = {f"{''.join(rng.choice(list('abcdefghkmnpqrstuvwxyz'), 3))}": int(rng.integers(10, 100)) for _ in range(8)}
        keys = list(pairs)
        listing = " ".join(f"{k}={v}" for k, v in pairs.items())
        asked = [keys[int(rng.integers(len(keys)))] for _ in range(queries)]
        answered = "".join(f"{k}={pairs[k]} " for k in asked[:-1])
        return f"{listing}. {answered}{asked[-1]}=", str(pairs[asked[-1]])
    key = str(int(rng.integers(10000, 100000)))
    return f"The passkey is {key}. Remember it. {filler} What is the passkey? The passkey is ", key


def recall_episode(tok, rng: np.random.Generator, corpus: np.ndarray, queries: int, tail: str = "") -> np.ndarray:
    """One recall episode's tokens, a passkey's filler drawn from the corpus."""
    start = int(rng.integers(0, max(1, len(corpus) - 64)))
    filler = tok.decode(corpus[start : start + int(rng.integers(8, 48))].tolist())
    context, answer = recall_text(rng, filler, queries)
    return encode(tok, context + answer + tail)


def recall_window(tok, rng: np.random.Generator, corpus: np.ndarray, length: int, packing: int = 0) -> np.ndarray:
    """One training window of ``length`` tokens. ``packing`` 0: corpus text, then one recall
    episode whose answer ends the window. ``packing`` n > 0: the window packed with episodes, each
    key–value list asked n times (most of its answers then need memory), the last one cut off."""
    if not packing:
        ids = recall_episode(tok, rng, corpus, 1)
        if len(ids) >= length:
            return ids[-length:]
        pad_start = int(rng.integers(0, max(1, len(corpus) - length)))
        return np.concatenate([corpus[pad_start : pad_start + length - len(ids)], ids])
    episodes = [recall_episode(tok, rng, corpus, packing, ". ")]
    while sum(map(len, episodes)) < length:
        episodes.append(recall_episode(tok, rng, corpus, packing, ". "))
    return np.concatenate(episodes)[:length]


def batch_at(step: int, cfg: TrainConfig, tok, train: np.ndarray) -> torch.Tensor:
    """The step's batch of (batch, seq + 1) tokens: seeded by (seed, step) alone."""
    rng = np.random.default_rng([cfg.seed, step])
    rows = []
    for _ in range(cfg.batch):
        if rng.random() < cfg.recall_share:
            rows.append(recall_window(tok, rng, train, cfg.seq + 1, cfg.recall_packing))
        else:
            s = int(rng.integers(0, len(train) - cfg.seq - 1))
            rows.append(train[s : s + cfg.seq + 1])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


# -- checkpoints ---------------------------------------------------------------------------------------
def save_checkpoint(run: Path, model: SynapticGPT, opt: torch.optim.Optimizer, step: int) -> None:
    """Weights, optimizer moments and the step, each written atomically; the step (``state.json``,
    the run folder's commit point) last."""
    from safetensors.torch import save_file

    from birdbone.io.atomic import atomic_path

    with atomic_path(run / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.cfg.tie_embeddings},
                  str(tmp))
    state = opt.state_dict()
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for i, s in state["state"].items():
        scalars["state"][str(i)] = {}
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().contiguous().clone()
            else:
                scalars["state"][str(i)][k] = v
    with atomic_path(run / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(run / "optimizer.json", json.dumps(scalars) + "\n")
    write_text_atomic(run / "state.json", json.dumps({"step": step}) + "\n")


def load_weights(run: Path, model: SynapticGPT) -> None:
    from safetensors.torch import load_file

    state = load_file(str(run / "model.safetensors"))
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    try:
        model.fit_experts(state)  # splits and merges change the expert counts
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that is not the config's
        raise InputError(run / "model.safetensors", f"checkpoint does not fit its config ({shown(str(e), 160)})") from None
    if missing or unexpected:
        raise InputError(run, f"checkpoint does not fit its config (missing {missing[:2]}, unexpected {unexpected[:2]})")


def load_optimizer(run: Path, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(run / "optimizer.safetensors"))
    scalars = read_json(run / "optimizer.json")
    state = {int(i): dict(s) for i, s in scalars["state"].items()}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state[int(i)][k] = v
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def read_config(run: Path) -> TrainConfig:
    from birdbone.io.config import config_from_dict

    path = run / "config.json"
    if not path.exists():
        raise InputError(run, "not a synapse run folder (no config.json)")
    return config_from_dict(TrainConfig, read_json(path)["train"], str(path))


# -- the loop -------------------------------------------------------------------------------------------
def identity(cfg: TrainConfig, sha: str) -> dict:
    """What a synapse run is: its text and its config as asked for (the vocabulary size the model
    gets is derived from the tokenizer, so it is left out)."""
    from birdbone.io.config import config_dict

    data = config_dict(cfg)
    data["model"].pop("vocab_size")
    return {"text_sha256": sha, "config": data}


def prepare(run: Path, body: str, name: str, cfg: TrainConfig) -> TrainConfig:
    """Create the run folder (tokenizer, resolved config) or check that it holds this text and config."""
    from birdbone.io.atomic import atomic_path
    from birdbone.io.config import config_dict
    from birdbone.io.run_folder import RunFolder, sha256_text
    from birdbone.io.text import split_holdout

    sha = sha256_text(body)
    RunFolder.open(run, "synapse", identity(cfg, sha), {"step": 0})
    if (run / "config.json").exists():
        return read_config(run)
    train_part, _ = split_holdout(body, cfg.holdout)
    tok = train_tokenizer(train_part, cfg.vocab)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=tok.get_vocab_size()))
    with atomic_path(run / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    where = name if name.startswith("builtin:") else str(Path(name).resolve())  # eval finds the held-out tenth here
    write_text_atomic(run / "config.json", json.dumps({"train": config_dict(cfg), "text": {"name": where, "sha256": sha}}, indent=1) + "\n")
    return cfg


def train(run: str | Path, text_path: str | Path | None, cfg: TrainConfig, progress: Progress | None = None) -> dict:
    """Train (or resume) the run to ``cfg.steps``; returns the last metrics."""
    from birdbone.io.text import load_text, split_holdout

    run = Path(run)
    body, name = load_text(Path(text_path) if text_path else None)
    cfg = prepare(run, body, name, cfg)
    tok = load_tokenizer(run)
    train_part, held_part = split_holdout(body, cfg.holdout)
    train_ids, held_ids = encode(tok, train_part), encode(tok, held_part)
    if len(train_ids) < cfg.seq + 2 or len(held_ids) < cfg.seq + 2:
        raise InputError(Path(text_path or "builtin"), f"too short: {len(train_ids)} training and {len(held_ids)} held-out tokens; "
                                                     f"one window needs {cfg.seq + 2}")
    torch.manual_seed(cfg.seed)
    model = SynapticGPT(cfg.model)
    step = read_json(run / "state.json")["step"]
    resume = step > 0
    if (run / "model.safetensors").exists():  # a resume, or a warm start (synapse enable: optimizer fresh)
        load_weights(run, model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    if resume:
        load_optimizer(run, opt)
        for log_file in ("metrics.jsonl", "lineage.jsonl"):
            _truncate_metrics(run, step, log_file)  # rows logged after the checkpoint will be logged again
        log.info("resuming %s at step %d", run, step)
    probe = batch_at(10**9, cfg, tok, train_ids) if cfg.model.moe else None  # a fixed batch for the metabolism
    writer = _tensorboard(run)
    last: dict = {}
    t0, tokens_done = time.time(), 0
    while step < cfg.steps:
        model.train()
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # stochastic release: same draws on resume
        x = batch_at(step, cfg, tok, train_ids)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # stop before a non-finite step reaches the weights
            raise BirdboneError(f"{run}: loss {loss.item()}, gradient norm {grad_norm.item()} at step {step + 1}; "
                                "the run stops (its last checkpoint is kept)")
        opt.step()
        step += 1
        if probe is not None and step % cfg.model.splitmerge_every == 0:
            for event in metabolism_round(model, opt, probe, step, cfg.seed):
                with open(run / "lineage.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(event) + "\n")
        tokens_done += x[:, 1:].numel()
        last = {"step": step, "loss": loss.item(), "lr": cfg.lr_at(step - 1), **model.vitals(),
                "train_tok_s": tokens_done / max(time.time() - t0, 1e-9)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last["val_loss"] = evaluate_loss(model, held_ids, cfg)
            last["val_ppl"] = math.exp(last["val_loss"])
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(run, model, opt, step)
        _log(run, writer, last)
        if progress:
            progress("train", step, cfg.steps)
    if writer:
        writer.close()
    return last


def metabolism_round(model: SynapticGPT, opt: torch.optim.Optimizer, probe: torch.Tensor, step: int, seed: int,
                     tolerance: float = 0.05) -> list[dict]:
    """Book every expert's leave-one-out contribution on the probe batch, then split and merge."""
    from birdbone.synapse.moe import contributions, surgery

    layers = model.expert_layers()
    was = model.training
    model.eval()
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach().reshape(-1, mod.d)))
             for i, layer in enumerate(layers)]

    def probe_loss() -> float:
        with torch.no_grad():
            return float(model(probe[:, :-1], probe[:, 1:])[1])

    try:
        for layer in layers:
            layer.assess(contributions(layer, probe_loss))
        probe_loss()  # the layers' inputs on the probe, for the split check
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    events = []
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    for i, layer in enumerate(layers):
        for event in surgery(layer, opt, step, inputs[i], tolerance, gen):
            events.append({"layer": i, **event})
    return events


def evaluate_loss(model: SynapticGPT, held: np.ndarray, cfg: TrainConfig) -> float:
    """Mean next-token loss over up to ``eval_windows`` consecutive held-out windows (deterministic release)."""
    model.eval()
    n = min(cfg.eval_windows, (len(held) - 1) // cfg.seq)
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            x = torch.from_numpy(held[i * cfg.seq : i * cfg.seq + cfg.seq + 1][None, :])
            total += float(model(x[:, :-1], x[:, 1:])[1])
    return total / max(n, 1)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install should not stop training
        return None
    return SummaryWriter(str(run / "tb"))


def _truncate_metrics(run: Path, step: int, name: str = "metrics.jsonl") -> None:
    path = run / name
    if path.exists():
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line)
            except (json.JSONDecodeError, KeyError):  # a line cut short by the kill
                continue
        write_text_atomic(path, "".join(r + "\n" for r in rows))


def _log(run: Path, writer, metrics: dict) -> None:
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    if writer:
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, metrics["step"])



def enable(run: str | Path, out: str | Path, sets: list[str]) -> dict:
    """A new run folder whose model is ``run``'s checkpoint with mechanisms switched on (``sets``:
    model.presynaptic=true ...): the new parameters start where the model computes what the plain
    one did (gains at 0); ``synapse train -o OUT`` then trains on from there."""
    import shutil

    from birdbone.io.config import config_dict, config_from_dict

    from birdbone.io.atomic import atomic_folder, check_output_folder

    run, out = Path(run), Path(out)
    cfg = read_config(run)
    if not (run / "model.safetensors").exists():
        raise InputError(run, "has no checkpoint to enable")
    if out.exists():
        raise InputError(out, "exists; enable writes a new run folder")
    check_output_folder(out, [run])
    data = config_dict(cfg)
    for item in sets:
        key, _, value = item.partition("=")
        if key.strip() not in SWITCHES:
            raise InputError(run, f"enable takes only the switches {', '.join(SWITCHES)}, not {key.strip()!r}")
        data["model"][key.strip().split(".", 1)[1]] = value.strip()
    new_cfg = config_from_dict(TrainConfig, data, "--set")
    plain = SynapticGPT(cfg.model)
    load_weights(run, plain)
    model = SynapticGPT(new_cfg.model)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    if unexpected:
        raise InputError(run, f"its checkpoint has parameters the new model lacks ({unexpected[:2]}): switching mechanisms off is not enable's job")
    model.neutralize_new(set(missing))
    from birdbone.io.run_folder import RunFolder

    text = read_json(run / "config.json")["text"]
    from safetensors.torch import save_file

    with atomic_folder(out) as tmp:
        RunFolder.open(tmp, "synapse", identity(new_cfg, text["sha256"]), {"step": 0})  # train -o OUT resumes it as its own
        shutil.copy2(run / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps({"train": config_dict(new_cfg), "text": text, "enabled_from": str(run)}, indent=1) + "\n")
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight" or not new_cfg.model.tie_embeddings},
                  str(tmp / "model.safetensors"))
    return {"out": str(out), "new_parameters": sorted(missing)}


class TrainResult:
    """``birdbone synapse train``: the run folder and its last metrics."""

    def __init__(self, run: Path, last: dict):
        self.run, self.last = run, last

    def as_dict(self) -> dict:
        return {"run": str(self.run), **self.last}

    def render(self) -> list:
        from birdbone.io.report import Line

        last = self.last
        vitals = ", ".join(f"{k} {v:.3g}" for k, v in last.items() if k not in ("step", "loss", "lr", "val_loss", "val_ppl", "train_tok_s"))
        return [Line(f"{self.run}: step {last.get('step')}, loss {last.get('loss', float('nan')):.3f}, held-out ppl {last.get('val_ppl', float('nan')):.2f}, "
                     f"{last.get('train_tok_s', 0):.0f} tok/s" + (f"; {vitals}" if vitals else ""))]


def train_run(out: str | Path, text: str | Path | None = None, config: str | Path | None = None, sets: list[str] | tuple[str, ...] = (),
              progress: Progress | None = None) -> TrainResult:
    """Train (or resume) a run: an existing run goes on with its own config unless a config or ``--set`` is given."""
    note_input(text, config)  # known before any output is written, so none lands on them
    from birdbone.io.config import load_config

    out = Path(out)
    cfg = read_config(out) if (out / "config.json").exists() and config is None and not sets else load_config(TrainConfig, config, sets)
    return TrainResult(out, train(out, text, cfg, progress))


class Enabled:
    def __init__(self, data: dict):
        self.data = data

    def as_dict(self) -> dict:
        return self.data

    def render(self) -> list:
        from birdbone.io.report import Line

        return [Line(f"wrote {self.data['out']}: {len(self.data['new_parameters'])} new parameters at neutral values; "
                     f"train on with: birdbone synapse train -o {self.data['out']} --text TEXT")]


def enable_run(run: str | Path, out: str | Path, sets: list[str]) -> Enabled:
    """``birdbone synapse enable``: :func:`enable` as a result that renders itself."""
    return Enabled(enable(run, out, sets))
