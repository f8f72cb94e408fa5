"""`duet talk`: stream a WAV to a realtime server like a microphone would, collect the spoken reply.

The file is sent in 20 ms chunks at real-time pace (each chunk when it would have been recorded),
then silence keeps flowing until the reply is done. Voice-to-voice latency is measured on this side:
arrival of the first reply audio minus the moment the file's audio ended.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import wave
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
import soxr
from websockets.asyncio.client import ClientConnection, connect

from common.playback import PlaybackClock

RATE = 24000
CHUNK_MS = 20


def read_wav(path: str | Path, rate: int = RATE) -> np.ndarray:
    """Any PCM WAV -> mono float32 at `rate`."""
    with wave.open(str(path), "rb") as w:
        width, channels, src_rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"{path}: only 16-bit PCM WAV is supported (got {8 * width}-bit)")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    samples = samples.reshape(-1, channels).mean(axis=1)
    return soxr.resample(samples, src_rate, rate).astype(np.float32) if src_rate != rate else samples


def write_wav(path: str | Path, samples: np.ndarray, rate: int = RATE) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def with_duet_events(url: str, events: str = "all") -> str:
    """`url` asking a Duet server for its own `duet.*` events (thoughts, turn metrics, partial transcripts),
    which it sends only to clients that ask. A query parameter rather than a `session.update` field: other
    realtime servers reject unknown session fields."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({"duet_events": events})) if q)
    return urlunsplit(parts._replace(query=query))


def pcm16_b64(samples: np.ndarray) -> str:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


class _Collector:
    """Everything the server says about the turn, with arrival times."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.audio: list[np.ndarray] = []
        self.first_audio_at: float | None = None
        self.user_transcript = ""
        self.reply = ""
        self.thought = ""
        self.metrics: dict[str, Any] = {}
        self.errors: list[dict[str, Any]] = []
        self.partials: list[str] = []  # partial transcripts received while the user was still speaking
        self.done = asyncio.Event()
        self.speech_stopped_at: float | None = None
        self.playback = PlaybackClock()  # the listener's 1x playback, to count audible gaps

    def feed(self, event: dict[str, Any]) -> None:
        now = time.perf_counter()
        kind = event.get("type", "")
        self.events.append(event)
        if kind in ("response.output_audio.delta", "response.audio.delta"):
            if self.first_audio_at is None:
                self.first_audio_at = now
            pcm = np.frombuffer(base64.b64decode(event["delta"]), dtype="<i2")
            self.audio.append(pcm.astype(np.float32) / 32768.0)
            self.playback.add(len(pcm) * 1000.0 / RATE, now)
        elif kind in ("response.output_audio_transcript.delta", "response.audio_transcript.delta",
                      "response.output_text.delta", "response.text.delta"):
            self.reply += event["delta"]
        elif kind == "duet.thought.delta":
            self.thought += event["delta"]
        elif kind == "duet.input_transcript.partial":
            if self.speech_stopped_at is None:
                self.partials.append(event["transcript"])
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.user_transcript = event["transcript"]
        elif kind == "input_audio_buffer.speech_stopped":
            self.speech_stopped_at = now
        elif kind == "duet.turn.metrics":
            self.metrics = event["metrics"]
        elif kind == "error":
            self.errors.append(event["error"])
        elif kind == "response.done":
            self.done.set()


async def _receive(ws: ClientConnection, sink: _Collector) -> None:
    async for message in ws:
        sink.feed(json.loads(message))


async def _stream(ws: ClientConnection, audio: np.ndarray, sink: _Collector, tail_s: float,
                  timeout_s: float) -> float:
    """Send the file in real time; return when its audio ended. Then silence until done or timeout."""
    step = RATE * CHUNK_MS // 1000
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(audio), step):
        n += 1
        await asyncio.sleep(max(0.0, t0 + n * CHUNK_MS / 1000 - time.perf_counter()))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(audio[i:i + step])}))
    speech_end = time.perf_counter()
    silence = pcm16_b64(np.zeros(step, dtype=np.float32))
    while not sink.done.is_set() and time.perf_counter() - speech_end < timeout_s:
        n += 1
        await asyncio.sleep(max(0.0, t0 + n * CHUNK_MS / 1000 - time.perf_counter()))
        if time.perf_counter() - speech_end < tail_s or sink.speech_stopped_at is not None:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
    return speech_end


async def _expect(ws: ClientConnection, kind: str, timeout_s: float = 30.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            event = json.loads(await ws.recv())
            if event.get("type") == kind:
                return dict(event)
            if event.get("type") == "error":
                raise RuntimeError(f"server error before {kind}: {event['error']}")


async def talk(wav: str | Path | np.ndarray, url: str, out: str | Path | None = None, pacing: str | None = None,
               tail_s: float = 1.5, timeout_s: float = 60.0, session: dict[str, Any] | None = None,
               beta: bool = False) -> dict[str, Any]:
    """`beta`: speak the beta protocol (OpenAI-Beta header, beta session shape and event names)."""
    audio = wav if isinstance(wav, np.ndarray) else read_wav(wav)
    headers = {"OpenAI-Beta": "realtime=v1"} if beta else None
    async with connect(with_duet_events(url), max_size=None, additional_headers=headers) as ws:
        await _expect(ws, "session.created")
        shape: dict[str, Any] = {"modalities": ["audio", "text"], "input_audio_format": "pcm16",
                                 "output_audio_format": "pcm16"} if beta else {"type": "realtime"}
        update: dict[str, Any] = {**shape, **(session or {})}
        if pacing:
            update["duet"] = {**update.get("duet", {}), "pacing": pacing}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        await _expect(ws, "session.updated")
        sink = _Collector()
        receiver = asyncio.create_task(_receive(ws, sink))
        try:
            speech_end = await _stream(ws, audio, sink, tail_s, timeout_s)
        finally:
            receiver.cancel()
    reply_audio = np.concatenate(sink.audio) if sink.audio else np.zeros(0, np.float32)
    if out is not None:
        write_wav(out, reply_audio)
    v2v = None if sink.first_audio_at is None else round((sink.first_audio_at - speech_end) * 1000, 1)
    vad_wait = None if sink.speech_stopped_at is None else round((sink.speech_stopped_at - speech_end) * 1000, 1)
    return {
        "user_transcript": sink.user_transcript,
        "reply_transcript": sink.reply.strip(),
        "thought": sink.thought.strip(),
        "partial_transcripts": sink.partials,
        "reply_audio_s": round(len(reply_audio) / RATE, 2),
        "voice_to_voice_ms": v2v,
        "underruns": sink.playback.underruns,
        "speech_stopped_after_ms": vad_wait,
        "server_metrics": sink.metrics,
        "errors": sink.errors,
        "event_types": sorted({e.get("type", "") for e in sink.events}),
        "out": str(out) if out is not None else None,
    }
