"""Interruptions on the real stack: echo of the reply must not interrupt; a person talking over it must."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.integration import schema

pytestmark = pytest.mark.integration
RATE, STEP = 24000, 480  # 20 ms frames


def b64(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode()


class Call:
    """A scripted client: speaks, listens, and decides what its microphone hears while the reply plays."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.invalid: list[str] = []  # events that failed the schema check
        self.reply: list[np.ndarray] = []
        self.first_audio: float | None = None

    async def receive(self) -> None:
        async for message in self.ws:
            event = json.loads(message)
            try:  # interruptions (cleared, truncated, cancelled responses) must fit the schema too
                schema.check(event)
            except schema.SchemaError as exc:
                self.invalid.append(str(exc))  # reported by `call`: this task's exceptions go nowhere
            self.events.append(event)
            if event["type"] == "response.output_audio.delta":
                self.first_audio = self.first_audio or time.perf_counter()
                pcm = np.frombuffer(base64.b64decode(event["delta"]), dtype="<i2").astype(np.float32) / 32768
                self.reply.append(pcm)

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def stream(self, source: Any, seconds: float) -> None:
        """Send 20 ms frames at real-time pace; `source(i)` gives frame i (None = silence)."""
        t0 = time.perf_counter()
        for i in range(int(seconds * 50)):
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.perf_counter()))
            frame = source(i)
            await self.ws.send(json.dumps({"type": "input_audio_buffer.append",
                                           "audio": b64(frame if frame is not None else np.zeros(STEP))}))


async def call(url: str, question: np.ndarray, while_reply: Any, seconds_after: float,
               until_done: bool = False) -> Call:
    """`until_done`: keep the microphone going until the first response is done (at most 60 s more)."""
    async with connect(url, max_size=None) as ws:
        c = Call(ws)
        receiver = asyncio.create_task(c.receive())
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "instructions": "You are a storyteller. Always answer with a long story.",
            "duet": {"pacing": "nothink"}}}))
        await c.stream(lambda i: question[i * STEP:(i + 1) * STEP] if i * STEP < len(question) else None,
                       len(question) / RATE + 0.2)
        # Silence until the reply's first audio, then the microphone hears `while_reply`.
        deadline = time.perf_counter() + 30
        while c.first_audio is None and time.perf_counter() < deadline:
            await c.stream(lambda i: None, 0.1)
        assert c.first_audio is not None, c.kinds()
        await c.stream(lambda i: while_reply(c, i), seconds_after)
        offset = int(seconds_after * 50)
        deadline = time.perf_counter() + 60
        while until_done and "response.done" not in c.kinds() and time.perf_counter() < deadline:
            await c.stream(lambda i, o=offset: while_reply(c, o + i), 0.5)
            offset += 25
        receiver.cancel()
        assert c.invalid == [], c.invalid[0]
        return c


async def test_reply_echo_at_minus_20_db_does_not_interrupt(url, speak) -> None:
    def echo(c: Call, i: int) -> np.ndarray:
        played = np.concatenate(c.reply)  # what the speaker is playing now, 20 dB down, back in the mic
        return 0.1 * played[i * STEP:(i + 1) * STEP] if i * STEP < len(played) else np.zeros(STEP)

    c = await call(url, speak("Tell me a story about a dragon."), echo, seconds_after=3.0, until_done=True)
    kinds = c.kinds()
    assert kinds.count("input_audio_buffer.speech_started") == 1, "only the question was a turn"
    assert "output_audio_buffer.cleared" not in kinds
    assert kinds.count("conversation.item.input_audio_transcription.completed") == 1
    done = [e for e in c.events if e["type"] == "response.done"]
    assert done and done[0]["response"]["status"] == "completed"


async def test_user_talking_over_the_reply_interrupts_and_truncates(url, speak) -> None:
    interruption = speak("Stop, stop. Please tell me what time it is instead.")

    def talk_over(c: Call, i: int) -> np.ndarray | None:
        start = 10  # 200 ms into the reply
        j = i - start
        return interruption[j * STEP:(j + 1) * STEP] if j >= 0 and j * STEP < len(interruption) else None

    c = await call(url, speak("Tell me a story about a dragon."), talk_over, seconds_after=4.0)
    kinds = c.kinds()
    assert kinds.count("input_audio_buffer.speech_started") == 2
    assert "output_audio_buffer.cleared" in kinds
    first = next(e["response"] for e in c.events if e["type"] == "response.done")
    said = "".join(e["delta"] for e in c.events if e["type"] == "response.output_audio_transcript.delta")
    heard = first["output"][0]["content"][0]["transcript"]
    truncated = [e for e in c.events if e["type"] == "conversation.item.truncated"]
    assert first["status"] == "cancelled" or truncated
    # The history keeps only what was played before the interruption, never the unheard rest.
    assert len(heard.split()) < len(said.split()), (heard, said)
