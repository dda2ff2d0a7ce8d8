"""A conversation, whatever answers it: one :class:`ChatSession` behind ``birdbone chat`` (a GGUF
in llama.cpp, :class:`LlamaChat`) and ``birdbone synapse chat`` (a synaptic GPT whose fast state
persists across turns, ``birdbone.synapse.chat``), and behind the HTTP API's conversations.

The session keeps the messages and the commands (``/reset``, ``/vitals``, ``/quit``); an engine
only turns the messages so far into the reply's pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from birdbone.io.report import Line
from birdbone.io.runtime import LlamaRuntime, Message

COMMANDS = {"/reset": "clear the conversation", "/vitals": "the engine's state", "/quit": "leave", "/exit": "leave"}


class ChatEngine(Protocol):
    name: str

    def reply(self, messages: list[Message], max_tokens: int) -> Iterator[str]:
        """The reply's text pieces, streamed; raises :class:`ContextFull` when the messages do not fit."""

    def vitals(self) -> dict[str, float]: ...

    def reset(self) -> None: ...


class ContextFull(Exception):
    pass


@dataclass
class Turn:
    """What one line of input did: a reply (its pieces), a notice, or the end of the session."""

    kind: str  # reply | info (asked-for output: /vitals) | notice (to the user's side channel: stderr) | quit
    pieces: Iterator[str] | None = None
    notice: Line | None = None


@dataclass
class ChatSession:
    engine: ChatEngine
    system: str | None = None
    max_tokens: int = 256
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [Message("system", self.system)] if self.system else []
        self.engine.reset()

    def turn(self, line: str) -> Turn:
        """Handle one line of user input."""
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            return Turn("quit")
        if cmd == "/reset":
            self.reset()
            return Turn("notice", notice=Line("state cleared: the conversation starts over", "dim"))
        if cmd == "/vitals":
            v = self.engine.vitals()
            return Turn("info", notice=Line(", ".join(f"{k} {x:.3g}" for k, x in v.items()) or "no vitals: this engine has no state"))
        if not cmd:
            return Turn("notice")
        return Turn("reply", pieces=self._reply(line))

    def _reply(self, line: str) -> Iterator[str]:
        self.messages.append(Message("user", line))
        pieces: list[str] = []
        try:
            for piece in self.engine.reply(self.messages, self.max_tokens):
                pieces.append(piece)
                yield piece
        except ContextFull:
            self.messages.pop()
            raise
        self.messages.append(Message("assistant", "".join(pieces).strip()))

    def send(self, line: str) -> str:
        """The whole reply to one message (for callers that do not stream)."""
        return "".join(self.turn(line).pieces or ())


class LlamaChat:
    """A GGUF in llama.cpp, with the model's own chat template; the conversation is re-encoded each turn."""

    def __init__(self, model: str | Path, ctx: int = 2048, temperature: float = 0.0, seed: int = 0, threads: int | None = None):
        self.rt = LlamaRuntime(model, n_ctx=ctx, threads=threads)
        self.name, self.ctx, self.temperature, self.seed = self.rt.path.name, ctx, temperature, seed
        self.last_prompt = ""  # the templated conversation the last reply continued

    def reply(self, messages: list[Message], max_tokens: int) -> Iterator[str]:
        self.last_prompt = self.rt.apply_chat_template(messages)
        toks = self.rt.tokenize(self.last_prompt, add_special=True, parse_special=True)
        if len(toks) + max_tokens > self.ctx:
            raise ContextFull(f"the conversation ({len(toks)} tokens) no longer fits the context of {self.ctx}")
        out: list[int] = []
        for tok in self.rt.stream(toks, max_tokens, self.temperature, self.seed):
            out.append(tok)
            yield self.rt.piece(tok).decode("utf-8", errors="replace")

    def vitals(self) -> dict[str, float]:
        return {}

    def reset(self) -> None:
        self.rt.reset()

    def close(self) -> None:
        self.rt.close()


@dataclass
class Generation:
    prompt: str
    reply: str
    n_tokens: int
    temperature: float
    seed: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def render(self) -> list:
        return [Line(self.reply)]


def generate(model: str | Path = "builtin", prompt: str = "", max_tokens: int = 128, temperature: float = 0.0, raw: bool = False,
             ctx: int = 2048, seed: int = 0, threads: int | None = None) -> Generation:
    """A reply through llama.cpp with the model's chat template (``raw``: continue the prompt as plain text)."""
    with LlamaRuntime(model, n_ctx=ctx, threads=threads) as rt:
        toks = rt.tokenize(prompt, add_special=True) if raw else rt.chat_tokens([Message("user", prompt)])
        out = list(rt.stream(toks, max_tokens, temperature, seed))
        return Generation(prompt, rt.detokenize(out), len(out), temperature, seed)
