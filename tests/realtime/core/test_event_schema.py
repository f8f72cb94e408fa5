"""Server event shapes against the `openai` package's models, and the opt-in of Duet's own events.

The integration tests validate whole sessions on the real server; these check the oracle itself (it must
reject what strict clients reject) and the shapes built here without models, in both dialects.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from brains.history import Item
from common.errors import SessionError
from realtime.core import events as ev
from realtime.core.settings import SessionSettings
from tests.integration import schema

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def wire(event: ev.ServerEvent, beta: bool = False) -> dict[str, Any]:
    return dict(json.loads(ev.encode_server_event(event, beta=beta)))


# ---------------------------------------------------------------- the oracle rejects what strict clients reject

GOOD_COMPLETED = {"type": "conversation.item.input_audio_transcription.completed", "event_id": "event_1",
                  "item_id": "item_1", "content_index": 0, "transcript": "hi",
                  "usage": {"type": "duration", "seconds": 1.2}}


@pytest.mark.parametrize("beta", [False, True])
def test_the_oracle_accepts_a_valid_event(beta: bool) -> None:
    assert schema.check(GOOD_COMPLETED, beta=beta) is GOOD_COMPLETED


@pytest.mark.parametrize("bad", [
    {k: v for k, v in GOOD_COMPLETED.items() if k != "usage"},  # what Duet sent before: no usage
    {"type": "rate_limits.updated", "event_id": "e",
     "rate_limits": [{"name": "sessions", "limit": 8, "remaining": 7, "reset_seconds": 0.0}]},
    {"type": "response.content_part.added", "event_id": "e", "response_id": "r", "item_id": "i",
     "output_index": 0, "content_index": 0, "part": {"type": "output_audio", "transcript": ""}},
    {"type": "duet.thought.delta", "event_id": "e", "response_id": "r", "item_id": "i", "delta": "hmm"},
    {"type": "response.done", "event_id": "e", "response": {"id": "r", "object": "realtime.response",
                                                            "status": "cancelled",
                                                            "status_details": {"type": "cancelled",
                                                                               "reason": "client_truncated"}}},
])
@pytest.mark.parametrize("beta", [False, True])
def test_the_oracle_rejects_what_strict_clients_reject(bad: dict[str, Any], beta: bool) -> None:
    with pytest.raises(schema.SchemaError, match=bad["type"]):
        schema.check(bad, beta=beta)


# ---------------------------------------------------------------- Duet's shapes validate

def items() -> list[Item]:
    return [Item(id="item_u", role="user", text="hello", audio=True),
            Item(id="item_t", role="user", text="typed"),
            Item(id="item_s", role="system", text="Be brief."),
            Item(id="item_a", role="assistant", text="Hi there.", audio=True, thought="greet"),
            Item(id="item_x", role="assistant", text="Hi.", status="incomplete"),
            Item(id="item_f", role="assistant", type="function_call", call_id="call_1", name="get_weather",
                 arguments='{"city": "Paris"}'),
            Item(id="item_o", role="user", type="function_call_output", call_id="call_1", text='{"sky": "sunny"}')]


@pytest.mark.parametrize("beta", [False, True])
def test_session_objects_validate(beta: bool) -> None:
    s = SessionSettings(beta=beta)
    check = schema.check
    check(wire(ev.SessionCreated(session=s.to_protocol("sess_1")), beta), beta)
    s.apply({"tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"}, "turn_detection": None,
             "duet": {"events": ["thought"]}} if beta else
            {"type": "realtime", "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"},
             "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "semantic_vad"}},
                       "output": {"format": {"type": "audio/pcma"}}}, "duet": {"events": ["thought"]}})
    reported = s.to_protocol("sess_1")
    check(wire(ev.SessionUpdated(session=reported), beta), beta)
    assert reported["tool_choice"] == ("get_weather" if beta else {"type": "function", "name": "get_weather"})


@pytest.mark.parametrize("beta", [False, True])
def test_item_events_validate(beta: bool) -> None:
    for item in items():
        raw = item.to_protocol(beta)
        for event in (ev.ItemCreated(previous_item_id=None, item=raw), ev.ItemRetrieved(item=raw),
                      ev.OutputItemDone(response_id="resp_1", item=raw)):
            schema.check(wire(event, beta), beta)


@pytest.mark.parametrize("beta", [False, True])
@pytest.mark.parametrize(("status", "reason"), [
    ("completed", None), ("cancelled", "turn_detected"), ("cancelled", "client_cancelled"),
    ("cancelled", "client_truncated"), ("cancelled", "client_cleared"), ("cancelled", "item_deleted"),
    ("cancelled", "client_disconnected"), ("failed", "the engine stopped")])
def test_response_status_details_validate(beta: bool, status: str, reason: str | None) -> None:
    details = ev.status_details(status, reason)
    response = {"id": "resp_1", "object": "realtime.response", "status": status, "status_details": details,
                "output": [i.to_protocol(beta) for i in items()[3:6]], "conversation_id": "sess_1",
                "usage": {"output_tokens": 3, "output_token_details": {"reasoning_tokens": 2}},
                "modalities" if beta else "output_modalities": ["audio", "text"]}
    schema.check(wire(ev.ResponseDone(response=response), beta), beta)
    if reason is not None and status == "cancelled":
        assert details is not None and details["reason"] in ("turn_detected", "client_cancelled")
        if details["reason"] != reason:
            assert details["duet"]["reason"] == reason  # the finer reason is kept, namespaced


@pytest.mark.parametrize("beta", [False, True])
def test_the_other_server_events_validate(beta: bool) -> None:
    capacity = ev.Capacity(limit=8, remaining=7)
    events: list[ev.ServerEvent] = [
        ev.error_event(SessionError("bad", code="invalid_value", param="session", event_id="evt_1")),
        ev.SpeechStarted(audio_start_ms=100, item_id="i"), ev.SpeechStopped(audio_end_ms=900, item_id="i"),
        ev.Committed(previous_item_id="item_0", item_id="i"), ev.Cleared(),
        ev.ItemTruncated(item_id="i", audio_end_ms=600), ev.ItemDeleted(item_id="i"),
        ev.TranscriptionDelta(item_id="i", delta="hi"),
        ev.TranscriptionCompleted(item_id="i", transcript="hi", usage=ev.TranscriptionUsage(seconds=0.8)),
        ev.ResponseCreated(response={"id": "r", "object": "realtime.response", "status": "in_progress",
                                     "output": []}),
        ev.RateLimitsUpdated(rate_limits=[ev.RateLimit(name="requests", limit=8, remaining=7, reset_seconds=0.0)],
                             duet={"sessions": capacity, "kv_slots": capacity}),
        ev.OutputItemAdded(response_id="r", item=items()[3].to_protocol(beta)),
        ev.ContentPartAdded(response_id="r", item_id="i", part={"type": "audio", "transcript": ""}),
        ev.ContentPartDone(response_id="r", item_id="i", part={"type": "text", "text": "Hi."}),
        ev.AudioDelta(response_id="r", item_id="i", delta=np.zeros(480, np.float32)),
        ev.AudioDone(response_id="r", item_id="i"),
        ev.AudioTranscriptDelta(response_id="r", item_id="i", delta="Hi"),
        ev.AudioTranscriptDone(response_id="r", item_id="i", transcript="Hi."),
        ev.TextDelta(response_id="r", item_id="i", delta="Hi"), ev.TextDone(response_id="r", item_id="i", text="Hi"),
        ev.FunctionCallArgumentsDelta(response_id="r", item_id="i", call_id="c", delta="{}"),
        ev.FunctionCallArgumentsDone(response_id="r", item_id="i", call_id="c", name="f", arguments="{}"),
        ev.OutputAudioBufferCleared(),  # no response to name: still a string
    ]
    for event in events:
        schema.check(wire(event, beta), beta)


# ---------------------------------------------------------------- opting in to Duet's own events

DUET = [ev.ThoughtDelta(response_id="r", item_id="i", delta="hmm"),
        ev.TurnMetrics(response_id="r", metrics={"status": "completed"}),
        ev.PartialTranscript(item_id="i", transcript="what is")]


def test_duet_events_are_hidden_unless_asked_for() -> None:
    assert not any(ev.visible(e, frozenset()) for e in DUET)
    assert all(ev.visible(e, ev.parse_duet_events("all")) for e in DUET)
    only_thought = ev.parse_duet_events(["thought"])
    assert [ev.visible(e, only_thought) for e in DUET] == [True, False, False]
    assert ev.visible(ev.Cleared(), frozenset()), "standard events always go out"


def test_parse_duet_events_names() -> None:
    assert ev.parse_duet_events("thought, turn_metrics") == {"duet.thought.delta", "duet.turn.metrics"}
    assert ev.parse_duet_events(["duet.input_transcript.partial"]) == {"duet.input_transcript.partial"}
    assert ev.parse_duet_events("") == frozenset() == ev.parse_duet_events([])
    for bad in (["thoughts"], "nope", 3, [1]):
        with pytest.raises(ValueError, match="duet"):
            ev.parse_duet_events(bad)


def test_session_update_opts_in_and_reports_it() -> None:
    s = SessionSettings()
    assert s.duet_events == frozenset() and s.to_protocol("sess_1")["duet"]["events"] == []
    s.apply({"duet": {"events": ["thought", "turn_metrics"]}})
    assert s.duet_events == {"duet.thought.delta", "duet.turn.metrics"}
    assert s.to_protocol("sess_1")["duet"]["events"] == ["thought", "turn_metrics"]
    # Asking for partial transcripts is asking for the event that carries them.
    s.apply({"duet": {"partial_transcripts_ms": 500}})
    assert "duet.input_transcript.partial" in s.duet_events
    s.apply({"duet": {"events": []}})
    assert s.duet_events == frozenset()
    s.apply({"duet": {"events": "all"}})
    assert set(s.to_protocol("sess_1")["duet"]["events"]) == set(ev.DUET_EVENTS)
    with pytest.raises(SessionError) as info:
        s.apply({"duet": {"events": ["everything"]}})
    assert info.value.code == "invalid_value"

