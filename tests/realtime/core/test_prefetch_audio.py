"""The prefetch synthesizes the reply's first chunk while the silence window is open, and the response that
adopts it sends that audio instead of synthesizing the chunk again (no models: a scripted pacer, a recording
synthesizer, the real FairPool over one TTS thread)."""

from __future__ import annotations

import asyncio
import logging
import threading
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np

from brains.history import Conversation
from brains.pacer import PacerDone, PacerEvent, ReplyDelta, ThoughtDelta, ToolCall, TurnStats
from common.config import LlmConfig, TtsConfig
from common.playback import PlaybackClock
from realtime.core import events as ev
from realtime.core.options import ResponseOptions
from realtime.core.prefetch import Prefetch
from realtime.core.response import Response
from realtime.core.settings import SessionSettings
from realtime.runtime import FairPool

RATE = 24000  # the session's output rate: the audio sent is the synthesized audio, sample for sample
FIRST = "Paris is the capital"  # the first chunk of REPLY (tts.first_chunk_*_words = 3..5)
REPLY = ["Paris is the ", "capital of France. ", "It is lovely ", "in spring."]


class Synth:
    """Records each synthesis; the audio is a function of the text. `hold` keeps the TTS thread busy."""

    sample_rate = RATE

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def synthesize(self, text: str) -> np.ndarray:
        self.calls.append(text)
        return self.audio(text)

    @staticmethod
    def audio(text: str) -> np.ndarray:
        level = (zlib.crc32(text.encode()) % 1000) / 2000 + 0.1
        return np.full(RATE // 10, level, dtype=np.float32)  # 100 ms

    def hold(self) -> None:
        self.release.wait(5)


class Runtime(SimpleNamespace):
    """The runtime services a prefetch and a response use; any report hook is a no-op."""

    def __init__(self) -> None:
        super().__init__(config=SimpleNamespace(tts=TtsConfig(), llm=LlmConfig()), synthesizer=Synth(),
                         tts_pool=ThreadPoolExecutor(1, thread_name_prefix="test-tts"))
        self.pool = FairPool(self.tts_pool)
        self.deadlines: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    async def run_in(self, pool: ThreadPoolExecutor, fn: Any, *args: Any, deadline: float = float("inf")) -> Any:
        if args:
            self.deadlines[args[0]] = deadline
        return await self.pool.run("sess_test", fn, *args, deadline=deadline)


class Pacer:
    """The brains, scripted: the test feeds events; `cancel` ends the run as MindPacer's does."""

    thinking = False

    def __init__(self) -> None:
        self.feed: asyncio.Queue[PacerEvent | None] = asyncio.Queue()
        self.cancelled = False

    def say(self, *events: PacerEvent | str) -> None:
        for e in events:
            self.feed.put_nowait(ReplyDelta(e) if isinstance(e, str) else e)

    def done(self, reply: str) -> None:
        self.feed.put_nowait(PacerDone(reply, "", TurnStats(mode="nothink")))
        self.feed.put_nowait(None)

    def cancel(self) -> None:
        self.cancelled = True
        self.feed.put_nowait(None)

    async def run(self, conversation: list[int]) -> AsyncIterator[PacerEvent]:
        while (event := await self.feed.get()) is not None:
            yield event


class StandIn:
    def __init__(self, modalities: tuple[str, ...] = ("audio", "text")) -> None:
        self.id = "sess_test"
        self.settings = SessionSettings(modalities=list(modalities))
        self.history = Conversation()
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})
        self.events: list[ev.ServerEvent] = []
        self.rt = Runtime()
        self.pacers: list[Pacer] = []

    def emit(self, event: ev.ServerEvent) -> None:
        self.events.append(event)

    def rate_limits(self) -> ev.RateLimitsUpdated:
        return ev.RateLimitsUpdated(rate_limits=[])

    def new_pacer(self, *args: Any, **kwargs: Any) -> Pacer:
        pacer = Pacer()
        self.pacers.append(pacer)
        return pacer

    def conversation_ids(self, *args: Any) -> list[int]:
        return []

    def audio(self) -> np.ndarray:
        deltas = [e.delta for e in self.events if isinstance(e, ev.AudioDelta)]
        return np.concatenate(deltas) if deltas else np.zeros(0, np.float32)


def prefetch(session: StandIn) -> tuple[Prefetch, Pacer]:
    pacer = Pacer()
    return Prefetch(pacer, PlaybackClock(), "What is the capital of France?", [], []), pacer  # type: ignore[arg-type]


async def settle(until: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not until():
            await asyncio.sleep(0.005)


def respond(session: StandIn, pre: Prefetch | None) -> tuple[Response, asyncio.Task[None]]:
    options = ResponseOptions.parse({}, session.settings)
    response = Response(session, options, pre)  # type: ignore[arg-type]
    return response, asyncio.create_task(response.run())


def expected_audio(*chunks: str) -> np.ndarray:
    return np.concatenate([Synth.audio(c) for c in chunks])


def speculating_behind_busy_tts(session: StandIn) -> tuple[Prefetch, Pacer, Any, asyncio.Task[Any]]:
    """A prefetch that wrote REPLY and asked for its first audio while the TTS pool is held by another job
    (`blocker`, running until `synth.release` is set): the speculative synthesis waits in the pool."""
    synth = session.rt.synthesizer
    synth.release.clear()
    blocker = asyncio.create_task(session.rt.run_in(session.rt.tts_pool, synth.hold))
    pre, pacer = prefetch(session)
    pacer.say(*REPLY)
    pre.speak_first_chunk(session.rt, deadline=1.0)  # type: ignore[arg-type]
    return pre, pacer, synth, blocker


async def test_the_first_chunk_is_synthesized_in_the_window_and_sent_at_commit() -> None:
    session = StandIn()
    synth = session.rt.synthesizer
    pre, pacer = prefetch(session)
    pacer.say(*REPLY[:2])
    pre.speak_first_chunk(session.rt, deadline=123.0)  # type: ignore[arg-type]
    await settle(lambda: synth.calls == [FIRST])
    assert session.rt.deadlines[FIRST] == 123.0  # due when the window closes, not at once
    assert session.events == []  # nothing reaches the client before the commit

    response, run = respond(session, pre)
    pacer.say(*REPLY[2:])
    pacer.done("".join(REPLY))
    await run
    assert response.status == "completed"
    assert synth.calls == [FIRST, "of France.", "It is lovely in spring."]  # the first chunk once, not again
    assert response.metrics["first_audio_prefetched"] is True and response.metrics["prefetched"] is True
    np.testing.assert_array_equal(session.audio(), expected_audio(*synth.calls))


async def test_a_first_chunk_written_after_the_request_is_synthesized_when_complete() -> None:
    session = StandIn()
    synth = session.rt.synthesizer
    pre, pacer = prefetch(session)
    pre.speak_first_chunk(session.rt, deadline=1.0)  # type: ignore[arg-type]
    pacer.say("Paris is the ")
    await asyncio.sleep(0.05)
    assert synth.calls == [] and pre.first_chunk is None  # not a chunk yet
    pacer.say("capital of France. ")
    await settle(lambda: synth.calls == [FIRST])


async def test_a_first_chunk_written_after_the_commit_is_synthesized_once() -> None:
    session = StandIn()
    synth = session.rt.synthesizer
    pre, pacer = prefetch(session)
    pre.speak_first_chunk(session.rt, deadline=1.0)  # type: ignore[arg-type]
    response, run = respond(session, pre)  # think-first: the reply starts after the commit
    pacer.say(ThoughtDelta("They ask about geography, a capital city of Europe."), *REPLY)
    pacer.done("".join(REPLY))
    await run
    assert synth.calls == [FIRST, "of France.", "It is lovely in spring."]
    assert response.metrics["first_audio_prefetched"] is True
    np.testing.assert_array_equal(session.audio(), expected_audio(*synth.calls))


async def test_a_reply_shorter_than_a_chunk_is_synthesized_when_written() -> None:
    session = StandIn()
    synth = session.rt.synthesizer
    pre, pacer = prefetch(session)
    pacer.say("Yes.")
    pre.speak_first_chunk(session.rt, deadline=1.0)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert synth.calls == []  # "Yes." may go on: only the end of the reply makes it a chunk
    pacer.done("Yes.")
    await settle(lambda: synth.calls == ["Yes."])
    response, run = respond(session, pre)
    await run
    assert synth.calls == ["Yes."] and response.metrics["first_audio_prefetched"] is True
    np.testing.assert_array_equal(session.audio(), Synth.audio("Yes."))


async def test_only_reply_text_is_chunked() -> None:
    """Thoughts and tool calls are never spoken: the prefetch's chunker sees what `_Speech.push` sees."""
    session = StandIn()
    synth = session.rt.synthesizer
    pre, pacer = prefetch(session)
    pacer.say(ThoughtDelta("The user wants the weather, a tool can tell. "), ToolCall('{"name": "weather"}'),
              "Sure thing, ", "let me check that for you now. ")
    pre.speak_first_chunk(session.rt, deadline=1.0)  # type: ignore[arg-type]
    await settle(lambda: len(synth.calls) == 1)
    response, run = respond(session, pre)
    pacer.done("Sure thing, let me check that for you now.")
    await run
    assert synth.calls[0] == pre.first_chunk and len(synth.calls) == len(set(synth.calls))
    assert response.metrics["first_audio_prefetched"] is True
    assert "".join(synth.calls).startswith("Sure thing")


async def test_the_response_awaits_a_synthesis_still_running() -> None:
    session = StandIn()
    pre, pacer, synth, blocker = speculating_behind_busy_tts(session)
    response, run = respond(session, pre)
    pacer.done("".join(REPLY))
    await asyncio.sleep(0.05)
    assert synth.calls == [] and not [e for e in session.events if isinstance(e, ev.AudioDelta)]
    synth.release.set()
    await run
    await blocker
    assert synth.calls == [FIRST, "of France.", "It is lovely in spring."]
    assert response.metrics["first_audio_prefetched"] is True


async def test_a_cancelled_prefetch_skips_its_queued_synthesis_and_the_real_turn_speaks() -> None:
    """The user spoke again (or the final transcript differs): the speculative job, still queued behind
    other work, never runs; the turn's own response synthesizes its first chunk itself."""
    session = StandIn()
    pre, pacer, synth, blocker = speculating_behind_busy_tts(session)
    await asyncio.sleep(0.02)
    pre.cancel()
    assert pacer.cancelled
    synth.release.set()
    await blocker

    response, run = respond(session, None)
    await settle(lambda: bool(session.pacers))
    session.pacers[0].say("Berlin is the capital of Germany.")
    session.pacers[0].done("Berlin is the capital of Germany.")
    await run
    assert synth.calls == ["Berlin is the capital", "of Germany."]  # never the cancelled FIRST
    assert "first_audio_prefetched" not in response.metrics
    np.testing.assert_array_equal(session.audio(), expected_audio(*synth.calls))


async def test_a_text_reply_drops_the_speculative_audio() -> None:
    session = StandIn(modalities=("text",))
    pre, pacer, synth, blocker = speculating_behind_busy_tts(session)
    response, run = respond(session, pre)
    pacer.done("".join(REPLY))
    await run
    synth.release.set()
    await blocker
    await asyncio.sleep(0.02)
    assert synth.calls == [] and response.status == "completed"


async def test_other_text_is_not_given_the_speculative_audio() -> None:
    session = StandIn()
    pre, _pacer, synth, blocker = speculating_behind_busy_tts(session)
    await settle(lambda: pre.first_chunk is not None)
    audio = pre._first_audio
    assert audio is not None
    assert pre.first_audio("Berlin is the capital") is None
    synth.release.set()
    await blocker
    await asyncio.sleep(0.02)
    assert audio.cancelled() and synth.calls == []
    assert pre.first_audio(FIRST) is None  # taken once: the response synthesizes anything else itself
    pre.cancel()


async def test_no_synthesis_without_the_session_asking() -> None:
    session = StandIn()
    synth = session.rt.synthesizer
    pre, pacer = prefetch(session)
    response, run = respond(session, pre)
    pacer.say(*REPLY)
    pacer.done("".join(REPLY))
    await run
    assert synth.calls == [FIRST, "of France.", "It is lovely in spring."]
    assert "first_audio_prefetched" not in response.metrics
