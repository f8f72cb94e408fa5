"""The process split, on loopback: a front end whose brains are remote (`llm.backend = "remote"`) holds a spoken
conversation with the real engine served by `duet engine`'s server. Here both ends share the test run's
runtime and loop (one process), but every token crosses real HTTP, as between `duet serve` and `duet engine`;
tests/duet/test_engine_process.py runs `duet engine` itself as a process."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from brains.backends.engine_server import EngineServer, serve
from brains.backends.remote import RemoteEngine
from clients.talk import talk
from realtime.runtime import Runtime
from realtime.transports.websocket import DuetServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def front(runtime: Runtime) -> AsyncIterator[tuple[str, EngineServer, RemoteEngine]]:
    engine_server = EngineServer(runtime.engine, "smollm2")
    runner = await serve(engine_server, "127.0.0.1", 0)
    llm = dataclasses.replace(runtime.config.llm, backend="remote",
                              remote_url=f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
    remote = RemoteEngine(llm, urgent_audio_ms=runtime.config.mind.urgent_audio_ms, eos_ids=runtime.prompts.stop_ids)
    await asyncio.to_thread(remote.start)  # blocks until /v1/models answers, served on this loop
    # The test run's runtime with remote brains and a session registry of its own: a front-end process.
    rt = dataclasses.replace(runtime, engine=remote, sessions={}, observers=[], session_observers=[],
                             server_tools=None)
    server = DuetServer(rt)
    await server.start("127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.port}/v1/realtime", engine_server, remote
    finally:
        await server.close()
        await asyncio.to_thread(remote.close)
        await runner.cleanup()


@pytest.mark.parametrize("pacing", ["nothink", "speak-first"])
async def test_a_front_end_with_remote_brains_answers_a_spoken_question(
        front: tuple[str, EngineServer, RemoteEngine], runtime: Runtime, speak: Any, pacing: str) -> None:
    url, engine_server, remote = front
    steps_before = runtime.engine.stats.steps
    result = await talk(speak("What is the capital of France?"), url, pacing=pacing, timeout_s=90)
    assert result["reply_transcript"], result
    assert "france" in result["user_transcript"].lower(), result
    # Every token came over HTTP from the engine, and the brains went as themselves.
    assert remote.stats.decode_tokens > 0 and remote.stats.failed_requests == 0
    assert runtime.engine.stats.steps > steps_before
    assert engine_server.requests["ab"] >= 1
    if pacing == "speak-first":
        assert engine_server.requests["fb"] >= 1, "the formulation brain's thought ran on the engine too"
    for _ in range(100):  # the streams are done and nothing is left running on the engine
        if runtime.engine.live_sequences() == 0:
            break
        await asyncio.sleep(0.05)
    assert runtime.engine.live_sequences() == 0
