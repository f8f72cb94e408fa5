"""Fuzzing the client event decoder (`decode_client_event`): whatever bytes or text arrive, it returns a typed
event or raises `SessionError` with one of the protocol's error codes; nothing else may escape, since anything
else becomes an `internal_error` and a logged traceback per message.

Hypothesis, derandomized (the same examples every run, no example database), ~8,700 examples in all: raw bytes
and text, JSON values of every shape and extreme, mutated real events, and nesting past the interpreter's
recursion limit (which used to escape as RecursionError). Valid events are generated too, and must decode to
the right struct: a decoder that rejected everything would fail here.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import SessionError
from realtime.core.events import CLIENT_EVENTS, ClientEvent, decode_client_event

CODES = {"invalid_json", "missing_type", "unknown_event_type", "invalid_base64", "invalid_value"}
TYPES = sorted(CLIENT_EVENTS)


def fuzz(n: int) -> settings:
    # Deterministic and bounded: CI runs the same examples every time and never writes .hypothesis/.
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(data: str | bytes) -> ClientEvent | SessionError:
    """Decode; the only failure allowed is a SessionError with a known code and a message."""
    try:
        event = decode_client_event(data)
    except SessionError as err:
        assert err.code in CODES, (err.code, err.message, data[:200])
        assert err.message
        return err
    assert isinstance(event, ClientEvent)
    assert event.__struct_config__.tag in CLIENT_EVENTS
    return event


# JSON extremes: what a hostile client can put in a number or string field.
EXTREME_NUMBERS = st.sampled_from([0, -1, 2**31, -(2**31) - 1, 2**63, 2**64 + 1, 10**30, -(10**30), 1e308, -1e308,
                                   5e-324, 1.5, -0.0, math.inf, -math.inf, math.nan])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    EXTREME_NUMBERS, st.text(max_size=40),
                    st.sampled_from(["", "NaN", "1e308", "-1", "\x00", "\u202e", "A" * 5000, "🎙" * 50]))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                     st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                    max_leaves=25)

# Fields the real events have, so generated events reach the struct validation, not only the type lookup.
FIELDS = ["event_id", "session", "audio", "item", "previous_item_id", "item_id", "content_index", "audio_end_ms",
          "response", "response_id", "type"]


def dumps(value: Any) -> str:
    # allow_nan: NaN and Infinity as JSON literals (invalid JSON the client may still send)
    return json.dumps(value, allow_nan=True)


@fuzz(1500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@fuzz(1000)
@given(st.text(max_size=300))
def test_arbitrary_text(data: str) -> None:
    check(data)


@fuzz(2000)
@given(st.sampled_from([*TYPES, "nope", "", "session.updated", "SESSION.UPDATE"]),
       st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), st.one_of(st.none(), JSON))
def test_events_with_hostile_fields(kind: str, fields: dict[str, Any], event_id: Any) -> None:
    raw = {"type": kind, **{k: v for k, v in fields.items() if k != "type"}}
    if event_id is not None:
        raw["event_id"] = event_id
    result = check(dumps(raw))
    # The error names the client's event where it had a string one, so the client can match it up.
    if isinstance(result, SessionError) and result.code != "invalid_json" and isinstance(event_id, str):
        assert result.event_id == event_id
    if isinstance(result, ClientEvent):
        assert result.__struct_config__.tag == kind


@fuzz(1200)
@given(st.one_of(JSON, st.lists(JSON, max_size=3)))
def test_any_json_value(value: Any) -> None:
    result = check(dumps(value))
    if not isinstance(value, dict):
        assert isinstance(result, SessionError) and result.code in ("invalid_json",), result


# Real events as a client sends them, for the byte-level mutator below and the positive test.
AUDIO = base64.b64encode(bytes(range(256)) * 4).decode()
REAL = [
    {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief.",
                                           "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}},
    {"type": "input_audio_buffer.append", "audio": AUDIO, "event_id": "ev_1"},
    {"type": "input_audio_buffer.commit"},
    {"type": "input_audio_buffer.clear"},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "hi"}]}},
    {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 1500},
    {"type": "conversation.item.delete", "item_id": "item_1"},
    {"type": "conversation.item.retrieve", "item_id": "item_1"},
    {"type": "response.create", "response": {"instructions": "Say hi."}},
    {"type": "response.cancel"},
    {"type": "output_audio_buffer.clear"},
]


@fuzz(2000)
@given(st.sampled_from(REAL), st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "dup", "delete"]),
                                                 st.floats(0, 1), st.binary(min_size=1, max_size=8)),
                                       min_size=1, max_size=4))
def test_mutated_real_events(event: dict[str, Any], edits: list[tuple[str, float, bytes]]) -> None:
    data = bytearray(dumps(event).encode())
    for op, where, junk in edits:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[i] ^= junk[0] or 0x80
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = junk
        elif op == "dup":
            data[i:i] = data[i:i + len(junk) * 4]
        elif op == "delete":
            del data[i:i + len(junk)]
    check(bytes(data))
    check(bytes(data).decode("utf-8", errors="replace"))


@fuzz(300)
@given(st.integers(1, 20_000), st.sampled_from(["[", '{"a":', '{"type":"session.update","session":{"x":']))
def test_deep_nesting(depth: int, opener: str) -> None:
    """JSON nested up to 20,000 deep (under 200 KB, inside the message size limit): before the fix, past
    ~1,000 levels msgspec raised RecursionError, and the server answered internal_error with a traceback."""
    closer = {"[": "]", '{"a":': "}"}.get(opener, "}}")  # the session.update opener opens two objects
    result = check(opener * depth + "1" + closer * depth)
    if depth > 2000:  # far past any stack: must be refused as invalid JSON, not accepted or crash
        assert isinstance(result, SessionError) and result.code == "invalid_json"


@fuzz(400)
@given(st.sampled_from(REAL), st.one_of(st.none(), st.text(max_size=20)))
def test_valid_events_decode(event: dict[str, Any], event_id: str | None) -> None:
    raw = dict(event) if event_id is None else {**event, "event_id": event_id}
    result = decode_client_event(dumps(raw))
    assert result.__struct_config__.tag == raw["type"]
    assert result.event_id == (event_id if event_id is not None else raw.get("event_id"))
    back = msgspec.to_builtins(result)
    for key, value in raw.items():
        if key == "audio":  # base64 on the wire, bytes in the core
            assert base64.b64encode(result.audio).decode() == value  # type: ignore[attr-defined]
        else:
            assert back[key] == value


def test_surrogate_text_is_invalid_json() -> None:
    """A str holding a lone surrogate (not UTF-8 encodable) is bad input, not an internal error."""
    err = check('{"type": "response.cancel", "event_id": "\ud800"}')
    assert isinstance(err, SessionError) and err.code == "invalid_json"
