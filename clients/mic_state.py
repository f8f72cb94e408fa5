"""The microphone client's pure parts: the playback buffer and the turn state driven by server events.

No audio device, socket or clock of their own, so unit tests drive them with scripted events (see clients/mic.py).
"""

from __future__ import annotations

import base64
import dataclasses
import threading
from collections import deque
from dataclasses import dataclass, field
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
