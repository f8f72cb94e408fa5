"""What one process shares among all sessions: the models, the engine and the worker threads.

Models load once, here; sessions only hold per-stream state. Blocking model work (VAD, Whisper,
Piper) runs in thread pools and the LLM on the engine's own thread, so the event loop only routes
events and never computes.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import math
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from brains.engine import GenerationEngine, GenerationRequest
from brains.load import load_engine
from brains.prompts import PromptBuilder
from common.audio import SPEECH_RATE
from common.config import DuetConfig
from realtime.speech_in.asr import Transcriber, load_listener
from realtime.speech_in.smart_turn import SmartTurn
from realtime.speech_in.vad import SileroVad
from realtime.speech_in.vad_batch import VadBatcher
from tts.synthesizer import Synthesizer

# Why a Whisper pass runs: a committed turn or an added item ("final"), the silence window's guess ("speculative"),
# a partial transcript while the user speaks ("partial").
AsrPassKind = Literal["final", "speculative", "partial"]
ASR_PASS_KINDS: tuple[AsrPassKind, ...] = ("final", "speculative", "partial")

log = logging.getLogger(__name__)
T = TypeVar("T")

# Whose work a pool call is: `Session.start` sets it to the session's id, and every task the session's
# connection spawns afterwards inherits it (asyncio copies the context into each new task), so `run_in`
# can queue work per session without every call site naming its session.
work_owner: contextvars.ContextVar[str] = contextvars.ContextVar("duet_work_owner", default="")


class FairPool:
    """Dispatch of one executor's work among owners (sessions): earliest deadline first, round-robin on ties.

    The VAD, ASR and TTS executors are shared by every session. Submitted straight to the executor, work runs
    first come first served, so a session that queues many jobs (audio items to transcribe, a burst of input)
    makes every other session wait behind all of them. Here each owner has its own queue, ordered by deadline,
    and at most `workers` jobs are in the executor at once. The next job is the owners' earliest head deadline;
    owners whose heads tie (jobs without a deadline are all `inf`) take turns, so a session waits behind at
    most one job of each other session. Deadlines let urgent work pass: the first audio chunk of a reply (a
    listener waiting in silence) goes before a later chunk of another reply whose listener still has
    seconds of audio queued, as the engine orders its urgent rows."""

    def __init__(self, executor: Executor, workers: int = 1) -> None:
        self.executor = executor
        self.workers = workers
        # Per owner, a heap of (deadline, seq, future, fn, args); seq keeps equal deadlines first come first
        # served and means futures are never compared.
        self._queues: OrderedDict[str, list[tuple[float, int, asyncio.Future[Any], Callable[..., Any],
                                                  tuple[Any, ...]]]] = OrderedDict()
        self._seq = itertools.count()
        self._running = 0
        self.peak = 0  # most jobs in the executor at once: shows the pool's parallelism was used

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def run(self, owner: str, fn: Callable[..., T], *args: Any, deadline: float = math.inf) -> T:
        """`fn(*args)` on the executor; `deadline` (a time.perf_counter() value) orders it: sooner runs first."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queues.setdefault(owner, []), (deadline, next(self._seq), fut, fn, args))
        self._pump()
        return await fut  # cancelling the caller cancels fut: a job not yet started is skipped

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running < self.workers and self._queues:
            # min() keeps the first of equal keys, and owners that just ran are at the end: round-robin on ties.
            owner = min(self._queues, key=lambda o: self._queues[o][0][0])
            queue = self._queues[owner]
            _, _, fut, fn, args = heapq.heappop(queue)
            if queue:
                self._queues.move_to_end(owner)  # this owner's next job waits for everyone else's turn
            else:
                del self._queues[owner]
            if fut.done():
                continue
            self._running += 1
            self.peak = max(self.peak, self._running)
            job = loop.run_in_executor(self.executor, fn, *args)
            job.add_done_callback(lambda j, fut=fut: self._finished(j, fut))  # type: ignore[misc]

    def _finished(self, job: asyncio.Future[Any], fut: asyncio.Future[Any]) -> None:
        self._running -= 1
        if not fut.done():
            if job.cancelled():
                fut.cancel()
            elif job.exception() is not None:
                fut.set_exception(job.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(job.result())
        self._pump()


def pool_workers(configured: int, cores: int | None = None, per_worker_threads: int = 1, cap: int = 4) -> int:
    """Threads for a model pool: `configured` when set (> 0), else as many as the cores hold at
    `per_worker_threads` each, at most `cap` (more would only contend with the engine and each other)."""
    if configured > 0:
        return configured
    cores = cores or os.cpu_count() or 1
    return max(1, min(cap, cores // max(1, per_worker_threads)))


class LoopMonitor:
    """How busy the event loop is, sampled cheaply from the loop itself.

    Every `interval_s` a task on the loop reads the loop thread's CPU time (`time.thread_time`): its growth over
    wall time is the loop's busy share (parsing, routing, encoding events; time the loop waits for the GIL is
    not counted, which is what the engine and model threads hold). The task's own wake-up delay is the loop's
    lag: how late any callback would run. Both are read by realtime/metrics.py at scrape time."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.busy_seconds = 0.0  # loop-thread CPU seconds since start (a counter: its rate is the busy share)
        self.busy_ratio = 0.0  # over the last ~5 s
        self.lag_max_s = 0.0  # worst wake-up delay over the last ~5 s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample(), name="duet-loop-monitor")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _sample(self) -> None:
        window: deque[tuple[float, float, float]] = deque()  # (wall, cpu, lag) per sample
        wall, cpu = time.perf_counter(), time.thread_time()
        window.append((wall, cpu, 0.0))
        while True:
            await asyncio.sleep(self.interval_s)
            now, now_cpu = time.perf_counter(), time.thread_time()
            lag = max(0.0, now - wall - self.interval_s)
            self.busy_seconds += now_cpu - cpu
            wall, cpu = now, now_cpu
            window.append((now, now_cpu, lag))
            while len(window) > 2 and window[0][0] < now - 5.0:
                window.popleft()
            first_wall, first_cpu, _ = window[0]
            span = now - first_wall
            self.busy_ratio = (now_cpu - first_cpu) / span if span > 0 else 0.0
            self.lag_max_s = max(x[2] for x in window)


@dataclass(frozen=True)
class TurnReport:
    """One finished response, as observers see it (metrics, transcripts): built by `Response` when its
    response.done goes out. Times are wall-clock seconds (time.time()); `metrics` is the response's
    `duet.turn.metrics` dict (milliseconds after the turn was committed)."""

    session_id: str
    response_id: str
    status: str  # completed | cancelled | failed | incomplete
    user_item_id: str | None  # the user turn this answers (None: a response.create with no user item)
    user_text: str
    item_id: str  # the assistant message
    assistant_text: str  # as heard: a cut reply keeps only what was played
    started_at: float  # the turn's commit (or the response's start)
    finished_at: float
    metrics: dict[str, Any] = field(default_factory=dict)


class RuntimeObserver(Protocol):
    """Told about every finished turn of every session (realtime/metrics.py, realtime/transcripts.py). Runs on
    the event loop: it must only count or hand work to a thread."""

    def turn_finished(self, report: TurnReport) -> None: ...


class SessionObserver(Protocol):
    """Sees every server event of every session, and each session's end (realtime/bus). `session_event` runs
    inside the session's emit, on the voice path: it must only look and queue, never wait."""

    def session_event(self, session: Any, event: Any) -> None: ...

    def session_closed(self, session: Any) -> None: ...


class ServerToolExecutor(Protocol):
    """Runs the functions the server itself offers the model (realtime/bus: MQTT tools). A session hands it
    each such call of a finished response and gives the model its result, as a client would. Which functions
    are the server's is configuration (`[[mqtt.tools]]` -> `SessionSettings.server_tools`)."""

    async def call(self, session_id: str, call_id: str, name: str, arguments: str) -> str:
        """The call's output (a JSON text); failures and timeouts are outputs too (an "error" field)."""
        ...


class _ObservedEmit:
    """A session's emit with its observers looking on. `__self__` is the wrapped emit's owner, as if this were
    still that bound method: realtime/lifecycle.py finds the transport's outbox that way."""

    def __init__(self, runtime: Runtime, session: Any, emit: Callable[[Any], None]) -> None:
        self.rt, self.session, self.inner = runtime, session, emit

    @property
    def __self__(self) -> Any:
        return getattr(self.inner, "__self__", None)

    def __call__(self, event: Any) -> None:
        self.inner(event)
        for observer in self.rt.session_observers:
            try:
                observer.session_event(self.session, event)
            except Exception:
                log.exception("session observer %r failed", observer)


@dataclass
class Runtime:
    config: DuetConfig
    vad: SileroVad
    listener: Transcriber
    synthesizer: Synthesizer
    engine: GenerationEngine
    prompts: PromptBuilder
    asr_pool: ThreadPoolExecutor
    tts_pool: ThreadPoolExecutor
    # Open sessions by id, registered by the server; one registry, so rate_limits.updated can count them.
    sessions: dict[str, object] = field(default_factory=dict)
    asr_inflight: int = 0  # transcriptions queued or running (optional ones start only below a share: asr_has_room)
    # Whisper passes asked for, by why (`transcribe`'s kind), and replies started on speculative transcripts
    # (`Prefetch`): /metrics, so a benchmark can tell what optional work the sessions added at a load.
    asr_passes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ASR_PASS_KINDS, 0))
    prefetches_started: int = 0
    warmed: bool = False  # every model ran once (`warm`): the process is ready for sessions (/readyz)
    observers: list[RuntimeObserver] = field(default_factory=list)
    session_observers: list[SessionObserver] = field(default_factory=list)
    server_tools: ServerToolExecutor | None = None  # functions the server runs itself (MQTT tools)
    smart_turn: SmartTurn | None = None  # semantic_vad's turn model; None: semantic_vad runs as server_vad
    _fair: dict[int, FairPool] = field(default_factory=dict)  # per executor, made on first use
    loop_monitor: LoopMonitor = field(default_factory=LoopMonitor)  # started by `warm`, on the loop
    # Silero for every session on one thread, a batched model call per round (speech_in/vad_batch.py).
    vad_batcher: VadBatcher = field(default_factory=VadBatcher)

    @classmethod
    def load(cls, config: DuetConfig) -> Runtime:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Every torch call and every socket call releases the GIL; at the default 5 ms switch interval the engine
        # thread waits behind the event loop between kernels (measured on an H100: p95 first token 6.4 s at 64
        # sessions), and the loop behind the other threads between receives (common/config.py ServerConfig).
        sys.setswitchinterval(config.server.gil_switch_interval_ms / 1000)
        t0 = time.perf_counter()
        engine, prompts = load_engine(config)
        # Concurrent turns are transcribed and replies synthesized in parallel: one ASR thread per CTranslate2
        # worker (the Listener holds as many model replicas) or, with asr.engine = "torch", threads that only queue
        # their turn for its one batching worker; TTS threads sized to the cores. Both models release the GIL
        # while they compute. VAD is one thread that batches every session's frames (VadBatcher).
        asr_workers = max(1, config.asr.workers)
        tts_workers = pool_workers(config.tts.workers, per_worker_threads=config.tts.threads)
        runtime = cls(
            config=config, vad=SileroVad.load(), listener=load_listener(config.asr),
            synthesizer=Synthesizer.load(config.tts), engine=engine, prompts=prompts,
            asr_pool=ThreadPoolExecutor(asr_workers, thread_name_prefix="duet-asr"),
            tts_pool=ThreadPoolExecutor(tts_workers, thread_name_prefix="duet-tts"),
            smart_turn=_load_smart_turn(config),
        )
        engine.start()
        log.info("runtime ready in %.1fs (%d ASR, %d TTS workers)", time.perf_counter() - t0, asr_workers, tts_workers)
        return runtime

    async def warm(self) -> None:
        """Prefill both system-prompt variants once, so the first turn of every session finds them in the
        engine's prefix cache, and run each model once so lazy initialisation is off the first turn."""
        self.loop_monitor.start()  # here because warm runs on the serving loop
        for thinking in (False, True):
            prompt = self.prompts.conversation([], None, thinking)
            async for _ in self.engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=1)):
                pass
        await self.transcribe(np.zeros(SPEECH_RATE, dtype=np.float32))  # 1 s of silence
        await self.run_in(self.tts_pool, self.synthesizer.synthesize, "Ready.")
        self.warmed = True

    def turn_finished(self, report: TurnReport) -> None:
        """Tell every observer; a failing observer is logged and never fails the response."""
        for observer in self.observers:
            try:
                observer.turn_finished(report)
            except Exception:
                log.exception("turn observer %r failed", observer)

    def observe(self, session: Any, emit: Callable[[Any], None]) -> Callable[[Any], None]:
        """`emit` as the session should call it: with session observers, each also sees every event."""
        return _ObservedEmit(self, session, emit) if self.session_observers else emit

    def session_closed(self, session: Any) -> None:
        for observer in self.session_observers:
            try:
                observer.session_closed(session)
            except Exception:
                log.exception("session observer %r failed", observer)

    def asr_has_room(self, share: float = 1.0) -> bool:
        """Can optional ASR work start without queueing: fewer turns in Whisper than `share` of the ASR threads.
        (One thread on the CPU stack: only when Whisper is idle. With `asr.engine = "torch"` the threads only
        wait on the GPU's batched decode, and there are many: speculation rides along in the batch.) Partial
        transcripts ask for half: on the H200 at 64 sessions, partials every 500 ms filled the batches (ASR queue
        peak 60) and final transcripts waited behind them (p50 743 ms)."""
        return self.asr_inflight < max(1, int(self.asr_pool._max_workers * share))

    def transcribe(self, audio16k: np.ndarray, kind: AsrPassKind = "final") -> asyncio.Task[str]:
        """Whisper on `audio16k` in the ASR pool, as a task to await. Counted in `asr_inflight` from this call on,
        not from when the task first runs: sessions woken by one VAD round all check `asr_has_room` before any
        of their tasks starts, and must see each other's claims. `kind`: why (counted in `asr_passes`)."""
        self.asr_passes[kind] += 1
        self.asr_inflight += 1
        task = asyncio.ensure_future(self.run_in(self.asr_pool, self.listener.transcribe, audio16k))
        task.add_done_callback(self._transcribed)
        return task

    def _transcribed(self, _task: asyncio.Task[str]) -> None:
        self.asr_inflight -= 1

    async def run_in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any,
                     deadline: float = math.inf) -> T:
        """Run `fn` on `pool`, taking turns with the other sessions' work (`FairPool`, `work_owner`); a sooner
        `deadline` (time.perf_counter()) runs first."""
        return await self.fair(pool).run(work_owner.get(), fn, *args, deadline=deadline)

    def fair(self, pool: ThreadPoolExecutor) -> FairPool:
        fair = self._fair.get(id(pool))
        if fair is None:
            fair = self._fair[id(pool)] = FairPool(pool, pool._max_workers)
        return fair

    def close(self) -> None:
        self.engine.close()
        self.vad_batcher.close()
        if self.listener is not None:  # None only in tests that stand in for the runtime
            self.listener.close()
        for pool in (self.asr_pool, self.tts_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def _load_smart_turn(config: DuetConfig) -> SmartTurn | None:
    """Always loaded (8.7 MB), since any client may ask for semantic_vad; required only when it is the default."""
    try:
        return SmartTurn.load()
    except FileNotFoundError as exc:
        if config.vad.turn_detection == "semantic_vad":
            raise
        log.warning("semantic_vad will run as server_vad: %s", exc)
        return None
