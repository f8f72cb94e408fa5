"""The Twilio/Telnyx Media Streams bridge: unit tests against a scripted session, and a phone call
through the server's /twilio endpoint with the real models."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import deque
from typing import Any

import numpy as np
import pytest
import soxr

from common import audio as audio_codec
from common.errors import SessionError
from realtime.core import events as ev
from realtime.transports.telephony import TelephonyCall, run_call
from tests.conftest import says

SID = "MZ00000000000000000000000000000001"


class FakeSession:
    """Records the client events the bridge sends; the test emits server events through `emit`."""

    def __init__(self, session_id: str, emit: Any) -> None:
        self.id = session_id
        self.emit = emit
        self.handled: list[ev.ClientEvent] = []
        self.reject: set[type] = set()
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    async def handle(self, event: ev.ClientEvent) -> None:
        self.handled.append(event)
        if type(event) in self.reject:
            raise SessionError(f"{type(event).__name__} is not supported yet", code="unsupported_event")

    async def close(self) -> None:
        self.closed = True

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.handled if isinstance(e, cls)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def make_call(dialect: str = "twilio", **kw: Any) -> tuple[TelephonyCall, FakeSession, Clock]:
    sessions: list[FakeSession] = []
    clock = Clock()

    def factory(session_id: str, emit: Any) -> FakeSession:
        sessions.append(FakeSession(session_id, emit))
        return sessions[0]

    call = TelephonyCall(None, dialect, session_factory=factory, clock=clock, **kw)
    await call.start()
    return call, sessions[0], clock


def twilio_start(**params: str) -> dict[str, Any]:
    return {"event": "start", "sequenceNumber": "1", "streamSid": SID,
            "start": {"accountSid": "AC1", "callSid": "CA1", "streamSid": SID, "tracks": ["inbound"],
                      "customParameters": params,
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


def media(payload: bytes, chunk: int = 1, track: str = "inbound") -> dict[str, Any]:
    return {"event": "media", "sequenceNumber": str(chunk + 2), "streamSid": SID,
            "media": {"track": track, "chunk": str(chunk), "timestamp": str(20 * chunk),
                      "payload": base64.b64encode(payload).decode()}}


def echo(name: str) -> dict[str, Any]:
    return {"event": "mark", "sequenceNumber": "9", "streamSid": SID, "mark": {"name": name}}


def delta(session: FakeSession, item_id: str, data: bytes,
          fmt: audio_codec.AudioFormat = audio_codec.G711_ULAW) -> None:
    # The session emits PCM; the bridge encodes it for the phone. G.711 round-trips exactly through PCM, but for
    # mu-law's two zeros (0x7f and 0xff both decode to 0): test data avoid 0x7f.
    assert 0x7F not in data or fmt != audio_codec.G711_ULAW
    pcm = audio_codec.decode(data, fmt)
    session.emit(ev.AudioDelta(response_id="resp_1", item_id=item_id, delta=pcm))


def drain(call: TelephonyCall) -> list[dict[str, Any]]:
    frames = []
    while not call._outbox.empty():
        frame = call._outbox.get_nowait()
        assert frame is not None
        frames.append(frame)
    return frames


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ---- platform -> session ----------------------------------------------------------------------

async def test_start_configures_the_session_for_mulaw_and_custom_parameters() -> None:
    call, session, _ = await make_call()
    await call.feed({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    await call.feed(twilio_start(pacing="nothink", instructions="Be brief."))
    first, second = session.of(ev.SessionUpdate)
    assert first.session == {"input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw",
                             "turn_detection": {"type": "server_vad"}}
    # Custom parameters go in their own update, so a bad one cannot undo the audio formats.
    assert second.session == {"instructions": "Be brief.", "duet": {"pacing": "nothink"}}
    assert call.stream_id == SID and call.call_info["callSid"] == "CA1"


async def test_media_payload_passes_through_untouched_and_only_the_inbound_track() -> None:
    call, session, _ = await make_call()
    await call.feed(media(b"\x7f" * 160))  # before `start`: dropped
    await call.feed(twilio_start())
    await call.feed(media(bytes(range(160)), chunk=1))
    await call.feed(media(b"\x00" * 160, chunk=2, track="outbound"))  # our own reply: never fed back
    appends = session.of(ev.InputAudioBufferAppend)
    assert [a.audio for a in appends] == [bytes(range(160))]  # base64 undone at the bridge's edge


async def test_bad_input_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    call, session, _ = await make_call()
    await call.feed(twilio_start())
    await call.feed_raw("{not json")
    await call.feed_raw("[1, 2]")
    await call.feed_raw(b"\xff\xfe")
    await call.feed({"event": "media", "media": {}})  # no payload
    await call.feed({"event": "mark"})
    await call.feed({"event": "no-such-event"})
    await call.feed_raw(json.dumps(media(b"\xff" * 160)))
    assert not call.closed and len(session.of(ev.InputAudioBufferAppend)) == 1
    assert "not JSON" in caplog.text and "malformed media" in caplog.text


async def test_a_flood_of_bad_frames_logs_a_bounded_number_of_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """1,000 bad frames used to write 1,000 WARNING lines; now the first of each kind, then one line per period
    with the count since, and a total when the call ends. Nesting past the stack and Infinity used to end the call
    (RecursionError, OverflowError escaped `feed`)."""
    call, session, clock = await make_call()
    await call.feed(twilio_start())
    caplog.clear()
    for i in range(1000):
        await call.feed_raw(["{not json", "[" * 10_000, json.dumps({"event": "media", "media": {}})][i % 3])
        clock.now += 0.02  # 50 frames a second, as a platform sends them: 20 s in all
    await call.feed_raw('{"event": "start", "start": {"mediaFormat": {"sampleRate": Infinity}}}')
    assert not call.closed
    await call.feed(media(b"\xff" * 160))
    assert len(session.of(ev.InputAudioBufferAppend)) == 1  # still bridging audio
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert 3 <= len(warnings) <= 12, [r.getMessage() for r in warnings]  # 2 kinds x (20 s / 10 s + 1), +2 others
    assert any("times since the last report" in r.getMessage() for r in warnings)
    await call.close()
    assert "1001 bad messages" in caplog.records[-2].getMessage() + caplog.records[-1].getMessage()


async def test_session_rejection_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    call, session, _ = await make_call()
    session.reject.add(ev.InputAudioBufferAppend)
    await call.feed(twilio_start())
    await call.feed(media(b"\xff" * 160))
    assert "session rejected media" in caplog.text and not call.closed


async def test_telnyx_dialect_with_pcma() -> None:
    call, session, _ = await make_call("telnyx")
    await call.feed({"event": "connected", "version": "1.0.0"})
    await call.feed({"event": "start", "sequence_number": "1", "stream_id": "st-1",
                     "start": {"call_control_id": "v3:abc", "client_state": None,
                               "custom_parameters": [{"name": "pacing", "value": "tbs"}],
                               "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}})
    update = session.of(ev.SessionUpdate)
    assert update[0].session["input_audio_format"] == "g711_alaw"
    assert update[0].session["output_audio_format"] == "g711_alaw"
    assert update[1].session == {"duet": {"pacing": "tbs"}}
    assert call.stream_id == "st-1"
    delta(session, "item_a", b"\x01" * 100, audio_codec.G711_ALAW)
    session.emit(ev.AudioDone(response_id="resp_1", item_id="item_a"))
    media_frame, mark = drain(call)
    assert media_frame["stream_id"] == "st-1" and "streamSid" not in media_frame
    # The short tail is padded to a whole frame with A-law silence.
    assert base64.b64decode(media_frame["media"]["payload"]) == b"\x01" * 100 + b"\xd5" * 60
    assert mark == {"event": "mark", "mark": {"name": "item_a@12"}, "stream_id": "st-1"}


async def test_telnyx_bidirectional_codec_can_differ_from_the_stream() -> None:
    call, session, _ = await make_call("telnyx", output_encoding="g711_ulaw")
    await call.feed({"event": "start", "stream_id": "st-2", "start": {"media_format": {"encoding": "PCMA"}}})
    assert session.of(ev.SessionUpdate)[0].session["output_audio_format"] == "g711_ulaw"
    assert call.output_format == audio_codec.G711_ULAW


def test_construction_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="runtime"):
        TelephonyCall(None, "twilio")
    with pytest.raises(ValueError, match="output_encoding"):
        TelephonyCall(None, "twilio", output_encoding="pcm16", session_factory=FakeSession)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dialect"):
        TelephonyCall(None, "vonage", session_factory=FakeSession)


@pytest.mark.parametrize("fmt", [{"encoding": "G722", "sample_rate": 8000},
                                 {"encoding": "L16", "sample_rate": 16000},
                                 {"encoding": "PCMU", "sample_rate": 16000}])
async def test_unsupported_formats_end_the_call(fmt: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    call, session, _ = await make_call("telnyx")
    await call.feed({"event": "start", "stream_id": "st-3", "start": {"media_format": fmt}})
    assert call.closed and session.closed and not session.of(ev.SessionUpdate)
    assert "unsupported media format" in caplog.text
    assert [f async for f in call.frames()] == []


async def test_dtmf_reaches_the_hook_and_stop_closes_the_call() -> None:
    digits: list[str] = []

    async def on_dtmf(digit: str) -> None:
        digits.append(digit)

    call, session, _ = await make_call(on_dtmf=on_dtmf)
    await call.feed(twilio_start())
    await call.feed({"event": "dtmf", "streamSid": SID, "sequenceNumber": "5",
                     "dtmf": {"track": "inbound_track", "digit": "7"}})
    await call.feed({"event": "stop", "sequenceNumber": "6", "streamSid": SID,
                     "stop": {"accountSid": "AC1", "callSid": "CA1"}})
    assert digits == ["7"] and call.closed and session.closed
    await call.feed(media(b"\xff" * 160))  # after stop: ignored
    assert not session.of(ev.InputAudioBufferAppend)


# ---- session -> platform ----------------------------------------------------------------------

async def test_audio_is_reframed_to_20ms_frames_each_delta_followed_by_a_mark() -> None:
    call, session, _ = await make_call()
    await call.feed(twilio_start())
    drain(call)
    audio = bytes(np.arange(1700 + 60 + 45, dtype=np.uint8) % 120)  # no 0x7f (see `delta`)
    delta(session, "item_a", audio[:1700])  # 212.5 ms: 10 frames now, 100 bytes carried
    delta(session, "item_a", audio[1700:1760])  # the carry completes one frame
    delta(session, "item_a", audio[1760:])  # 45 bytes: nothing whole yet
    frames = drain(call)
    kinds = [f["event"] for f in frames]
    assert kinds == ["media"] * 10 + ["mark"] + ["media", "mark"]
    assert all(f["streamSid"] == SID for f in frames)
    assert all(len(base64.b64decode(f["media"]["payload"])) == 160 for f in frames if f["event"] == "media")
    assert [f["mark"]["name"] for f in frames if f["event"] == "mark"] == ["item_a@200", "item_a@220"]
    session.emit(ev.AudioDone(response_id="resp_1", item_id="item_a"))
    tail, mark = drain(call)
    # The padding is mu-law silence, and the mark counts only the real audio (the session checks
    # truncations against the audio it produced).
    assert base64.b64decode(tail["media"]["payload"]) == audio[1760:] + b"\xff" * 115
    assert mark["mark"]["name"] == "item_a@226"
    sent = b"".join(base64.b64decode(f["media"]["payload"]) for f in [*frames, tail] if f["event"] == "media")
    assert sent[:len(audio)] == audio


async def test_a_new_item_flushes_the_previous_items_tail() -> None:
    call, session, _ = await make_call()
    await call.feed(twilio_start())
    drain(call)
    delta(session, "item_a", b"\x10" * 170)
    delta(session, "item_b", b"\x20" * 160)
    names = [f["mark"]["name"] for f in drain(call) if f["event"] == "mark"]
    assert names == ["item_a@20", "item_a@21", "item_b@20"]


async def test_barge_in_clears_and_truncates_to_what_the_marks_say_was_played() -> None:
    call, session, clock = await make_call()
    await call.feed(twilio_start())
    session.emit(ev.OutputItemAdded(response_id="resp_1", item={"id": "item_a"}))
    delta(session, "item_a", b"\x11" * 1600)
    delta(session, "item_a", b"\x11" * 1600)
    marks = [f["mark"]["name"] for f in drain(call) if f["event"] == "mark"]
    assert marks == ["item_a@200", "item_a@400"]
    clock.now += 0.25
    await call.feed(echo("item_a@200"))  # the platform has played the first 200 ms
    assert call.played_ms("item_a") == 200 and call.unplayed
    clock.now += 0.1  # 100 ms into the second delta
    session.emit(ev.SpeechStarted(audio_start_ms=1000, item_id="item_user"))
    assert drain(call) == [{"event": "clear", "streamSid": SID}]
    await settle()
    (truncate,) = session.of(ev.ConversationItemTruncate)
    assert (truncate.item_id, truncate.content_index, truncate.audio_end_ms) == ("item_a", 0, 300)
    # Audio of the cut reply still in flight is dropped; marks echoed because of the clear are not
    # taken as played; a second trigger (the session's output_audio_buffer.cleared) changes nothing.
    delta(session, "item_a", b"\x11" * 1600)
    await call.feed(echo("item_a@400"))
    session.emit(ev.OutputAudioBufferCleared(response_id="resp_1"))
    await settle()
    assert drain(call) == [] and len(session.of(ev.ConversationItemTruncate)) == 1
    assert call.played_ms("item_a") == 200 and not call.unplayed
    # The next reply plays normally.
    delta(session, "item_b", b"\x22" * 160)
    assert [f["event"] for f in drain(call)] == ["media", "mark"]


async def test_speech_with_nothing_left_to_play_sends_no_clear() -> None:
    call, session, clock = await make_call()
    await call.feed(twilio_start())
    delta(session, "item_a", b"\x11" * 800)
    session.emit(ev.AudioDone(response_id="resp_1", item_id="item_a"))
    session.emit(ev.OutputItemDone(response_id="resp_1", item={"id": "item_a"}))
    (mark,) = [f for f in drain(call) if f["event"] == "mark"]
    clock.now += 0.2
    await call.feed(echo(mark["mark"]["name"]))
    session.emit(ev.SpeechStarted(audio_start_ms=500, item_id="item_user"))
    await settle()
    assert drain(call) == [] and not session.of(ev.ConversationItemTruncate)


async def test_barge_in_while_the_reply_is_generated_but_the_platform_is_idle() -> None:
    """All audio sent so far was played, yet the reply is still being generated: nothing to clear on the
    platform, but its later audio must not play and the history keeps what was heard."""
    call, session, clock = await make_call()
    await call.feed(twilio_start())
    session.emit(ev.OutputItemAdded(response_id="resp_1", item={"id": "item_a"}))
    delta(session, "item_a", b"\x11" * 1600)
    clock.now += 0.2
    await call.feed(echo("item_a@200"))
    drain(call)
    session.emit(ev.SpeechStarted(audio_start_ms=900, item_id="item_user"))
    await settle()
    assert drain(call) == []
    assert [(t.item_id, t.audio_end_ms) for t in session.of(ev.ConversationItemTruncate)] == [("item_a", 200)]
    delta(session, "item_a", b"\x11" * 1600)
    assert drain(call) == []


async def test_unsupported_truncate_is_logged_and_the_call_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    call, session, _ = await make_call()
    session.reject.add(ev.ConversationItemTruncate)
    await call.feed(twilio_start())
    delta(session, "item_a", b"\x11" * 1600)
    session.emit(ev.SpeechStarted(audio_start_ms=900, item_id="item_user"))
    await settle()
    assert "could not truncate item_a" in caplog.text and not call.closed
    assert [f["event"] for f in drain(call)][-1] == "clear"


async def test_session_events_reach_the_event_hook() -> None:
    seen: list[str] = []
    call, session, _ = await make_call(on_event=lambda e: seen.append(type(e).__name__))
    session.emit(ev.TranscriptionCompleted(item_id="item_user", transcript="hello",
                                           usage=ev.TranscriptionUsage(seconds=1.0)))
    session.emit(ev.error_event(SessionError("boom", code="internal_error")))
    assert seen == ["TranscriptionCompleted", "Error"] and not call.closed


async def test_run_call_drives_a_transport_until_stop() -> None:
    call, session, _ = await make_call()
    sent: list[dict[str, Any]] = []
    played = asyncio.Event()

    async def send(text: str) -> None:
        sent.append(json.loads(text))
        if sent[-1]["event"] == "mark":
            played.set()

    async def incoming() -> Any:
        yield json.dumps(twilio_start())
        yield "garbage"
        yield json.dumps(media(b"\xff" * 160))
        delta(session, "item_a", b"\x33" * 320)
        await asyncio.wait_for(played.wait(), 5)
        yield json.dumps({"event": "stop", "streamSid": SID})
        raise AssertionError("run_call must stop reading after `stop`")

    await asyncio.wait_for(run_call(call, incoming(), send), 5)
    assert [f["event"] for f in sent] == ["media", "media", "mark"]
    assert call.closed and session.closed and len(session.of(ev.InputAudioBufferAppend)) == 1


# ---- a phone call through the server --------------------------------------------------------------

def to_ulaw(audio_24k: np.ndarray) -> bytes:
    return audio_codec.encode(soxr.resample(audio_24k, 24000, 8000), audio_codec.G711_ULAW)


def from_ulaw(data: bytes) -> np.ndarray:
    return soxr.resample(audio_codec.decode(data, audio_codec.G711_ULAW), 8000, 24000).astype(np.float32)


class FakeTwilio:
    """Twilio's side of a <Connect><Stream>: a caller's microphone sending 20 ms frames in real time
    (silence unless it is `say`ing something), and a phone that plays the frames it receives at 1x and
    echoes each mark when playback reaches it, or at once when a `clear` drops the queued audio."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.reply = bytearray()
        self.queue: deque[tuple[str, Any]] = deque()
        self.playing = True
        self.echoed: list[str] = []
        self.last_media_at = 0.0
        self.new_frame = asyncio.Event()
        self._speech: deque[bytes] = deque()
        self._seq = 1

    def say(self, ulaw: bytes) -> None:
        self._speech.extend(ulaw[i:i + 160].ljust(160, b"\xff") for i in range(0, len(ulaw), 160))

    @property
    def saying(self) -> bool:
        return bool(self._speech)

    async def send(self, message: dict[str, Any]) -> None:
        self._seq += 1
        await self.ws.send(json.dumps({**message, "sequenceNumber": str(self._seq), "streamSid": SID}))

    async def microphone(self) -> None:
        t0, n = time.perf_counter(), 0
        while True:
            n += 1
            await asyncio.sleep(max(0.0, t0 + n * 0.02 - time.perf_counter()))
            frame = self._speech.popleft() if self._speech else b"\xff" * 160
            await self.send({"event": "media", "media": {"track": "inbound", "chunk": str(n),
                                                         "timestamp": str(n * 20),
                                                         "payload": base64.b64encode(frame).decode()}})

    async def receive(self) -> None:
        async for text in self.ws:
            frame = json.loads(text)
            self.frames.append(frame)
            self.new_frame.set()
            if frame["event"] == "media":
                data = base64.b64decode(frame["media"]["payload"])
                self.reply += data
                self.last_media_at = time.perf_counter()
                self.queue.append(("media", data))
            elif frame["event"] == "mark":
                self.queue.append(("mark", frame["mark"]["name"]))
            elif frame["event"] == "clear":
                marks = [value for kind, value in self.queue if kind == "mark"]
                self.queue.clear()
                for name in marks:
                    await self.echo(name)

    async def player(self) -> None:
        while True:
            if not self.playing or not self.queue:
                await asyncio.sleep(0.01)
                continue
            kind, value = self.queue.popleft()
            if kind == "media":
                await asyncio.sleep(len(value) / 8000)
            else:
                await self.echo(value)

    async def echo(self, name: str) -> None:
        self.echoed.append(name)
        await self.send({"event": "mark", "mark": {"name": name}})

    def count(self, event: str) -> int:
        return sum(1 for f in self.frames if f["event"] == event)

    async def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.perf_counter() + timeout
        while not predicate():
            if time.perf_counter() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {len(self.frames)} frames")
            await asyncio.sleep(0.02)


@pytest.mark.integration
async def test_phone_call_through_the_twilio_endpoint(server: Any, speak: Any, judge: Any) -> None:
    from websockets.asyncio.client import connect

    question = to_ulaw(speak("What is the capital of France?"))
    async with connect(f"ws://127.0.0.1:{server.port}/twilio") as ws:
        phone = FakeTwilio(ws)
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps(twilio_start(pacing="nothink")))
        tasks = [asyncio.create_task(c) for c in (phone.receive(), phone.microphone(), phone.player())]
        try:
            # 1. Ask; the reply plays at 1x and every mark is echoed as Twilio does.
            phone.say(question)
            await phone.wait_for(lambda: phone.count("media") > 0, 40, "the spoken reply")
            await phone.wait_for(lambda: not phone.queue and time.perf_counter() - phone.last_media_at > 2.5, 40,
                                 "the reply to finish playing")
            reply = bytes(phone.reply)
            assert 0.5 < len(reply) / 8000 < 30
            (call_session,) = [s for s in server.sessions.values()
                               if s.settings.input_format == audio_codec.G711_ULAW]
            said = [i.text for i in call_session.history.items if i.role == "assistant"][-1]
            assert "paris" in said.lower()
            assert says(judge(from_ulaw(reply)), said)  # the phone audio says the reply's words
            assert all(f["streamSid"] == SID for f in phone.frames)
            assert all(len(base64.b64decode(f["media"]["payload"])) == 160 for f in phone.frames
                       if f["event"] == "media")
            marks = [f["mark"]["name"] for f in phone.frames if f["event"] == "mark"]
            assert marks and phone.echoed == marks and phone.count("clear") == 0
            (session,) = [s for s in server.sessions.values() if s.settings.input_format == audio_codec.G711_ULAW]
            assert session.settings.output_format == audio_codec.G711_ULAW and session.settings.pacing == "nothink"

            # 2. Ask again, but the phone holds playback: the reply's audio stays unplayed.
            phone.playing = False
            first_reply_frames = len(phone.frames)
            phone.say(question)
            await phone.wait_for(lambda: any(f["event"] == "media" for f in phone.frames[first_reply_frames:]), 40,
                                 "the second reply")
            # The echoed marks were taken as played: the question's speech_started found nothing to clear.
            assert phone.count("clear") == 0

            # 3. Barge in while the reply is unplayed: Twilio is told to drop it.
            await phone.wait_for(lambda: not phone.saying, 5, "the microphone")
            phone.say(question)
            await phone.wait_for(lambda: phone.count("clear") == 1, 20, "a clear on barge-in")
            second = [f["mark"]["name"] for f in phone.frames[first_reply_frames:] if f["event"] == "mark"]
            assert second and set(second) <= set(phone.echoed)  # the clear returned the queued marks

            # The history keeps only what was heard of the second reply: with no mark echoed, at most the
            # first delta, which the bridge assumes playing since it was sent (Twilio plays on arrival).
            def truncated() -> bool:
                return any(i.role == "assistant" and i.status == "incomplete" and i.audio_ms <= 200
                           for i in session.history.items)

            await phone.wait_for(truncated, 10, "the unheard reply to be truncated")
            await phone.send({"event": "stop", "stop": {"accountSid": "AC1", "callSid": "CA1"}})
            await asyncio.wait_for(ws.wait_closed(), 10)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    await phone.wait_for(lambda: session.id not in server.sessions, 5, "the call's session to end")
