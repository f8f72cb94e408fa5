"""OpenAI Realtime protocol events: decoding client events, error codes, encoding server events."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import numpy as np
import pytest

from common import audio as audio_codec
from common.errors import SessionError
from realtime.core import events as ev

# ---------------------------------------------------------------- decoding client events

CLIENT_SAMPLES: list[tuple[dict[str, Any], type[ev.ClientEvent], dict[str, Any]]] = [
    ({"type": "session.update", "session": {"voice": "joe"}}, ev.SessionUpdate, {"session": {"voice": "joe"}}),
    ({"type": "input_audio_buffer.append", "audio": "AAAA"}, ev.InputAudioBufferAppend, {"audio": b"\0\0\0"}),
    ({"type": "input_audio_buffer.commit"}, ev.InputAudioBufferCommit, {}),
    ({"type": "input_audio_buffer.clear"}, ev.InputAudioBufferClear, {}),
    ({"type": "conversation.item.create", "item": {"type": "message"}, "previous_item_id": "item_1"},
     ev.ConversationItemCreate, {"item": {"type": "message"}, "previous_item_id": "item_1"}),
    ({"type": "conversation.item.create", "item": {}}, ev.ConversationItemCreate, {"previous_item_id": None}),
    ({"type": "conversation.item.truncate", "item_id": "item_2", "content_index": 0, "audio_end_ms": 1500},
     ev.ConversationItemTruncate, {"item_id": "item_2", "audio_end_ms": 1500}),
    ({"type": "conversation.item.delete", "item_id": "item_3"}, ev.ConversationItemDelete, {"item_id": "item_3"}),
    ({"type": "conversation.item.retrieve", "item_id": "item_4"}, ev.ConversationItemRetrieve,
     {"item_id": "item_4"}),
    ({"type": "response.create"}, ev.ResponseCreate, {"response": None}),
    ({"type": "response.create", "response": {"modalities": ["text"]}}, ev.ResponseCreate,
     {"response": {"modalities": ["text"]}}),
    ({"type": "response.cancel"}, ev.ResponseCancel, {"response_id": None}),
    ({"type": "response.cancel", "response_id": "resp_1"}, ev.ResponseCancel, {"response_id": "resp_1"}),
    ({"type": "output_audio_buffer.clear"}, ev.OutputAudioBufferClear, {}),
]


@pytest.mark.parametrize(("raw", "cls", "fields"), CLIENT_SAMPLES, ids=[f"{r['type']}-{i}"
                                                                       for i, (r, _, _) in enumerate(CLIENT_SAMPLES)])
def test_decode_each_client_event(raw: dict[str, Any], cls: type[ev.ClientEvent], fields: dict[str, Any]) -> None:
    event = ev.decode_client_event(json.dumps({**raw, "event_id": "evt_client_1"}))
    assert type(event) is cls
    assert event.event_id == "evt_client_1"
    for name, value in fields.items():
        assert getattr(event, name) == value


def test_every_client_event_type_is_decodable() -> None:
    covered = {raw["type"] for raw, _, _ in CLIENT_SAMPLES}
    assert covered == set(ev.CLIENT_EVENTS)


def test_decode_accepts_bytes_and_no_event_id() -> None:
    event = ev.decode_client_event(b'{"type": "input_audio_buffer.commit"}')
    assert isinstance(event, ev.InputAudioBufferCommit)
    assert event.event_id is None


def test_decode_ignores_unknown_fields() -> None:
    """Newer clients may send fields we do not know; that is not an error."""
    event = ev.decode_client_event('{"type": "response.cancel", "future_field": 1}')
    assert isinstance(event, ev.ResponseCancel)


def errors_for(data: str | bytes) -> SessionError:
    with pytest.raises(SessionError) as info:
        ev.decode_client_event(data)
    return info.value


@pytest.mark.parametrize("data", ["{", "not json", '{"type": "response.create",}', "", b"\xff\xfe"])
def test_malformed_json(data: str | bytes) -> None:
    err = errors_for(data)
    assert err.code == "invalid_json"
    assert err.type == "invalid_request_error"


@pytest.mark.parametrize("data", ["[1, 2]", '"response.create"', "42", "null", "true"])
def test_non_object_json(data: str) -> None:
    assert errors_for(data).code == "invalid_json"


@pytest.mark.parametrize("data", ['{"event_id": "e1"}', '{"type": 5, "event_id": "e1"}',
                                  '{"type": null, "event_id": "e1"}'])
def test_missing_type(data: str) -> None:
    err = errors_for(data)
    assert err.code == "missing_type"
    assert err.event_id == "e1"


def test_unknown_type_echoes_event_id() -> None:
    err = errors_for('{"type": "response.explode", "event_id": "evt_42"}')
    assert err.code == "unknown_event_type"
    assert err.param == "type"
    assert err.event_id == "evt_42"
    assert "response.explode" in err.message


def test_unknown_type_with_non_string_event_id_is_not_echoed() -> None:
    err = errors_for('{"type": "nope", "event_id": 7}')
    assert err.code == "unknown_event_type"
    assert err.event_id is None


@pytest.mark.parametrize("raw", [
    {"type": "input_audio_buffer.append", "audio": 5},
    {"type": "input_audio_buffer.append"},  # required field missing
    {"type": "session.update", "session": "voice=joe"},
    {"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": "soon"},
    {"type": "conversation.item.delete", "item_id": ["i"]},
    {"type": "response.create", "response": [1]},
    {"type": "response.cancel", "response_id": 3},
])
def test_wrong_field_types(raw: dict[str, Any]) -> None:
    err = errors_for(json.dumps({**raw, "event_id": "evt_bad"}))
    assert err.code == "invalid_value"
    assert err.event_id == "evt_bad"


def test_decode_audio_roundtrip() -> None:
    pcm = bytes(range(256)) * 3
    b64 = ev.encode_audio(pcm)
    assert b64 == base64.b64encode(pcm).decode("ascii")
    assert "\n" not in b64
    assert ev.decode_audio(b64) == pcm
    assert ev.decode_audio("") == b""


@pytest.mark.parametrize("b64", ["!!!!", "AAA", "AA AA", "QUJD\n", "A====", "QQ==QQ=="])
def test_bad_base64(b64: str) -> None:
    with pytest.raises(SessionError) as info:
        ev.decode_audio(b64, event_id="evt_audio")
    assert info.value.code == "invalid_base64"
    assert info.value.param == "audio"
    assert info.value.event_id == "evt_audio"


# ---------------------------------------------------------------- encoding server events


def encoded(event: ev.ServerEvent, beta: bool = False) -> dict[str, Any]:
    return dict(json.loads(ev.encode_server_event(event, beta=beta)))


def test_audio_delta_has_the_published_fields() -> None:
    pcm = np.array([0.0, 0.5, -1.0], np.float32)  # inside the core reply audio is PCM
    out = encoded(ev.AudioDelta(event_id="event_1", response_id="resp_1", item_id="item_1", delta=pcm))
    assert out == {"type": "response.output_audio.delta", "event_id": "event_1", "response_id": "resp_1",
                   "item_id": "item_1", "output_index": 0, "content_index": 0,
                   "delta": base64.b64encode(audio_codec.encode(pcm, audio_codec.PCM16)).decode()}


@pytest.mark.parametrize("fmt", [audio_codec.PCM16, audio_codec.G711_ULAW, audio_codec.G711_ALAW])
def test_audio_is_encoded_only_at_the_wire_in_the_sessions_format(fmt: audio_codec.AudioFormat) -> None:
    pcm = np.linspace(-0.9, 0.9, 160, dtype=np.float32)
    event = ev.AudioDelta(response_id="r", item_id="i", delta=pcm)
    wire = json.loads(ev.encode_server_event(event, audio_format=fmt))["delta"]
    assert base64.b64decode(wire) == audio_codec.encode(pcm, fmt)
    assert event.delta is pcm  # the event itself still holds PCM (other transports encode their own way)


def test_append_audio_arrives_as_bytes_and_bad_base64_has_its_own_code() -> None:
    event = ev.decode_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": "AAE="}))
    assert isinstance(event, ev.InputAudioBufferAppend) and event.audio == b"\0\1"
    with pytest.raises(SessionError) as info:
        ev.decode_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": "A!E="}))
    assert info.value.code == "invalid_base64"


@pytest.mark.parametrize(("event", "expected"), [
    (ev.SessionCreated(session={"id": "sess_1"}), {"type": "session.created", "session": {"id": "sess_1"}}),
    (ev.SpeechStarted(audio_start_ms=120, item_id="item_9"),
     {"type": "input_audio_buffer.speech_started", "audio_start_ms": 120, "item_id": "item_9"}),
    (ev.SpeechStopped(audio_end_ms=900, item_id="item_9"),
     {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "item_9"}),
    (ev.Committed(previous_item_id=None, item_id="item_9"),
     {"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": "item_9"}),
    (ev.TranscriptionCompleted(item_id="item_9", transcript="hi", usage=ev.TranscriptionUsage(seconds=1.5)),
     {"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_9", "content_index": 0,
      "transcript": "hi", "usage": {"type": "duration", "seconds": 1.5}}),
    (ev.AudioTranscriptDone(response_id="r", item_id="i", transcript="Hello."),
     {"type": "response.output_audio_transcript.done", "response_id": "r", "item_id": "i", "output_index": 0,
      "content_index": 0, "transcript": "Hello."}),
    (ev.TextDone(response_id="r", item_id="i", text="Hi"),
     {"type": "response.output_text.done", "response_id": "r", "item_id": "i", "output_index": 0,
      "content_index": 0, "text": "Hi"}),
    (ev.ResponseDone(response={"id": "r", "status": "completed"}),
     {"type": "response.done", "response": {"id": "r", "status": "completed"}}),
    (ev.OutputAudioBufferCleared(response_id="r"), {"type": "output_audio_buffer.cleared", "response_id": "r"}),
    (ev.ThoughtDelta(response_id="r", item_id="i", delta="hmm"),
     {"type": "duet.thought.delta", "response_id": "r", "item_id": "i", "delta": "hmm"}),
])
def test_server_event_fields(event: ev.ServerEvent, expected: dict[str, Any]) -> None:
    out = encoded(event)
    event_id = out.pop("event_id")
    assert out == expected
    assert isinstance(event_id, str) and event_id.startswith("event_")


def test_error_event_shape() -> None:
    err = SessionError("bad thing", code="invalid_value", param="session", event_id="evt_7")
    out = encoded(ev.error_event(err))
    assert out["type"] == "error"
    assert out["error"] == {"type": "invalid_request_error", "code": "invalid_value", "message": "bad thing",
                            "param": "session", "event_id": "evt_7"}


def test_encoding_assigns_an_event_id_once() -> None:
    event = ev.Cleared()
    first = encoded(event)["event_id"]
    assert first
    assert encoded(event)["event_id"] == first  # the same event keeps its id


BETA_CASES = [
    (ev.AudioDelta(response_id="r", item_id="i", delta="AA=="), "response.audio.delta"),
    (ev.AudioDone(response_id="r", item_id="i"), "response.audio.done"),
    (ev.AudioTranscriptDelta(response_id="r", item_id="i", delta="he"), "response.audio_transcript.delta"),
    (ev.AudioTranscriptDone(response_id="r", item_id="i", transcript="hey"), "response.audio_transcript.done"),
    (ev.TextDelta(response_id="r", item_id="i", delta="he"), "response.text.delta"),
    (ev.TextDone(response_id="r", item_id="i", text="hey"), "response.text.done"),
]


@pytest.mark.parametrize(("event", "beta_name"), BETA_CASES)
def test_beta_renames_output_events(event: ev.ServerEvent, beta_name: str) -> None:
    ga_name = event.__struct_config__.tag
    ga = encoded(event, beta=False)
    beta = encoded(event, beta=True)
    assert ga["type"] == ga_name
    assert beta["type"] == beta_name
    # Only the name changes.
    assert {k: v for k, v in ga.items() if k != "type"} == {k: v for k, v in beta.items() if k != "type"}


@pytest.mark.parametrize("event", [ev.ResponseDone(response={}), ev.Cleared(),
                                   ev.SpeechStarted(audio_start_ms=0, item_id="i"),
                                   ev.ThoughtDelta(response_id="r", item_id="i", delta="x")])
def test_beta_keeps_other_names(event: ev.ServerEvent) -> None:
    assert encoded(event, beta=True)["type"] == event.__struct_config__.tag


def test_encoded_events_decode_as_json_objects() -> None:
    text = ev.encode_server_event(ev.AudioDelta(response_id="r", item_id="i", delta="AA=="))
    assert isinstance(text, str)
    assert isinstance(msgspec.json.decode(text), dict)


def test_new_ids_unique_and_prefixed() -> None:
    ids = [ev.new_id("item") for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("item_") for i in ids)
    assert ev.new_id("resp").startswith("resp_")
