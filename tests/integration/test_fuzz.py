"""Fuzzing a live server on loopback: mutated real session traffic through /v1/realtime and /twilio.

A seeded mutator (the same messages every run) takes the events a real client sends (session.update,
input_audio_buffer.append with chunks of real speech, commit/clear, conversation.item.create/truncate/delete/
retrieve, response.create/cancel, output_audio_buffer.clear) and breaks them: wrong types, extreme numbers,
NaN/Infinity, JSON nested 10,000 deep (and 400 deep, which parses), invalid UTF-8 and binary frames, oversized
strings and messages, missing and extra fields, byte-level damage, and valid events in invalid orders (truncate
of an unknown or user item, cancel with nothing running, commit of an empty buffer, ...).

Asserted: every message the decoder rejects (judged by the same pure decoder, here in the test) gets an `error`
event with that code, and every other message's outcome is in before the next one goes (a probe after it, see
`Fuzzer.send`), so no error is lost to the outbox's one-unsent-error-per-code rule; no `internal_error`, no ERROR
log record; each session stays open; a bystander session that started before gets a spoken answer, and a fresh
session after it; the rate limit answers `rate_limit_exceeded`; closes happen only with the RFC's or documented
codes. Then a few hundred good and bad Twilio frames: the call stays up (it answers a spoken question after),
and the log gets a bounded number of WARNING lines.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from clients.talk import talk
from common import audio as audio_codec
from common.errors import SessionError
from realtime.core.events import decode_client_event
from tests.integration import schema

pytestmark = pytest.mark.integration

SEED = 20261202
FUZZ_SESSIONS = 4
EVENTS_PER_SESSION = 560  # 2,240 mutated events through the live socket (probes not counted)
PACE_PER_S = 150.0  # per session, under [limits] events_per_second (200): the limit gets a test of its own
TWILIO_FRAMES = 300
STEP_TIMEOUT_S = 20.0  # one message's answer; generous for a loaded 2-core machine


# ---------------------------------------------------------------------------------------------
# The mutator


HOSTILE = [None, True, False, 0, -1, 1.5, 1e308, -1e308, 2**31, 2**63, 2**64 + 1, 10**30, -(2**63) - 1, "", "x",
           "NaN", "Infinity", "-1", "1e308", "\x00", "\u202e\u0000", "🎙" * 20, [], {}, [1, "a", None], {"a": {}},
           "A" * 70_000]
NUMERIC_FIELDS = ["audio_end_ms", "content_index", "temperature", "max_output_tokens", "silence_duration_ms",
                  "prefix_padding_ms", "threshold", "rate", "partial_transcripts_ms"]


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


class Fuzzer:
    """One fuzzing session: builds real events, mutates them, sends them paced, and checks each outcome."""

    def __init__(self, ws: ClientConnection, rng: random.Random, chunks: list[str], limit: int) -> None:
        self.ws = ws
        self.rng = rng
        self.chunks = chunks  # base64 pcm16 24 kHz chunks of real speech
        self.limit = limit  # server.max_message_bytes
        self.items: list[str] = []  # item ids the server reported
        self.user_items: list[str] = []
        self.responses = 0
        self.sent = 0
        self.expected_errors = 0
        self.codes: Counter[str] = Counter()  # error codes seen
        self.kinds: Counter[str] = Counter()  # mutations sent
        self._next_at = time.perf_counter()

    # ---- real traffic ---------------------------------------------------------------------------
    def real(self) -> dict[str, Any]:
        r = self.rng
        item = r.choice(self.items) if self.items and r.random() < 0.7 else f"item_{r.randrange(10**6)}"
        choices: list[tuple[float, Any]] = [
            (3, lambda: {"type": "session.update", "session": r.choice([
                {"type": "realtime", "instructions": "Be brief.", "audio": {"input": {"turn_detection": None}}},
                {"duet": {"pacing": r.choice(["nothink", "speak-first"])}},
                {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}},
                {"output_modalities": ["text"]}])}),
            (30, lambda: {"type": "input_audio_buffer.append", "audio": r.choice(self.chunks)}),
            (2, lambda: {"type": "input_audio_buffer.commit"}),
            (4, lambda: {"type": "input_audio_buffer.clear"}),
            (8, lambda: {"type": "conversation.item.create",
                         "item": {"type": "message", "role": r.choice(["user", "assistant", "system"]),
                                  "content": [{"type": "input_text", "text": "What is two plus two?"}]},
                         **({"previous_item_id": item} if r.random() < 0.3 else {})}),
            (6, lambda: {"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                         "audio_end_ms": r.choice([0, 100, 1500])}),
            (3, lambda: {"type": "conversation.item.delete", "item_id": item}),
            (4, lambda: {"type": "conversation.item.retrieve", "item_id": item}),
            # Real replies cost CPU: a few per session, mostly cancelled at once by the next event.
            (1 if self.responses < 3 else 0, lambda: {"type": "response.create",
                                                      "response": {"instructions": "Say OK.",
                                                                   "output_modalities": ["text"]}}),
            (5, lambda: {"type": "response.cancel"}),
            (2, lambda: {"type": "output_audio_buffer.clear"}),
        ]
        make = r.choices([c for _, c in choices], weights=[w for w, _ in choices])[0]
        event = make()
        if r.random() < 0.5:
            event["event_id"] = f"fz_{r.randrange(10**9)}"
        return dict(event)

    # ---- mutations ----------------------------------------------------------------------------
    def mutate(self, event: dict[str, Any]) -> tuple[str, str | bytes]:
        r = self.rng
        kind = r.choices(
            ["valid", "wrong_type", "huge_number", "nan", "deep", "deep_parsable", "binary", "oversized",
             "missing_field", "extra_field", "bytes", "type_confusion", "bad_order", "bad_event_id"],
            weights=[12, 14, 10, 4, 3, 3, 4, 2, 8, 6, 12, 8, 10, 4])[0]
        e = json.loads(json.dumps(event))  # a copy
        if kind == "wrong_type":
            path = self._random_path(e)
            self._set(e, path, r.choice(HOSTILE))
        elif kind == "huge_number":
            target = e.get("session") if isinstance(e.get("session"), dict) else e
            target[r.choice(NUMERIC_FIELDS)] = r.choice([1e308, -1e308, -1, 2**64, 10**30, -(2**63), 5e-324])
        elif kind == "nan":
            text = json.dumps(e)
            literal = r.choice(["NaN", "Infinity", "-Infinity"])
            return kind, text[:-1] + f', "x": {literal}}}'
        elif kind == "deep":  # past the stack: 10,000 levels, as a whole message or inside a field
            text = r.choice([nested(10_000), '{"type": "session.update", "session": {"x": ' + nested(10_000) + "}}",
                             '{"type": "conversation.item.create", "item": ' + "{\"a\":" * 10_000 + "1" +
                             "}" * 10_000 + "}"])
            return kind, text
        elif kind == "deep_parsable":  # deep but parsable (under the ~1,000 limit): reaches the session
            field = r.choice(["session", "item", "response"])
            text = json.dumps({**e, "type": {"session": "session.update", "item": "conversation.item.create",
                                             "response": "response.create"}[field]})
            return kind, text[:-1] + f', "{field}": {{"instructions": {nested(400)}, "content": {nested(300)}}}}}'
        elif kind == "binary":
            data = r.choice([json.dumps(e).encode(), bytes(r.randrange(256) for _ in range(r.randrange(1, 64))),
                             b"\xff\xfe\xfd" + json.dumps(e).encode()])
            return kind, data
        elif kind == "oversized":
            if r.random() < 0.2:  # over the message limit (4 MiB by default): message_too_large, not a close
                return kind, json.dumps({**e, "pad": "A" * (self.limit + 16)})
            e.setdefault("session", {})
            if isinstance(e["session"], dict):
                e["session"]["instructions"] = "word " * r.choice([10_000, 100_000])
        elif kind == "missing_field":
            keys = [k for k in e if k != "event_id"]
            if keys:
                del e[r.choice(keys)]
        elif kind == "extra_field":
            e[r.choice(["extra", "__proto__", "constructor", "event_id2", "typ", ""])] = r.choice(HOSTILE[:20])
        elif kind == "bytes":
            data = bytearray(json.dumps(e).encode())
            for _ in range(r.randint(1, 4)):
                i = r.randrange(len(data))
                op = r.randrange(3)
                if op == 0:
                    data[i] = r.randrange(32, 127)
                elif op == 1:
                    del data[i:]
                    if not data:
                        data = bytearray(b"{")
                else:
                    data[i:i] = r.choice([b'"', b"{", b"]", b",", b"\\", b"\\u00"])
            return kind, data.decode("utf-8", errors="replace")
        elif kind == "type_confusion":
            e["type"] = r.choice(["response.created", "session.updated", "SESSION.UPDATE", "", "input_audio_buffer",
                                  "conversation.item.truncate", "response.create", 42, None, ["session.update"]])
            if e["type"] is None:
                del e["type"]
        elif kind == "bad_order":
            e = r.choice([
                {"type": "conversation.item.truncate", "item_id": r.choice(self.user_items or ["item_none"]),
                 "content_index": 0, "audio_end_ms": 5000},
                {"type": "conversation.item.truncate", "item_id": "item_never", "content_index": 3,
                 "audio_end_ms": 10**12},
                {"type": "response.cancel", "response_id": "resp_never"},
                {"type": "input_audio_buffer.commit"},  # after a clear, or with nothing appended
                {"type": "conversation.item.delete", "item_id": "item_gone"},
                {"type": "conversation.item.retrieve", "item_id": ""},
                {"type": "conversation.item.create", "previous_item_id": "item_nowhere",
                 "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
                {"type": "conversation.item.create", "item": {"id": r.choice(self.items or ["dup"]), "type": "message",
                                                              "role": "user", "content": []}},
                {"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_x",
                                                              "output": "{}"}},
                {"type": "output_audio_buffer.clear"},
            ])
        elif kind == "bad_event_id":
            e["event_id"] = r.choice([42, {"id": 1}, ["a"], "e" * 10_000, None, True])
        return kind, json.dumps(e)

    def _random_path(self, e: dict[str, Any]) -> list[str]:
        path, node = [], e
        while isinstance(node, dict) and node:
            key = self.rng.choice(list(node))
            path.append(key)
            node = node[key]
            if self.rng.random() < 0.5:
                break
        return path or ["type"]

    @staticmethod
    def _set(e: dict[str, Any], path: list[str], value: Any) -> None:
        node: Any = e
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    # ---- the exchange -------------------------------------------------------------------------
    def expected(self, payload: str | bytes) -> tuple[str, str | None] | None:
        """The error the server must answer with (code, event_id), judged by the same pure decoder; None when
        the message decodes (then the session decides; any answer but an internal error is fine)."""
        if isinstance(payload, bytes):
            return "binary_not_supported", None
        if len(payload) > self.limit:
            return "message_too_large", None
        try:
            decode_client_event(payload)
        except SessionError as err:
            return err.code, err.event_id
        return None

    async def _pace(self) -> None:
        self._next_at = max(self._next_at + 1 / PACE_PER_S, time.perf_counter())
        await asyncio.sleep(max(0.0, self._next_at - time.perf_counter()))

    async def send(self, kind: str, payload: str | bytes) -> None:
        await self._pace()
        await self.ws.send(payload)
        self.sent += 1
        self.kinds[kind] += 1
        want = self.expected(payload)
        if want is None:
            # The session may answer anything, now or never: a probe after it (invalid JSON, a code no decodable
            # event can cause) proves that everything it emitted on the way has been read.
            await self._pace()
            await self.ws.send("{")
            await self.read_until("invalid_json", None)
            return
        self.expected_errors += 1
        await self.read_until(*want)

    async def read_until(self, code: str, event_id: str | None) -> None:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while True:
                event = schema.check(json.loads(await self.ws.recv()))  # errors too must fit strict clients
                kind = event["type"]
                if kind == "conversation.item.created":
                    self.items.append(event["item"]["id"])
                    if event["item"].get("role") == "user":
                        self.user_items.append(event["item"]["id"])
                elif kind == "response.created":
                    self.responses += 1
                elif kind == "error":
                    err = event["error"]
                    self.codes[err["code"]] += 1
                    assert err["code"] not in ("internal_error", "rate_limit_exceeded"), err
                    if err["code"] == code:
                        assert err.get("event_id") == event_id or event_id is None, (err, event_id)
                        return


async def fuzz_session(url: str, seed: int, chunks: list[str], limit: int) -> Fuzzer:
    async with connect(url, max_size=None, max_queue=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        # Manual turns: real speech appended must not start a reply per fuzzed append (CPU), only commits do.
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        fz = Fuzzer(ws, random.Random(seed), chunks, limit)
        for _ in range(EVENTS_PER_SESSION - 1):
            await fz.send(*fz.mutate(fz.real()))
        # One message over the size limit whatever the dice said: its answer is an error, not a close.
        await fz.send("oversized", json.dumps({"type": "response.cancel", "pad": "A" * limit}))
        # Still open, still working.
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while (event := json.loads(await ws.recv()))["type"] != "session.updated":
                assert event["type"] != "error" or event["error"]["code"] != "internal_error", event
        assert event["session"]["instructions"] == "Be brief."
    return fz


def speech_chunks(speak: Any) -> list[str]:
    """Real speech as a client sends it: pcm16 24 kHz, 20-100 ms a chunk."""
    audio = speak("Please tell me a short story about a fox.")
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    out, i, rng = [], 0, random.Random(SEED)
    while i < len(pcm):
        n = 960 * rng.randint(1, 5)  # 20 ms = 480 samples = 960 bytes
        out.append(base64.b64encode(pcm[i:i + n]).decode())
        i += n
    return out


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------------------------
# The tests


async def test_fuzzed_sessions_get_errors_and_bystanders_are_unharmed(url, server, speak, caplog) -> None:
    caplog.set_level(logging.WARNING)
    question = speak("What is the capital of France?")
    chunks = speech_chunks(speak)
    before = len(server.sessions)
    bystander = asyncio.create_task(talk(question, url, timeout_s=90))
    async with asyncio.timeout(30):  # the bystander's session is open before the fuzzing starts
        while len(server.sessions) == before:
            await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    fuzzers = await asyncio.gather(*(fuzz_session(url, SEED + i, chunks, server.cfg.max_message_bytes)
                                     for i in range(FUZZ_SESSIONS)))
    fuzz_s = time.perf_counter() - t0
    heard = await bystander
    assert heard["reply_transcript"] and heard["voice_to_voice_ms"] is not None and not heard["errors"], heard

    sent = sum(f.sent for f in fuzzers)
    kinds = sum((f.kinds for f in fuzzers), Counter())
    codes = sum((f.codes for f in fuzzers), Counter())
    print(f"fuzz: {sent} events in {fuzz_s:.1f} s, {sum(f.expected_errors for f in fuzzers)} rejected by the "
          f"decoder; mutations {dict(kinds)}; error codes {dict(codes)}")
    assert sent >= 2000
    # The mutator reached every path it claims to: each mutation ran, and the decoder and the session both
    # answered (a run where everything failed to parse would not test the session).
    assert all(kinds[k] >= 10 for k in ("valid", "wrong_type", "deep", "deep_parsable", "binary", "bad_order")), kinds
    assert codes["invalid_json"] > 100 and codes["binary_not_supported"] > 0 and codes["message_too_large"] > 0
    assert sum(n for c, n in codes.items() if c not in {"invalid_json", "missing_type", "unknown_event_type",
                                                         "invalid_base64", "invalid_value", "binary_not_supported",
                                                         "message_too_large"}) > 50, codes
    assert not server_errors(caplog)

    # A fresh session after the fuzzing gets a spoken answer too.
    fresh = await talk(question, url, timeout_s=90)
    assert fresh["reply_transcript"] and fresh["voice_to_voice_ms"] is not None and not fresh["errors"], fresh
    assert not server_errors(caplog)


async def test_rate_limit_answers_rate_limit_exceeded(url) -> None:
    async with connect(url, max_size=None, max_queue=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        # 1,000 at once: past the 400-event burst and whatever refills meanwhile (200 a second).
        clear = json.dumps({"type": "input_audio_buffer.clear"})
        for _ in range(1000):
            await ws.send(clear)
        cleared, limited = 0, 0
        # Errors of one code wait unsent at most once (the outbox), so count until the answers stop.
        with contextlib.suppress(TimeoutError):
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 3))
                cleared += event["type"] == "input_audio_buffer.cleared"
                if event["type"] == "error":
                    assert event["error"]["code"] == "rate_limit_exceeded", event
                    limited += 1
        assert limited >= 1 and 400 <= cleared < 1000, (cleared, limited)
        await asyncio.sleep(1.0)  # the bucket refills; the session goes on
        await ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "after"}))
        async with asyncio.timeout(20):
            while (event := json.loads(await ws.recv()))["type"] != "input_audio_buffer.cleared":
                pass


async def test_frames_the_server_closes_for_use_documented_codes(url, server, caplog) -> None:
    """The two inputs that end a session on purpose, with their codes: a text frame of invalid UTF-8 (1007,
    RFC 6455: aiohttp closes it before Duet sees it) and a message over twice `max_message_bytes` (1009, the
    WebSocket layer's bound, docs/security.md). Neither logs an error."""
    caplog.set_level(logging.WARNING)
    for payload, code in ((b'{"type": "response.cancel", "x": "\xff\xfe"}', 1007),
                          ("A" * (2 * server.cfg.max_message_bytes + 1024), 1009)):
        async with connect(url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(payload, text=True)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(30):
                    while True:
                        await ws.recv()
            assert ws.close_code == code, (ws.close_code, ws.close_reason)
    assert not server_errors(caplog)


# ---- Twilio -----------------------------------------------------------------------------------

SID = "MZ00000000000000000000000000000fuz"


def twilio_frames(rng: random.Random, n: int) -> list[tuple[str | bytes, bool]]:
    """(frame, is it bad) * n: silent audio and broken frames of every kind the bridge reads."""
    silence = base64.b64encode(b"\xff" * 160).decode()  # mu-law silence, 20 ms
    good = json.dumps({"event": "media", "streamSid": SID, "media": {"track": "inbound", "payload": silence}})
    bad: list[Any] = [
        "{not json", "[1, 2]", "null", "42", b"\xff\xfe\x00", nested(10_000), '{"event": ' + nested(10_000) + "}",
        '{"event": "media", "media": {"payload": ' + nested(10_000) + "}}",
        {"event": "media"}, {"event": "media", "media": {}}, {"event": "media", "media": {"payload": 42}},
        {"event": "media", "media": {"payload": "@@not base64@@"}}, {"event": "media", "media": None},
        {"event": "media", "media": {"payload": silence, "track": ["x"]}},
        {"event": "mark"}, {"event": "mark", "mark": {"name": ["unhashable"]}}, {"event": "mark", "mark": 1},
        {"event": "dtmf"}, {"event": "dtmf", "dtmf": {}}, {"event": "error", "x": "A" * 100_000},
        {"event": "no-such-event"}, {"event": None}, {"event": ["media"]}, {"event": "connected", "protocol": 1e308},
        '{"event": "start", "start": {"mediaFormat": {"sampleRate": Infinity}}}',
        {"event": "start", "start": "not an object"}, {"event": "start", "start": {"mediaFormat": 7}},
    ]
    out: list[tuple[str | bytes, bool]] = []
    for _ in range(n):
        if rng.random() < 0.4:
            out.append((good, False))
        else:
            frame = rng.choice(bad)
            out.append((frame if isinstance(frame, str | bytes) else json.dumps(frame), True))
    return out


def mulaw_frames(audio_24k: np.ndarray) -> list[str]:
    pcm8k = soxr.resample(audio_24k, 24000, 8000).astype(np.float32)
    pcm8k = np.concatenate([pcm8k, np.zeros(8000 * 2, np.float32)])  # the pause that ends the turn
    data = audio_codec.encode(pcm8k, audio_codec.G711_ULAW)
    return [json.dumps({"event": "media", "streamSid": SID, "media": {"track": "inbound",
                                                                      "payload": base64.b64encode(data[i:i + 160])
                                                                      .decode()}})
            for i in range(0, len(data) - 159, 160)]


async def test_twilio_call_survives_bad_frames_with_bounded_warnings(url, server, speak, caplog) -> None:
    caplog.set_level(logging.INFO)
    twilio = url.replace("/v1/realtime", "/twilio")
    frames = twilio_frames(random.Random(SEED), TWILIO_FRAMES)
    before = set(server.sessions)
    async with connect(twilio, max_size=None) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({"event": "start", "streamSid": SID, "start": {
            "streamSid": SID, "callSid": "CA1", "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        (call_id,) = set(server.sessions) - before
        caplog.clear()
        for frame, _ in frames:
            await ws.send(frame)
            await asyncio.sleep(1 / PACE_PER_S)
        await asyncio.sleep(0.5)  # the last frames handled
        bridge_warnings = [r for r in caplog.records
                           if r.name == "realtime.transports.telephony" and r.levelno == logging.WARNING]
        assert sum(is_bad for _, is_bad in frames) >= 150
        # Before: one WARNING a bad frame. Now: the first of each kind, then one per 10 s with a count.
        assert 5 <= len(bridge_warnings) <= 25, [r.getMessage() for r in bridge_warnings]
        assert not server_errors(caplog)
        assert call_id in server.sessions  # the call is still up ...
        # ... and answers a spoken question, streamed at real-time pace like a phone line.
        replies = 0

        async def listen() -> None:
            nonlocal replies
            while True:
                if json.loads(await ws.recv()).get("event") == "media":
                    replies += 1
        listener = asyncio.create_task(listen())
        t0 = time.perf_counter()
        for i, frame in enumerate(mulaw_frames(speak("What is the capital of France?"))):
            await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.perf_counter()))
            await ws.send(frame)
        async with asyncio.timeout(60):
            while replies < 25:  # half a second of reply audio
                await asyncio.sleep(0.1)
        listener.cancel()
        # Frames after `stop` go nowhere and harm nothing: the bridge ends the call and the socket closes.
        await ws.send(json.dumps({"event": "stop", "streamSid": SID}))
        with contextlib.suppress(ConnectionClosed):
            for frame, _ in frames[:20]:
                await ws.send(frame)
        async with asyncio.timeout(20):
            await ws.wait_closed()
    async with asyncio.timeout(20):
        while call_id in server.sessions:
            await asyncio.sleep(0.05)
    assert not server_errors(caplog)
