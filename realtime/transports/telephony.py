"""Telephony bridge: Twilio / Telnyx Media Streams <-> one Duet session.

A phone platform streams the call as JSON messages over a WebSocket (`connected`, `start`, `media`
with 20 ms of base64 G.711 at 8 kHz, `mark`, `dtmf`, `stop`) and plays what comes back (`media`,
`mark`, `clear`). This module only translates: phone messages become OpenAI Realtime client events
for `realtime.core.session.Session`, and the session's server events become phone messages. The session
core never sees the telephony wire format.

Playback accounting: after the frames of each audio delta we send a `mark`; the platform echoes it
when playback reaches it, so the echoed marks say how much of which reply the caller has heard. On
barge-in we send `clear` (the platform drops its queued audio; without it the old reply keeps
playing) and truncate the reply in the history to what was heard.

Use it without Duet's server: build a `Runtime`, then per call

    call = TelephonyCall(runtime, "twilio")
    await call.start()
    await call.feed(message)             # each parsed message from the platform
    async for frame in call.frames():    # each message to send back (a dict; JSON-encode it)
        ...
    await call.close()

or hand `run_call` any async iterable of incoming text messages and a send coroutine.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from common import audio as audio_codec
from common.errors import SessionError
from realtime.core import events as ev
from realtime.core.limits import Throttled
from realtime.core.session import SessionLog

if TYPE_CHECKING:
    from realtime.runtime import Runtime

log = logging.getLogger(__name__)

FRAME_MS = 20  # what both platforms send and expect: 160 bytes of G.711 at 8 kHz
# Bad input from the platform is logged at most once per this many seconds per call, with a count of the
# repeats since: the platforms take no error events, and a line per bad frame (50 frames a second) floods logs.
BAD_INPUT_LOG_PERIOD_S = 10.0
# What `feed` treats as a malformed message rather than a bug: a handler reading a field of the wrong shape
# (KeyError...), a number out of range (`int(Infinity)`: json.loads accepts Infinity), or a value nested past
# the stack (str() of it).
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, ArithmeticError, RecursionError)


@dataclass(frozen=True)
class Dialect:
    """Where a platform puts the few fields that differ; the event names and shapes are shared."""

    name: str
    stream_key: str  # the stream id, top level of every message (and in `start` for Twilio)
    format_key: str  # the media format object inside `start`
    rate_key: str
    params_keys: tuple[str, ...]  # custom parameters inside `start`


DIALECTS: dict[str, Dialect] = {
    "twilio": Dialect("twilio", "streamSid", "mediaFormat", "sampleRate", ("customParameters",)),
    # Telnyx documents TwiML-compatible <Parameter>s; accept either spelling of the field.
    "telnyx": Dialect("telnyx", "stream_id", "media_format", "sample_rate", ("custom_parameters", "customParameters")),
}

# Platform encoding names (lower-cased) -> the session's G.711 formats.
_ENCODINGS: dict[str, audio_codec.Encoding] = {
    "audio/x-mulaw": "g711_ulaw", "pcmu": "g711_ulaw",
    "audio/x-alaw": "g711_alaw", "pcma": "g711_alaw",
}
_INBOUND_TRACKS = (None, "inbound", "inbound_track")


class CallSession(Protocol):
    """What the bridge needs of a session (`realtime.core.session.Session`; tests script a fake)."""

    def start(self) -> None: ...
    async def handle(self, event: ev.ClientEvent) -> None: ...
    async def close(self) -> None: ...


SessionFactory = Callable[[str, Callable[[ev.ServerEvent], None]], CallSession]
DtmfHook = Callable[[str], Awaitable[None] | None]
EventHook = Callable[[ev.ServerEvent], None]


@dataclass
class _Mark:
    item_id: str
    start_ms: float  # the item's audio before this mark's frames
    end_ms: float  # ... and after them
    sent_at: float


class TelephonyCall:
    """One phone call bridged to one session. Not thread-safe: use it from one event loop."""

    def __init__(self, runtime: Runtime | None, dialect: str | Dialect = "twilio", *,
                 output_encoding: audio_codec.Encoding | None = None, on_dtmf: DtmfHook | None = None,
                 on_event: EventHook | None = None, session_factory: SessionFactory | None = None,
                 session_id: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """`output_encoding`: what the platform plays back, when it differs from what it streams (Telnyx's
        bidirectional codec is configured apart from the call's); default: the same as the call.
        `on_event`: sees every session event (transcripts, errors) before translation."""
        if isinstance(dialect, str) and dialect not in DIALECTS:
            raise ValueError(f"unknown telephony dialect {dialect!r}; expected one of {sorted(DIALECTS)}")
        self.dialect = DIALECTS[dialect] if isinstance(dialect, str) else dialect
        if output_encoding not in (None, "g711_ulaw", "g711_alaw"):
            raise ValueError(f"output_encoding must be g711_ulaw or g711_alaw, not {output_encoding!r}")
        if session_factory is None:
            if runtime is None:
                raise ValueError("TelephonyCall needs a runtime, or a session_factory")
            session_factory = _session_factory(runtime)
        self._factory = session_factory
        self.id = session_id or ev.new_id("sess")
        self.log = SessionLog(log, {"session_id": self.id})
        self.on_dtmf = on_dtmf
        self.on_event = on_event
        self._output_encoding = output_encoding
        self._clock = clock
        self.session: CallSession | None = None
        self.stream_id: str | None = None
        self.call_info: dict[str, Any] = {}  # the `start` message's metadata (call sid, tracks, ...)
        self.output_format = audio_codec.G711_ULAW
        self.closed = False
        self._started = False  # the platform's `start` arrived
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_early_media = False
        self._bad_input = Throttled(self.log, period=BAD_INPUT_LOG_PERIOD_S, clock=clock)
        self.bad_messages = 0  # platform messages ignored: not JSON, malformed, or rejected by the session
        # Playback accounting (see the module docstring).
        self._marks: dict[str, _Mark] = {}  # sent, not yet echoed; insertion order = play order
        self._item_ms: dict[str, float] = {}  # ms of each item's audio sent
        self._played_ms: dict[str, float] = {}  # ms of each item's audio the platform reported played
        self._last_ack_at: float | None = None
        self._carry = b""  # the tail of a delta short of a whole frame, sent with the next delta
        self._carry_item: str | None = None
        self._active: set[str] = set()  # assistant items still being generated
        self._cut: set[str] = set()  # items whose playback was cleared: later audio of them is dropped

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.session is not None:
            return
        self.session = self._factory(self.id, self._on_server_event)
        self.session.start()
        self.log.info("%s call bridge started", self.dialect.name)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        self._outbox.put_nowait(None)
        if self.bad_messages:
            self.log.warning("%d bad messages from %s were ignored on this call", self.bad_messages,
                             self.dialect.name)
        self.log.info("%s call bridge closed", self.dialect.name)

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        """Messages for the platform, in order, until the call is closed."""
        while (frame := await self._outbox.get()) is not None:
            yield frame

    # ---- platform -> session ------------------------------------------------------------------
    async def feed_raw(self, data: str | bytes) -> None:
        """One WebSocket message as received. Bad JSON is logged and ignored: the platforms take no errors."""
        try:
            message = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            self._warn_bad("not_json", "ignoring a message that is not JSON: %s", exc)
            return
        except RecursionError:  # JSON nested past the stack (10,000 `[`): bad input, not a reason to end the call
            self._warn_bad("not_json", "ignoring a message that is not JSON: nested too deeply")
            return
        if not isinstance(message, dict):
            self._warn_bad("not_object", "ignoring a JSON message that is not an object")
            return
        await self.feed(message)

    async def feed(self, message: dict[str, Any]) -> None:
        """One parsed platform message. Never raises for bad input: it is logged and the call goes on."""
        if self.closed:
            return
        if self.session is None:
            await self.start()
        kind = message.get("event")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self.log.debug("ignoring %s message %r", self.dialect.name, kind)
            return
        try:
            await handler(self, message)
        except SessionError as err:
            self._warn_bad(f"rejected {kind}", "session rejected %s message: %s (%s)", kind, err.message[:200],
                           err.code)
        except _MALFORMED as exc:
            self._warn_bad(f"malformed {kind}", "ignoring malformed %s message: %s", kind, repr(exc)[:200])

    def _warn_bad(self, key: str, msg: str, *args: Any) -> None:
        """`key`: what is throttled together; only known message kinds reach here, so the keys are few."""
        self.bad_messages += 1
        self._bad_input.warning(key, msg, *args)

    async def _on_connected(self, message: dict[str, Any]) -> None:
        self.log.info("%s connected: protocol %s, version %s", self.dialect.name, message.get("protocol"),
                      message.get("version"))

    async def _on_start(self, message: dict[str, Any]) -> None:
        d = self.dialect
        start = message.get("start") or {}
        if not isinstance(start, dict):
            raise TypeError("start must be an object")
        self.stream_id = str(message.get(d.stream_key) or start.get(d.stream_key) or "") or None
        self.call_info = start
        fmt = start.get(d.format_key) or {}
        name = str(fmt.get("encoding", "audio/x-mulaw")).lower()
        rate, channels = fmt.get(d.rate_key, 8000), fmt.get("channels", 1)
        encoding = _ENCODINGS.get(name)
        if encoding is None or int(rate) != audio_codec.G711_RATE or int(channels) != 1:
            self.log.error("unsupported media format %s; Duet bridges mono G.711 (PCMU/PCMA) at 8 kHz: ending the "
                           "call", fmt)
            await self.close()
            return
        out = self._output_encoding or encoding
        self.output_format = audio_codec.parse_audio_format(out)
        await self._to_session(ev.SessionUpdate(session={
            "input_audio_format": encoding, "output_audio_format": out, "turn_detection": {"type": "server_vad"}}))
        self._started = True
        self.log.info("stream %s started (%s in, %s out)", self.stream_id, encoding, out)
        # Separate update: a bad parameter must not undo the audio formats above.
        params = _custom_parameters(start, d.params_keys)
        update: dict[str, Any] = {}
        if "instructions" in params:
            update["instructions"] = str(params["instructions"])
        if "pacing" in params:
            update["duet"] = {"pacing": params["pacing"]}
        if update:
            await self._to_session(ev.SessionUpdate(session=update))

    async def _on_media(self, message: dict[str, Any]) -> None:
        if not self._started:
            if not self._warned_early_media:
                self._warned_early_media = True
                self.log.warning("dropping media that arrived before the stream's start message")
            return
        media = message["media"]
        if media.get("track") not in _INBOUND_TRACKS:
            return  # our own reply, streamed back when the platform sends both tracks
        payload = media["payload"]
        if not isinstance(payload, str):
            raise TypeError("media.payload must be a base64 string")
        # G.711 in the session's input format: base64 is the platform's wire, undone here at the edge.
        await self._to_session(ev.InputAudioBufferAppend(audio=ev.decode_audio(payload)))

    async def _on_mark(self, message: dict[str, Any]) -> None:
        name = message["mark"]["name"]
        if name not in self._marks:
            # Marks of cleared audio come back at once on `clear`; they say nothing about what was played.
            self.log.debug("mark %s echoed after a clear (or not ours): ignored", name)
            return
        now = self._clock()
        # Echoes come in play order: every earlier mark has been played too.
        while self._marks:
            key, mark = next(iter(self._marks.items()))
            del self._marks[key]
            self._played_ms[mark.item_id] = mark.end_ms
            if key == name:
                break
        self._last_ack_at = now

    async def _on_dtmf(self, message: dict[str, Any]) -> None:
        digit = str(message["dtmf"]["digit"])
        self.log.info("caller pressed %s", digit)
        if self.on_dtmf is not None:
            try:
                result = self.on_dtmf(digit)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.log.exception("on_dtmf hook failed")

    async def _on_stop(self, message: dict[str, Any]) -> None:
        self.log.info("stream %s stopped by the platform", self.stream_id)
        await self.close()

    async def _on_error(self, message: dict[str, Any]) -> None:
        self._bad_input.warning("platform_error", "%s reported an error: %.500s", self.dialect.name, message)

    _handlers: ClassVar[dict[str, Callable[[TelephonyCall, dict[str, Any]], Awaitable[None]]]] = {
        "connected": _on_connected, "start": _on_start, "media": _on_media, "mark": _on_mark,
        "dtmf": _on_dtmf, "stop": _on_stop, "error": _on_error,
    }

    async def _to_session(self, event: ev.ClientEvent) -> None:
        assert self.session is not None
        await self.session.handle(event)

    # ---- session -> platform ------------------------------------------------------------------
    def _on_server_event(self, event: ev.ServerEvent) -> None:
        """The session's emit callback: runs synchronously, so frames keep the session's event order."""
        if self.closed:
            return
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                self.log.exception("on_event hook failed")
        if isinstance(event, ev.AudioDelta):
            if event.item_id not in self._cut:
                self._send_audio(event.item_id, audio_codec.encode(event.delta, self.output_format))
        elif isinstance(event, ev.AudioDone):
            if self._carry_item == event.item_id:
                self._flush_carry()
        elif isinstance(event, ev.OutputItemAdded):
            self._active.add(str(event.item.get("id")))
        elif isinstance(event, ev.OutputItemDone):
            self._active.discard(str(event.item.get("id")))
        elif isinstance(event, ev.SpeechStarted):
            # During a reply the session announces speech only once it judged it a real interruption
            # (not the reply's echo or a cough), and then cancels the reply.
            self._barge_in("speech_started")
        elif isinstance(event, ev.OutputAudioBufferCleared):
            self._barge_in("output_audio_buffer.cleared")
        elif isinstance(event, ev.ItemTruncated):
            self.log.info("session truncated %s to %d ms heard", event.item_id, event.audio_end_ms)
        elif isinstance(event, ev.Error):  # throttled like bad input: a flood of bad audio is one error each
            self._bad_input.warning("session_error", "session error %s: %s", event.error.code, event.error.message)

    def _send_audio(self, item_id: str, data: bytes) -> None:
        if self._carry_item not in (None, item_id):
            self._flush_carry()
        data = self._carry + data
        frame = self._frame_bytes
        whole = len(data) - len(data) % frame
        self._carry, self._carry_item = data[whole:], item_id
        if whole:
            self._send_frames(item_id, data[:whole], whole)

    def _flush_carry(self) -> None:
        """Send the last partial frame, padded with silence (the end of a reply, or the next one starts)."""
        item_id, data = self._carry_item, self._carry
        self._carry, self._carry_item = b"", None
        if item_id is None or not data:
            return
        silence = audio_codec.encode(np.zeros(self._frame_bytes - len(data), np.float32), self.output_format)
        self._send_frames(item_id, data + silence, len(data))

    def _send_frames(self, item_id: str, data: bytes, audio_bytes: int) -> None:
        """Frames of `data`, then a mark at the end of its `audio_bytes` of real (unpadded) audio: the
        session checks a truncation against the audio it produced, which had no padding."""
        frame = self._frame_bytes
        for i in range(0, len(data), frame):
            self._put({"event": "media", "media": {"payload": ev.encode_audio(data[i:i + frame])}})
        start = self._item_ms.get(item_id, 0.0)
        end = start + self.output_format.duration_ms(audio_bytes)
        self._item_ms[item_id] = end
        name = f"{item_id}@{end:.0f}"
        self._marks[name] = _Mark(item_id, start, end, self._clock())
        self._put({"event": "mark", "mark": {"name": name}})

    def played_ms(self, item_id: str) -> float:
        """How much of an item's audio the caller has heard: the last echoed mark, plus the time the
        platform has been playing the next one since (capped at that mark, so at most one delta off)."""
        played = self._played_ms.get(item_id, 0.0)
        head = next(iter(self._marks.values()), None)
        if head is None or head.item_id != item_id:
            return played
        began = max(head.sent_at, self._last_ack_at or head.sent_at)
        return min(head.end_ms, head.start_ms + max(0.0, self._clock() - began) * 1000.0)

    @property
    def unplayed(self) -> bool:
        """Is audio queued at the platform that the caller has not heard yet?"""
        return bool(self._marks)

    def _barge_in(self, reason: str) -> None:
        """Stop the replies being played or generated: `clear` the platform's queue, drop their later audio,
        and truncate each to what was heard. Idempotent: a second trigger finds nothing left to cut."""
        items = {m.item_id for m in self._marks.values()} | self._active
        if self._carry_item is not None:
            items.add(self._carry_item)
        items -= self._cut
        heard = {item_id: self.played_ms(item_id) for item_id in items}
        if self._marks:
            self._put({"event": "clear"})
            self.log.info("barge-in (%s): cleared the platform's queued audio", reason)
        self._marks.clear()
        self._carry, self._carry_item = b"", None
        self._cut |= items
        for item_id, ms in heard.items():
            if item_id in self._item_ms:  # nothing was sent of a reply that had not spoken yet
                self._spawn(self._truncate(item_id, round(ms)))

    async def _truncate(self, item_id: str, audio_end_ms: int) -> None:
        try:
            await self._to_session(ev.ConversationItemTruncate(item_id=item_id, content_index=0,
                                                               audio_end_ms=audio_end_ms))
        except SessionError as err:
            self.log.warning("could not truncate %s to %d ms: %s (%s)", item_id, audio_end_ms, err.message, err.code)

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def _frame_bytes(self) -> int:
        fmt = self.output_format
        return fmt.sample_rate * FRAME_MS // 1000 * fmt.bytes_per_sample

    def _put(self, frame: dict[str, Any]) -> None:
        if self.stream_id is not None:
            frame[self.dialect.stream_key] = self.stream_id
        self._outbox.put_nowait(frame)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro, name=f"{self.id}-telephony")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("telephony task failed", exc_info=task.exception())


def _session_factory(runtime: Runtime) -> SessionFactory:
    from realtime.core.session import Session

    return lambda session_id, emit: Session(runtime, session_id, emit)


def _custom_parameters(start: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """TwiML <Parameter>s: an object, or (as Telnyx's call-control API takes them) a list of name/value pairs."""
    for key in keys:
        raw = start.get(key)
        if isinstance(raw, dict):
            return raw
        if isinstance(raw, list):
            return {p["name"]: p.get("value") for p in raw if isinstance(p, dict) and "name" in p}
    return {}


async def run_call(call: TelephonyCall, incoming: AsyncIterable[str | bytes],
                   send: Callable[[str], Awaitable[Any]]) -> None:
    """Drive a call over any message transport (a WebSocket connection is both arguments): feed what
    arrives, send what the call produces, until the platform says stop or the transport ends. The call
    is closed on return; transport errors from `send` propagate."""
    await call.start()

    async def pump() -> None:
        async for frame in call.frames():
            await send(json.dumps(frame))

    sender = asyncio.create_task(pump(), name=f"{call.id}-send")
    try:
        async for data in incoming:
            await call.feed_raw(data)
            if call.closed or sender.done():
                break
    finally:
        await call.close()
        sender.cancel()  # after a stop or a dropped connection, queued frames have nowhere to go
        (outcome,) = await asyncio.gather(sender, return_exceptions=True)
        if isinstance(outcome, Exception):
            call.log.info("stopped sending to the platform: %r", outcome)
