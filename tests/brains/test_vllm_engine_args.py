"""The vLLM backend's pure parts, which need no vLLM: priorities and engine arguments (tests_vllm/ runs vLLM)."""

from __future__ import annotations

import pytest

from brains.backends.vllm_engine import VllmEngine, engine_args, request_priority
from brains.engine import GenerationRequest
from common.config import LlmConfig
from common.errors import EngineError


def ab(ahead: float) -> GenerationRequest:
    return GenerationRequest(prompt=[1], max_new_tokens=1, brain="ab", audio_ahead_ms=lambda: ahead)


def test_priorities_follow_the_mind_paced_policy() -> None:
    """Lower runs first: urgent ABs (closest to running dry first), then FBs, then ABs with audio to spare."""
    fb = GenerationRequest(prompt=[1], max_new_tokens=1, brain="fb")
    urgent = 1500.0
    order = sorted([ab(5000), fb, ab(1400), ab(0), ab(200), ab(1500)], key=lambda r: request_priority(r, urgent))
    assert [r.brain for r in order] == ["ab", "ab", "ab", "fb", "ab", "ab"]
    aheads = [r.audio_ahead_ms() for r in order if r.audio_ahead_ms is not None]
    assert aheads == [0, 200, 1400, 1500, 5000]
    # No audio clock counts as nothing queued (as in the torch engine); odd clocks still give a valid priority.
    assert request_priority(GenerationRequest(prompt=[1], max_new_tokens=1), urgent) == 0
    assert request_priority(ab(float("nan")), urgent) == 0 and request_priority(ab(-5), urgent) == 0
    assert request_priority(ab(float("inf")), urgent) > request_priority(ab(5000), urgent)


def test_engine_args_map_the_llm_section(tmp_path) -> None:
    cfg = LlmConfig(model=str(tmp_path), backend="vllm", max_slots=8, max_seq_len=2048, step_token_budget=300,
                    prefill_chunk=100, vllm_kv_cache_gib=0.5)
    args = engine_args(cfg)
    assert args["enable_prefix_caching"] is True and args["scheduling_policy"] == "priority"
    assert (args["max_num_seqs"], args["max_model_len"], args["max_num_batched_tokens"]) == (8, 2048, 300)
    assert args["long_prefill_token_threshold"] == 100 and args["kv_cache_memory_bytes"] == 1 << 29
    assert args["enforce_eager"] is True and args["block_size"] == 32  # CPU
    gpu = engine_args(LlmConfig(model=str(tmp_path), device="cuda", dtype="bfloat16"))
    assert gpu["enforce_eager"] is False and "block_size" not in gpu and "kv_cache_memory_bytes" not in gpu


def test_the_gguf_is_refused_with_the_way_out() -> None:
    with pytest.raises(EngineError, match="duet export-hf"):
        VllmEngine(LlmConfig(backend="vllm"))


async def test_submit_before_start_is_an_engine_error(tmp_path) -> None:
    engine = VllmEngine(LlmConfig(model=str(tmp_path), backend="vllm"))
    with pytest.raises(EngineError):
        engine.submit(GenerationRequest(prompt=[1, 2], max_new_tokens=1))
    with pytest.raises(ValueError):
        engine.submit(GenerationRequest(prompt=[], max_new_tokens=1))
    assert engine.live_sequences() == 0
    engine.close()  # never started: nothing to do
