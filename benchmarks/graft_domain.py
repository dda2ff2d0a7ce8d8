"""Domain organs: fine-tune one organ kind of the built-in model on Shakespeare, graft it back.

For SmolLM2-135M-Instruct (the built-in Q4_1 GGUF, 30 layers), on tinyshakespeare:

1. Split the text: the first 90 % of its characters (cut at the next line start) trains, the
   rest is held out (written to ``results/work/shakespeare_heldout.txt``).
2. Two donors, each a short *full* fine-tune (no LoRA) in torch fp32 of the built-in model
   (its Q4_1 weights dequantized), AdamW, fixed seeds, random windows of the training tokens
   (llama.cpp's tokenizer of the built-in model):
     * donor ``ffn``:  only ffn gate/up/down of the chosen layers train (role ``organ``);
     * donor ``attn``: only attention q/k/v/o of the same layers train (role ``skeleton``).
   Each donor is written as an F16 GGUF with the built-in model's metadata.
3. Each donor's trained organs (its role, those layers) are grafted into (a) the untouched
   built-in Q4_1 base (requantized to Q4_1 with llama.cpp's ggml: the share of weights whose
   dequantized value changed is reported per tensor) and (b) the F16 form of the base (no
   conversion).
4. Perplexity (llama.cpp, ctx 512, the first ``--tokens`` tokens) on the Shakespeare held-out
   part and on wiki.test.raw for the bases, the donors and the four chimeras, with KLD against
   the F16 base, file bytes, and each donor's training loss at start and end.

    python benchmarks/graft_domain.py [--steps 18] [--layers 10-19] [--lr 2e-4]

Writes benchmarks/results/graft_domain.{json,md}; GGUFs go to benchmarks/results/work/.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"  # ../shared/data from the repository root
log = logging.getLogger("graft_domain")

# donor kind -> (graft role, torch module names inside a decoder layer)
DONORS = {
    "ffn": ("organ", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "attn": ("skeleton", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
}


# -- data ---------------------------------------------------------------------------------------
def split_text(text: str, share: float) -> tuple[str, str]:
    """First ``share`` of the characters (cut at the next line start) and the rest."""
    cut = int(len(text) * share)
    nl = text.find("\n", cut)
    cut = len(text) if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def batches(tokens: np.ndarray, batch: int, seq: int, seed: int):
    """Endless random windows of seq+1 tokens, (batch, seq+1) int64, from a seeded generator."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
        yield np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64)


# -- training -----------------------------------------------------------------------------------
def lm_loss(lm, x):
    import torch.nn.functional as F

    logits = lm(input_ids=x[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def train_donor(kind: str, layers: list[int], tokens: np.ndarray, probe: np.ndarray, args) -> tuple[dict, dict]:
    """Fine-tune one organ kind of ``layers``; returns (numpy state dict, training record)."""
    import torch

    from birdbone.bridge import load_causal_lm
    from birdbone.bridge.torch_eval import state_dict_numpy

    torch.manual_seed(args.seed)
    lm = load_causal_lm("builtin")
    for p in lm.parameters():
        p.requires_grad_(False)
    params = []
    for i in layers:
        block = lm.model.layers[i]
        for mod in DONORS[kind][1]:
            w = block.get_submodule(mod).weight
            w.requires_grad_(True)
            params.append(w)
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, min(args.warmup, args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    probe_t = torch.from_numpy(probe)

    def probe_loss() -> float:
        lm.eval()
        with torch.inference_mode():
            return float(lm_loss(lm, probe_t))

    before = probe_loss()
    lm.train()
    losses, seconds = [], []
    data = batches(tokens, args.batch, args.seq, args.seed)
    for step in range(args.steps):
        t0 = time.perf_counter()
        x = torch.from_numpy(next(data))
        loss = lm_loss(lm, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        log.info("%s step %d/%d loss %.4f (%.1f s)", kind, step + 1, args.steps, losses[-1], seconds[-1])
    after = probe_loss()
    k = min(5, len(losses))
    record = {
        "kind": kind, "role": DONORS[kind][0], "modules": list(DONORS[kind][1]), "layers": layers,
        "trained_params": n_train, "steps": args.steps, "lr": args.lr, "warmup_steps": warm,
        "batch": args.batch, "seq": args.seq, "tokens_seen": args.steps * args.batch * args.seq,
        "loss_first_step": losses[0] if losses else None, "loss_last_step": losses[-1] if losses else None,
        f"loss_first_{k}_mean": float(np.mean(losses[:k])) if losses else None,
        f"loss_last_{k}_mean": float(np.mean(losses[-k:])) if losses else None,
        "probe_loss_before": before, "probe_loss_after": after,
        "losses": losses, "seconds_per_step": seconds,
        "seconds_per_step_mean": float(np.mean(seconds)) if seconds else None,
        "seconds_per_step_median": float(np.median(seconds)) if seconds else None,
        "train_seconds": float(np.sum(seconds)),
    }
    return state_dict_numpy(lm), record


def write_donor(kind: str, layers: list[int], tokens, probe, args, work: Path) -> tuple[Path, dict]:
    from birdbone.bridge import state_dict_to_gguf
    from birdbone.io import open_model

    out = work / f"graft_domain_donor_{kind}.gguf"
    sidecar = out.with_suffix(".json")
    if args.reuse and out.exists() and sidecar.exists():
        record = json.loads(sidecar.read_text())
        if record.get("config") == donor_config(args):
            log.info("reusing %s", out)
            return out, record
    state, record = train_donor(kind, layers, tokens, probe, args)
    record["config"] = donor_config(args)
    t0 = time.perf_counter()
    out.unlink(missing_ok=True)
    with open_model("builtin") as parent:
        state_dict_to_gguf(state, parent, out, "F16")
    record["write_seconds"] = time.perf_counter() - t0
    sidecar.write_text(json.dumps(record, indent=1))
    return out, record


def donor_config(args) -> dict:
    return {k: getattr(args, k) for k in ("steps", "layers", "lr", "warmup", "batch", "seq", "seed", "train_share")}


# -- checks -------------------------------------------------------------------------------------
def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of tensors whose stored bytes differ between two GGUFs of the same layout."""
    from birdbone.anatomy.body import Body

    with Body(a) as x, Body(b) as y:
        return [n for n in x.entries if n not in y.entries or x.entries[n].type != y.entries[n].type
                or not np.array_equal(x.raw(n), y.raw(n))]


def q4_1_code_changes(base: Path, chimera: Path, names: list[str]) -> dict[str, dict]:
    """Per Q4_1 tensor: share of 4-bit codes that differ, and share of blocks whose scale or min differ.

    A Q4_1 block is 32 weights in 20 bytes: f16 scale d, f16 min m, 16 bytes of 4-bit codes.
    birdbone's ``changed_share`` counts dequantized values that differ, which a new d or m
    alone makes true for a whole block; the codes show how many weights moved on the grid.
    """
    from birdbone.anatomy.body import Body
    from birdbone.io.codes import code_change

    out = {}
    with Body(base) as b, Body(chimera) as c:
        for n in names:
            if b.entries[n].type.name != "Q4_1":
                continue
            change = code_change(b.raw(n), c.raw(n), b.entries[n].type)
            out[n] = {"codes_changed_share": change.codes, "blocks_scale_or_min_changed_share": change.blocks_rescaled}
    return out


def weight_moves(base_f16: Path, base_q: Path, donor: Path, names: list[str]) -> dict:
    """How far training moved each weight, against the Q4_1 base's step (scale d) of its block.

    A Q4_1 code can only change when a weight moves by about half its block's step, so this says
    how much of a fine-tune a requantizing graft can carry.
    """
    from birdbone.anatomy.body import Body

    per = {}
    with Body(base_f16) as b, Body(base_q) as q, Body(donor) as d:
        for n in names:
            dw = np.abs(d.tensor(n) - b.tensor(n)).reshape(-1, 32)  # (blocks, 32), Q4_1 blocks run along rows
            step = q.raw(n).reshape(-1, 20)[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
            per[n] = {"mean_abs_dw": float(dw.mean()), "max_abs_dw": float(dw.max()), "median_q4_1_step": float(np.median(step)),
                      "share_over_half_step": float((dw > step / 2).mean())}
    return {"mean_abs_dw": float(np.mean([v["mean_abs_dw"] for v in per.values()])),
            "max_abs_dw": float(max(v["max_abs_dw"] for v in per.values())),
            "median_q4_1_step": float(np.median([v["median_q4_1_step"] for v in per.values()])),
            "share_over_half_step": float(np.mean([v["share_over_half_step"] for v in per.values()])), "per_tensor": per}


# -- report -------------------------------------------------------------------------------------
def rel(path: Path) -> str:
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def fmt(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def write_markdown(path: Path, res: dict) -> None:
    a = res["args"]
    lines = [
        "# Domain organs: Shakespeare fine-tunes of one organ kind, grafted back", "",
        f"Command: `{res['command']}`", "",
        f"Built-in SmolLM2-135M-Instruct (Q4_1, 30 layers). Training text: first {a['train_share']:.0%} of "
        f"tinyshakespeare ({res['data']['train_chars']:,} characters, {res['data']['train_tokens']:,} tokens, "
        "llama.cpp's tokenizer); held out: the rest "
        f"({res['data']['heldout_chars']:,} characters, {res['data']['heldout_tokens']:,} tokens). "
        f"Each donor: full fine-tune (not LoRA) of layers {a['layers']} only, torch fp32, AdamW "
        f"(lr {a['lr']:g}, betas 0.9/0.95, no weight decay, {a['warmup']} warm-up steps, grad-norm clip 1.0), "
        f"{a['steps']} steps of {a['batch']}×{a['seq']} tokens, seed {a['seed']}, {res['threads']} CPU threads.", "",
        f"Perplexity: llama.cpp, ctx {a['ctx']}, the first {a['tokens']:,} tokens of each text "
        f"({res['n_scored']} tokens scored per text: llama.cpp-style, the second half of each window). "
        "KLD and top-1 agreement are against the F16 base on the same windows.", "",
        "## Training", "",
        "| donor | trained tensors | params | steps | s/step (mean / median) | loss first step → last step | "
        "mean first 5 → last 5 | fixed probe batch (training part, not a training draw) before → after |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for d in res["donors"].values():
        k = min(5, len(d["losses"]))
        lines.append(
            f"| {d['kind']} | {', '.join(m.split('.')[-1] for m in d['modules'])} × {len(d['layers'])} layers | "
            f"{d['trained_params']/1e6:.1f} M | {d['steps']} | {fmt(d['seconds_per_step_mean'], '.1f')} / "
            f"{fmt(d['seconds_per_step_median'], '.1f')} | {fmt(d['loss_first_step'], '.3f')} → {fmt(d['loss_last_step'], '.3f')} | "
            f"{fmt(d[f'loss_first_{k}_mean'], '.3f')} → {fmt(d[f'loss_last_{k}_mean'], '.3f')} | "
            f"{fmt(d['probe_loss_before'], '.3f')} → {fmt(d['probe_loss_after'], '.3f')} |")
    if all("weight_moves" in d for d in res["donors"].values()):
        lines += ["", "How far the trained weights moved (donor − F16 base), against the Q4_1 base's step (block scale d): "
                  "a 4-bit code can only change when a weight moves by about half a step.", "",
                  "| donor | mean abs Δw | max abs Δw | median Q4_1 step | weights moved over half their block's step |",
                  "|---|---:|---:|---:|---:|"]
        for d in res["donors"].values():
            w = d["weight_moves"]
            lines.append(f"| {d['kind']} | {w['mean_abs_dw']:.2e} | {w['max_abs_dw']:.2e} | {w['median_q4_1_step']:.2e} | "
                         f"{w['share_over_half_step']:.4%} |")
    lines += ["", "## Perplexity", "",
              "| model | file | bytes | tensors changed vs its base | Shakespeare held-out PPL | Δ vs F16 base | "
              "wiki.test PPL | Δ vs F16 base | KLD Shakespeare | KLD wiki | top-1 agree wiki |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {t: res["models"]["base F16"]["eval"][t]["ppl"] for t in ("shakespeare", "wiki")}
    for name, m in res["models"].items():
        e = m["eval"]
        cells = [name, f"`{Path(m['file']).name}`", f"{m['bytes']:,}", m.get("changed_note", "–")]
        for t in ("shakespeare", "wiki"):
            cells += [f"{e[t]['ppl']:.3f} ± {e[t]['ppl_stderr']:.3f}", f"{100 * (e[t]['ppl'] / base[t] - 1):+.1f} %"]
        cells += [fmt(e["shakespeare"].get("kld_mean"), ".4f"), fmt(e["wiki"].get("kld_mean"), ".4f"),
                  fmt(e["wiki"].get("top1_agreement"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {name}: {m['eval']['shakespeare']['note']}" for name, m in res["models"].items() if m["eval"]["shakespeare"].get("note")]
    lines += [""] + notes if notes else []
    lines += ["", "## Grafts", "",
              "| chimera | tensors grafted | converted | weights whose value changed vs base: mean (min–max) | "
              "4-bit codes changed: mean (min–max) | blocks with new scale/min: mean |",
              "|---|---:|---|---|---|---:|"]
    for name, g in res["grafts"].items():
        sh = list(g["changed_share"].values())
        codes = [v["codes_changed_share"] for v in g.get("q4_1_codes", {}).values()]
        code_cell = f"{np.mean(codes):.4%} ({min(codes):.4%}–{max(codes):.4%})" if codes else "– (F16)"
        scale_cell = fmt(g.get("mean_blocks_scale_or_min_changed_share"), ".1%") if codes else "–"
        lines.append(f"| {name} | {len(g['tensors'])} | {'Q4_1 (requantized)' if g['converted'] else 'no'} | "
                     f"{np.mean(sh):.1%} ({min(sh):.1%}–{max(sh):.1%}) | {code_cell} | {scale_cell} |")
    lines += ["", "Value shares are birdbone's `GraftResult.changed_share` (for Q4_1: dequantized values that differ, "
              "so a new block scale or min counts its whole block); code shares compare the stored 4-bit codes. "
              "Per-tensor figures are in `graft_domain.json` (`grafts.*.changed_share`, `grafts.*.q4_1_codes`).", "",
              "## Checks", ""]
    for c in res["checks"]:
        lines.append(f"- {c}")
    lines += ["", "## Interpretation", "", res["interpretation"], "",
              f"Runtime of this invocation: {res['runtime_seconds'] / 60:.1f} min on {res['machine']}."]
    if a.get("reuse"):
        train = sum(d["train_seconds"] + d.get("write_seconds", 0) for d in res["donors"].values())
        lines[-1] += (f" The donors were reused (`--reuse`): an earlier invocation with the same settings trained and wrote "
                      f"them in {train / 60:.1f} min (steps and writes; loading the model twice adds about a minute).")
    path.write_text("\n".join(lines) + "\n")


def interpret(res: dict) -> str:
    m = {k: v["eval"] for k, v in res["models"].items()}

    def ppl(name, t):
        return m[name][t]["ppl"]

    def pct(name, ref, t):
        return 100 * (ppl(name, t) / ppl(ref, t) - 1)

    parts = []
    for kind, label in (("ffn", "FFN"), ("attn", "attention")):
        d = f"donor {kind} (F16)"
        parts.append(f"the {label} donor moves Shakespeare held-out PPL by {pct(d, 'base F16', 'shakespeare'):+.1f} % "
                     f"and wiki PPL by {pct(d, 'base F16', 'wiki'):+.1f} % vs the F16 base")
    a = res["args"]
    s = (f"After {a['steps']} steps ({a['steps'] * a['batch'] * a['seq']:,} tokens), " + "; ".join(parts) +
         ": the domain shift is learned by either organ kind alone, at a small cost on wiki. ")
    q = [f"{pct(f'Q4_1 base + {k}', 'base Q4_1', 'shakespeare'):+.1f} % ({k})" for k in ("ffn", "attn")]
    codes = [res["grafts"][f"Q4_1 base + {k}"].get("mean_codes_changed_share") for k in ("ffn", "attn")]
    blocks = [res["grafts"][f"Q4_1 base + {k}"].get("mean_blocks_scale_or_min_changed_share") for k in ("ffn", "attn")]
    s += f"Requantized into the Q4_1 base, most of the Shakespeare gain is lost: {' and '.join(q)} vs base Q4_1"
    if None not in codes and None not in blocks:
        span = f"{min(blocks):.0%}" if round(min(blocks), 2) == round(max(blocks), 2) else f"{min(blocks):.0%}–{max(blocks):.0%}"
        s += (f"; at most {max(codes):.4%} of the 4-bit codes changed, and what carried over is the new scale/min of "
              f"{span} of the blocks (their extreme weights moved)")
    if all("weight_moves" in d for d in res["donors"].values()):
        w = [d["weight_moves"] for d in res["donors"].values()]
        s += (f", since training moved weights by {np.mean([x['mean_abs_dw'] for x in w]):.1e} on average "
              f"(max {max(x['max_abs_dw'] for x in w):.1e}) against a Q4_1 step of about {np.median([x['median_q4_1_step'] for x in w]):.2f}")
    s += ". "
    if all(c.endswith("0 (0 means the chimera is the donor, byte for byte)") for c in res["checks"] if "F16 base +" in c):
        s += "Grafts into the F16 base are byte-identical to the donors in every tensor, so they keep the whole effect. "
    s += (f"These are small-budget fine-tunes on {res['threads']} shared CPU threads; differences within the ± figures "
          f"(one standard error over {res['n_scored']} scored tokens; chunks are correlated) should not be read as real.")
    return s


def rewrite_report(out: Path, work: Path, base_q: Path, base_f16: Path) -> int:
    res = json.loads(out.with_suffix(".json").read_text())
    for kind, d in res["donors"].items():
        if "weight_moves" not in d:
            donor = work / f"graft_domain_donor_{kind}.gguf"
            d["weight_moves"] = weight_moves(base_f16, base_q, donor, differing_tensors(base_f16, donor))
    res["interpretation"] = interpret(res)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    write_markdown(out.with_suffix(".md"), res)
    log.info("rewrote %s.{json,md}", out)
    return 0


# -- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=18, help="optimizer steps per donor")
    ap.add_argument("--layers", default="10-19", help="block of layers whose organs train and are grafted")
    ap.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate")
    ap.add_argument("--warmup", type=int, default=2, help="linear warm-up steps")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-share", type=float, default=0.9, help="share of Shakespeare's characters used for training")
    ap.add_argument("--shakespeare", default=str(DATA / "tinyshakespeare" / "input.txt"))
    ap.add_argument("--wiki", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of each text to score")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse donors in --work trained with the same settings")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the .md (and fill in cheap figures missing from the .json, from the files in --work) without training or scoring")
    ap.add_argument("--work", default=str(HERE / "results" / "work"), help="folder for GGUFs and the held-out text")
    ap.add_argument("--out", default=str(HERE / "results" / "graft_domain"), help="report path without suffix")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("birdbone.llama", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.time()

    import torch

    torch.set_num_threads(args.threads)
    from birdbone.anatomy.graft import graft
    from birdbone.anatomy.selection import parse_layers
    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.float_form import float_form
    from birdbone.io.model_file import resolve_model_path
    from birdbone.io.runtime import LlamaRuntime

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_q = resolve_model_path("builtin")
    base_f16 = float_form("builtin")
    if args.report_only:
        return rewrite_report(Path(args.out), work, base_q, base_f16)
    layers = sorted(parse_layers(args.layers, 30))

    # 1. data
    text = Path(args.shakespeare).read_bytes().decode("utf-8")
    train_text, held_text = split_text(text, args.train_share)
    heldout = work / "shakespeare_heldout.txt"
    heldout.write_bytes(held_text.encode("utf-8"))
    with LlamaRuntime(base_q, n_ctx=args.ctx) as rt:
        train_tokens = rt.tokenize(train_text, add_special=False)
        held_tokens = len(rt.tokenize(held_text, add_special=False))
    probe = next(batches(train_tokens, args.batch, args.seq, args.seed + 1000))  # fixed batch, not a training draw
    data = {"train_chars": len(train_text), "heldout_chars": len(held_text), "train_tokens": int(len(train_tokens)),
            "heldout_tokens": held_tokens, "heldout_file": rel(heldout)}
    log.info("train %d tokens, held out %d tokens", len(train_tokens), held_tokens)

    # 2. donors
    donors, donor_paths = {}, {}
    for kind in DONORS:
        donor_paths[kind], donors[kind] = write_donor(kind, layers, train_tokens, probe, args, work)

    # 3. grafts
    grafts, models = {}, {}
    checks = []
    models["base Q4_1"] = {"file": base_q}
    models["base F16"] = {"file": base_f16}
    for kind in DONORS:
        models[f"donor {kind} (F16)"] = {"file": donor_paths[kind]}
        diff = differing_tensors(base_f16, donor_paths[kind])
        models[f"donor {kind} (F16)"]["changed_note"] = f"{len(diff)} (vs F16 base)"
        expect = len(layers) * len(DONORS[kind][1])
        checks.append(f"donor {kind}: {len(diff)} tensors differ from the F16 base (expected {expect}: the trained ones); "
                      f"all in the trained organs: {all(int(n.split('.')[1]) in layers for n in diff)}")
    for kind in DONORS:
        names = [n for n in differing_tensors(base_f16, donor_paths[kind])]
        donors[kind]["weight_moves"] = weight_moves(base_f16, base_q, donor_paths[kind], names)
    # control: the untouched F16 form grafted back into the Q4_1 base must give the base's codes, scales and mins
    # (Q4_1 -> F16 -> Q4_1 round trip), so any change in the Q4_1 chimeras comes from training
    ident = work / "graft_domain_identity_q41.gguf"
    ident.unlink(missing_ok=True)
    r = graft(base_q, base_f16, ident, layers=args.layers, roles=[v[0] for v in DONORS.values()], convert=True)
    codes = q4_1_code_changes(base_q, ident, r.tensors)
    checks.append(f"control: F16 form of the base grafted into the Q4_1 base ({len(r.tensors)} tensors, requantized): "
                  f"values changed {max(r.changed_share.values()):.1%} max, codes changed "
                  f"{max(v['codes_changed_share'] for v in codes.values()):.1%} max, blocks with new scale/min "
                  f"{max(v['blocks_scale_or_min_changed_share'] for v in codes.values()):.1%} max; "
                  f"tensors differing from the base: {len(differing_tensors(base_q, ident))}")
    ident.unlink()
    for base_name, base_path, convert in (("Q4_1 base", base_q, True), ("F16 base", base_f16, False)):
        for kind in DONORS:
            name = f"{base_name} + {kind}"
            out = work / f"graft_domain_{'q41' if convert else 'f16'}_{kind}.gguf"
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            r = graft(base_path, donor_paths[kind], out, layers=args.layers, roles=[DONORS[kind][0]], convert=convert)
            grafts[name] = {"file": rel(out), "tensors": r.tensors, "converted": bool(r.converted),
                            "changed_share": r.changed_share, "converted_share": r.converted,
                            "mean_changed_share": float(np.mean(list(r.changed_share.values()))),
                            "seconds": time.perf_counter() - t0}
            if convert:
                codes = q4_1_code_changes(base_path, out, r.tensors)
                grafts[name]["q4_1_codes"] = codes
                grafts[name]["mean_codes_changed_share"] = float(np.mean([v["codes_changed_share"] for v in codes.values()]))
                grafts[name]["mean_blocks_scale_or_min_changed_share"] = float(np.mean([v["blocks_scale_or_min_changed_share"] for v in codes.values()]))
            models[name] = {"file": out, "changed_note": f"{len(r.tensors)} grafted, mean {grafts[name]['mean_changed_share']:.1%} of weights changed"}
            log.info("%s: %d tensors, mean changed share %.3f", name, len(r.tensors), grafts[name]["mean_changed_share"])
            if not convert:
                same = differing_tensors(out, donor_paths[kind])
                checks.append(f"{name}: tensors differing from donor {kind}: {len(same)} (0 means the chimera is the donor, byte for byte)")
                if not same:
                    models[name]["same_as"] = f"donor {kind} (F16)"

    # 4. evaluation. llama.cpp is the slow part on a shared CPU, so nothing is scored twice: the
    # F16 base's figures are the parent side of the Q4_1 base's evaluation (same windows, same
    # token ids), and a chimera byte-identical to its donor (checked above) takes the donor's figures.
    cfg = EvalConfig(ctx=args.ctx, tokens=args.tokens, decode=0, canary_tokens=0, threads=args.threads)
    texts = {"shakespeare": heldout, "wiki": Path(args.wiki)}
    n_scored = None

    def figures(ppl, kld: dict, seconds: float, note: str | None = None) -> dict:
        d = {"ppl": ppl.ppl, "ppl_stderr": ppl.ppl_stderr, "mean_nll": ppl.mean_nll, "n_scored": ppl.n_tokens,
             "n_chunks": ppl.n_chunks, "seconds": seconds, **{k: kld.get(k) for k in ("kld_mean", "kld_p99", "top1_agreement")}}
        if note:
            d["note"] = note
        return d

    for name, m in models.items():
        path = Path(m["file"])
        m["file"] = rel(path)
        m["bytes"] = path.stat().st_size
        m.setdefault("eval", {})
    for name, m in models.items():
        if name == "base F16":
            continue  # filled from the Q4_1 base's parent side
        if "same_as" in m:
            m["eval"] = {t: {**v, "note": f"not scored again: same tensors as {m['same_as']}"} for t, v in models[m["same_as"]]["eval"].items()}
            continue
        for tname, tpath in texts.items():
            t0 = time.perf_counter()
            rep = evaluate(REPO / m["file"] if not Path(m["file"]).is_absolute() else m["file"], base_f16, tpath, cfg)
            m["eval"][tname] = figures(rep.model.ppl, rep.kld, time.perf_counter() - t0)
            if name == "base Q4_1":
                models["base F16"]["eval"][tname] = figures(rep.parent.ppl, {}, 0.0, "parent side of the base Q4_1 evaluation")
            n_scored = rep.model.ppl.n_tokens
            log.info("%-22s %-11s ppl %.3f  kld %s  (%.0f s)", name, tname, rep.model.ppl.ppl, rep.kld.get("kld_mean"),
                     m["eval"][tname]["seconds"])
    models = {k: models[k] for k in ["base Q4_1", "base F16"] + [k for k in models if not k.startswith("base ")]}

    res = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:]),
        "args": vars(args), "threads": args.threads, "data": data, "n_scored": n_scored,
        "base_q4_1": str(base_q), "base_f16": str(base_f16),
        "donors": donors, "grafts": grafts, "models": models, "checks": checks,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} torch threads)".replace("  ", " "),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    res["interpretation"] = interpret(res)
    res["runtime_seconds"] = time.time() - started
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    write_markdown(out.with_suffix(".md"), res)
    log.info("wrote %s.{json,md} in %.1f min", out, res["runtime_seconds"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
