"""Conformance: scripted client sessions replayed against the real server; event sequences and fields.

Every event a script receives is validated against the `openai` package's models (tests/integration/
schema.py), as strict clients do: a field, name or shape they would reject fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect

from common.audio import AudioFormat, decode, encode
from tests.integration import schema

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


class Script:
    def __init__(self, ws: ClientConnection, beta: bool = False, duet_events: frozenset[str] = frozenset()) -> None:
        self.ws = ws
        self.beta = beta
        self.duet_events = duet_events  # Duet's own event types this client opted in to (no schema has them)
        self.log: list[dict[str, Any]] = []

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    async def until(self, kind: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Events up to and including the next `kind`."""
        got = []
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads(await self.ws.recv())
                if event["type"] not in self.duet_events:
                    schema.check(event, beta=self.beta)
                self.log.append(event)
                got.append(event)
                if event["type"] == kind:
                    return got


def types(events: list[dict[str, Any]]) -> list[str]:
    """Event types with repeats of deltas folded, and Duet's own extension events left out."""
    out: list[str] = []
    for e in events:
        if e["type"].startswith("duet.") or (out and out[-1] == e["type"] and e["type"].endswith(".delta")):
            continue
        out.append(e["type"])
    return out


async def open_script(url: str, **session: Any) -> tuple[ClientConnection, Script]:
    ws = await connect(url, max_size=None)
    s = Script(ws)
    created = (await s.until("session.created"))[-1]
    assert created["session"]["id"].startswith("sess_")
    await s.send(type="session.update", event_id="ev_update", session={"type": "realtime", **session})
    updated = (await s.until("session.updated"))[-1]
    assert updated["session"]["type"] == "realtime"
    return ws, s


async def user_text(s: Script, text: str) -> None:
    await s.send(type="conversation.item.create",
                 item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    created = (await s.until("conversation.item.created"))[-1]
    assert created["item"]["role"] == "user" and created["item"]["content"][0]["text"] == text


async def test_text_turn_has_the_published_event_sequence_and_ids(url) -> None:
    ws, s = await open_script(url, output_modalities=["text"], duet={"pacing": "nothink"})
    async with ws:
        await user_text(s, "What is the capital of France?")
        await s.send(type="response.create")
        events = await s.until("response.done")
    assert types(events) == [
        "response.created", "rate_limits.updated", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.done"]
    rid = events[0]["response"]["id"]
    limits = {r["name"]: r for r in events[1]["rate_limits"]}
    assert limits["requests"]["remaining"] < limits["requests"]["limit"]  # this session holds a session slot
    capacity = events[1]["duet"]  # Duet's own names for its capacity
    assert capacity["sessions"]["remaining"] == limits["requests"]["remaining"]
    assert 0 <= capacity["kv_slots"]["remaining"] <= capacity["kv_slots"]["limit"]
    item_id = events[2]["item"]["id"]
    for e in events[1:]:
        if "response_id" in e:
            assert e["response_id"] == rid
        if "item_id" in e:
            assert e["item_id"] == item_id and e["output_index"] == 0
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == text.strip()
    assert "paris" in text.lower()


async def test_manual_turn_with_g711_audio_commit_and_response(url, speak) -> None:
    ulaw = AudioFormat("g711_ulaw", 8000)
    ws, s = await open_script(url, audio={"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
                                          "output": {"format": {"type": "audio/pcmu"}}}, duet={"pacing": "nothink"})
    async with ws:
        question = encode(soxr.resample(speak("What is the capital of France?"), 24000, 8000), ulaw)
        for i in range(0, len(question), 1600):
            await s.send(type="input_audio_buffer.append", audio=base64.b64encode(question[i:i + 1600]).decode())
        await s.send(type="input_audio_buffer.commit", event_id="ev_commit")
        committed = await s.until("conversation.item.input_audio_transcription.completed")
        assert types(committed) == ["input_audio_buffer.committed", "conversation.item.created",
                                    "conversation.item.input_audio_transcription.delta",
                                    "conversation.item.input_audio_transcription.completed"]
        assert "france" in committed[-1]["transcript"].lower()
        assert not any(e["type"] == "response.created" for e in committed), "manual turns wait for response.create"
        await s.send(type="response.create")
        events = await s.until("response.done")
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert len(audio) > 8000 * 0.5, "at least half a second of 8 kHz mu-law"
    assert np.abs(decode(audio, ulaw)).max() > 0.05
    assert "response.output_audio_transcript.delta" in types(events)


async def test_forced_tool_call_then_function_output_then_spoken_answer(url) -> None:
    ws, s = await open_script(url, tools=TOOLS, output_modalities=["text"], duet={"pacing": "nothink"})
    async with ws:
        await user_text(s, "What's the weather in Paris?")
        await s.send(type="response.create", response={"tool_choice": {"type": "function", "name": "get_weather"}})
        events = await s.until("response.done")
        assert types(events) == ["response.created", "rate_limits.updated", "response.output_item.added",
                                 "response.function_call_arguments.delta", "response.function_call_arguments.done",
                                 "response.output_item.done", "response.done"]
        call = events[4]
        assert call["name"] == "get_weather"
        assert isinstance(json.loads(call["arguments"]), dict)
        assert events[-1]["response"]["output"][0]["type"] == "function_call"
        await s.send(type="conversation.item.create", event_id="ev_bad", item={
            "type": "function_call_output", "call_id": "call_unknown", "output": "{}"})
        err = (await s.until("error"))[-1]["error"]
        assert err["event_id"] == "ev_bad" and err["param"] == "item.call_id"
        await s.send(type="conversation.item.create", item={
            "type": "function_call_output", "call_id": call["call_id"],
            "output": json.dumps({"city": "Paris", "sky": "sunny", "temperature_c": 21})})
        await s.until("conversation.item.created")
        # SmolLM2-135M tends to call the tool again under "auto"; a client that has the result asks for words.
        await s.send(type="response.create", response={"tool_choice": "none", "output_modalities": ["audio"]})
        answer = await s.until("response.done")
    reply = answer[-1]["response"]["output"][0]
    assert reply["type"] == "message" and reply["content"][0]["transcript"]
    assert any(e["type"] == "response.output_audio.delta" for e in answer), "the result is spoken"


async def test_truncate_delete_retrieve_and_their_errors(url) -> None:
    ws, s = await open_script(url, duet={"pacing": "nothink"})
    async with ws:
        await user_text(s, "Tell me about the city of Paris.")
        await s.send(type="response.create")
        done = (await s.until("response.done"))[-1]["response"]
        item = done["output"][0]
        said = item["content"][0]["transcript"]
        await s.send(type="conversation.item.truncate", event_id="ev_far", item_id=item["id"], content_index=0,
                     audio_end_ms=10_000_000)
        err = (await s.until("error"))[-1]["error"]
        assert err["event_id"] == "ev_far" and err["param"] == "audio_end_ms"
        await s.send(type="conversation.item.truncate", item_id=item["id"], content_index=0, audio_end_ms=600)
        truncated = (await s.until("conversation.item.truncated"))[-1]
        assert truncated["audio_end_ms"] == 600
        await s.send(type="conversation.item.retrieve", item_id=item["id"])
        heard = (await s.until("conversation.item.retrieved"))[-1]["item"]["content"][0]["transcript"]
        assert len(heard.split()) < len(said.split())
        await s.send(type="conversation.item.delete", item_id=item["id"])
        assert (await s.until("conversation.item.deleted"))[-1]["item_id"] == item["id"]
        await s.send(type="conversation.item.retrieve", event_id="ev_gone", item_id=item["id"])
        err = (await s.until("error"))[-1]["error"]
        assert err["code"] == "item_not_found" and err["event_id"] == "ev_gone"


async def test_response_cancel_stops_a_response_in_progress(url) -> None:
    ws, s = await open_script(url, instructions="Always answer with a very long story.", duet={"pacing": "tbs"})
    async with ws:
        await user_text(s, "Tell me a long story about a dragon.")
        await s.send(type="response.create")
        created = (await s.until("response.created"))[-1]
        await s.send(type="response.cancel", response_id=created["response"]["id"])
        done = (await s.until("response.done"))[-1]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
        await s.send(type="response.cancel", event_id="ev_none")
        assert (await s.until("error"))[-1]["error"]["code"] == "response_cancel_not_active"


async def test_beta_text_turn_validates_against_the_beta_schema(url) -> None:
    async with connect(url, max_size=None, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        s = Script(ws, beta=True)
        await s.until("session.created")
        await s.send(type="session.update", session={"modalities": ["text"], "input_audio_format": "pcm16",
                                                     "turn_detection": None, "duet": {"pacing": "nothink"}})
        assert "modalities" in (await s.until("session.updated"))[-1]["session"]
        await user_text(s, "What is the capital of France?")
        await s.send(type="response.create")
        events = await s.until("response.done")
        await s.send(type="output_audio_buffer.clear")  # nothing playing: still answered, with a valid shape
        await s.until("output_audio_buffer.cleared")
    assert types(events) == [
        "response.created", "rate_limits.updated", "response.output_item.added", "response.content_part.added",
        "response.text.delta", "response.text.done", "response.content_part.done", "response.output_item.done",
        "response.done"]
    assert events[-1]["response"]["output"][0]["content"][0]["type"] == "text"


async def test_duet_events_only_for_a_client_that_asks(url) -> None:
    """A client that asks (session.update or the URL) gets the Duet events it named; the others, none."""
    ask = {"output_modalities": ["text"], "duet": {"pacing": "think-first", "events": ["turn_metrics"]}}
    ws, s = await open_script(url, **ask)
    s.duet_events = frozenset({"duet.turn.metrics"})
    async with ws:
        assert s.log[-1]["session"]["duet"]["events"] == ["turn_metrics"]  # session.updated reports it
        await user_text(s, "What is two plus two?")
        await s.send(type="response.create")
        events = await s.until("response.done")
    kinds = [e["type"] for e in events]
    assert "duet.turn.metrics" in kinds and "duet.thought.delta" not in kinds
    metrics = next(e for e in events if e["type"] == "duet.turn.metrics")["metrics"]
    assert metrics["pacing"] == "think-first" and metrics["thought_tokens"] > 0  # it thought, unseen

    async with connect(url + "?duet_events=thought", max_size=None) as ws:
        s = Script(ws, duet_events=frozenset({"duet.thought.delta"}))
        created = (await s.until("session.created"))[-1]
        assert created["session"]["duet"]["events"] == ["thought"]
        await s.send(type="session.update", session={"type": "realtime", "output_modalities": ["text"],
                                                     "duet": {"pacing": "think-first"}})
        await s.until("session.updated")
        await user_text(s, "What is two plus two?")
        await s.send(type="response.create")
        kinds = [e["type"] for e in await s.until("response.done")]
    assert "duet.thought.delta" in kinds and "duet.turn.metrics" not in kinds


async def test_unknown_duet_events_on_the_url_are_refused(url) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        async with connect(url + "?duet_events=everything"):
            pass
    assert info.value.response.status_code == 400
