"""Shared fakes for the brains tests: a deterministic slot-cache backend and a tiny tokenizer.

`FakeBackend` implements the engine's `Backend` protocol without a model. It keeps, per slot, the
token written at every cache position, and computes each row's next token from the slot's cached
history (positions 0..p), so a wrong prefix copy, a wrong position or a wrong slot changes the
output. It also refuses misuse outright: writing position p of a slot whose positions < p are not
valid, copying more of a slot than is valid, or a `kv_len` that disagrees with the positions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from brains.engine import Engine, GenerationRequest, TokenStream

NextToken = Callable[[Sequence[int]], int]

DEFAULT_VOCAB = 97


def hash_next(history: Sequence[int], vocab: int = DEFAULT_VOCAB) -> int:
    """The fake model: a position-weighted checksum of everything cached so far."""
    return (sum((i + 1) * (t + 1) for i, t in enumerate(history)) + 7 * len(history)) % vocab


def reference(prompt: Sequence[int], max_new: int, stop_ids: frozenset[int] = frozenset(),
              next_token: NextToken = hash_next) -> list[int]:
    """What a correct engine must produce for `prompt` with greedy decoding."""
    history, out = list(prompt), []
    while len(out) < max_new:
        tok = next_token(history)
        if tok in stop_ids:
            break
        out.append(tok)
        history.append(tok)
    return out


class FakeMisuseError(AssertionError):
    """The engine used the backend in a way a real KV cache would silently get wrong."""


@dataclass(frozen=True)
class ForwardCall:
    tokens: list[list[int]]
    positions: list[list[int]]
    slots: list[int]
    kv_len: int

    @property
    def batch(self) -> int:
        return len(self.slots)

    @property
    def width(self) -> int:
        return len(self.tokens[0])


class FakeBackend:
    def __init__(self, slots: int = 4, max_len: int = 256, vocab: int = DEFAULT_VOCAB,
                 next_token: NextToken | None = None) -> None:
        self.slots = slots
        self.max_len = max_len
        self.vocab = vocab
        self.next_token: NextToken = next_token or (lambda history: hash_next(history, vocab))
        self.cache: list[list[int]] = [[-1] * max_len for _ in range(slots)]
        self.valid = [0] * slots  # leading positions of each slot that hold computed keys/values
        self.calls: list[ForwardCall] = []
        self.copies: list[tuple[int, int, int]] = []
        self.misuse: list[str] = []
        self.fail_next: Exception | None = None  # raised by the next forward, once
        # Gate: None = run freely; an int = that many more forwards may start, then they block.
        self._cond = threading.Condition()
        self._allowed: int | None = None
        self.blocked = False
        self.passed = 0

    # ---- the Backend protocol ------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        self._gate()
        call = ForwardCall(tokens.tolist(), positions.tolist(), slots.tolist(), kv_len)
        self.calls.append(call)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if tokens.shape != positions.shape or tokens.shape[0] != slots.shape[0] or tokens.dim() != 2:
            self._misuse(f"shapes tokens={tuple(tokens.shape)} positions={tuple(positions.shape)} "
                         f"slots={tuple(slots.shape)}")
        if kv_len != int(positions.max()) + 1:
            self._misuse(f"kv_len {kv_len} but positions reach {int(positions.max())}")
        if len(set(call.slots)) != len(call.slots):
            self._misuse(f"one slot twice in a batch: {call.slots}")
        logits = torch.zeros((call.batch, self.vocab))
        for row, slot in enumerate(call.slots):
            if not 0 <= slot < self.slots:
                self._misuse(f"slot {slot} out of range")
            cache = self.cache[slot]
            for tok, pos in zip(call.tokens[row], call.positions[row], strict=True):
                if pos >= self.max_len:
                    self._misuse(f"position {pos} past max_len {self.max_len}")
                if pos > self.valid[slot]:
                    self._misuse(f"slot {slot}: write at position {pos} but only {self.valid[slot]} valid")
                cache[pos] = tok
                self.valid[slot] = pos + 1  # anything after was computed for another sequence
            last = call.positions[row][-1]
            logits[row, self.next_token(cache[: last + 1])] = 1.0
        return logits

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.copies.append((src, dst, n))
        if src == dst:
            self._misuse(f"copy_prefix onto itself (slot {src})")
        if n > self.valid[src]:
            self._misuse(f"copy of {n} positions from slot {src}, which has {self.valid[src]} valid")
        self.cache[dst][:n] = self.cache[src][:n]
        self.valid[dst] = n

    def _misuse(self, what: str) -> None:
        self.misuse.append(what)
        raise FakeMisuseError(what)

    # ---- stepping control ------------------------------------------------------------------------
    def _gate(self) -> None:
        with self._cond:
            while self._allowed == 0:
                self.blocked = True
                self._cond.notify_all()
                self._cond.wait()
            self.blocked = False
            if self._allowed is not None:
                self._allowed -= 1
            self.passed += 1
            self._cond.notify_all()

    def pause(self) -> None:
        """Forwards from now on block until `allow` or `resume`."""
        with self._cond:
            self._allowed = 0

    def allow(self, n: int) -> None:
        with self._cond:
            self._allowed = (self._allowed or 0) + n
            # A forward waiting at the gate now may pass, but `blocked` stays true until its thread wakes: a
            # `wait_blocked` right after would return at once, before the allowed forwards ran.
            self.blocked = self.blocked and n <= 0
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._allowed = None
            self._cond.notify_all()

    def step(self, n: int, timeout: float = 5.0) -> bool:
        """Let exactly `n` more forwards run; block the calling thread until the next one waits at the gate."""
        with self._cond:
            target = self.passed + n
            self._allowed = (self._allowed or 0) + n
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self.passed >= target and self.blocked, timeout)

    def wait_blocked(self, timeout: float = 5.0) -> bool:
        """Block the calling thread until a forward waits at the gate."""
        with self._cond:
            return self._cond.wait_for(lambda: self.blocked, timeout)

    def wait_passed(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.passed >= n, timeout)

    def decode_calls(self) -> list[ForwardCall]:
        return [c for c in self.calls if c.width == 1]


async def collect(stream: TokenStream, timeout: float = 10.0) -> list[int]:
    """All tokens of a stream, in order (EngineError propagates)."""

    async def run() -> list[int]:
        out: list[int] = []
        async for batch in stream:
            out.extend(batch)
        return out

    return await asyncio.wait_for(run(), timeout)


async def first_batch(stream: TokenStream, timeout: float = 10.0) -> list[int]:
    return await asyncio.wait_for(anext(aiter(stream)), timeout)


# ---------------------------------------------------------------- recording engine


class RecordingEngine(Engine):
    """An Engine that records every request submitted, and may call a hook at submit time."""

    def __init__(self, *args: Any, on_submit: Callable[[GenerationRequest, TokenStream], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted: list[tuple[GenerationRequest, TokenStream]] = []
        self.on_submit = on_submit
        self.submit_event = asyncio.Event()

    def submit(self, req: GenerationRequest) -> TokenStream:
        stream = super().submit(req)
        self.submitted.append((req, stream))
        self.submit_event.set()
        if self.on_submit is not None:
            self.on_submit(req, stream)
        return stream

    def by_brain(self, brain: str) -> list[tuple[GenerationRequest, TokenStream]]:
        return [(r, s) for r, s in self.submitted if r.brain == brain]


# ---------------------------------------------------------------- tokenizer


class FakeTokenizer:
    """One id per character (its code point), plus a few special tokens above `SPECIAL_BASE`.

    `native_think=True` makes `<think>`/`</think>` single special tokens (like Qwen3); otherwise they
    are spelled out character by character (like SmolLM2's BPE splitting them into pieces).
    """

    SPECIAL_BASE = 1000
    unk_token_id = 1023

    def __init__(self, native_think: bool = True, batch_encoding: bool = False) -> None:
        names = ["<|im_start|>", "<|im_end|>"] + (["<think>", "</think>"] if native_think else [])
        self.specials = {name: self.SPECIAL_BASE + i for i, name in enumerate(names)}
        self.names = {i: name for name, i in self.specials.items()}
        self.eos_token_id = self.specials["<|im_end|>"]
        self.batch_encoding = batch_encoding

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for name, tid in self.specials.items():
                if text.startswith(name, i):
                    ids.append(tid)
                    i += len(name)
                    break
            else:
                code = ord(text[i])
                assert code < self.SPECIAL_BASE, f"character {text[i]!r} outside the fake vocabulary"
                ids.append(code)
                i += 1
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        parts = []
        for i in ids:
            if i in self.names:
                if not skip_special_tokens:
                    parts.append(self.names[i])
            elif i == self.unk_token_id:
                parts.append("\ufffd")
            else:
                parts.append(chr(i))
        return "".join(parts)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.specials.get(token, self.unk_token_id)

    def apply_chat_template(self, chat: Sequence[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> Any:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        if not tokenize:
            return text
        ids = self.encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if self.batch_encoding else ids
