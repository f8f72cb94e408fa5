"""WebRTC transport: a browser (or any WebRTC peer) talks to one Duet session over a peer connection.

In OpenAI's style: `POST /v1/realtime/calls` with the SDP offer as the body (`application/sdp`, or a
multipart form with `sdp` and an optional `session` JSON) and the same credentials as the WebSocket
(`Authorization: Bearer <key or ek_...>`); the answer SDP comes back with 201 and a `Location` naming the call.
Audio flows as Opus both ways on the media track; the protocol's JSON events flow on the data channel the
client opens, named "oai-events".

Like the telephony bridge, this module only translates at its edge, and the session core never sees WebRTC:
- in: decoded frames (48 kHz Opus) are resampled to the session's input format and handed to the session as
  `input_audio_buffer.append` bytes; data channel messages are parsed as client events.
- out: reply audio (`AudioDelta`, float32 PCM at the session's output rate) is resampled to 48 kHz and queued
  on `ReplyTrack`, which hands 20 ms frames to the encoder at real time. Every other event goes on the data
  channel as JSON, as the WebSocket would send it (audio deltas do not: the audio is on the track), plus
  OpenAI's WebRTC-only `output_audio_buffer.started` / `.stopped`.

Barge-in: the browser holds no queue we could ask it to flush; the queue is ours. On a confirmed interruption
(the session's `speech_started` during a reply, or `output_audio_buffer.cleared`) the call drops its queued
reply audio and truncates each cut reply to what it actually sent, minus the browser's playout delay
(`PLAYOUT_DELAY_MS`), which is what the user heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import av
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from common import audio as audio_codec
from common.audio import AudioFormat
from common.errors import SessionError
from realtime.core import events as ev
from realtime.core.session import SessionLog
from realtime.transports.auth import Authenticator, Refusal

if TYPE_CHECKING:
    from realtime.runtime import Runtime

log = logging.getLogger(__name__)

CALLS_PATH = "/v1/realtime/calls"
CHANNEL_LABEL = "oai-events"  # the data channel OpenAI's clients open for the protocol's events
TRACK_RATE = 48000  # Opus's clock: what aiortc decodes to and what its encoder takes
FRAME_MS = 20
FRAME_SAMPLES = TRACK_RATE * FRAME_MS // 1000
INPUT_CHUNK_MS = 40  # input appends per 40 ms: 25 events/s, well under the session's event rate limit
# Sent is not heard: the browser's jitter buffer and output hold some of what left us. An estimate for a
# loopback/LAN path (Chrome's jitter buffer settles near 20-60 ms there); a truncate errs on "heard less".
PLAYOUT_DELAY_MS = 40.0
MAX_BEHIND_S = 0.2  # the track fell further behind real time than this (a stalled loop): re-anchor, no burst
CONNECT_TIMEOUT_S = 30.0  # a call whose peer never connects gives its session slot back
MAX_OFFER_BYTES = 64 * 1024
MAX_CHANNEL_BUFFER = 8 * 1024 * 1024  # a peer that does not read its data channel is disconnected past this


class CallSession(Protocol):
    """What the call needs of a session (`realtime.core.session.Session`; tests script a fake)."""

    settings: Any  # SessionSettings: input_format, output_format, duet_events, beta

    def start(self) -> None: ...
    async def handle(self, event: ev.ClientEvent) -> None: ...
    async def close(self) -> None: ...


SessionFactory = Callable[[str, Callable[[ev.ServerEvent], None]], CallSession]


# ---------------------------------------------------------------------------------------------
# Reply audio out


@dataclass
class _Chunk:
    response_id: str
    item_id: str
    samples: np.ndarray  # int16 at TRACK_RATE
    offset: int = 0


class ReplyTrack(MediaStreamTrack):
    """The reply audio the peer hears: 20 ms frames at real time, silence while nothing is queued.

    The queue lives here, so this is where a barge-in flushes. `sent_ms(item)` is how much of an item's
    audio has been handed to the encoder. Callbacks tell the call when a response's audio starts going out
    and when a finished response's audio has all gone out (`output_audio_buffer.started` / `.stopped`)."""

    kind = "audio"

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 on_started: Callable[[str], None] | None = None,
                 on_stopped: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self._clock = clock
        self._sleep = sleep
        self.on_started = on_started
        self.on_stopped = on_stopped
        self._queue: deque[_Chunk] = deque()
        self._queued = 0  # samples
        self._start: float | None = None
        self._pts = 0
        self._sent: dict[str, int] = {}  # item -> samples handed to the encoder
        self._playing: str | None = None  # the response whose audio went out last
        self._finished: set[str] = set()  # responses whose audio is complete (no more will be queued)
        self.frames = 0

    def push(self, response_id: str, item_id: str, samples: np.ndarray) -> None:
        if len(samples):
            self._queue.append(_Chunk(response_id, item_id, samples))
            self._queued += len(samples)

    def finish(self, response_id: str) -> None:
        """No more audio will come for this response; `on_stopped` fires once its queue has gone out."""
        if self._playing != response_id and all(c.response_id != response_id for c in self._queue):
            return  # no audio of it went out or waits (a text reply, or one cleared by a barge-in)
        self._finished.add(response_id)
        if self._playing == response_id and not self._queued:
            self._stopped()

    def clear(self) -> set[str]:
        """Drop everything queued (barge-in); return the items that lost audio."""
        items = {c.item_id for c in self._queue}
        self._queue.clear()
        self._queued = 0
        self._playing = None  # a cleared response is not "stopped": the client gets output_audio_buffer.cleared
        return items

    def sent_ms(self, item_id: str) -> float:
        return self._sent.get(item_id, 0) * 1000.0 / TRACK_RATE

    def queued_items(self) -> set[str]:
        return {c.item_id for c in self._queue}

    @property
    def queued_ms(self) -> float:
        return self._queued * 1000.0 / TRACK_RATE

    def _stopped(self) -> None:
        response_id, self._playing = self._playing, None
        if response_id is not None:
            self._finished.discard(response_id)
            if self.on_stopped is not None:
                self.on_stopped(response_id)

    def next_frame(self) -> np.ndarray:
        """The next 20 ms of int16 samples: queued audio, padded with silence (sans I/O, for tests)."""
        out = np.zeros(FRAME_SAMPLES, np.int16)
        filled = 0
        while filled < FRAME_SAMPLES and self._queue:
            chunk = self._queue[0]
            if chunk.response_id != self._playing:
                self._playing = chunk.response_id
                if self.on_started is not None:
                    self.on_started(chunk.response_id)
            take = chunk.samples[chunk.offset:chunk.offset + FRAME_SAMPLES - filled]
            out[filled:filled + len(take)] = take
            filled += len(take)
            chunk.offset += len(take)
            self._queued -= len(take)
            self._sent[chunk.item_id] = self._sent.get(chunk.item_id, 0) + len(take)
            if chunk.offset >= len(chunk.samples):
                self._queue.popleft()
        if not self._queued and self._playing is not None and self._playing in self._finished:
            self._stopped()
        return out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._start is None:
            self._start = now
        else:
            due = self._start + self._pts / TRACK_RATE
            if now - due > MAX_BEHIND_S:
                # The loop stalled: catching up would burst audio at the peer; start the schedule again.
                self._start = now - self._pts / TRACK_RATE
            elif due > now:
                await self._sleep(due - now)
        samples = self.next_frame()
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = TRACK_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, TRACK_RATE)
        self._pts += FRAME_SAMPLES
        self.frames += 1
        return frame


# ---------------------------------------------------------------------------------------------
# One call


class WebRTCCall:
    """One peer connection bridged to one session. Use it from one event loop.

        call = WebRTCCall(runtime)
        answer_sdp = await call.accept(offer_sdp)   # the session starts here
        await call.closed.wait()                    # the peer hung up, failed, or close() was called
    """

    def __init__(self, runtime: Runtime | None, *, session_factory: SessionFactory | None = None,
                 session_id: str | None = None, duet_events: frozenset[str] | None = None,
                 session_configs: Sequence[dict[str, Any]] = (), playout_delay_ms: float = PLAYOUT_DELAY_MS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`duet_events`: Duet's own events the client asked for (`?duet_events=` on the calls URL).
        `session_configs`: `session.update` bodies applied before the session starts (a client secret's, then
        the call request's own); a bad one raises SessionError from `accept`."""
        if session_factory is None:
            if runtime is None:
                raise ValueError("WebRTCCall needs a runtime, or a session_factory")
            session_factory = _session_factory(runtime)
        self.id = session_id or ev.new_id("sess")
        self.log = SessionLog(log, {"session_id": self.id})
        self.session: CallSession = session_factory(self.id, self._on_server_event)
        self._duet_events = duet_events
        self._session_configs = list(session_configs)
        self.playout_delay_ms = playout_delay_ms
        self.track = ReplyTrack(clock=clock, on_started=self._audio_started, on_stopped=self._audio_stopped)
        self.pc: RTCPeerConnection | None = None
        self.channel: Any = None  # aiortc RTCDataChannel, once the peer opens "oai-events"
        self.closed = asyncio.Event()
        self._pending: list[str] = []  # data channel messages made before the channel opened
        self._tasks: set[asyncio.Task[Any]] = set()
        self._resamplers: dict[str, audio_codec.Resampler] = {}  # item -> output rate to 48 kHz
        self._active: set[str] = set()  # assistant items still being generated
        self._cut: set[str] = set()  # items flushed by a barge-in: later audio of them is dropped
        self._connected = asyncio.Event()
        self.input_ms = 0.0  # audio received from the peer and handed to the session
        self.stats: dict[str, int] = {"barge_ins": 0, "truncates": 0, "events_in": 0, "events_out": 0}

    # ---- lifecycle ----------------------------------------------------------------------------
    async def accept(self, offer_sdp: str) -> str:
        """Answer the peer's offer and start the session; returns the answer SDP (host ICE candidates in it:
        aiortc does not trickle). Raises ValueError for an offer that is not a usable audio offer."""
        for update in self._session_configs:
            self.session.settings.apply(update)
        if self._duet_events is not None:
            self.session.settings.duet_events = self._duet_events
        # No STUN/TURN servers: the peer reaches us at our host candidates (loopback-free LAN addresses).
        # aiortc's default would ask a public STUN server, which a closed network answers only by timing out.
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.on("datachannel", self._on_datachannel)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError and others for an unparsable or odd offer
            raise ValueError(f"the SDP offer was not accepted: {exc}") from None
        audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise ValueError("the SDP offer has no audio media section")
        pc.addTrack(self.track)  # joins the offer's audio transceiver: the reply goes back on the same m-line
        await pc.setLocalDescription(await pc.createAnswer())
        self.session.start()
        self._spawn(self._connect_deadline(), "deadline")
        self.log.info("webrtc call answered")
        return str(pc.localDescription.sdp)

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.session.close()
        self.track.stop()
        if self.pc is not None:
            await self.pc.close()
        self.log.info("webrtc call closed (%.1f s of audio in, %s)", self.input_ms / 1000, self.stats)

    async def _connect_deadline(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._connected.wait()
        except TimeoutError:
            self.log.warning("the peer did not connect within %.0f s: ending the call", CONNECT_TIMEOUT_S)
            self._spawn_close()

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState if self.pc is not None else "closed"
        self.log.info("peer connection %s", state)
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self._spawn_close()

    def _spawn_close(self) -> None:
        # Not through _spawn: close() cancels the spawned tasks, this one included.
        task = asyncio.get_running_loop().create_task(self.close(), name=f"{self.id}-close")
        self._closer = task  # a strong reference: the loop keeps only weak ones

    # ---- peer -> session ----------------------------------------------------------------------
    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != CHANNEL_LABEL:
            self.log.info("ignoring data channel %r (events go on %r)", channel.label, CHANNEL_LABEL)
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("close", self._spawn_close)  # the protocol has no other path: the call is over
        if channel.readyState == "open":
            self._flush_pending()
        else:
            channel.on("open", self._flush_pending)

    def _on_message(self, message: str | bytes) -> None:
        self.stats["events_in"] += 1
        self._spawn(self._handle_message(message), "event")

    async def _handle_message(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                raise SessionError("binary messages are not supported: send JSON text events",
                                   code="binary_not_supported")
            await self.session.handle(ev.decode_client_event(message))
        except SessionError as err:
            self._on_server_event(ev.error_event(err))

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._read_audio(track), "audio-in")

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        """Decoded frames -> the session's input format, in INPUT_CHUNK_MS appends."""
        fmt: AudioFormat | None = None
        resampler: av.AudioResampler | None = None
        pending: list[np.ndarray] = []
        count = 0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            wanted = self.session.settings.input_format
            if wanted != fmt:  # session.update may change the input format mid-call
                fmt, pending, count = wanted, [], 0
                resampler = av.AudioResampler(format="s16", layout="mono", rate=fmt.sample_rate)
            assert resampler is not None and fmt is not None
            for out in resampler.resample(frame):
                samples = out.to_ndarray().reshape(-1)
                pending.append(samples)
                count += len(samples)
            if count * 1000 >= INPUT_CHUNK_MS * fmt.sample_rate:
                pcm = np.concatenate(pending)
                pending, count = [], 0
                self.input_ms += len(pcm) * 1000 / fmt.sample_rate
                # Bytes in the session's input format, as a WebSocket client's base64 would have decoded to.
                data = pcm.astype("<i2").tobytes() if fmt.encoding == "pcm16" else \
                    audio_codec.encode(audio_codec.int16_to_float(pcm), fmt)
                try:
                    await self.session.handle(ev.InputAudioBufferAppend(audio=data))
                except SessionError as err:
                    self._on_server_event(ev.error_event(err))

    # ---- session -> peer ----------------------------------------------------------------------
    def _on_server_event(self, event: ev.ServerEvent) -> None:
        """The session's emit callback: synchronous, so audio and events keep the session's order."""
        if self.closed.is_set():
            return
        if isinstance(event, ev.AudioDelta):
            self._queue_audio(event)
            return  # on the track, not the data channel (as with OpenAI's WebRTC)
        if isinstance(event, ev.AudioDone):
            self._end_audio(event.response_id, event.item_id)
        elif isinstance(event, ev.OutputItemAdded):
            self._active.add(str(event.item.get("id")))
        elif isinstance(event, ev.OutputItemDone):
            self._active.discard(str(event.item.get("id")))
        elif isinstance(event, ev.ResponseDone):
            self.track.finish(str(event.response.get("id", "")))
        elif isinstance(event, ev.SpeechStarted | ev.OutputAudioBufferCleared):
            # During a reply the session announces speech only once it judged it a real interruption.
            self._barge_in(event.__struct_config__.tag)  # type: ignore[arg-type]
        if ev.visible(event, self.session.settings.duet_events):
            self._send(ev.encode_server_event(event, beta=self.session.settings.beta))

    def _queue_audio(self, event: ev.AudioDelta) -> None:
        if event.item_id in self._cut:
            return  # made before the session heard of the barge-in: the user must not hear it
        resampler = self._resamplers.get(event.item_id)
        if resampler is None:
            rate = self.session.settings.output_format.sample_rate
            resampler = self._resamplers[event.item_id] = audio_codec.Resampler(rate, TRACK_RATE)
        samples = resampler.process(np.asarray(event.delta, np.float32))
        self.track.push(event.response_id, event.item_id, audio_codec.float_to_int16(samples))

    def _end_audio(self, response_id: str, item_id: str) -> None:
        resampler = self._resamplers.pop(item_id, None)
        if resampler is not None and item_id not in self._cut:
            self.track.push(response_id, item_id, audio_codec.float_to_int16(resampler.flush()))

    def _audio_started(self, response_id: str) -> None:
        self._send_raw({"type": "output_audio_buffer.started", "response_id": response_id})

    def _audio_stopped(self, response_id: str) -> None:
        self._send_raw({"type": "output_audio_buffer.stopped", "response_id": response_id})

    def _barge_in(self, reason: str) -> None:
        """Drop the queued reply audio and truncate each reply still playing or being generated to what went
        out. Idempotent: the speech_started and the output_audio_buffer.cleared of one barge-in cut once."""
        items = (self.track.queued_items() | self._active) - self._cut
        if not items:
            return
        dropped_ms = self.track.queued_ms
        self.track.clear()
        self._cut |= items
        for item_id in items:
            self._resamplers.pop(item_id, None)
        self.stats["barge_ins"] += 1
        self.log.info("barge-in (%s): dropped %.0f ms of queued reply audio", reason, dropped_ms)
        for item_id in items:
            sent = self.track.sent_ms(item_id)
            if sent > 0:  # nothing was sent of a reply that had not spoken yet
                self._spawn(self._truncate(item_id, round(max(0.0, sent - self.playout_delay_ms))), "truncate")

    async def _truncate(self, item_id: str, audio_end_ms: int) -> None:
        self.stats["truncates"] += 1
        try:
            await self.session.handle(ev.ConversationItemTruncate(item_id=item_id, content_index=0,
                                                                  audio_end_ms=audio_end_ms))
        except SessionError as err:
            # The session may have cut the item to its own playback clock already, a frame shorter.
            self.log.info("could not truncate %s to %d ms: %s (%s)", item_id, audio_end_ms, err.message, err.code)

    def _send_raw(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", ev.new_id("event"))
        self._send(json.dumps(event))

    def _send(self, message: str) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            self._pending.append(message)  # session.created comes before the peer has opened the channel
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER:
            self.log.warning("the peer is not reading its data channel: ending the call")
            self._spawn_close()
            return
        channel.send(message)
        self.stats["events_out"] += 1

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for message in pending:
            self._send(message)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.id}-webrtc-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("webrtc task %s failed", task.get_name(), exc_info=task.exception())


def _session_factory(runtime: Runtime) -> SessionFactory:
    from realtime.core.session import Session

    return lambda session_id, emit: Session(runtime, session_id, emit)


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint


Refuse = Callable[..., web.Response]  # DuetServer._refuse(request, refusal, as_json=...)
Capacity = Callable[[web.Request, str | None], web.Response | None]  # DuetServer._capacity


class WebRTCEndpoint:
    """`POST /v1/realtime/calls` on the server's app. The server's auth, session registry, per-client counts
    and refusal paths are handed in, so a call is judged and counted exactly like a WebSocket session."""

    def __init__(self, runtime: Runtime, auth: Authenticator, sessions: MutableMapping[str, Any],
                 per_client: MutableMapping[str, int], *, refuse: Refuse, capacity: Capacity,
                 session_factory: SessionFactory | None = None) -> None:
        self.rt = runtime
        self.auth = auth
        self.sessions = sessions
        self.per_client = per_client
        self._refuse = refuse
        self._capacity = capacity
        self._factory = session_factory
        self.calls: dict[str, WebRTCCall] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def add_routes(self, app: web.Application) -> None:
        """The calls route; the server adds `close_all` to its shutdown hooks after its drain."""
        app.router.add_post(CALLS_PATH, self.create_call)

    async def create_call(self, request: web.Request) -> web.Response:
        verdict = self.auth.authenticate(request.headers.get("Authorization"))
        if isinstance(verdict, Refusal):
            return self._refuse(request, verdict, as_json=True)
        _credential, secret = verdict

        def bad(message: str, status: int = 400, reason: str = "bad_request") -> web.Response:
            return self._refuse(request, Refusal(status, reason, message), as_json=True)

        try:
            duet_events = ev.parse_duet_events(",".join(v for v in request.query.getall("duet_events", []) if v))
        except ValueError as exc:
            return bad(f"duet_events: {exc}")
        try:
            offer, wanted = await _read_offer(request)
        except ValueError as exc:
            return bad(str(exc))
        except _UnsupportedMedia as exc:
            return bad(str(exc), 415, "unsupported_media_type")
        remote = request.remote or "unknown"
        if (refused := self._capacity(request, remote)) is not None:
            return refused
        configs = [c for c in ((secret.session if secret is not None else None), wanted) if c]
        call = WebRTCCall(self.rt if self._factory is None else None, session_factory=self._factory,
                          duet_events=duet_events if (duet_events or secret is None) else None,
                          session_configs=configs)
        # Registered before the first await, so concurrent offers cannot all pass the session cap.
        self.sessions[call.id] = call.session
        self.per_client[remote] = self.per_client.get(remote, 0) + 1
        self.calls[call.id] = call
        try:
            answer = await call.accept(offer)
        except (ValueError, SessionError) as exc:
            await self._forget(call, remote)
            message = exc.message if isinstance(exc, SessionError) else str(exc)
            return bad(message)
        except Exception:
            call.log.exception("could not answer a WebRTC offer")
            await self._forget(call, remote)
            return bad("could not answer the offer", 500, "internal_error")
        call.log.info("webrtc call from %s", remote)
        watcher = asyncio.get_running_loop().create_task(self._watch(call, remote), name=f"{call.id}-watch")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": f"{CALLS_PATH}/{call.id}"})

    async def _watch(self, call: WebRTCCall, remote: str) -> None:
        await call.closed.wait()
        await self._forget(call, remote)

    async def _forget(self, call: WebRTCCall, remote: str) -> None:
        if self.calls.pop(call.id, None) is None:
            return
        await call.close()
        self.sessions.pop(call.id, None)
        self.per_client[remote] = self.per_client.get(remote, 1) - 1
        if self.per_client[remote] <= 0:
            del self.per_client[remote]

    async def close_all(self, app: web.Application | None = None) -> None:
        await asyncio.gather(*(call.close() for call in list(self.calls.values())), return_exceptions=True)
        watchers = list(self._watchers)
        with contextlib.suppress(Exception):
            await asyncio.gather(*watchers, return_exceptions=True)


class _UnsupportedMedia(Exception):
    pass


async def _read_offer(request: web.Request) -> tuple[str, dict[str, Any] | None]:
    """The SDP offer and an optional session configuration: a bare `application/sdp` body, or OpenAI's
    multipart form (`sdp`, `session` as JSON; a urlencoded form is read the same way)."""
    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        raise ValueError(f"the offer is over {MAX_OFFER_BYTES} bytes")
    kind = request.content_type
    session: dict[str, Any] | None = None
    if kind == "application/sdp" or kind == "text/plain":
        body = await request.content.read(MAX_OFFER_BYTES + 1)
        if len(body) > MAX_OFFER_BYTES:
            raise ValueError(f"the offer is over {MAX_OFFER_BYTES} bytes")
        sdp = body.decode("utf-8", "replace")
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.post()
        sdp = str(form.get("sdp") or "")
        raw = form.get("session")
        if raw:
            try:
                session = json.loads(str(raw))
            except json.JSONDecodeError:
                raise ValueError("session must be a JSON object") from None
            if not isinstance(session, dict):
                raise ValueError("session must be a JSON object")
            if session.get("type", "realtime") != "realtime":
                raise ValueError("session must be a realtime session configuration")
    else:
        raise _UnsupportedMedia("send the SDP offer as application/sdp (or multipart/form-data with sdp)")
    if not sdp.lstrip().startswith("v=0"):
        raise ValueError("the body is not an SDP offer")
    return sdp, session
