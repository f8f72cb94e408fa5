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
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from brains.backends.loop_thread import LoopThreadEngine, Seq
from brains.backends.loop_thread import request_priority as request_priority  # where callers find it
from brains.engine import Finished, GenerationRequest, TokenStream
from common.config import LlmConfig
from common.errors import EngineError

log = logging.getLogger(__name__)

# vLLM's finish reasons as Duet's (anything else, e.g. "error", becomes an error).
_VLLM_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


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
class _Seq(Seq):
    request_id: str = ""


class VllmEngine(LoopThreadEngine[_Seq]):
    """`Engine`'s public surface (start, close, submit, cancel, live_sequences, stats, eos_ids) on vLLM.

    `stats` holds what vLLM lets us see per request: tokens generated (`decode_tokens`), prompt tokens computed
    (`prefill_tokens`) and found in the prefix cache (`prefill_tokens_saved`), and the most sequences live at
    once (`max_batch`). vLLM's steps happen in its EngineCore process: `steps` and `busy_seconds` stay 0.
    """

    thread_name = "duet-vllm"
    what = "vLLM"
    shutdown_timeout_s = 60.0

    def __init__(self, cfg: LlmConfig, urgent_audio_ms: float = 1500.0, eos_ids: frozenset[int] = frozenset(),
                 extra_args: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, urgent_audio_ms, eos_ids)
        self._args = {**engine_args(cfg), **(extra_args or {})}
        self._llm: Any = None
        self._prompt: Callable[[list[int]], Any] = lambda ids: {"prompt_token_ids": ids}

    def _new_seq(self, seq_id: int, req: GenerationRequest, stream: TokenStream, loop: asyncio.AbstractEventLoop,
                 stops: frozenset[int], priority: int) -> _Seq:
        return _Seq(seq_id, req, stream, loop, stops, priority, request_id=f"duet-{seq_id}")

    def _submitted(self) -> None:
        self.stats.max_batch = max(self.stats.max_batch, len(self._seqs))

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

    async def _cancel_backend(self, seq: _Seq) -> None:
        await self._llm.abort(seq.request_id)

    async def _close_backend(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
