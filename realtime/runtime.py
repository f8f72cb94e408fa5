"""What one process shares among all sessions: the models, the engine and the worker threads.

Models load once, here; sessions only hold per-stream state. Blocking model work (VAD, Whisper,
Piper) runs in thread pools and the LLM on the engine's own thread, so the event loop only routes
events and never computes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from brains.backends.loader import load_decoder, load_tokenizer
from brains.backends.torch_backend import TorchBackend
from brains.engine import Engine, GenerationEngine, GenerationRequest
from brains.prompts import PromptBuilder
from brains.scheduler import SchedulerConfig
from common.audio import SPEECH_RATE
from common.config import DuetConfig
from realtime.speech_in.asr import Listener
from realtime.speech_in.vad import SileroVad
from tts.synthesizer import Synthesizer

log = logging.getLogger(__name__)
T = TypeVar("T")


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

    @classmethod
    def load(cls, config: DuetConfig) -> Runtime:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Every torch call releases the GIL; at the default 5 ms switch interval the engine thread waits
        # behind the event loop between kernels (measured on an H100: p95 first token 6.4 s at 64 sessions).
        sys.setswitchinterval(0.001)
        t0 = time.perf_counter()
        if config.llm.backend == "vllm":
            engine, prompts = _vllm_engine(config)
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

    async def transcribe(self, audio16k: np.ndarray) -> str:
        self.asr_inflight += 1
        try:
            return await self.run_in(self.asr_pool, self.listener.transcribe, audio16k)
        finally:
            self.asr_inflight -= 1

    async def run_in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def close(self) -> None:
        self.engine.close()
        for pool in (self.asr_pool, self.tts_pool, self.vad_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def _vllm_engine(config: DuetConfig) -> tuple[GenerationEngine, PromptBuilder]:
    """llm.backend = "vllm": vLLM's engine on llm.model (a Hugging Face folder), the prompts from its tokenizer.
    vLLM is imported only here, so the torch stack never needs it installed."""
    from brains.backends.vllm_engine import VllmEngine

    prompts = PromptBuilder(load_tokenizer(config.llm), config.llm, config.mind)
    engine = VllmEngine(config.llm, urgent_audio_ms=config.mind.urgent_audio_ms, eos_ids=prompts.stop_ids)
    return engine, prompts
