"""The WebRTC transport with a scripted session: a real aiortc peer on the other side (Opus both ways, the
"oai-events" data channel), the reply track's pacing and accounting, barge-in, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import fractions
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from common.config import DuetConfig
from realtime.core import events as ev
from realtime.core.settings import SessionSettings
from realtime.transports import webrtc
from realtime.transports.webrtc import FRAME_SAMPLES, TRACK_RATE, ReplyTrack, WebRTCCall


class ScriptedSession:
    """Records what the call hands it; the test emits server events through `emit`."""

    def __init__(self, session_id: str, emit: Callable[[ev.ServerEvent], None]) -> None:
        self.id = session_id
        self.emit = emit
        self.settings = SessionSettings.from_config(DuetConfig())
        self.handled: list[ev.ClientEvent] = []
        self.closed = False

    def start(self) -> None:
        self.emit(ev.SessionCreated(session={"id": self.id, "object": "realtime.session"}))

    async def handle(self, event: ev.ClientEvent) -> None:
        self.handled.append(event)

    async def close(self) -> None:
        self.closed = True

    def of(self, kind: type[ev.ClientEvent]) -> list[Any]:
        return [e for e in self.handled if isinstance(e, kind)]


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


class ToneTrack(MediaStreamTrack):
    """The peer's microphone: a 440 Hz tone in 20 ms frames at real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        await asyncio.sleep(max(0.0, self._start + self._pts / TRACK_RATE - loop.time()))
        t = (self._pts + np.arange(FRAME_SAMPLES)) / TRACK_RATE
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = TRACK_RATE, self._pts, fractions.Fraction(1, TRACK_RATE)
        self._pts += FRAME_SAMPLES
        return frame


class Peer:
    """The browser's side: an offer with audio both ways and the events channel."""

    def __init__(self, send_audio: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel(webrtc.CHANNEL_LABEL)
        self.events: list[dict[str, Any]] = []
        self.channel.on("message", lambda m: self.events.append(json.loads(m)))
        if send_audio:
            self.pc.addTrack(ToneTrack())
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.heard: list[np.ndarray] = []  # 48 kHz mono int16 frames of the reply track
        self.pc.on("track", lambda track: asyncio.ensure_future(self._listen(track)))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def _listen(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=TRACK_RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for out in resampler.resample(frame):
                self.heard.append(out.to_ndarray().reshape(-1))

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def heard_audio(self) -> np.ndarray:
        return np.concatenate(self.heard).astype(np.float32) / 32768 if self.heard else np.zeros(0, np.float32)


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ---- the reply track, sans I/O ---------------------------------------------------------------


def test_reply_track_frames_accounting_and_clear() -> None:
    started: list[str] = []
    stopped: list[str] = []
    track = ReplyTrack(on_started=started.append, on_stopped=stopped.append)
    audio = (np.arange(int(0.03 * TRACK_RATE)) % 100 + 1).astype(np.int16)  # 30 ms, no zeros
    track.push("r1", "a", audio)
    first, second, third = track.next_frame(), track.next_frame(), track.next_frame()
    assert np.array_equal(first, audio[:FRAME_SAMPLES])
    assert np.array_equal(second[:FRAME_SAMPLES // 2], audio[FRAME_SAMPLES:]) and not second[FRAME_SAMPLES // 2:].any()
    assert not third.any()  # silence while nothing is queued
    assert track.sent_ms("a") == pytest.approx(30.0) and started == ["r1"]
    assert stopped == []  # the response may still produce audio: not "stopped" on an underrun
    track.finish("r1")
    assert stopped == ["r1"]

    track.push("r2", "b", audio)
    track.push("r2", "b", audio)
    track.next_frame()
    assert track.queued_ms == pytest.approx(40.0)
    assert track.clear() == {"b"}
    assert track.queued_ms == 0 and not track.next_frame().any()
    assert track.sent_ms("b") == pytest.approx(20.0)  # what went out before the clear stays counted
    track.finish("r2")
    assert stopped == ["r1"]  # a cleared response is not reported as played out


async def test_reply_track_paces_at_real_time_and_does_not_burst_after_a_stall() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    track = ReplyTrack(clock=lambda: now[0], sleep=sleep)
    frames = [await track.recv() for _ in range(3)]
    assert [f.pts for f in frames] == [0, FRAME_SAMPLES, 2 * FRAME_SAMPLES]
    assert frames[0].sample_rate == TRACK_RATE and frames[0].samples == FRAME_SAMPLES
    assert slept == pytest.approx([0.02, 0.02])
    now[0] += 1.0  # the loop stalled for a second
    slept.clear()
    await track.recv()
    await track.recv()
    # Re-anchored: the next frame waits its 20 ms instead of 50 frames going out at once.
    assert slept == pytest.approx([0.02])


# ---- a real peer ----------------------------------------------------------------------------------


async def test_call_with_a_real_peer() -> None:
    sessions: list[ScriptedSession] = []

    def factory(session_id: str, emit: Callable[[ev.ServerEvent], None]) -> ScriptedSession:
        sessions.append(ScriptedSession(session_id, emit))
        return sessions[-1]

    call = WebRTCCall(None, session_factory=factory, duet_events=frozenset())
    peer = Peer()
    try:
        await peer.answer(await call.accept(await peer.offer()))
        (session,) = sessions
        # Events: session.created was made before the channel opened and still arrives, first.
        await eventually(lambda: "session.created" in peer.types(), what="session.created")
        assert peer.types()[0] == "session.created"
        peer.channel.send(json.dumps({"type": "response.create"}))
        peer.channel.send("{not json")
        await eventually(lambda: bool(session.of(ev.ResponseCreate)), what="response.create")
        await eventually(lambda: "error" in peer.types(), what="an error event")
        assert next(e for e in peer.events if e["type"] == "error")["error"]["code"] == "invalid_json"

        # Input: Opus from the peer arrives as pcm16 at the session's 24 kHz, the tone intact.
        await eventually(lambda: sum(len(e.audio) for e in session.of(ev.InputAudioBufferAppend)) >= 2 * 24000,
                         what="a second of input audio")
        pcm = np.frombuffer(b"".join(e.audio for e in session.of(ev.InputAudioBufferAppend)), "<i2")
        assert dominant_hz(pcm[-12000:].astype(np.float32), 24000) == pytest.approx(440, abs=5)

        # Output: a reply's float32 deltas at 24 kHz play on the track at 48 kHz, not on the data channel.
        session.emit(ev.OutputItemAdded(response_id="resp_1", item={"id": "item_1", "type": "message"}))
        session.emit(ev.AudioDelta(response_id="resp_1", item_id="item_1", delta=tone(660, 0.6, 24000)))
        session.emit(ev.AudioDone(response_id="resp_1", item_id="item_1"))
        session.emit(ev.OutputItemDone(response_id="resp_1", item={"id": "item_1", "type": "message"}))
        session.emit(ev.ResponseDone(response={"id": "resp_1", "status": "completed"}))
        await eventually(lambda: "output_audio_buffer.stopped" in peer.types(), what="the reply played out")
        await asyncio.sleep(0.2)  # the last frames through the peer's jitter buffer
        heard = peer.heard_audio()
        loud = heard[np.abs(heard) > 0.05]
        assert len(loud) > 0.3 * TRACK_RATE
        assert dominant_hz(heard[np.argmax(np.abs(heard) > 0.05):][:TRACK_RATE // 2], TRACK_RATE) == \
            pytest.approx(660, abs=5)
        assert call.track.sent_ms("item_1") == pytest.approx(600, abs=21)  # resampler tail included
        assert "response.output_audio.delta" not in peer.types()
        assert peer.types().index("output_audio_buffer.started") < peer.types().index("output_audio_buffer.stopped")

        # Barge-in: the session confirms speech during a long reply; the call drops its queue and truncates the
        # reply to what it sent, less the playout delay; later audio of that item is dropped.
        session.emit(ev.OutputItemAdded(response_id="resp_2", item={"id": "item_2", "type": "message"}))
        session.emit(ev.AudioDelta(response_id="resp_2", item_id="item_2", delta=tone(660, 5.0, 24000)))
        await asyncio.sleep(0.5)
        sent = call.track.sent_ms("item_2")
        session.emit(ev.SpeechStarted(audio_start_ms=1000, item_id="item_user"))
        session.emit(ev.OutputAudioBufferCleared(response_id="resp_2"))  # the same barge-in: cut once
        assert call.track.queued_ms == 0
        await eventually(lambda: bool(session.of(ev.ConversationItemTruncate)), what="the truncate")
        (truncate,) = session.of(ev.ConversationItemTruncate)
        assert truncate.item_id == "item_2"
        assert truncate.audio_end_ms == round(sent - webrtc.PLAYOUT_DELAY_MS)
        assert 300 < sent < 1500
        session.emit(ev.AudioDelta(response_id="resp_2", item_id="item_2", delta=tone(660, 1.0, 24000)))
        assert call.track.queued_ms == 0
        assert call.stats["barge_ins"] == 1
        assert "input_audio_buffer.speech_started" in peer.types()

        # The peer hangs up: the call closes its session.
        await peer.pc.close()
        await asyncio.wait_for(call.closed.wait(), 15)
        assert session.closed
    finally:
        await peer.pc.close()
        await call.close()


async def test_an_offer_without_audio_is_refused() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel(webrtc.CHANNEL_LABEL)
    await pc.setLocalDescription(await pc.createOffer())
    call = WebRTCCall(None, session_factory=ScriptedSession)
    with pytest.raises(ValueError, match="no audio"):
        await call.accept(pc.localDescription.sdp)
    await pc.close()
    await call.close()


# ---- the endpoint --------------------------------------------------------------------------------


@pytest.fixture
async def keyed_app() -> Any:
    from realtime.transports.websocket import DuetServer
    from tests.realtime.fake_runtime import fake_runtime

    srv = DuetServer(fake_runtime(), environ={"DUET_API_KEYS": "sk-test"})
    sessions: list[ScriptedSession] = []

    def factory(session_id: str, emit: Callable[[ev.ServerEvent], None]) -> ScriptedSession:
        sessions.append(ScriptedSession(session_id, emit))
        return sessions[-1]

    srv.webrtc._factory = factory  # no models in this runtime: script the session
    async with TestClient(TestServer(srv.app)) as client:
        yield srv, client, sessions
    await srv.webrtc.close_all()


async def test_calls_endpoint(keyed_app: Any) -> None:
    srv, client, sessions = keyed_app
    peer = Peer(send_audio=False)
    offer = await peer.offer()
    sdp = {"Content-Type": "application/sdp"}
    auth = {"Authorization": "Bearer sk-test", **sdp}

    r = await client.post(webrtc.CALLS_PATH, data=offer, headers=sdp)
    assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
    r = await client.post(webrtc.CALLS_PATH, data=offer,
                          headers={"Authorization": "Bearer sk-test", "Content-Type": "application/json"})
    assert r.status == 415
    r = await client.post(webrtc.CALLS_PATH, data="hello", headers=auth)
    assert r.status == 400 and "SDP" in (await r.json())["error"]["message"]
    r = await client.post(webrtc.CALLS_PATH + "?duet_events=nope", data=offer, headers=auth)
    assert r.status == 400
    assert not sessions and not srv.sessions

    # An ephemeral key works like the WebSocket's; the call's session is registered like a WebSocket session.
    secret = await (await client.post("/v1/realtime/client_secrets", json={},
                                      headers={"Authorization": "Bearer sk-test"})).json()
    r = await client.post(webrtc.CALLS_PATH + "?duet_events=thought",
                          data=offer, headers={"Authorization": f"Bearer {secret['value']}", **sdp})
    assert r.status == 201 and r.content_type == "application/sdp"
    (session,) = sessions
    assert r.headers["Location"] == f"{webrtc.CALLS_PATH}/{session.id}"
    assert srv.sessions[session.id] is session and session.settings.duet_events == {"duet.thought.delta"}
    await peer.answer(await r.text())
    await eventually(lambda: "session.created" in peer.types(), what="session.created")

    # A multipart request with a session configuration, as OpenAI's SDKs send it.
    other = Peer(send_audio=False)
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("sdp", await other.offer())
    form.add_field("session", json.dumps({"type": "realtime", "instructions": "Be brief."}))
    r = await client.post(webrtc.CALLS_PATH, data=form, headers={"Authorization": "Bearer sk-test"})
    assert r.status == 201
    assert sessions[1].settings.instructions == "Be brief."
    await other.answer(await r.text())
    bad = Peer(send_audio=False)
    r = await client.post(webrtc.CALLS_PATH, headers={"Authorization": "Bearer sk-test"},
                          data={"sdp": await bad.offer(), "session": json.dumps({"temperature": 99})})
    assert r.status == 400 and len(srv.sessions) == 2  # refused, and not left registered
    await bad.pc.close()

    # Hanging up frees the session slot and the per-client count.
    await eventually(lambda: other.pc.connectionState == "connected", what="the second call to connect")
    await peer.pc.close()
    await other.pc.close()
    await eventually(lambda: not srv.sessions, timeout=20, what="the calls to end")
    assert not srv._per_client


async def test_page_is_served_with_a_strict_policy(keyed_app: Any) -> None:
    _srv, client, _sessions = keyed_app
    r = await client.get("/")
    assert r.status == 200 and r.content_type == "text/html"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert '<script type="module" src="/web/app.js">' in await r.text()
    for name, kind in (("app.js", "text/javascript"), ("worklets.js", "text/javascript"), ("style.css", "text/css")):
        r = await client.get(f"/web/{name}")
        assert r.status == 200 and r.content_type == kind, name
    assert (await client.get("/web/nope.js")).status == 404
    assert (await client.get("/web/..%2F..%2Fpyproject.toml")).status == 404


async def test_a_peer_that_never_connects_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webrtc, "CONNECT_TIMEOUT_S", 0.5)
    peer = Peer(send_audio=False)
    sessions: list[ScriptedSession] = []
    call = WebRTCCall(None, session_factory=lambda i, e: sessions.append(ScriptedSession(i, e)) or sessions[-1])
    await call.accept(await peer.offer())  # the answer never reaches the peer
    await asyncio.wait_for(call.closed.wait(), 5)
    assert sessions[0].closed
    await peer.pc.close()
