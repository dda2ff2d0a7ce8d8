"""Usage profiling on the torch side: run a text through a model and record what each weight sees.

The windows and token ids are llama-imatrix's (``tools/imatrix/imatrix.cpp``): the text is
tokenized once by llama.cpp's tokenizer of the GGUF with special tokens added, cut into
``chunks`` windows of ``ctx`` tokens, each window's first token replaced by BOS when the
vocabulary adds BOS, and the KV cache cleared per window. Forward hooks on every
``nn.Linear`` of the decoder layers accumulate, per input channel, the sum over tokens of the
squared input (llama.cpp's ``in_sum2``; one count per token). llama-imatrix collects only
``blk.*`` weights (``output.weight`` needs ``--process-output``), so ``lm_head`` is profiled
only when ``process_output`` is set and it is not tied to the embedding.

Names are the GGUF's. llama.cpp permutes the *rows* (output dims) of attn_q / attn_k (its rope
pairs adjacent dims); an importance matrix is indexed by *input* column, so it needs no
permutation, and the attention output (the attn_output input) is unchanged too, since q and k
are permuted alike within each head and their dot products do not change. Gradients, which are
per weight element, are re-permuted to GGUF row order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birdbone.io.inputs import note_input
from birdbone.io.errors import InputError
from birdbone.measure.config import ProfileConfig
from birdbone.measure.usage import UsageProfile
from birdbone.io.progress import Progress

log = logging.getLogger(__name__)

# |a| above this counts as "active"; absolute, on the scale of the layer's input (RMS-normed
# hidden states feed q/k/v and gate/up, so typical magnitudes are ~0.1-1).
ACT_EPS = 1e-3


def profile(model, text: str | Path | None = None, tokens: int | None = None, ctx: int = 512, gradients: bool = False,
            progress: Progress | None = None, *, tokenizer_gguf: str | Path | None = None, eps: float = ACT_EPS,
            process_output: bool = False, threads: int | None = None) -> UsageProfile:
    """Profile ``model`` on ``text`` (a path; None: the built-in text) over at most ``tokens`` tokens.

    ``model`` is a GGUF path or "builtin" (loaded with ``bridge.load_causal_lm``), or a loaded
    ``transformers`` llama with ``tokenizer_gguf`` naming a GGUF of the same vocabulary.
    ``gradients=True`` also records the mean over windows of ``|dL/dw|`` (L: the window's mean
    next-token loss) for each profiled weight.
    """
    from birdbone.io.runtime import LlamaRuntime
    from birdbone.io.text import iter_windows, load_text, tokenize_windows

    if isinstance(model, (str, Path)):
        from birdbone.bridge import load_causal_lm
        from birdbone.io.model_file import resolve_model_path

        tokenizer_gguf = tokenizer_gguf or resolve_model_path(model)
        model_name = str(model)
        lm = load_causal_lm(model)
    else:
        if tokenizer_gguf is None:
            raise ValueError("a loaded torch model needs tokenizer_gguf (a GGUF of the same vocabulary)")
        lm, model_name = model, f"torch:{type(model).__name__}"
    body, text_name = load_text(text)
    if ctx < 16:
        # llama-imatrix ignores matmuls of fewer than 16 rows
        raise ValueError(f"context {ctx} is too small to profile (llama-imatrix needs at least 16)")
    with LlamaRuntime(tokenizer_gguf, n_ctx=ctx, threads=threads) as rt:
        ids, windows = tokenize_windows(rt, body, text_name, ctx, tokens)
    log.info("profiling %s on %s: %d windows of %d tokens (text has %d)", model_name, text_name, windows.n_chunks, ctx, len(ids))

    prof = UsageProfile(model_name, text_name, windows.n_chunks * ctx, ctx, windows.n_chunks, eps)
    rec = _Recorder(lm, eps, process_output, gradients)
    try:
        for i, chunk in enumerate(iter_windows(ids, windows)):
            rec.run(chunk)
            if progress:
                progress("profile", i + 1, windows.n_chunks)
    finally:
        rec.remove()
    rec.fill(prof)
    return prof


class _Recorder:
    """Hooks on the profiled linears; accumulates in float64 on the module's device."""

    def __init__(self, lm, eps: float, process_output: bool, gradients: bool):
        import torch

        from birdbone.io.families import family_of_lm
        from birdbone.bridge.names import gguf_linears

        self.lm, self.eps, self.gradients = lm, eps, gradients
        cfg = lm.config
        self.arch = family_of_lm(lm).arch
        self.n_layers = cfg.num_hidden_layers
        self.n_head = cfg.num_attention_heads
        self.n_head_kv = getattr(cfg, "num_key_value_heads", None) or self.n_head
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_head
        self.targets: dict[str, torch.nn.Linear] = {}
        named = gguf_linears(lm, self.arch)
        known = {id(mod) for _, mod in named.values()}
        for hf_name, mod in lm.named_modules():  # a layer's linear without a GGUF name would be silently unprofiled
            if isinstance(mod, torch.nn.Linear) and ".layers." in hf_name and id(mod) not in known:
                raise InputError(None, f"no GGUF name for {hf_name} of a {self.arch} model")
        for name, (hf_name, mod) in named.items():
            if hf_name == "lm_head":
                tied = lm.get_input_embeddings().weight.data_ptr() == mod.weight.data_ptr()
                if not process_output or tied:
                    continue
            elif ".layers." not in hf_name:
                continue
            self.targets[name] = mod
        self.sum2 = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in self.targets.items()}
        self.sum1 = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in self.targets.items()}
        self.active = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in self.targets.items()}
        self.count = dict.fromkeys(self.targets, 0)
        self.head_sum: dict[int, torch.Tensor] = {}
        self.grad_sum = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in self.targets.items()} if gradients else {}
        self.n_backward = 0
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.targets.items()]
        self._saved_requires_grad = {}
        if gradients:
            for p in lm.parameters():
                self._saved_requires_grad[p] = p.requires_grad
                p.requires_grad_(False)
            for n, m in self.targets.items():
                m.weight.requires_grad_(True)
                # fold each gradient into its one fp32 buffer as soon as it exists, then drop it
                self.handles.append(m.weight.register_post_accumulate_grad_hook(self._grad_hook(n)))

    def _hook(self, name: str):
        is_o = name.endswith("attn_output.weight")
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1

        def hook(_mod, inputs, _out):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])  # (tokens, n_in)
            xd = x.double()
            self.sum2[name] += (xd * xd).sum(0).cpu()
            self.sum1[name] += xd.sum(0).cpu()
            self.active[name] += (x.abs() > self.eps).sum(0).double().cpu()
            self.count[name] += x.shape[0]
            if is_o:
                # (tokens, n_head, head_dim): each head's slice of the attention output
                norms = xd.reshape(x.shape[0], -1, self.head_dim).norm(dim=-1).sum(0).cpu()
                self.head_sum[layer] = self.head_sum.get(layer, 0) + norms

        return hook

    def _grad_hook(self, name: str):
        def hook(p):
            self.grad_sum[name] += p.grad.detach().abs().float()
            p.grad = None

        return hook

    def run(self, chunk: np.ndarray) -> None:
        import torch

        dev = next(self.lm.parameters()).device
        ids = torch.as_tensor(np.asarray(chunk, dtype=np.int64), device=dev)[None]
        if not self.gradients:
            with torch.inference_mode():
                # logits are not needed: keep one position so lm_head does almost no work
                self.lm(input_ids=ids, use_cache=False, logits_to_keep=1)
            return
        # HF shifts labels internally: mean next-token NLL over the window
        loss = self.lm(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        self.n_backward += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for p, flag in self._saved_requires_grad.items():
            p.requires_grad_(flag)

    def fill(self, prof: UsageProfile) -> None:
        from birdbone.bridge.names import permute_qk, qk_rows

        for name in self.targets:
            c = self.count[name]
            prof.in_sum2[name] = self.sum2[name].float().numpy()
            prof.in_sum[name] = self.sum1[name].float().numpy()
            prof.counts[name] = c
            prof.act_freq[name] = (self.active[name] / max(c, 1)).float().numpy()
            if self.gradients:
                g = (self.grad_sum[name] / max(self.n_backward, 1)).cpu().numpy()
                heads = qk_rows(self.lm, self.arch, name)
                if heads:
                    g = permute_qk(g, *heads)
                prof.grad_abs[name] = np.ascontiguousarray(g)
        for layer, s in self.head_sum.items():
            c = self.count[f"blk.{layer}.attn_output.weight"]
            prof.head_norm[layer] = (s / max(c, 1)).float().numpy()


@dataclass
class ProfileReport:
    out: Path
    profile: UsageProfile

    def as_dict(self) -> dict:
        p = self.profile
        return {"out": str(self.out), "files": ["usage.safetensors", "usage.json", "imatrix.gguf"], "model": p.model,
                "text": p.text_name, "tokens": p.n_tokens, "chunks": p.chunks, "weights": len(p.in_sum2)}

    def render(self) -> list:
        from birdbone.io.report import Line

        p = self.profile
        return [Line(f"profiled {len(p.in_sum2)} weights on {p.n_tokens} tokens of {p.text_name}; wrote {self.out}/imatrix.gguf "
                     "(use it with birdbone quantize --imatrix or llama.cpp's llama-quantize --imatrix)")]


def profile_model(model: str | Path = "builtin", out: str | Path = "usage", text: str | Path | None = None,
                  cfg: ProfileConfig = ProfileConfig(), progress: Progress | None = None, threads: int | None = None) -> ProfileReport:
    """``birdbone profile``: the usage profile of ``model`` on ``text``, written to the folder ``out``."""
    note_input(text)  # known before any output is written, so none lands on them
    from birdbone.measure.usage import write_profile

    prof = profile(model, text, cfg.tokens or None, cfg.ctx, cfg.gradients, progress, threads=threads)
    write_profile(prof, out)
    return ProfileReport(Path(out), prof)
