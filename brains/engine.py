"""One engine per process: owns the model and runs every forward pass on its own thread.

Sessions submit `GenerationRequest`s from the event loop and read tokens from a `TokenStream`. The
engine thread loops: take commands (submit, cancel), admit waiting sequences into KV-cache slots
(reusing the longest cached prefix), ask the pure scheduler for a plan, run that plan's prefill chunks
and one batched decode over every chosen sequence of every session, and hand the new tokens back to
the loop with `call_soon_threadsafe` (moshi-server's compute thread; vLLM's EngineCore).

Every forward re-reads all the weights (~15 GB for an 8B model), so a step costs about one weight read
however many tokens it carries: a step runs as few forwards as it can. A backend with `forward_ragged`
(feature-detected: `backend.ragged` is true) runs the step's prefill chunks and decode rows as one flat
batch and computes logits for the decode rows only. Any other backend gets all prefill chunks as the rows
of one padded [B, T] forward, then the batched decode.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from brains.scheduler import Brain, SchedulerConfig, SeqView, StepPlan, schedule
from common.errors import EngineError

log = logging.getLogger(__name__)

# A shared prefix shorter than this is cheaper to prefill twice than to wait for.
MIN_SHARED_PREFILL = 16

FinishReason = Literal["stop", "length", "cancelled", "error"]


class Backend(Protocol):
    """What the engine needs from a model: a batched forward over a slot cache."""

    max_len: int
    slots: int

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_len: int) -> torch.Tensor: ...

    def copy_prefix(self, src: int, dst: int, n: int) -> None: ...


class RaggedBackend(Backend, Protocol):
    """Optional: one forward over N tokens of any mix of sequences (tokens, positions, slots: [N]; a slot's tokens
    in increasing position). Each token writes its key/value at (slot, position), then attends to its slot's
    keys 0..position, this call's included. Returns float32 logits [R, V] of `logit_rows` ([R]) only. The engine
    uses it when `ragged` is true."""

    ragged: bool

    def forward_ragged(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       logit_rows: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Sequence[int]
    max_new_tokens: int
    brain: Brain = "ab"
    session_id: str = ""
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0
    # Read from the engine thread each step; AB requests report their audio ahead of playback.
    audio_ahead_ms: Callable[[], float] | None = None


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    error: str = ""


class GenerationEngine(Protocol):
    """What the brains need from an engine: Duet's torch `Engine` and `VllmEngine` both provide it."""

    stats: EngineStats
    eos_ids: frozenset[int]

    def start(self) -> None: ...

    def close(self) -> None: ...

    def submit(self, req: GenerationRequest) -> TokenStream: ...

    def cancel(self, seq_id: int) -> None: ...

    def live_sequences(self) -> int: ...


class TokenStream:
    """The loop side of one sequence: an async iterator of token ids, then `finish` is set."""

    def __init__(self, engine: GenerationEngine, seq_id: int) -> None:
        self._engine = engine
        self.seq_id = seq_id
        self._queue: asyncio.Queue[list[int] | Finished] = asyncio.Queue()
        self.finish: Finished | None = None
        self.reused_prefix = 0

    def _deliver(self, item: list[int] | Finished) -> None:
        self._queue.put_nowait(item)

    def cancel(self) -> None:
        if self.finish is None:
            self._engine.cancel(self.seq_id)

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> list[int]:
        """Tokens arrive in batches (all that one engine step made for this sequence)."""
        if self.finish is not None:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Finished):
            self.finish = item
            if item.reason == "error":
                raise EngineError(item.error)
            raise StopAsyncIteration
        return item


@dataclass
class _Seq:
    seq_id: int
    req: GenerationRequest
    stream: TokenStream
    loop: asyncio.AbstractEventLoop
    tokens: list[int]
    arrival: int
    slot: int = -1
    kv_len: int = 0
    generated: int = 0
    last_step: int = -1
    pending_out: list[int] = field(default_factory=list)


class StepHistogram:
    """Counts of observations per bucket, written by the engine thread only and read by a metrics collector
    on another thread without a lock: each field is a plain int/float whose update is atomic under the GIL,
    so a reader may see one step's count without its sum (harmless for monitoring), and the hot path pays one
    bisect and two additions per step."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last: Prometheus' histogram shape."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            running += n
            out.append((bound, running))
        return out


# A CPU step of SmolLM2 takes ~10-40 ms, a GPU step of an 8B model ~10-30 ms; slow steps are what to see.
STEP_SECONDS_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class EngineStats:
    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    prefill_tokens_saved: int = 0
    max_batch: int = 0
    busy_seconds: float = 0.0
    post_seconds: float = 0.0  # the engine thread handing tokens to the event loops (`Engine._post`), not in busy
    # Gauges and counters for metrics (realtime/metrics.py), set by the engine thread as it goes.
    waiting: int = 0  # requests submitted but not yet in a KV slot
    live: int = 0  # sequences in a KV slot
    failed_requests: int = 0  # requests ended by an error (their own, or a failed step they were in)
    failed_steps: int = 0
    step_seconds: StepHistogram = field(default_factory=lambda: StepHistogram(STEP_SECONDS_BUCKETS))
    batch_size: StepHistogram = field(default_factory=lambda: StepHistogram(BATCH_BUCKETS))  # decode rows/step


class SlotPool:
    """KV slots: live ones belong to a sequence; finished ones stay cached (LRU) for prefix reuse."""

    def __init__(self, n: int) -> None:
        self.free: list[int] = list(range(n))
        self.cached: OrderedDict[int, list[int]] = OrderedDict()  # slot -> tokens with KV computed

    def available(self) -> bool:
        return bool(self.free or self.cached)

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        slot, _ = self.cached.popitem(last=False)
        return slot

    def release(self, slot: int, tokens: list[int]) -> None:
        if tokens:
            self.cached[slot] = tokens
        else:
            self.free.append(slot)

    def claim_cached(self, slot: int) -> None:
        self.cached.pop(slot, None)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    def __init__(self, backend: Backend, scheduler: SchedulerConfig, eos_ids: frozenset[int] = frozenset()):
        self.backend = backend
        self.cfg = scheduler
        self.eos_ids = eos_ids
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._arrivals = itertools.count()
        self._waiting: list[_Seq] = []
        self._live: dict[int, _Seq] = {}
        self._pool = SlotPool(backend.slots)
        # What this engine-thread pass has for the loops, in order, posted by `_post` in one call per loop.
        self._outbox: list[LoopCall] = []
        self._thread: threading.Thread | None = None
        # Service order for fairness: a strict sequence, so sequences served in the same step don't tie and
        # the least recently served one really goes first next time (exact round robin).
        self._served = itertools.count()
        self._closed = False

    # ---- loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="duet-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, req: GenerationRequest) -> TokenStream:
        if not req.prompt:
            raise ValueError("empty prompt")
        if len(req.prompt) >= self.backend.max_len:
            raise ValueError(f"prompt of {len(req.prompt)} tokens exceeds the {self.backend.max_len}-token cache")
        vocab = getattr(self.backend, "vocab", 0)
        # A token id outside the embedding table fails the whole batched step it runs in (on CUDA it is a
        # device-side assert that poisons the context): refuse it here, where it costs only this request.
        if vocab and not all(0 <= t < vocab for t in req.prompt):
            raise ValueError(f"prompt has token ids outside the model's vocabulary of {vocab}")
        if self._closed:
            raise EngineError("engine is closed")
        seq_id = next(self._ids)
        stream = TokenStream(self, seq_id)
        seq = _Seq(seq_id, req, stream, asyncio.get_running_loop(), list(req.prompt), next(self._arrivals))
        self._commands.put(("submit", seq))
        return stream

    def cancel(self, seq_id: int) -> None:
        self._commands.put(("cancel", seq_id))

    def live_sequences(self) -> int:
        return len(self._live) + len(self._waiting)

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        stats = self.stats
        while True:
            self._post()  # before `_drain` may block: what a cancel or the last step made goes out now
            idle = not self._live and not self._waiting
            if not self._drain(block=idle):
                self._post()
                break
            try:
                self._admit()
            except Exception:  # a bug here must not end the thread: every request would hang
                log.exception("engine admission failed")
            stats.waiting, stats.live = len(self._waiting), len(self._live)
            if not self._live:
                continue
            t0 = time.perf_counter()
            plan = self._plan()
            try:
                self._execute(plan)
            except Exception as exc:  # a model failure fails the step's requests, never the engine
                log.exception("engine step failed")
                stats.failed_steps += 1
                # Only the sequences this step ran: the forward wrote keys/values of no other slot, so the
                # rest go on. (Which row broke a batched forward cannot be told, so all of its rows fail.)
                for seq_id in {*(i for i, _ in plan.prefill), *plan.decode}:
                    seq = self._live.get(seq_id)
                    if seq is not None:
                        self._fail(seq, f"{type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - t0
            stats.busy_seconds += elapsed
            stats.step_seconds.observe(elapsed)
            self._flush_outputs()
            stats.waiting, stats.live = len(self._waiting), len(self._live)

    def _fail(self, seq: _Seq, error: str) -> None:
        self.stats.failed_requests += 1
        self._finish(seq, Finished("error", error))

    def _drain(self, block: bool) -> bool:
        try:
            cmd, arg = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if cmd == "stop":
                for seq in [*self._live.values(), *self._waiting]:
                    self._finish(seq, Finished("cancelled"))
                self._flush_outputs()
                return False
            if cmd == "submit":
                assert isinstance(arg, _Seq)
                self._waiting.append(arg)
            elif cmd == "cancel":
                self._cancel(arg)  # type: ignore[arg-type]
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _cancel(self, seq_id: int) -> None:
        for seq in self._waiting:
            if seq.seq_id == seq_id:
                self._waiting.remove(seq)
                self._deliver(seq, Finished("cancelled"))
                return
        seq = self._live.get(seq_id)
        if seq is not None:
            self._finish(seq, Finished("cancelled"))
            self._flush_outputs()

    def _admit(self) -> None:
        deferred = []
        while self._waiting and self._pool.available():
            seq = self._waiting.pop(0)
            if self._sibling_prefilling(seq):
                deferred.append(seq)
                continue
            src, n = self._best_prefix(seq.tokens)
            if n > 0 and src in self._pool.cached:
                # A finished sequence's slot: take it over in place; positions past n get overwritten.
                self._pool.claim_cached(src)
                slot = src
            else:
                slot = self._pool.take()
                if n > 0:  # the source is live: copy its computed prefix into our slot
                    try:
                        self.backend.copy_prefix(src, slot, n)
                    except Exception as exc:  # this request's copy: it fails alone, its slot goes back
                        log.exception("prefix copy failed")
                        self._pool.release(slot, [])
                        self.stats.failed_requests += 1
                        self._deliver(seq, Finished("error", f"{type(exc).__name__}: {exc}"))
                        continue
            seq.slot, seq.kv_len = slot, n
            seq.stream.reused_prefix = n
            self.stats.prefill_tokens_saved += n
            self._live[seq.seq_id] = seq
        self._waiting[:0] = deferred

    def _sibling_prefilling(self, seq: _Seq) -> bool:
        """A live sequence still prefilling a prefix we share (FB and AB of one turn start together):
        wait for its keys/values and copy them, rather than computing the same prefix twice."""
        for other in self._live.values():
            if other.kv_len < len(other.tokens) - 1:
                shared = common_prefix(other.tokens, seq.tokens)
                if shared - other.kv_len >= MIN_SHARED_PREFILL:
                    return True
        return False

    def _best_prefix(self, tokens: list[int]) -> tuple[int, int]:
        """The slot sharing the longest computed prefix with `tokens` (at least one token left to run)."""
        best, best_n = -1, 0
        limit = len(tokens) - 1
        candidates = [(s.slot, s.tokens[: s.kv_len]) for s in self._live.values()]
        candidates += list(self._pool.cached.items())
        for slot, cached in candidates:
            n = min(common_prefix(cached, tokens), limit)
            if n > best_n:
                best, best_n = slot, n
        return best, best_n

    def _plan(self) -> StepPlan:
        views = []
        for seq in list(self._live.values()):
            try:
                ahead = seq.req.audio_ahead_ms() if seq.req.audio_ahead_ms is not None else 0.0
            except Exception as exc:  # the request's own callback (its pacer): it fails alone
                log.exception("audio_ahead_ms of sequence %d failed", seq.seq_id)
                self._fail(seq, f"{type(exc).__name__}: {exc}")
                continue
            # Prefill computes every prompt token but the last; the decode step consumes that one.
            views.append(SeqView(seq.seq_id, seq.req.session_id, seq.req.brain, len(seq.tokens) - 1 - seq.kv_len,
                                 ahead, seq.last_step, seq.arrival))
        return schedule(views, self.cfg)

    def _execute(self, plan: StepPlan) -> None:
        self.stats.steps += 1
        # (sequence, first position, tokens) of each prefill chunk; state changes only once its forward ran.
        chunks = []
        for seq_id, n in plan.prefill:
            seq = self._live[seq_id]
            chunks.append((seq, seq.kv_len, seq.tokens[seq.kv_len: seq.kv_len + n]))
        completes = {seq.seq_id for seq, start, chunk in chunks if start + len(chunk) == len(seq.tokens) - 1}
        decode = list(plan.decode)
        # A prompt whose prefill completes in this step decodes in it too: its first token comes a step sooner,
        # and it shares the batched forward rather than costing one of its own.
        for i, _ in plan.prefill:
            if len(decode) < self.cfg.max_batch and i in completes:
                decode.append(i)
        seqs = [self._live[i] for i in decode]
        if chunks and getattr(self.backend, "ragged", False):
            logits = self._forward_ragged(chunks, seqs)  # the whole step: one pass over the weights
            self._prefilled(chunks)
        else:
            if chunks:
                self._prefill_batched(chunks)
                self._prefilled(chunks)
            if seqs:
                logits = self._forward([(s, s.kv_len, [s.tokens[s.kv_len]]) for s in seqs])
        if seqs:
            self.stats.decode_tokens += len(seqs)
            self.stats.max_batch = max(self.stats.max_batch, len(seqs))
            self.stats.batch_size.observe(len(seqs))
            # One batched argmax (a single device->host sync on GPU) for all greedy rows.
            greedy = logits.argmax(dim=-1).tolist()
            for row, seq in enumerate(seqs):
                seq.kv_len += 1
                seq.last_step = next(self._served)
                t = seq.req.temperature
                try:
                    token = greedy[row] if t <= 0 else self._sample(logits[row], t)
                except Exception as exc:  # one row's sampling (NaN logits, a bad temperature): that row only
                    log.exception("sampling sequence %d failed", seq.seq_id)
                    self._fail(seq, f"{type(exc).__name__}: {exc}")
                    continue
                self._accept(seq, token)

    def _prefilled(self, chunks: list[tuple[_Seq, int, list[int]]]) -> None:
        for seq, _, chunk in chunks:
            seq.kv_len += len(chunk)
            seq.last_step = next(self._served)
            self.stats.prefill_tokens += len(chunk)

    def _prefill_batched(self, chunks: list[tuple[_Seq, int, list[int]]]) -> None:
        """All chunks as the rows of one forward, padded to the longest. A padding token of row b lands at a
        position after the row's chunk, in the row's own slot: no real token of this forward attends to it
        (each sees positions <= its own), and the sequence's next token is written there before anything reads
        it (the KV cache is filled in position order, and only positions < kv_len count as computed, for prefix
        reuse too). A row whose padding would pass the end of the cache runs on its own, unpadded. The logits are
        not used: the decode consumes a prompt's last token."""
        width = max(len(c) for _, _, c in chunks)
        batch = [c for c in chunks if c[1] + width <= self.backend.max_len]
        alone = [c for c in chunks if c[1] + width > self.backend.max_len]
        for group in ([batch] if batch else []) + [[c] for c in alone]:
            self._forward(group)

    def _forward(self, rows: list[tuple[_Seq, int, list[int]]]) -> torch.Tensor:
        """Rows of (sequence, first position, tokens), padded to the longest: logits of each row's last column."""
        # Built as lists, then one tensor each: a torch call per row (up to 256 rows a decode step) releases and
        # retakes the GIL every time, and beside busy Python threads each retake waits (bench/engine_host.py).
        width = max(len(c) for _, _, c in rows)
        tokens = torch.tensor([[*chunk, *([0] * (width - len(chunk)))] for _, _, chunk in rows], dtype=torch.long)
        positions = torch.tensor([range(start, start + width) for _, start, _ in rows], dtype=torch.long)
        slots = torch.tensor([s.slot for s, _, _ in rows], dtype=torch.long)
        kv_len = max(start for _, start, _ in rows) + width
        return self.backend.forward(tokens, positions, slots, kv_len)

    def _forward_ragged(self, chunks: list[tuple[_Seq, int, list[int]]], seqs: list[_Seq]) -> torch.Tensor:
        """The prefill chunks, then one token per decode row (a row whose prefill completes here comes after its
        chunk, at the next position), flattened into one call; logits for the decode rows."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        after = {}
        for seq, start, chunk in chunks:
            tokens += chunk
            positions += range(start, start + len(chunk))
            slots += [seq.slot] * len(chunk)
            after[seq.seq_id] = start + len(chunk)
        rows = []
        for seq in seqs:
            pos = after.get(seq.seq_id, seq.kv_len)
            rows.append(len(tokens))
            tokens.append(seq.tokens[pos])
            positions.append(pos)
            slots.append(seq.slot)
        backend: RaggedBackend = self.backend  # type: ignore[assignment]
        return backend.forward_ragged(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots),
                                      torch.tensor(rows, dtype=torch.long))

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float) -> int:
        if temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1))

    def _accept(self, seq: _Seq, token: int) -> None:
        seq.tokens.append(token)
        seq.generated += 1
        if token in seq.req.stop_ids or token in self.eos_ids:
            self._finish(seq, Finished("stop"))
            return
        seq.pending_out.append(token)
        if seq.generated >= seq.req.max_new_tokens or len(seq.tokens) >= self.backend.max_len:
            self._finish(seq, Finished("length"))

    def _finish(self, seq: _Seq, result: Finished) -> None:
        self._live.pop(seq.seq_id, None)
        if seq.slot >= 0:
            self._pool.release(seq.slot, seq.tokens[: seq.kv_len])
            seq.slot = -1
        if seq.pending_out:
            self._deliver(seq, seq.pending_out)
            seq.pending_out = []
        self._deliver(seq, result)

    def _flush_outputs(self) -> None:
        for seq in self._live.values():
            if seq.pending_out:
                self._deliver(seq, seq.pending_out)
                seq.pending_out = []

    def _deliver(self, seq: _Seq, item: list[int] | Finished) -> None:
        self._outbox.append((seq.loop, seq.stream._deliver, (item,)))

    def _post(self) -> None:
        """Hand the outbox to the loops: one `call_soon_threadsafe` per loop, not one per sequence. Each call writes
        the loop's wake-up socket (a syscall that releases the GIL) and queues a callback; per sequence that was up
        to 256 of each per step at 128 sessions. bench/engine_host.py: a few per cent of a 10 ms pass at
        64–256 rows (docs/benchmarks.md 7d); beside busy Python threads the GIL wait dwarfs it. Order per stream
        is kept."""
        if not self._outbox:
            return
        t0 = time.perf_counter()
        outbox, self._outbox = self._outbox, []
        post_by_loop(outbox)
        self.stats.post_seconds += time.perf_counter() - t0


# A call to make on an event loop: (the loop, fn, args).
LoopCall = tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...]]


def post_by_loop(calls: list[LoopCall]) -> None:
    """Make each call on its loop, in order, with one `call_soon_threadsafe` per loop (not one per call):
    the engines' way of handing a pass's tokens to the sessions. A loop that is gone (shutdown) is skipped."""
    batches: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[Callable[..., Any], tuple[Any, ...]]]]] = {}
    for loop, fn, args in calls:
        batches.setdefault(id(loop), (loop, []))[1].append((fn, args))
    for loop, batch in batches.values():
        with contextlib.suppress(RuntimeError):  # that loop is gone; nobody is listening
            loop.call_soon_threadsafe(_run_all, batch)


def _run_all(batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    """On the loop: one pass's deliveries for its streams, in the order they were made."""
    for fn, args in batch:
        fn(*args)
