"""A float subject: a small model of a chosen family trained here in fp32, written as F32 and F16 GGUFs.

The built-in model's weights sit on the Q4_1 grid, so distribution statistics of it partly
measure the grid and requantizing it to Q4_1 is lossless by construction. Studies need a
second subject with genuinely float weights whose widths are multiples of 256 (so K-quants
apply to every 2-D tensor). This script makes one:

* tokenizer: byte-level BPE (GPT-2 regex, no prefix space) of ``--vocab`` tokens, trained
  with ``tokenizers`` on the training text; ChatML specials at ids 0..2;
* model: ``--arch`` llama (default) or any family of birdbone's table (``qwen2``, ``qwen3`` ...),
  hidden 256, FFN 768, 8 layers, 4 heads / 2 KV heads, untied output head (so ``output.weight``
  is its own tensor, as Qwen2.5-0.5B has), all row widths multiples of 256; a family other than
  llama is written by ``birdbone convert`` without ``--like`` (metadata from config.json);
* data: ../shared/data/wikitext-2-tok/valid.txt + ../shared/data/tinyshakespeare/input.txt
  (never wiki.test.raw, which is the evaluation text);
* training: AdamW, random windows, linear warm-up then cosine decay, fixed seeds, for a
  wall-clock budget (``--minutes``): the step count is set from the first steps' speed;
* output: ``results/work/float-subject[-ARCH]/`` (HF folder, tokenizer) and
  ``results/work/float-subject[-ARCH]-{f32,f16}.gguf``, checked to load and run in llama.cpp;
  ``results/float_model[_ARCH].{json,md}`` with the loss curve and llama.cpp's perplexity on
  wiki.test.raw (ctx 512). The model is weak; that is expected. (``-ARCH`` for families other
  than llama; the llama subject keeps its first names.)

    python benchmarks/make_float_model.py [--minutes 60 | --steps N] [--arch qwen2]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
WORK = HERE / "results" / "work"


def subject_paths(arch: str = "llama") -> tuple[Path, Path, Path]:
    """(HF folder, F32 GGUF, F16 GGUF) of the float subject of ``arch``."""
    stem = "float-subject" if arch == "llama" else f"float-subject-{arch}"
    return WORK / stem, WORK / f"{stem}-f32.gguf", WORK / f"{stem}-f16.gguf"


SUBJECT_DIR, SUBJECT_F32, SUBJECT_F16 = subject_paths()
TRAIN_FILES = (DATA / "wikitext-2-tok" / "valid.txt", DATA / "tinyshakespeare" / "input.txt")
log = logging.getLogger("make_float_model")


def training_text() -> str:
    return "".join(p.read_text(encoding="utf-8") for p in TRAIN_FILES)


def encode(tok, text: str) -> np.ndarray:
    """Token ids of the text, line batch by line batch (tokenizers parallelises a batch)."""
    lines = text.splitlines(keepends=True)
    ids = [i for enc in tok.encode_batch(lines) for i in enc.ids]
    return np.asarray(ids, dtype=np.int32)


def train(model, tokens: np.ndarray, args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def batch():
        starts = rng.integers(0, len(tokens) - args.seq - 1, size=args.batch)
        x = np.stack([tokens[s : s + args.seq + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(x)

    def lr_at(step: int, total: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, total - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    budget = args.minutes * 60.0
    total = args.steps  # None: set from the measured speed
    curve, t_start, step = [], time.perf_counter(), 0
    model.train()
    while total is None or step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10**9)
        x = batch()
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t_start
        if step == 20 and args.steps is None:  # fix the schedule from the measured speed
            total = max(step, args.warmup + 1, int(budget / (elapsed / step)))
            log.info("%.2f s/step: %d steps fit in %.0f min", elapsed / step, total, args.minutes)
        if step % 50 == 0 or step == total or step == 1:
            curve.append({"step": step, "loss": float(loss.detach()), "seconds": round(elapsed, 1)})
            log.info("step %d/%s loss %.4f (%.0f s)", step, total, curve[-1]["loss"], elapsed)
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t_start, 1), "curve": curve,
            "tokens_seen": step * args.batch * args.seq}


def check_in_llama_cpp(path: Path) -> str:
    """Load the GGUF in llama.cpp and decode a few greedy tokens (fails loudly if it cannot)."""
    from birdbone.io.runtime import LlamaRuntime

    with LlamaRuntime(path, n_ctx=128) as rt:
        prompt = rt.tokenize("The king said", add_special=False)
        return rt.detokenize(rt.greedy(prompt, 16, stop_at_eog=False))


def build_model(args, vocab: int):
    """A fresh model of the family, norms at 1."""
    import torch

    if args.arch == "llama":
        from tests.fixtures.tiny import build_hf_model

        model = build_hf_model(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, vocab, args.seed, tie_embeddings=False)
        with torch.no_grad():  # build_hf_model perturbs the norms for tests; a trained model starts them at 1
            for p in model.parameters():
                if p.ndim == 1:
                    p.fill_(1.0)
    else:  # transformers' own initialisation: norms at 1, biases at 0
        from transformers import AutoConfig, AutoModelForCausalLM

        from tests.fixtures.tiny import BOS_ID, EOS_ID, N_CTX_TRAIN, PAD_ID, RMS_EPS, ROPE_THETA

        config = AutoConfig.for_model(
            args.arch, vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=N_CTX_TRAIN, rms_norm_eps=RMS_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, tie_word_embeddings=False,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config).float()
        model.config.architectures = [type(model).__name__]
    return model


def write_subject(model, args, vocab: int, tokenizer_json: Path) -> None:
    """The HF folder, and its F32 and F16 GGUFs (written atomically)."""
    subject_dir, subject_f32, subject_f16 = subject_paths(args.arch)
    model.save_pretrained(str(subject_dir), safe_serialization=True)
    if args.arch == "llama":  # the first subject's own writer, kept so its files stay as they were made
        from tests.fixtures.tiny import TinyModel, gguf_tensors, write_llama_gguf

        subject = TinyModel(subject_dir, subject_dir, subject_f32, subject_f16, tokenizer_json, args.hidden,
                            args.intermediate, args.layers, args.heads, args.kv_heads, vocab)
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        tensors = gguf_tensors(state, args.layers, args.heads, args.kv_heads)
        for path, f16 in ((subject_f32, False), (subject_f16, True)):
            tmp = path.with_name(path.name + ".tmp")
            write_llama_gguf(tmp, subject, tensors, f16=f16, name="birdbone-float-subject")
            tmp.replace(path)
        return
    from birdbone.bridge.convert import convert

    for path, out_type in ((subject_f32, "F32"), (subject_f16, "F16")):
        path.unlink(missing_ok=True)  # a subject made again replaces its files
        convert(subject_dir, path, out_type)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget")
    ap.add_argument("--steps", type=int, help="train exactly this many steps (to make a recorded subject again) instead of a --minutes budget")
    ap.add_argument("--arch", default="llama", help="the model family (config.json's model_type): llama, qwen2, qwen3, ...")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for w in (args.hidden, args.intermediate):
        if w % 256:
            ap.error(f"width {w} is not a multiple of 256; K-quants would not apply")
    sys.path.insert(0, str(REPO))
    import torch

    from birdbone.evaluate.compare import EvalConfig, evaluate
    from tests.fixtures.tiny import save_tokenizer, train_tokenizer

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    subject_dir, subject_f32, subject_f16 = subject_paths(args.arch)
    subject_dir.mkdir(parents=True, exist_ok=True)
    text = training_text()
    t0 = time.perf_counter()
    tok = train_tokenizer(args.vocab, text)
    tokenizer_json = save_tokenizer(tok, subject_dir)
    tokens = encode(tok, text)
    log.info("tokenizer: %d tokens in %.1f s; training text: %d tokens", tok.get_vocab_size(), time.perf_counter() - t0, len(tokens))

    vocab = tok.get_vocab_size()
    model = build_model(args, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2f M parameters", args.arch, n_params / 1e6)
    record = train(model, tokens, args)
    write_subject(model, args, vocab, tokenizer_json)
    sample = check_in_llama_cpp(subject_f32)
    log.info("llama.cpp continues 'The king said' with %r", sample)

    test = DATA / "wikitext-2-raw" / "wiki.test.raw"
    cfg = EvalConfig(ctx=512, tokens=None, decode=0, canary_tokens=0)
    ppl = {name: evaluate(path, text=test, cfg=cfg).model.ppl.as_dict() for name, path in (("F32", subject_f32), ("F16", subject_f16))}
    result = {
        "what": "float subject model trained here (benchmarks/make_float_model.py)",
        "machine": {"cpu_count": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__},
        "args": vars(args), "n_params": n_params, "vocab": vocab, "training_files": [str(p.relative_to(DATA)) for p in TRAIN_FILES],
        "training_tokens": int(len(tokens)), "training": record, "sample_continuation": sample,
        "perplexity_wiki_test": ppl,
        "files": {"f32": str(subject_f32.relative_to(REPO)), "f16": str(subject_f16.relative_to(REPO)),
                  "f32_bytes": subject_f32.stat().st_size, "f16_bytes": subject_f16.stat().st_size},
    }
    out = HERE / "results" / ("float_model.json" if args.arch == "llama" else f"float_model_{args.arch}.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = [
        "# Float subject model", "",
        "`python benchmarks/make_float_model.py " + (f"--steps {args.steps}" if args.steps else f"--minutes {args.minutes:g}") + ("" if args.arch == "llama" else f" --arch {args.arch}") + "`", "",
        f"{args.arch}, hidden {args.hidden}, FFN {args.intermediate}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"vocab {vocab}, {n_params / 1e6:.2f} M parameters, untied output head.", "",
        f"Trained {record['steps']} steps ({record['tokens_seen'] / 1e6:.1f} M tokens, {record['seconds'] / 60:.1f} min, "
        f"{len(tokens) / 1e6:.2f} M-token training text) to a training loss of {record['curve'][-1]['loss']:.3f}.", "",
        "| file | wiki.test.raw ppl (llama.cpp, ctx 512) | tokens scored |", "|---|---:|---:|",
        *[f"| {k} | {v['ppl']:.2f} ± {v['ppl_stderr']:.2f} | {v['n_tokens_scored']} |" for k, v in ppl.items()], "",
        f"Greedy continuation of 'The king said': {sample!r}", "",
    ]
    out.with_suffix(".md").write_text("\n".join(md), encoding="utf-8")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
