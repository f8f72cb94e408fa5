"""A real strict client: the OpenAI Agents SDK's realtime agent, talking to Duet on loopback.

The SDK validates every server event against the `openai` package's models and reports each one that does
not fit as an error event (it found 26 in one spoken turn before Duet's events were fixed), so this is the
end-to-end check that a standard client sees a clean session: spoken question in, spoken answer out, and the
agent's function tool in Duet's prompt.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.integration

RATE = 24000
CHUNK = RATE // 10  # 100 ms of pcm16 per input_audio_buffer.append


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


async def test_agents_sdk_realtime_agent_gets_a_spoken_answer_without_errors(
        url, server, runtime, speak, monkeypatch, caplog) -> None:
    agents = pytest.importorskip("agents")
    from agents.realtime import RealtimeAgent, RealtimeRunner

    from realtime.core.options import ResponseOptions

    monkeypatch.setenv("OPENAI_API_KEY", "sk-dummy-for-a-local-server")  # the SDK wants one; Duet ignores it
    agents.set_tracing_disabled(True)  # no trace export to OpenAI from a test

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"It is sunny in {city}."

    agent = RealtimeAgent(name="Assistant", instructions="You are a helpful assistant. Answer in one short "
                                                         "sentence.", tools=[get_weather])
    runner = RealtimeRunner(agent, config={"tracing_disabled": True})
    errors: list[Any] = []
    audio = bytearray()
    seen: list[str] = []
    sessions_before = set(server.sessions)
    caplog.set_level(logging.ERROR, logger="openai.agents")

    async with asyncio.timeout(150), await runner.run(model_config={"url": url}) as session:
        async def listen() -> None:
            async for event in session:
                if event.type == "error":
                    errors.append(event.error)
                elif event.type == "audio":
                    audio.extend(event.audio.data)
                elif event.type == "raw_model_event" and event.data.type == "raw_server_event":
                    seen.append(str(event.data.data.get("type")))
                    if seen[-1] == "response.done":
                        return

        listener = asyncio.create_task(listen())
        # The agent's session.update (instructions, tools) reaches Duet before it answers session.updated.
        async with asyncio.timeout(30):
            while "session.updated" not in seen:
                await asyncio.sleep(0.05)
        (duet_session,) = [s for sid, s in server.sessions.items() if sid not in sessions_before]
        settings = duet_session.settings
        assert [t["name"] for t in settings.tools] == ["get_weather"]
        offered = ResponseOptions.parse({}, settings).offered_tools
        prompt = runtime.prompts.system_prompt(settings.instructions, False, offered)
        assert "get_weather" in prompt and "one short sentence" in prompt

        question = speak("What is the capital of France?")
        silence = np.zeros(RATE * 2, np.float32)  # the end of the turn, for the server's VAD
        for samples in (question, silence):
            for i in range(0, len(samples), CHUNK):
                await session.send_audio(pcm16(samples[i:i + CHUNK]))
                await asyncio.sleep(0.01)  # paced a little, as a microphone would, without slowing the test
        await asyncio.wait_for(listener, timeout=120)

    failures = [r.getMessage()[:300] for r in caplog.records if "Failed to validate" in r.getMessage()]
    assert failures == [] and errors == [], (failures, errors)
    assert "conversation.item.input_audio_transcription.completed" in seen and "response.done" in seen
    assert len(audio) > RATE * 2 // 2, "at least half a second of spoken answer"
    assert np.abs(np.frombuffer(bytes(audio), "<i2")).max() > 1000, "the answer is speech, not silence"
    assert not [k for k in seen if k.startswith("duet.")], "a standard client gets only standard events"
