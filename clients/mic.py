"""`duet mic`: talk to a realtime server with the microphone, full duplex, and watch the turn unfold.

Capture and playback run in PortAudio's threads (`sounddevice`); everything else runs on one asyncio loop:
a sender streams 20 ms blocks of 24 kHz mono pcm16 as `input_audio_buffer.append`, a receiver feeds server
events to `MicState`, and a renderer draws `MicState.snapshot()` with rich. `MicState` is pure (no audio,
no socket, no clock of its own): it is what the unit tests drive with scripted events.

Barge-in works as real clients do it: when the server reports `input_audio_buffer.speech_started`, the
queued reply audio is dropped at once and `conversation.item.truncate` tells the server how much of the
assistant item was actually played, so its history holds what the user heard.

Latency per turn = arrival of the first reply audio minus the client's estimate of when the user stopped
speaking. That estimate maps the `audio_end_ms` of `input_audio_buffer.speech_stopped` (a position in the
audio we sent) to the wall-clock time at which that sample was captured. Duet's `audio_end_ms` is the start
of the closing silence; OpenAI documents theirs as including `silence_duration_ms`, so for other servers we
subtract the session's silence duration. Input and output device latency (the PortAudio buffers, a few to
tens of ms, shown at start) are not included. If the position cannot be mapped, we fall back to the arrival
of `speech_stopped` minus the silence duration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import soxr

RATE = 24000  # the wire format: pcm16 mono 24 kHz, both directions
BLOCK_MS = 20
BLOCK_FRAMES = RATE * BLOCK_MS // 1000
NO_DEVICE_HINT = "Connect a microphone, or use `duet talk --wav FILE`."

REPLY_AUDIO = ("response.output_audio.delta", "response.audio.delta")
REPLY_TEXT = ("response.output_audio_transcript.delta", "response.audio_transcript.delta",
              "response.output_text.delta", "response.text.delta")
REPLY_TEXT_DONE = ("response.output_audio_transcript.done", "response.audio_transcript.done",
                   "response.output_text.done", "response.text.done")


class NoAudioDevice(Exception):
    """No usable microphone or speaker: reported as one line, exit status 2."""

    def __init__(self, reason: str, hint: str = NO_DEVICE_HINT) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def message(self) -> str:
        return f"duet mic: {self.reason}. {self.hint}"


# ---------------------------------------------------------------------------------------------
# Pure parts: pacing, the playback buffer, the conversation state


class WallClockPacer:
    """Holds a device callback to real time.

    A device without a clock (ALSA's `null` plugin, some virtual devices) calls back as fast as the CPU
    allows: the capture side would flood the server with hours of audio a minute and both sides would burn
    a core. A real device never runs ahead of the wall clock by more than its own buffer, which `slack_s`
    covers, so there `delay` is always 0.
    """

    def __init__(self, rate: int, slack_s: float) -> None:
        self.rate = rate
        self.slack_s = slack_s
        self._t0: float | None = None
        self._frames = 0

    def delay(self, frames: int, now: float) -> float:
        """Count `frames` handed over at `now`; return how long the callback should wait (seconds)."""
        if self._t0 is None:
            self._t0 = now
        self._frames += frames
        return max(0.0, self._frames / self.rate - (now - self._t0) - self.slack_s)


class PlaybackBuffer:
    """Reply audio waiting for the speaker, and what of each assistant item was played.

    Shared between the event loop (push, clear, played_ms) and PortAudio's output thread (read): every
    method takes the lock. Positions are on the device's timeline: every frame handed to the device, audio
    or the silence written when nothing is queued. A frame handed over at position p is heard `latency`
    frames later, so "played" means handed over before the current position minus the output latency.
    """

    def __init__(self, rate: int = RATE, source_rate: int = RATE) -> None:
        self.rate = rate
        self.source_rate = source_rate
        self.latency_frames = 0  # set from the output stream once it is open
        self._lock = threading.Lock()
        self._chunks: deque[tuple[str, bytes]] = deque()
        self._head_offset = 0  # bytes of the first chunk already read
        self._queued = 0  # frames
        self._position = 0  # frames handed to the device so far
        self._segments: dict[str, list[list[int]]] = {}  # item -> [[position, frames], ...] as handed over
        self._resampler = self._new_resampler()

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.rate == self.source_rate:
            return None
        return soxr.ResampleStream(self.source_rate, self.rate, 1, dtype="int16")

    def push(self, item_id: str, pcm: bytes) -> None:
        """Queue pcm16 at `source_rate` for the item; converted to the device rate if they differ."""
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(np.frombuffer(pcm, dtype="<i2")).astype("<i2").tobytes()
        if not pcm:
            return
        with self._lock:
            self._chunks.append((item_id, pcm))
            self._queued += len(pcm) // 2

    def end_item(self, item_id: str) -> None:
        """The item's audio is complete: queue what the resampler still holds (its last ~30 ms)."""
        if self._resampler is None:
            return
        tail = self._resampler.resample_chunk(np.zeros(0, dtype="<i2"), last=True).astype("<i2").tobytes()
        self._resampler = self._new_resampler()
        if tail:
            with self._lock:
                self._chunks.append((item_id, tail))
                self._queued += len(tail) // 2

    def read(self, frames: int) -> bytes:
        """Exactly `frames` pcm16 frames for the device: queued audio, then silence."""
        out = bytearray()
        with self._lock:
            while len(out) < 2 * frames and self._chunks:
                item_id, pcm = self._chunks[0]
                take = pcm[self._head_offset:self._head_offset + 2 * frames - len(out)]
                n = len(take) // 2
                segments = self._segments.setdefault(item_id, [])
                pos = self._position + len(out) // 2
                if segments and segments[-1][0] + segments[-1][1] == pos:
                    segments[-1][1] += n
                else:
                    segments.append([pos, n])
                out += take
                self._head_offset += len(take)
                self._queued -= n
                if self._head_offset >= len(pcm):
                    self._chunks.popleft()
                    self._head_offset = 0
            out += bytes(2 * frames - len(out))
            self._position += frames
        return bytes(out)

    def clear(self) -> int:
        """Drop everything queued (barge-in); return how many frames were dropped."""
        with self._lock:
            dropped = self._queued
            self._chunks.clear()
            self._head_offset = 0
            self._queued = 0
            self._resampler = self._new_resampler()  # its held-back samples belong to the dropped audio
        return dropped

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of the item that have reached the listener's ears (never more than was received)."""
        with self._lock:
            heard = self._position - self.latency_frames
            frames = sum(min(max(heard - pos, 0), n) for pos, n in self._segments.get(item_id, ()))
        return int(frames * 1000 // self.rate)

    def unplayed(self, item_id: str) -> bool:
        """Is some of the item still queued, or handed over but not yet heard?"""
        with self._lock:
            if any(chunk_item == item_id for chunk_item, _ in self._chunks):
                return True
            segments = self._segments.get(item_id)
            return bool(segments) and segments[-1][0] + segments[-1][1] > self._position - self.latency_frames

    @property
    def queued_ms(self) -> float:
        with self._lock:
            return self._queued * 1000.0 / self.rate


@dataclass(eq=False)  # turns are told apart by identity: two may hold equal fields
class Turn:
    """One user utterance and the reply to it, as the client saw them."""

    user_item: str | None = None
    partial: str = ""  # the user's words so far (replaced by each partial transcript)
    user: str | None = None  # final transcript
    speaking: bool = False  # between speech_started and speech_stopped
    speech_end_at: float | None = None  # client clock estimate of when the user stopped speaking
    response_id: str | None = None
    assistant_item: str | None = None
    thought: str = ""
    reply: str = ""
    first_audio_at: float | None = None
    latency_ms: float | None = None
    audio_ms: float = 0.0  # reply audio received
    interrupted_at_ms: int | None = None  # audio_end_ms of our truncate, if the user barged in
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str | None = None  # from response.done
    done: bool = False


@dataclass(frozen=True)
class MicView:
    """What the renderer draws: an immutable copy taken on the event loop."""

    session_id: str | None
    status: str
    turn: Turn | None
    level_db: float
    queued_ms: float
    replies: int


class MicState:
    """The conversation as events arrive (sans I/O): feed server events, get client events to send back."""

    def __init__(self, playback: PlaybackBuffer, max_anchors: int = 3000) -> None:
        self.playback = playback
        self.session_id: str | None = None
        self.is_duet = False
        self.silence_ms = 500  # OpenAI's default; replaced by the session's own
        self.level_db = -120.0
        self.errors: list[str] = []  # server errors not yet printed
        self.replies = 0  # response.done events seen
        self._turns: list[Turn] = []  # open turns, oldest first
        self._by_response: dict[str, Turn] = {}
        self._by_item: dict[str, Turn] = {}  # assistant items whose audio we received
        self._truncated: set[str] = set()
        self._finished: list[Turn] = []
        # (first frame sent, capture time of that frame) per block sent; recent ones suffice because
        # speech_stopped refers to audio sent a second or so ago.
        self._anchors: deque[tuple[int, float]] = deque(maxlen=max_anchors)
        self._sent_frames = 0

    # ---- input side ---------------------------------------------------------------------------
    def audio_sent(self, frames: int, captured_at: float, level: float | None = None) -> None:
        """Record a block of `frames` (24 kHz) appended to the server, whose first frame was captured then
        (`level`: its dBFS, for the meter)."""
        self._anchors.append((self._sent_frames, captured_at))
        self._sent_frames += frames
        if level is not None:
            self.level_db = level

    def capture_time(self, audio_ms: float) -> float | None:
        """Client-clock time at which the sample `audio_ms` into the sent audio was captured."""
        frame = audio_ms * RATE / 1000
        if frame > self._sent_frames:
            return None
        for start, at in reversed(self._anchors):
            if start <= frame:
                return at + (frame - start) / RATE
        return None

    # ---- server events ------------------------------------------------------------------------
    def feed(self, event: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """Apply one server event received at `now` (client clock, seconds); return client events to send."""
        kind = event.get("type", "")
        if kind in ("session.created", "session.updated"):
            self._session(event.get("session") or {})
        elif kind == "input_audio_buffer.speech_started":
            return self._speech_started(event)
        elif kind == "input_audio_buffer.speech_stopped":
            self._speech_stopped(event, now)
        elif kind == "duet.input_transcript.partial":
            turn = self._user_turn(event.get("item_id"))
            turn.partial = str(event.get("transcript", ""))
        elif kind == "conversation.item.input_audio_transcription.delta":
            turn = self._user_turn(event.get("item_id"))
            turn.partial += str(event.get("delta", ""))
        elif kind == "conversation.item.input_audio_transcription.completed":
            turn = self._user_turn(event.get("item_id"))
            turn.user = str(event.get("transcript", ""))
        elif kind == "response.created":
            self._response_created(str((event.get("response") or {}).get("id", "")))
        elif kind == "response.output_item.added":
            item = event.get("item") or {}
            turn = self._response_turn(event.get("response_id"))
            if turn is not None and item.get("type", "message") == "message" and turn.assistant_item is None:
                turn.assistant_item = item.get("id")
        elif kind in REPLY_AUDIO:
            self._audio(event, now)
        elif kind in ("response.output_audio.done", "response.audio.done"):
            if event.get("item_id") not in self._truncated:
                self.playback.end_item(str(event.get("item_id", "")))
        elif kind in REPLY_TEXT:
            turn = self._response_turn(event.get("response_id"))
            if turn is not None and event.get("item_id") not in self._truncated:
                turn.reply += str(event.get("delta", ""))
        elif kind in REPLY_TEXT_DONE:
            # The final word on what the item says: after a barge-in, Duet's is the part the user heard.
            turn = self._response_turn(event.get("response_id"))
            final = event.get("transcript", event.get("text"))
            if turn is not None and isinstance(final, str):
                turn.reply = final
        elif kind == "duet.thought.delta":
            turn = self._response_turn(event.get("response_id"))
            if turn is not None:
                turn.thought += str(event.get("delta", ""))
        elif kind == "duet.turn.metrics":
            turn = self._response_turn(event.get("response_id"))
            if turn is not None:
                turn.metrics = dict(event.get("metrics") or {})
        elif kind == "response.done":
            self._response_done(event.get("response") or {})
        elif kind == "error":
            err = event.get("error") or {}
            self.errors.append(f"{err.get('code') or err.get('type', 'error')}: {err.get('message', '')}")
        return []

    def _session(self, session: dict[str, Any]) -> None:
        self.session_id = session.get("id", self.session_id)
        self.is_duet = "duet" in session
        td = ((session.get("audio") or {}).get("input") or {}).get("turn_detection", session.get("turn_detection"))
        if isinstance(td, dict) and isinstance(td.get("silence_duration_ms"), int | float):
            self.silence_ms = int(td["silence_duration_ms"])

    def _speech_started(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        sends: list[dict[str, Any]] = []
        # Barge-in: whatever the assistant is saying stops now. Truncate every item that was not played in
        # full, at what was played, so the server's history holds what the user heard.
        for item_id, turn in list(self._by_item.items()):
            if item_id in self._truncated:
                continue
            if not turn.done or self.playback.unplayed(item_id):
                played = self.playback.played_ms(item_id)
                sends.append({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                              "audio_end_ms": played})
                self._truncated.add(item_id)
                turn.interrupted_at_ms = played
        self.playback.clear()
        # An earlier turn that never got a reply (empty transcript, or a noise) is over now.
        for turn in [t for t in self._turns if t.response_id is None]:
            self._finish(turn)
        self._turns.append(Turn(user_item=event.get("item_id"), speaking=True))
        return sends

    def _speech_stopped(self, event: dict[str, Any], now: float) -> None:
        turn = self._user_turn(event.get("item_id"))
        turn.speaking = False
        end_ms = float(event.get("audio_end_ms", 0))
        if not self.is_duet:
            end_ms -= self.silence_ms  # OpenAI's audio_end_ms includes the silence window
        at = self.capture_time(end_ms)
        turn.speech_end_at = at if at is not None else now - self.silence_ms / 1000

    def _user_turn(self, item_id: Any) -> Turn:
        for turn in reversed(self._turns):
            if turn.user_item == item_id:
                return turn
        # Events for a turn we did not see start (e.g. connected mid-utterance).
        turn = Turn(user_item=item_id)
        self._turns.append(turn)
        return turn

    def _response_created(self, response_id: str) -> None:
        waiting = [t for t in self._turns if t.response_id is None and not t.speaking]
        turn = waiting[-1] if waiting else Turn()  # a response with no user turn (response.create)
        if not waiting:
            self._turns.append(turn)
        turn.response_id = response_id
        self._by_response[response_id] = turn

    def _response_turn(self, response_id: Any) -> Turn | None:
        return self._by_response.get(response_id) if isinstance(response_id, str) else None

    def _audio(self, event: dict[str, Any], now: float) -> None:
        item_id = str(event.get("item_id", ""))
        turn = self._response_turn(event.get("response_id"))
        if turn is None or item_id in self._truncated:
            return  # audio the server sent before it heard of the barge-in: the user must not hear it
        pcm = base64.b64decode(event.get("delta", ""))
        if turn.first_audio_at is None:
            turn.first_audio_at = now
            if turn.speech_end_at is not None:
                turn.latency_ms = round((now - turn.speech_end_at) * 1000, 1)
        turn.assistant_item = turn.assistant_item or item_id
        turn.audio_ms += len(pcm) / 2 * 1000 / RATE
        self._by_item[item_id] = turn
        self.playback.push(item_id, pcm)

    def _response_done(self, response: dict[str, Any]) -> None:
        self.replies += 1
        turn = self._response_turn(response.get("id"))
        if turn is None:
            return
        turn.status = response.get("status")
        self._finish(turn)

    def _finish(self, turn: Turn) -> None:
        turn.done = True
        turn.speaking = False
        if turn in self._turns:
            self._turns.remove(turn)
        if turn.user or turn.reply or turn.response_id:
            self._finished.append(turn)
        # Items fully heard need no truncate later; forget them so the maps stay small.
        for item_id, t in list(self._by_item.items()):
            if t.done and not self.playback.unplayed(item_id):
                del self._by_item[item_id]

    # ---- for the renderer ---------------------------------------------------------------------
    def take_finished(self) -> list[Turn]:
        """Turns completed since the last call, oldest first (the renderer prints them once)."""
        done, self._finished = self._finished, []
        return done

    def take_errors(self) -> list[str]:
        """Server errors since the last call."""
        errors, self.errors = self.errors, []
        return errors

    def snapshot(self) -> MicView:
        turn = self._turns[-1] if self._turns else None
        queued = self.playback.queued_ms
        if turn is not None and turn.speaking:
            status = "hearing you"
        elif turn is not None and turn.response_id is None:
            status = "transcribing"
        elif turn is not None and turn.first_audio_at is None:
            status = "thinking"
        elif queued > 0 or (turn is not None and turn.response_id is not None):
            status = "speaking"
        else:
            status = "listening"
        return MicView(session_id=self.session_id, status=status,
                       turn=dataclasses.replace(turn, metrics=dict(turn.metrics)) if turn else None,
                       level_db=self.level_db, queued_ms=queued, replies=self.replies)


def level_db(pcm: np.ndarray) -> float:
    """RMS level of int16 samples in dBFS (for the input meter)."""
    if not len(pcm):
        return -120.0
    rms = float(np.sqrt(np.mean((pcm.astype(np.float32) / 32768.0) ** 2)))
    return 20.0 * float(np.log10(max(rms, 1e-6)))


# ---------------------------------------------------------------------------------------------
# Rendering (rich)


def _meter(db: float, width: int = 20) -> str:
    filled = round(width * min(max((db + 60.0) / 60.0, 0.0), 1.0))
    return "▮" * filled + "▯" * (width - filled)


def _latency_line(turn: Turn) -> str:
    parts = []
    if turn.latency_ms is not None:
        parts.append(f"latency {turn.latency_ms:.0f} ms (your speech end → first reply audio)")
    m = turn.metrics
    server = [f"{label} {m[key]:.0f} ms" for key, label in (("transcript_ms", "transcript"),
                                                           ("ab_first_token_ms", "first reply token"),
                                                           ("first_audio_sent_ms", "first audio sent"))
              if isinstance(m.get(key), int | float)]
    if server:
        parts.append("server after commit: " + ", ".join(server))
    if isinstance(m.get("underruns"), int):
        parts.append(f"underruns {m['underruns']}")
    if turn.interrupted_at_ms is not None:
        parts.append(f"interrupted at {turn.interrupted_at_ms} ms")
    elif turn.status and turn.status != "completed":
        parts.append(turn.status)
    return " · ".join(parts)


def render_turn(turn: Turn) -> Any:
    """A finished turn, printed once above the live area."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    if turn.user is not None or turn.partial:
        grid.add_row(Text("you", style="cyan"), Text(turn.user if turn.user is not None else turn.partial))
    if turn.thought.strip():
        grid.add_row(Text("thought", style="dim"), Text(turn.thought.strip(), style="dim italic"))
    if turn.response_id is not None:
        grid.add_row(Text("duet", style="green"), Text(turn.reply.strip() or "(no words)"))
    line = _latency_line(turn)
    if line:
        grid.add_row("", Text(line, style="yellow"))
    return grid


def _tail(text: str, limit: int = 300) -> str:
    return "…" + text[-limit:] if len(text) > limit else text


def render_live(view: MicView) -> Any:
    """The turn in progress: status, input meter, what the user is saying, the reasoning, the reply."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    status = Text(f"● {view.status}", style="magenta")
    status.append(f"   mic {_meter(view.level_db)} {view.level_db:4.0f} dB", style="dim")
    if view.queued_ms > 0:
        status.append(f"   {view.queued_ms / 1000:.1f} s of reply queued", style="dim")
    grid.add_row("", status)
    turn = view.turn
    if turn is not None:
        if turn.user is not None:
            grid.add_row(Text("you", style="cyan"), Text(turn.user))
        elif turn.partial:
            grid.add_row(Text("you", style="cyan"), Text(turn.partial + " …", style="italic"))
        # The live area stays a few lines high: the tail of long texts; the whole turn is printed when done.
        if turn.thought.strip():
            grid.add_row(Text("thought", style="dim"), Text(_tail(turn.thought.strip()), style="dim italic"))
        if turn.reply:
            grid.add_row(Text("duet", style="green"), Text(_tail(turn.reply.strip())))
        if turn.latency_ms is not None:
            grid.add_row("", Text(f"latency {turn.latency_ms:.0f} ms", style="yellow"))
    return grid


# ---------------------------------------------------------------------------------------------
# Audio devices


def load_sounddevice() -> ModuleType:
    """Import sounddevice, turning a missing PortAudio or package into a NoAudioDevice with a fix."""
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError("PortAudio library not found") at import
        raise NoAudioDevice(f"cannot use audio devices: the PortAudio library is missing ({exc})",
                            "Install it (Debian/Ubuntu: apt-get install libportaudio2), or use "
                            "`duet talk --wav FILE`.") from None
    except ImportError:
        raise NoAudioDevice("cannot use audio devices: the sounddevice package is not installed",
                            "Install it with pip install 'duet-voice[mic]', or use `duet talk --wav FILE`.") from None
    return sounddevice


def probe_devices(sd: ModuleType) -> None:
    """Fail early, with a clear reason, when PortAudio sees no microphone or no speaker at all."""
    try:
        devices = list(sd.query_devices())
    except Exception as exc:  # PortAudioError, or a broken host API: the reason is in the message
        raise NoAudioDevice(f"cannot list audio devices ({exc})") from None
    if not any(d.get("max_input_channels", 0) > 0 for d in devices):
        raise NoAudioDevice(f"no audio input device found (PortAudio sees {len(devices)} device(s), none "
                            "with a microphone input)")
    if not any(d.get("max_output_channels", 0) > 0 for d in devices):
        raise NoAudioDevice(f"no audio output device found (PortAudio sees {len(devices)} device(s), none "
                            "with an output)", "Connect speakers or headphones, or use `duet talk --wav FILE`.")


class AudioIO:
    """Microphone and speaker streams (opened, not started), at 24 kHz or the device's own rate."""

    def __init__(self, sd: ModuleType, on_capture: Callable[[bytes, float], None]) -> None:
        self.sd = sd
        self.on_capture = on_capture
        self.xruns = 0  # input overflows and output underflows PortAudio reported
        try:
            self.in_rate = self._rate(sd.check_input_settings, "input")
            self.out_rate = self._rate(sd.check_output_settings, "output")
            self.playback = PlaybackBuffer(rate=self.out_rate)
            self._in_resampler = None if self.in_rate == RATE else \
                soxr.ResampleStream(self.in_rate, RATE, 1, dtype="int16")
            # Slack: a clocked device may run ahead of the wall clock by its buffer (output is primed
            # ahead at start), never by more; see WallClockPacer.
            self._in_pacer = WallClockPacer(self.in_rate, slack_s=0.2)
            self._out_pacer = WallClockPacer(self.out_rate, slack_s=0.5)
            self.input = sd.RawInputStream(samplerate=self.in_rate, channels=1, dtype="int16",
                                           blocksize=self.in_rate * BLOCK_MS // 1000, callback=self._on_input)
            try:
                self.output = sd.RawOutputStream(samplerate=self.out_rate, channels=1, dtype="int16",
                                                 blocksize=self.out_rate * BLOCK_MS // 1000,
                                                 callback=self._on_output)
            except BaseException:
                self.input.close()
                raise
        except (sd.PortAudioError, ValueError) as exc:
            raise NoAudioDevice(f"could not open the audio device ({exc})") from None
        self.playback.latency_frames = int(self.output.latency * self.out_rate)

    def _rate(self, check: Callable[..., None], kind: str) -> int:
        """24 kHz when the device takes it (no conversion), else the device's default rate."""
        try:
            check(samplerate=RATE, channels=1, dtype="int16")
            return RATE
        except (self.sd.PortAudioError, ValueError):
            return int(self.sd.query_devices(kind=kind)["default_samplerate"])

    @property
    def latency_ms(self) -> tuple[float, float]:
        return self.input.latency * 1000, self.output.latency * 1000

    def start(self) -> None:
        self.input.start()
        self.output.start()

    def close(self) -> None:
        for stream in (self.input, self.output):
            with contextlib.suppress(Exception):  # closing a stream whose device vanished may raise
                stream.abort()
                stream.close()

    def to_wire(self, pcm: bytes) -> bytes:
        """Captured device-rate pcm16 -> 24 kHz pcm16 (may be empty while the resampler fills)."""
        if self._in_resampler is None:
            return pcm
        return self._in_resampler.resample_chunk(np.frombuffer(pcm, dtype="<i2")).astype("<i2").tobytes()

    # PortAudio threads: no allocation-heavy work, never touch the event loop's objects directly.
    def _on_input(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.xruns += 1
        now = time.perf_counter()
        wait = self._in_pacer.delay(frames, now)
        if wait > 0:  # unclocked device: hold it to real time instead of dropping its audio
            time.sleep(wait)
            now += wait
        self.on_capture(bytes(indata), now - frames / self.in_rate)

    def _on_output(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.xruns += 1
        wait = self._out_pacer.delay(frames, time.perf_counter())
        if wait > 0:
            time.sleep(wait)
        outdata[:] = self.playback.read(frames)


# ---------------------------------------------------------------------------------------------
# The client


@dataclass
class MicOptions:
    url: str = "ws://127.0.0.1:8765/v1/realtime"
    pacing: str | None = None
    partials_ms: int | None = None
    seconds: float | None = None  # stop after this long (None: until Ctrl-C)
    turns: int | None = None  # stop after this many replies


def session_update(options: MicOptions) -> dict[str, Any]:
    """GA session shape; Duet's keys only when asked for, since other servers reject unknown fields."""
    session: dict[str, Any] = {"type": "realtime",
                               # Without it OpenAI sends no user transcript; Duet always transcribes.
                               "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
    duet: dict[str, Any] = {}
    if options.pacing:
        duet["pacing"] = options.pacing
    if options.partials_ms is not None:
        duet["partial_transcripts_ms"] = options.partials_ms
    if duet:
        session["duet"] = duet
    return {"type": "session.update", "session": session}


async def _expect(ws: Any, kind: str, state: MicState, timeout_s: float = 15.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            event = json.loads(await ws.recv())
            state.feed(event, time.perf_counter())
            if event.get("type") == kind:
                return dict(event)
            if event.get("type") == "error":
                raise ConnectionError(f"server error: {event.get('error', {}).get('message')}")


async def _converse(options: MicOptions, audio: AudioIO, queue: asyncio.Queue[tuple[bytes, float]],
                    console: Any) -> int:
    from rich.live import Live
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

    state = MicState(audio.playback)
    try:
        ws = await connect(options.url, max_size=None, open_timeout=10)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        print(f"duet mic: cannot connect to {options.url} ({exc})", file=sys.stderr)
        return 1
    try:
        try:
            await _expect(ws, "session.created", state)
            await ws.send(json.dumps(session_update(options)))
            updated = (await _expect(ws, "session.updated", state))["session"]
        except (ConnectionError, ConnectionClosed, TimeoutError) as exc:
            print(f"duet mic: session setup failed ({exc or 'timed out'})", file=sys.stderr)
            return 1
        pacing = (updated.get("duet") or {}).get("pacing")
        in_ms, out_ms = audio.latency_ms
        console.print(f"connected to {options.url}: session {state.session_id}"
                      + (f", pacing {pacing}" if pacing else "")
                      + f"; device latency in {in_ms:.0f} ms, out {out_ms:.0f} ms"
                      + (f" (device rates {audio.in_rate}/{audio.out_rate} Hz, converted)"
                         if (audio.in_rate, audio.out_rate) != (RATE, RATE) else ""), soft_wrap=True)
        console.print("speak; use headphones (without echo cancellation the reply can interrupt itself); "
                      "Ctrl-C quits", style="dim", soft_wrap=True)
        stop = asyncio.Event()
        closed: list[str] = []  # why the server ended the session, if it did

        async def send_audio() -> None:
            while True:
                pcm, captured_at = await queue.get()
                wire = audio.to_wire(pcm)
                if not wire:
                    continue
                samples = np.frombuffer(wire, dtype="<i2")
                state.audio_sent(len(samples), captured_at, level_db(samples))
                try:
                    await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(wire).decode("ascii")}))
                except ConnectionClosed:
                    return  # receive() reports why

        async def receive() -> None:
            try:
                async for message in ws:
                    for reply in state.feed(json.loads(message), time.perf_counter()):
                        await ws.send(json.dumps(reply))
                closed.append("closed normally")
            except ConnectionClosed as exc:
                closed.append(str(exc))
            stop.set()

        audio.start()
        tasks = [asyncio.create_task(send_audio()), asyncio.create_task(receive())]
        deadline = None if options.seconds is None else time.monotonic() + options.seconds
        try:
            # transient: the live area is redrawn in place and vanishes at exit; finished turns stay printed.
            with Live(render_live(state.snapshot()), console=console, auto_refresh=False, transient=True) as live:
                while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                    # --turns: stop once the last reply has also been heard to its end.
                    if options.turns is not None and state.replies >= options.turns and not audio.playback.queued_ms:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.1)
                    _print_news(state, live.console)
                    live.update(render_live(state.snapshot()), refresh=True)
        finally:  # also on Ctrl-C, which cancels this coroutine
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        _print_news(state, console)
        summary = f"{state.replies} repl{'y' if state.replies == 1 else 'ies'}"
        if audio.xruns:
            summary += f", {audio.xruns} audio over/underruns reported by PortAudio"
        if closed:
            print(f"duet mic: the server ended the session ({closed[0]}); {summary}", file=sys.stderr)
            return 1
        console.print(f"bye: {summary}", style="dim")
        return 0
    finally:
        audio.close()
        await ws.close()


def _print_news(state: MicState, console: Any) -> None:
    for err in state.take_errors():
        console.print(f"server error {err}", style="red", soft_wrap=True)
    for turn in state.take_finished():
        console.print(render_turn(turn))


async def _main(options: MicOptions, sd: ModuleType, console: Any) -> int:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    def on_capture(pcm: bytes, captured_at: float) -> None:  # PortAudio's thread
        with contextlib.suppress(RuntimeError):  # the loop is closing: the block no longer matters
            loop.call_soon_threadsafe(queue.put_nowait, (pcm, captured_at))

    audio = AudioIO(sd, on_capture)  # before connecting: a missing device is reported without a server
    return await _converse(options, audio, queue, console)


def run_mic(options: MicOptions) -> int:
    """`duet mic`: exit status 0 when stopped (Ctrl-C, --seconds, --turns), 1 on connection trouble,
    2 when there is no usable audio device."""
    from rich.console import Console

    console = Console(highlight=False)
    try:
        sd = load_sounddevice()
        probe_devices(sd)
        return asyncio.run(_main(options, sd, console))
    except NoAudioDevice as exc:
        print(exc.message(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print("bye", style="dim")
        return 0
