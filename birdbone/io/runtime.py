"""llama.cpp as a runtime: load a GGUF, tokenize, get logits, decode greedily, chat.

A small layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings) rather than
the high-level ``Llama`` class: birdbone needs exact control over which positions return
logits, the BOS rule, the model's own chat template, and timing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.llama import lib, probe_loadable
from birdbone.io.model_file import resolve_model_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class LlamaRuntime:
    """One GGUF loaded in llama.cpp with one context. Close it (or use ``with``)."""

    def __init__(self, model: str | Path, n_ctx: int = 512, n_batch: int = 512, threads: int | None = None):
        self.L = L = lib()
        self.path = resolve_model_path(model)
        if not self.path.exists():
            raise InputError(self.path, "no such file")
        probe_loadable(self.path)
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise InputError(self.path, "llama.cpp could not load this GGUF (see -v for its log)")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = min(n_batch, n_ctx)
        cparams.n_ubatch = min(n_batch, n_ctx)
        cparams.n_seq_max = 1
        # llama.cpp's default is 4 threads whatever the machine: on 2 cores that oversubscribes
        # and decoding slows 5x. Default to the cores this process may use.
        threads = threads or len(os.sched_getaffinity(0))
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise BirdboneError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_batch = cparams.n_batch
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.n_past = 0

    # -- vocabulary -------------------------------------------------------------------------
    @property
    def add_bos(self) -> bool:
        return bool(self.L.llama_vocab_get_add_bos(self.vocab))

    @property
    def bos(self) -> int:
        return int(self.L.llama_vocab_bos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens) -> str:
        return b"".join(self.piece(int(t)) for t in tokens).decode("utf-8", errors="replace")

    # -- evaluation -------------------------------------------------------------------------
    def reset(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def decode(self, tokens, want_logits: str = "last") -> np.ndarray | None:
        """Feed tokens after what is in the cache; ``want_logits`` is 'all', 'last' or 'none'."""
        tokens = list(map(int, tokens))
        if self.n_past + len(tokens) > self.n_ctx:
            raise BirdboneError(f"{self.n_past + len(tokens)} tokens exceed the context of {self.n_ctx}")
        out = []
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start : start + self.n_batch]
            b = self.batch
            b.n_tokens = len(part)
            last_part = start + self.n_batch >= len(tokens)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = want_logits == "all" or (want_logits == "last" and last_part and i == len(part) - 1)
            rc = self.L.llama_decode(self.ctx, b)
            if rc != 0:
                raise BirdboneError(f"{self.path}: llama_decode failed with code {rc}")
            if want_logits == "all":
                ptr = self.L.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(len(part), self.n_vocab)).copy())
            elif want_logits == "last" and last_part:
                ptr = self.L.llama_get_logits_ith(self.ctx, len(part) - 1)
                out.append(np.ctypeslib.as_array(ptr, shape=(1, self.n_vocab)).copy())
            self.n_past += len(part)
        return np.concatenate(out) if out else None

    def logits(self, tokens) -> np.ndarray:
        """Logits at every position of ``tokens`` from an empty cache: (n, n_vocab) float32."""
        self.reset()
        return self.decode(tokens, "all")

    def greedy(self, prompt_tokens, n: int, stop_at_eog: bool = True) -> list[int]:
        """Greedy continuation: argmax at each step (deterministic)."""
        self.reset()
        logits = self.decode(prompt_tokens, "last")
        out = []
        for _ in range(n):
            if self.n_past >= self.n_ctx:
                break
            tok = int(np.argmax(logits[-1]))
            if stop_at_eog and self.is_eog(tok):
                break
            out.append(tok)
            logits = self.decode([tok], "last")
        return out

    def stream(self, prompt_tokens, max_tokens: int, temperature: float = 0.0, seed: int = 0) -> Iterator[int]:
        """Sample a continuation token by token (greedy at temperature 0)."""
        rng = np.random.default_rng(seed)
        logits = self.decode(prompt_tokens, "last")
        for _ in range(max_tokens):
            if self.n_past >= self.n_ctx:
                return
            z = logits[-1].astype(np.float64)
            if temperature <= 0:
                tok = int(np.argmax(z))
            else:
                p = np.exp((z - z.max()) / temperature)
                tok = int(rng.choice(len(p), p=p / p.sum()))
            if self.is_eog(tok):
                return
            yield tok
            logits = self.decode([tok], "last")

    # -- chat -------------------------------------------------------------------------------
    def chat_template(self) -> str | None:
        t = self.L.llama_model_chat_template(self.model, None)
        return t.decode("utf-8") if t else None

    def apply_chat_template(self, messages: list[Message], add_assistant: bool = True) -> str:
        """The model's own chat template, applied by llama.cpp."""
        tmpl = self.L.llama_model_chat_template(self.model, None)
        if not tmpl:
            raise BirdboneError(f"{self.path}: the model has no chat template (tokenizer.chat_template)")
        arr = (self.L.llama_chat_message * len(messages))()
        keep = []
        for i, m in enumerate(messages):
            r, c = m.role.encode(), m.content.encode()
            keep += [r, c]
            arr[i].role, arr[i].content = r, c
        size = 4096 + sum(len(m.content) for m in messages) * 2
        buf = ctypes.create_string_buffer(size)
        n = self.L.llama_chat_apply_template(tmpl, arr, len(messages), add_assistant, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = self.L.llama_chat_apply_template(tmpl, arr, len(messages), add_assistant, buf, n)
        if n < 0:
            raise BirdboneError(f"{self.path}: llama.cpp does not recognise this model's chat template")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def chat_tokens(self, messages: list[Message]) -> np.ndarray:
        return self.tokenize(self.apply_chat_template(messages), add_special=True, parse_special=True)

    # -- speed ------------------------------------------------------------------------------
    def speed(self, n_prompt: int = 256, n_decode: int = 64, seed: int = 0) -> dict:
        """Prompt processing and decode throughput in tokens/s (random tokens, as llama-bench does)."""
        rng = np.random.default_rng(seed)
        n_decode = min(n_decode, self.n_ctx // 2)  # a short context is shared between prompt and decode
        n_prompt = max(8, min(n_prompt, self.n_ctx - n_decode - 1))
        toks = rng.integers(0, self.n_vocab, size=n_prompt)
        self.reset()
        self.decode(toks[:8], "last")  # warm-up
        self.reset()
        t0 = time.perf_counter()
        logits = self.decode(toks, "last")
        t1 = time.perf_counter()
        tok = int(np.argmax(logits[-1]))
        t2 = time.perf_counter()
        for _ in range(n_decode):
            logits = self.decode([tok], "last")
            tok = int(np.argmax(logits[-1]))
        t3 = time.perf_counter()
        return {"prompt_tok_s": n_prompt / (t1 - t0), "decode_tok_s": n_decode / (t3 - t2), "n_prompt": n_prompt, "n_decode": n_decode}

    def close(self) -> None:
        L = self.L
        if getattr(self, "batch", None) is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def tokenize_texts(model: str | Path, *texts: str) -> list[np.ndarray]:
    """Token ids of each text with ``model``'s vocabulary (no BOS), from one small llama.cpp context."""
    with LlamaRuntime(model, n_ctx=64) as rt:
        return [rt.tokenize(t, add_special=False) for t in texts]
