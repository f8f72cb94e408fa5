"""A whole Duet server with `configs/vllm.toml` (llm.backend = "vllm"): a spoken question in, a spoken answer out."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr

from common.config import DEFAULT_CONFIG_PATH, TtsConfig, load_config

VLLM_CONFIG = DEFAULT_CONFIG_PATH.parent / "vllm.toml"


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Iterator[Any]:
    from brains.backends.vllm_engine import VllmEngine
    from realtime.runtime import Runtime

    config = load_config(VLLM_CONFIG, [f"llm.model={model_dir}", "llm.vllm_kv_cache_gib=0.25"])
    assert config.llm.backend == "vllm"
    rt = Runtime.load(config)
    assert isinstance(rt.engine, VllmEngine)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
async def url(runtime: Any) -> AsyncIterator[str]:
    from realtime.transports.websocket import DuetServer

    srv = DuetServer(runtime)
    await srv.start("127.0.0.1", 0)
    yield f"ws://127.0.0.1:{srv.port}/v1/realtime"
    await srv.close()


def speak(text: str) -> np.ndarray:
    from tts.synthesizer import Synthesizer

    synth = Synthesizer.load(dataclasses.replace(TtsConfig(), noise_scale=0.0, noise_w=0.0))
    return soxr.resample(synth.synthesize(text), synth.sample_rate, 24000).astype(np.float32)


@pytest.mark.parametrize("pacing", ["speak-first", "nothink"])
async def test_spoken_question_gets_a_spoken_answer_on_vllm(url: str, runtime: Any, pacing: str) -> None:
    from clients.talk import talk

    result = await talk(speak("What is the capital of France?"), url, pacing=pacing, timeout_s=90)
    assert result["errors"] == []
    assert result["server_metrics"]["status"] == "completed"
    assert result["reply_audio_s"] > 0.3
    assert "paris" in result["reply_transcript"].lower(), result
    if pacing == "speak-first":
        assert result["thought"], "the formulation brain's reasoning is streamed to the client"
    assert runtime.engine.stats.prefill_tokens_saved > 0, "warm() cached the system prompt's blocks"
