"""The shell an engine on someone else's scheduler needs: its own asyncio loop on a thread, and `Engine`'s surface.

vLLM's AsyncLLM (`vllm_engine.py`) and an HTTP client of a completions server (`remote.py`) are both asyncio
code that must not run on the server's event loop (vLLM's output handling, hundreds of streams). So each runs a
loop of its own on a thread; sessions call `submit`/`cancel` from their loop, and tokens go back to each
session's loop with `call_soon_threadsafe`. What differs is only how a sequence is generated: subclasses give
`_new_seq` (their sequence record), `_open` (on the thread, before any request), `_generate` (one task per
sequence), `_cancel_backend` and `_close_backend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from brains.engine import EngineStats, Finished, GenerationRequest, LoopCall, TokenStream, post_by_loop
from brains.scheduler import rank
from common.config import LlmConfig
from common.errors import EngineError


def request_priority(req: GenerationRequest, urgent_audio_ms: float) -> int:
    """Backend priority (lower runs first) of a request: `brains.scheduler.rank`, the torch engine's policy,
    packed into one integer: urgent AB in [0, U), FB = U, other AB above U, with U = ceil(urgent_audio_ms)
    (at least 1) so an urgent AB stays strictly below FB even for a fractional threshold."""
    ahead = req.audio_ahead_ms() if req.audio_ahead_ms is not None else 0.0
    # NaN and negatives count as none queued; the cap keeps an infinite clock packable into an int.
    ahead = min(ahead, 1e9) if ahead > 0 else 0.0
    tier, key = rank(req.brain, ahead, urgent_audio_ms)
    urgent = max(1, math.ceil(urgent_audio_ms))
    if tier == 0:
        return int(key)
    if tier == 1:
        return urgent
    return urgent + 1 + int(key)


@dataclass
class Seq:
    """One submitted sequence, as the engine thread tracks it."""

    seq_id: int
    req: GenerationRequest
    stream: TokenStream
    loop: asyncio.AbstractEventLoop  # the submitting session's loop: tokens are delivered there
    stops: frozenset[int]
    priority: int
    task: asyncio.Task[None] | None = None
    finished: bool = False
    cached: int = 0  # prompt tokens the backend found in its prefix cache


S = TypeVar("S", bound=Seq)


class LoopThreadEngine(Generic[S]):
    """`Engine`'s public surface (start, close, submit, cancel, live_sequences, stats, eos_ids) over a backend
    driven from an asyncio loop on a thread of its own."""

    thread_name = "duet-engine"
    what = "the engine"  # for errors: "vLLM failed to start: ..."
    shutdown_timeout_s = 30.0

    def __init__(self, cfg: LlmConfig, urgent_audio_ms: float, eos_ids: frozenset[int]) -> None:
        self.cfg = cfg
        self.urgent_audio_ms = urgent_audio_ms
        self.eos_ids = eos_ids
        self.stats = EngineStats()
        self.max_len = cfg.max_seq_len
        self._ids = itertools.count(1)
        self._seqs: dict[int, S] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # (the session's loop, fn, args) made on this thread's loop since its last pass; see `_call`.
        self._outbox: list[LoopCall] = []

    # ---- subclasses ---------------------------------------------------------------------------
    async def _open(self) -> None:
        """Build the backend, on the engine thread; raising stops `start` with an EngineError."""

    async def _abandon(self) -> None:
        """Undo a partial `_open` after it raised."""

    def _new_seq(self, seq_id: int, req: GenerationRequest, stream: TokenStream, loop: asyncio.AbstractEventLoop,
                 stops: frozenset[int], priority: int) -> S:
        raise NotImplementedError

    def _accepting(self) -> bool:
        """Besides the loop running: is the backend ready for requests."""
        return True

    def _submitted(self) -> None:
        """Called with the lock held after a sequence was registered."""

    async def _generate(self, seq: S) -> None:
        raise NotImplementedError

    async def _cancel_backend(self, seq: S) -> None:
        """Tell the backend `seq` is cancelled (before its task is cancelled)."""

    async def _close_backend(self) -> None:
        """Release the backend once every sequence has ended."""

    # ---- caller side --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread and wait for `_open`; raises EngineError if it fails."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._abandon())
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._closed = True
            exc = failure[0]
            if isinstance(exc, EngineError):
                raise exc
            raise EngineError(f"{self.what} failed to start: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=self.shutdown_timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, req: GenerationRequest) -> TokenStream:
        if not req.prompt:
            raise ValueError("empty prompt")
        if len(req.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(req.prompt)} tokens exceeds the {self.max_len}-token context")
        loop = self._loop
        if self._closed or loop is None or loop.is_closed() or not self._accepting():
            raise EngineError("engine is closed" if self._closed else "engine is not started")
        seq_id = next(self._ids)
        stream = TokenStream(self, seq_id)  # type: ignore[arg-type]
        seq = self._new_seq(seq_id, req, stream, asyncio.get_running_loop(), frozenset(req.stop_ids) | self.eos_ids,
                            request_priority(req, self.urgent_audio_ms))
        with self._lock:
            self._seqs[seq_id] = seq
            self._submitted()
        loop.call_soon_threadsafe(self._start_seq, seq)
        return stream

    def cancel(self, seq_id: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closing: close() cancels everything anyway
                asyncio.run_coroutine_threadsafe(self._cancel(seq_id), loop)

    def live_sequences(self) -> int:
        with self._lock:
            return len(self._seqs)

    # ---- engine thread ------------------------------------------------------------------------
    def _start_seq(self, seq: S) -> None:
        if not seq.finished:
            seq.task = asyncio.get_running_loop().create_task(self._generate(seq))

    async def _cancel(self, seq_id: int) -> None:
        with self._lock:
            seq = self._seqs.get(seq_id)
        if seq is None or seq.finished:
            return
        with contextlib.suppress(Exception):
            await self._cancel_backend(seq)
        self._finish(seq, Finished("cancelled"))
        if seq.task is not None:
            seq.task.cancel()

    def _finish(self, seq: S, result: Finished) -> None:
        if seq.finished:
            return
        seq.finished = True
        with self._lock:
            self._seqs.pop(seq.seq_id, None)
        # Counted before the reader can see the end.
        prompt = len(seq.req.prompt)
        self.stats.prefill_tokens += prompt - min(seq.cached, prompt)
        self.stats.prefill_tokens_saved += min(seq.cached, prompt)
        self._call(seq, seq.stream._deliver, result)

    def _call(self, seq: Seq, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the sequence's loop, in order. On this thread's loop only. The calls of one pass of
        this loop go out together at its next pass, one `call_soon_threadsafe` per session loop (as the torch
        engine's `_post`): a backend step's chunks for every sequence arrive together, and one wake-up each
        (a socket write that releases the GIL, then a callback) was up to one per sequence per token."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._post)
        self._outbox.append((seq.loop, fn, args))

    def _post(self) -> None:
        calls, self._outbox = self._outbox, []
        post_by_loop(calls)

    async def _shutdown(self) -> None:
        with self._lock:
            live = list(self._seqs.values())
        for seq in live:
            await self._cancel(seq.seq_id)
        await asyncio.gather(*(s.task for s in live if s.task is not None), return_exceptions=True)
        await self._close_backend()
        self._post()  # the last endings, before the loop stops
