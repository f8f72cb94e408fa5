"""The brains on vLLM: the same surface as `brains.engine.Engine`, on vLLM's in-process async engine.

`VllmEngine` runs vLLM's `AsyncLLM` on an event loop of its own thread (vLLM's EngineCore runs in its own
process below it), so sessions on any loop submit `GenerationRequest`s and read the same `TokenStream`s as
with the torch engine, and vLLM's output processing never runs on the sessions' loop.

What vLLM does for the mind-paced design:
- automatic prefix caching: the AB prompt of segment n starts with the FB's whole thought prefix, whose KV
  blocks vLLM finds by hash and reuses (`num_cached_tokens`, counted in `stats.prefill_tokens_saved`);
- priority scheduling: `request_priority` maps the mind-paced policy (`brains.scheduler.rank`) onto vLLM's
  integer priority (lower runs first): AB segments of sessions close to running out of audio first, then
  FB thought, then AB segments with plenty of audio queued. vLLM reads a priority once, at submission,
  where the torch engine re-reads the audio clock every step: a new AB segment is a new request, so the
  priority is refreshed at each segment;
- cancellation: `cancel` aborts the request in vLLM at once (barge-in frees its batch slot and KV blocks).

vLLM is imported only in `start()`: the module imports without it (the main environment has no vLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from brains.engine import EngineStats, Finished, GenerationRequest, TokenStream
from brains.scheduler import rank
from common.config import LlmConfig
from common.errors import EngineError

log = logging.getLogger(__name__)

# vLLM's finish reasons as Duet's (anything else, e.g. "error", becomes an error).
_VLLM_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


def request_priority(req: GenerationRequest, urgent_audio_ms: float) -> int:
    """vLLM priority (lower runs first) of a request: `brains.scheduler.rank`, the torch engine's policy,
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


def engine_args(cfg: LlmConfig) -> dict[str, Any]:
    """`AsyncEngineArgs` keywords for `cfg`: Duet's [llm] knobs mapped onto vLLM's."""
    if cfg.model == "smollm2-gguf":
        raise EngineError("the vLLM backend reads Hugging Face folders, not the bundled GGUF: write one with "
                          "`duet export-hf --out DIR` and set llm.model = DIR (see configs/vllm.toml)")
    args: dict[str, Any] = dict(
        model=cfg.model, tokenizer=cfg.model, dtype=cfg.dtype,
        enable_prefix_caching=True, scheduling_policy="priority",
        max_model_len=cfg.max_seq_len, max_num_seqs=cfg.max_slots,
        # The step's token budget and the per-request prefill chunk, as in the torch engine's scheduler.
        max_num_batched_tokens=max(cfg.step_token_budget, cfg.max_slots),
        long_prefill_token_threshold=cfg.prefill_chunk,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        # On CPU, compiling the model costs minutes of startup; on GPU, cuda_graphs=false runs eagerly.
        enforce_eager=cfg.device == "cpu" or not cfg.cuda_graphs,
        # Per-request prefix-cache hits come with every output; vLLM's periodic stat logging is not needed.
        disable_log_stats=True,
        # Sampling is exactly what each request says, never the model folder's generation_config defaults.
        generation_config="vllm",
    )
    if cfg.device == "cpu":
        # Prefix-cache hits land on block boundaries: vLLM's CPU default of 128-token blocks would prefill up
        # to 127 tokens of each AB segment's shared thought prefix again (CPU kernels want multiples of 32).
        args["block_size"] = 32
    if cfg.vllm_kv_cache_gib > 0:
        args["kv_cache_memory_bytes"] = int(cfg.vllm_kv_cache_gib * (1 << 30))
    return args


@dataclass
class _Seq:
    seq_id: int
    request_id: str
    req: GenerationRequest
    stream: TokenStream
    loop: asyncio.AbstractEventLoop
    stops: frozenset[int]
    priority: int
    task: asyncio.Task[None] | None = None
    finished: bool = False
    cached: int = 0


class VllmEngine:
    """`Engine`'s public surface (start, close, submit, cancel, live_sequences, stats, eos_ids) on vLLM.

    `stats` holds what vLLM lets us see per request: tokens generated (`decode_tokens`), prompt tokens computed
    (`prefill_tokens`) and found in the prefix cache (`prefill_tokens_saved`), and the most sequences live at
    once (`max_batch`). vLLM's steps happen in its EngineCore process: `steps` and `busy_seconds` stay 0.
    """

    def __init__(self, cfg: LlmConfig, urgent_audio_ms: float = 1500.0, eos_ids: frozenset[int] = frozenset(),
                 extra_args: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.urgent_audio_ms = urgent_audio_ms
        self.eos_ids = eos_ids
        self.stats = EngineStats()
        self.max_len = cfg.max_seq_len
        self._args = {**engine_args(cfg), **(extra_args or {})}
        self._ids = itertools.count(1)
        self._seqs: dict[int, _Seq] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._llm: Any = None
        self._prompt: Callable[[list[int]], Any] = lambda ids: {"prompt_token_ids": ids}
        self._closed = False

    # ---- caller side --------------------------------------------------------------------------
    def start(self) -> None:
        """Build vLLM's engine (loads the model; blocks until it is ready)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="duet-vllm", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._closed = True
            raise EngineError(f"vLLM failed to start: {type(failure[0]).__name__}: {failure[0]}") from failure[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, req: GenerationRequest) -> TokenStream:
        if not req.prompt:
            raise ValueError("empty prompt")
        if len(req.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(req.prompt)} tokens exceeds the {self.max_len}-token context")
        loop = self._loop
        if self._closed or loop is None or loop.is_closed():
            raise EngineError("engine is closed" if self._closed else "engine is not started")
        seq_id = next(self._ids)
        stream = TokenStream(self, seq_id)
        seq = _Seq(seq_id, f"duet-{seq_id}", req, stream, asyncio.get_running_loop(),
                   frozenset(req.stop_ids) | self.eos_ids, request_priority(req, self.urgent_audio_ms))
        with self._lock:
            self._seqs[seq_id] = seq
            self.stats.max_batch = max(self.stats.max_batch, len(self._seqs))
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

    # ---- vLLM thread --------------------------------------------------------------------------
    async def _open(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:  # vLLM >= 0.2x: a rendered token input skips vLLM's prompt parsing
            from vllm.inputs.engine import tokens_input

            self._prompt = tokens_input
        except ImportError:
            self._prompt = lambda ids: {"prompt_token_ids": ids}
        log.info("starting vLLM: %s", self._args)
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._args))

    def _start_seq(self, seq: _Seq) -> None:
        if not seq.finished:
            seq.task = asyncio.get_running_loop().create_task(self._generate(seq))

    def _params(self, seq: _Seq) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=seq.req.max_new_tokens, temperature=max(0.0, seq.req.temperature),
            stop_token_ids=sorted(seq.stops), output_kind=RequestOutputKind.DELTA, detokenize=False)

    async def _generate(self, seq: _Seq) -> None:
        prompt = self._prompt(list(seq.req.prompt))
        try:
            async for out in self._llm.generate(prompt, self._params(seq), seq.request_id, priority=seq.priority):
                if seq.finished:
                    break
                self._on_output(seq, out)
            if not seq.finished:
                self._finish(seq, Finished("error", "vLLM ended the request without a finish reason"))
        except asyncio.CancelledError:
            self._finish(seq, Finished("cancelled"))  # generate() has aborted the request in vLLM
        except Exception as exc:  # a failed request fails its stream, never the engine or the session
            log.warning("vLLM request %s failed: %s: %s", seq.request_id, type(exc).__name__, exc)
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            self._finish(seq, Finished("error", f"{type(cause).__name__}: {cause}"))

    def _on_output(self, seq: _Seq, out: Any) -> None:
        if out.num_cached_tokens and out.num_cached_tokens != seq.cached:
            seq.cached = out.num_cached_tokens
            self._call(seq, setattr, seq.stream, "reused_prefix", seq.cached)
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        self.stats.decode_tokens += len(ids)
        reason = completion.finish_reason
        if reason == "stop" and ids and (ids[-1] in seq.stops or not isinstance(completion.stop_reason, str)):
            ids.pop()  # the stop token ends the sequence; like the torch engine, it is never delivered
        if ids:
            self._call(seq, seq.stream._deliver, ids)
        if out.finished or reason is not None:
            self._finish(seq, Finished(_VLLM_FINISH.get(reason or "", "error"),  # type: ignore[arg-type]
                                       "" if reason in _VLLM_FINISH else f"vLLM finish reason {reason!r}"))

    async def _cancel(self, seq_id: int) -> None:
        with self._lock:
            seq = self._seqs.get(seq_id)
        if seq is None or seq.finished:
            return
        with contextlib.suppress(Exception):
            await self._llm.abort(seq.request_id)
        self._finish(seq, Finished("cancelled"))
        if seq.task is not None:
            seq.task.cancel()

    def _finish(self, seq: _Seq, result: Finished) -> None:
        if seq.finished:
            return
        seq.finished = True
        with self._lock:
            self._seqs.pop(seq.seq_id, None)
        prompt = len(seq.req.prompt)
        self.stats.prefill_tokens += prompt - min(seq.cached, prompt)
        self.stats.prefill_tokens_saved += seq.cached
        self._call(seq, seq.stream._deliver, result)

    @staticmethod
    def _call(seq: _Seq, fn: Any, *args: Any) -> None:
        # RuntimeError: the session's loop is gone (shutdown); nobody is listening.
        with contextlib.suppress(RuntimeError):
            seq.loop.call_soon_threadsafe(fn, *args)

    async def _shutdown(self) -> None:
        with self._lock:
            live: Iterable[_Seq] = list(self._seqs.values())
        for seq in live:
            await self._cancel(seq.seq_id)
        tasks = [s.task for s in live if s.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
