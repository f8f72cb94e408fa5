"""What one process shares among all sessions: the models, the engine and the worker threads.

Models load once, here; sessions only hold per-stream state. Blocking model work (VAD, Whisper,
Piper) runs in thread pools and the LLM on the engine's own thread, so the event loop only routes
events and never computes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from brains.backends.loader import load_decoder, load_tokenizer
from brains.backends.torch_backend import TorchBackend
from brains.engine import Engine, GenerationEngine, GenerationRequest
from brains.prompts import PromptBuilder
from brains.scheduler import SchedulerConfig
from common.audio import SPEECH_RATE
from common.config import DuetConfig
from realtime.speech_in.asr import Listener
from realtime.speech_in.smart_turn import SmartTurn
from realtime.speech_in.vad import SileroVad
from tts.synthesizer import Synthesizer

log = logging.getLogger(__name__)
T = TypeVar("T")

# Whose work a pool call is: `Session.start` sets it to the session's id, and every task the session's
# connection spawns afterwards inherits it (asyncio copies the context into each new task), so `run_in`
# can queue work per session without every call site naming its session.
work_owner: contextvars.ContextVar[str] = contextvars.ContextVar("duet_work_owner", default="")


class FairPool:
    """Round-robin dispatch of one executor's work among owners (sessions).

    The VAD, ASR and TTS executors each have one thread shared by every session. Submitted straight to the
    executor, work runs first come first served, so a session that queues many jobs (audio items to
    transcribe, a burst of input) makes every other session wait behind all of them. Here each owner has its
    own queue, and at most `workers` jobs are in the executor at once, taken from the owners in turn: a
    session waits behind at most one job of each other session."""

    def __init__(self, executor: Executor, workers: int = 1) -> None:
        self.executor = executor
        self.workers = workers
        self._queues: OrderedDict[str, deque[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]]] = \
            OrderedDict()
        self._running = 0

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def run(self, owner: str, fn: Callable[..., T], *args: Any) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(owner, deque()).append((fut, fn, args))
        self._pump()
        return await fut  # cancelling the caller cancels fut: a job not yet started is skipped

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running < self.workers and self._queues:
            owner, queue = next(iter(self._queues.items()))
            fut, fn, args = queue.popleft()
            if queue:
                self._queues.move_to_end(owner)  # this owner's next job waits for everyone else's turn
            else:
                del self._queues[owner]
            if fut.done():
                continue
            self._running += 1
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
    listener: Listener
    synthesizer: Synthesizer
    engine: GenerationEngine
    prompts: PromptBuilder
    asr_pool: ThreadPoolExecutor
    tts_pool: ThreadPoolExecutor
    vad_pool: ThreadPoolExecutor
    # Open sessions by id, registered by the server; one registry, so rate_limits.updated can count them.
    sessions: dict[str, object] = field(default_factory=dict)
    asr_inflight: int = 0  # transcriptions queued or running (speculative ones only start when it is 0)
    warmed: bool = False  # every model ran once (`warm`): the process is ready for sessions (/readyz)
    observers: list[RuntimeObserver] = field(default_factory=list)
    session_observers: list[SessionObserver] = field(default_factory=list)
    server_tools: ServerToolExecutor | None = None  # functions the server runs itself (MQTT tools)
    smart_turn: SmartTurn | None = None  # semantic_vad's turn model; None: semantic_vad runs as server_vad
    _fair: dict[int, FairPool] = field(default_factory=dict)  # per executor, made on first use

    @classmethod
    def load(cls, config: DuetConfig) -> Runtime:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Every torch call releases the GIL; at the default 5 ms switch interval the engine thread waits
        # behind the event loop between kernels (measured on an H100: p95 first token 6.4 s at 64 sessions).
        sys.setswitchinterval(0.001)
        t0 = time.perf_counter()
        if config.llm.backend == "vllm":
            engine, prompts = _vllm_engine(config)
        elif config.llm.backend == "remote":
            engine, prompts = _remote_engine(config)
        else:
            decoder, tokenizer = load_decoder(config.llm)
            prompts = PromptBuilder(tokenizer, config.llm, config.mind)
            gpu = decoder.device.type == "cuda"
            backend = TorchBackend(decoder, config.llm.max_slots, cuda_graphs=gpu and config.llm.cuda_graphs,
                                   compile=gpu and config.llm.compile, logits_on_device=gpu)
            engine = Engine(backend, SchedulerConfig(
                token_budget=config.llm.step_token_budget, max_batch=config.llm.max_slots,
                prefill_chunk=config.llm.prefill_chunk, urgent_audio_ms=config.mind.urgent_audio_ms),
                eos_ids=prompts.stop_ids)
        runtime = cls(
            config=config, vad=SileroVad.load(), listener=Listener.load(config.asr),
            synthesizer=Synthesizer.load(config.tts), engine=engine, prompts=prompts,
            # One ASR and one TTS worker: on small CPUs more threads only contend with the engine.
            asr_pool=ThreadPoolExecutor(1, thread_name_prefix="duet-asr"),
            tts_pool=ThreadPoolExecutor(1, thread_name_prefix="duet-tts"),
            vad_pool=ThreadPoolExecutor(1, thread_name_prefix="duet-vad"),
            smart_turn=_load_smart_turn(config),
        )
        engine.start()
        log.info("runtime ready in %.1fs", time.perf_counter() - t0)
        return runtime

    async def warm(self) -> None:
        """Prefill both system-prompt variants once, so the first turn of every session finds them in the
        engine's prefix cache, and run each model once so lazy initialisation is off the first turn."""
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

    async def transcribe(self, audio16k: np.ndarray) -> str:
        self.asr_inflight += 1
        try:
            return await self.run_in(self.asr_pool, self.listener.transcribe, audio16k)
        finally:
            self.asr_inflight -= 1

    async def run_in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on `pool`, taking turns with the other sessions' work (`FairPool`, `work_owner`)."""
        fair = self._fair.get(id(pool))
        if fair is None:
            fair = self._fair[id(pool)] = FairPool(pool, pool._max_workers)
        return await fair.run(work_owner.get(), fn, *args)

    def close(self) -> None:
        self.engine.close()
        for pool in (self.asr_pool, self.tts_pool, self.vad_pool):
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


def _vllm_engine(config: DuetConfig) -> tuple[GenerationEngine, PromptBuilder]:
    """llm.backend = "vllm": vLLM's engine on llm.model (a Hugging Face folder), the prompts from its tokenizer.
    vLLM is imported only here, so the torch stack never needs it installed."""
    from brains.backends.vllm_engine import VllmEngine

    prompts = PromptBuilder(load_tokenizer(config.llm), config.llm, config.mind)
    engine = VllmEngine(config.llm, urgent_audio_ms=config.mind.urgent_audio_ms, eos_ids=prompts.stop_ids)
    return engine, prompts


def _remote_engine(config: DuetConfig) -> tuple[GenerationEngine, PromptBuilder]:
    """llm.backend = "remote": an OpenAI-compatible completions server at llm.remote_url. Only the tokenizer is
    loaded here (llm.model: the served model's, so our prompt ids are the server's and detokenization stays ours)."""
    from brains.backends.remote import RemoteEngine

    prompts = PromptBuilder(load_tokenizer(config.llm), config.llm, config.mind)
    engine = RemoteEngine(config.llm, urgent_audio_ms=config.mind.urgent_audio_ms, eos_ids=prompts.stop_ids)
    return engine, prompts
