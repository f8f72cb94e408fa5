"""The MQTT bus end to end: the real models behind a real server on loopback, a real Mosquitto broker.

A whole spoken conversation is published; control messages change a live session; an MQTT tool is called
from speech, answered by a device on the broker, and the answer spoken; an absent broker never stops a reply.

SmolLM2-135M rarely calls a tool on its own, so the tool test forces the call with the session's
`tool_choice` (as the conformance test does); the conversation tests turn tools off (`tool_choice: none`)
so the configured tool cannot take their turn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from clients.talk import talk
from common.config import MqttConfig, MqttToolConfig
from realtime.bus.mqtt import MqttBus
from realtime.core.options import ResponseOptions
from realtime.runtime import Runtime
from realtime.transports.websocket import DuetServer
from tests.realtime.bus.broker import Broker, broker_fixture, free_port, inbox  # noqa: F401  (the broker fixture)

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

LIGHT = {"type": "object", "required": ["room", "state"],
         "properties": {"room": {"type": "string"}, "state": {"type": "string", "enum": ["on", "off"]}}}


@dataclasses.dataclass
class BusServer:
    rt: Runtime
    server: DuetServer
    bus: MqttBus
    url: str

    @property
    def base(self) -> str:
        return self.bus.base


@contextlib.asynccontextmanager
async def bus_server(runtime: Runtime, **mqtt: Any) -> AsyncIterator[BusServer]:
    """A server over the test run's models with its own `[mqtt]` config and session registry (a copy of the
    shared runtime: no other test's server sees this bus)."""
    cfg = dataclasses.replace(MqttConfig(enabled=True, server_id=f"it{uuid.uuid4().hex[:8]}", reconnect_min_s=0.1,
                                         reconnect_max_s=0.5), **mqtt)
    rt = dataclasses.replace(runtime, config=dataclasses.replace(runtime.config, mqtt=cfg), sessions={},
                             observers=[], session_observers=[], server_tools=None)
    server = DuetServer(rt)
    await server.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    bus = await MqttBus(rt, environ={}).start(url)
    try:
        yield BusServer(rt, server, bus, url)
    finally:
        await server.close()
        await bus.close()


@pytest.fixture(scope="module")
async def live(runtime: Runtime, broker: Broker) -> AsyncIterator[BusServer]:
    prefix = f"home/{uuid.uuid4().hex[:6]}"
    tool = MqttToolConfig(name="set_light", description="Switch the light of a room on or off",
                          parameters=json.dumps(LIGHT), request_topic=f"{prefix}/light/set",
                          reply_topic=f"{prefix}/light/reply", timeout_s=30.0)
    async with bus_server(runtime, port=broker.port, control=True, tools=(tool,)) as srv:
        await asyncio.wait_for(srv.bus.connected.wait(), 10)
        yield srv


def pcm16(audio24k: np.ndarray) -> bytes:
    return (np.clip(audio24k, -1, 1) * 32767).astype("<i2").tobytes()


class Client:
    """A raw realtime client that keeps every event it received."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    async def until(self, match: Any, timeout: float = 90) -> dict[str, Any]:
        """The next event of type `match` (or for which `match(event)` is true)."""
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads(await self.ws.recv())
                self.events.append(event)
                if event["type"] == match if isinstance(match, str) else match(event):
                    return event

    async def speak(self, audio24k: np.ndarray, silence_s: float = 1.5) -> None:
        """The whole utterance and the silence after it at once (under the server's input burst)."""
        data = pcm16(np.concatenate([audio24k, np.zeros(int(24000 * silence_s), np.float32)]))
        for i in range(0, len(data), 9600):  # 200 ms appends
            await self.send(type="input_audio_buffer.append", audio=base64.b64encode(data[i:i + 9600]).decode())


@contextlib.asynccontextmanager
async def client(url: str, **session: Any) -> AsyncIterator[tuple[Client, str]]:
    async with connect(url, max_size=None) as ws:
        c = Client(ws)
        created = await c.until("session.created")
        await c.send(type="session.update", session={"type": "realtime", **session})
        await c.until("session.updated")
        yield c, created["session"]["id"]


async def test_a_spoken_conversation_is_published_on_the_broker(live: BusServer, broker: Broker, speak) -> None:
    async with inbox(broker.port, f"{live.base}/#") as box:
        result = await talk(speak("What is the capital of France?"), live.url, timeout_s=90,
                            session={"tool_choice": "none"})
        _, started, _ = await box.wait_for(lambda t, p: t.endswith("/lifecycle") and p["event"] == "started")
        sid = started["session_id"]
        await box.wait_for(lambda t, p: t == f"{live.base}/sessions/{sid}/lifecycle" and p["event"] == "ended", 30)
    assert result["errors"] == [] and result["reply_transcript"], result
    ours = [(t.removeprefix(f"{live.base}/sessions/{sid}/"), p) for t, p, _ in box.messages if f"/{sid}/" in t]
    kinds = [k for k, _ in ours]
    assert kinds[0] == "lifecycle" and kinds[-1] == "lifecycle", kinds
    assert {"transcript/user", "transcript/assistant", "metrics"} <= set(kinds), kinds
    assert all(p["session_id"] == sid and p["server_id"] == live.bus.server_id for _, p in ours)
    (user,) = [p for k, p in ours if k == "transcript/user"]
    assert user["text"] == result["user_transcript"] and "france" in user["text"].lower()
    (assistant,) = [p for k, p in ours if k == "transcript/assistant"]
    assert assistant["text"].strip() == result["reply_transcript"] and assistant["truncated"] is False
    (metrics,) = [p["metrics"] for k, p in ours if k == "metrics"]
    assert metrics["status"] == "completed"
    assert metrics["first_audio_sent_ms"] == result["server_metrics"]["first_audio_sent_ms"]
    reasoning = [p["text"] for k, p in ours if k == "reasoning"]
    assert [r.strip() for r in reasoning] == ([result["thought"]] if result["thought"] else [])
    online = [p for t, p, _ in box.messages if t.endswith("/presence") and p["status"] == "online"]
    assert online and online[0]["url"] == live.url and online[0]["capacity"] == live.rt.config.server.max_sessions


async def test_control_whispers_says_asks_and_ends_a_live_session(live: BusServer, broker: Broker) -> None:
    control = aiomqtt.Client("127.0.0.1", broker.port)
    async with client(live.url, tool_choice="none", duet={"pacing": "nothink"}) as (c, sid), \
            inbox(broker.port, f"{live.base}/sessions/{sid}/#") as box, control:
        topic = f"{live.base}/sessions/{sid}/control"

        async def result(n: int) -> dict[str, Any]:
            return (await box.wait_for(lambda t, p: t.endswith("/control/result") and p.get("id") == n))[1]

        # A supervisor's whisper: in the session's instructions, and so in the next prompt.
        await control.publish(topic, json.dumps({"id": 1, "type": "instructions", "mode": "append",
                                                 "instructions": "The caller's name is Ada."}))
        updated = await c.until("session.updated", 30)
        assert "The caller's name is Ada." in updated["session"]["instructions"]
        assert (await result(1))["ok"] is True
        session: Any = live.rt.sessions[sid]
        options = ResponseOptions.parse({}, session.settings)
        prompt = live.rt.prompts.decode(session.conversation_ids(session.history.messages(), options, False))
        assert "The caller's name is Ada." in prompt

        # Say these words, verbatim and spoken.
        await control.publish(topic, json.dumps({"id": 2, "type": "say", "text": "Your order has shipped."}))
        done = await c.until("response.done", 60)
        said = done["response"]["output"][0]["content"][0]["transcript"]
        assert said == "Your order has shipped." and done["response"]["status"] == "completed"
        assert (await result(2))["response_id"] == done["response"]["id"]
        assert any(e["type"] == "response.output_audio.delta" for e in c.events)

        # A message into the conversation, answered.
        await control.publish(topic, json.dumps({"id": 3, "type": "message", "role": "user", "respond": True,
                                                 "text": "What is the capital of France?"}))
        item = await c.until("conversation.item.created", 30)
        assert item["item"]["role"] == "user" and item["item"]["content"][0]["text"] == "What is the capital of France?"
        answer = await c.until("response.done", 90)
        assert answer["response"]["status"] == "completed" and (await result(3))["ok"] is True

        # End it: the client's connection closes normally, and the bus says the session ended.
        await control.publish(topic, json.dumps({"id": 4, "type": "end", "reason": "supervisor hung up"}))
        with pytest.raises(ConnectionClosed) as closed:
            await c.until(lambda e: False, 30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        assert closed.value.rcvd.reason == "supervisor hung up"
        await box.wait_for(lambda t, p: t.endswith("/lifecycle") and p["event"] == "ended", 30)
    assert sid not in live.rt.sessions


async def test_a_spoken_request_calls_an_mqtt_tool_and_speaks_its_answer(live: BusServer, broker: Broker,
                                                                         speak) -> None:
    tool = live.bus.tools["set_light"]
    requests: list[dict[str, Any]] = []
    subscribed = asyncio.Event()

    async def device() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port) as dev:
            await dev.subscribe(tool.request_topic, qos=1)
            subscribed.set()
            async for m in dev.messages:
                request = json.loads(m.payload)  # type: ignore[arg-type]
                requests.append(request)
                await dev.publish(request["reply_topic"], json.dumps(
                    {"correlation_id": request["correlation_id"], "ok": True, "state": "on"}), qos=1)

    device_task = asyncio.create_task(device())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        async with client(live.url, tool_choice={"type": "function", "name": "set_light"},
                          duet={"pacing": "nothink"}) as (c, sid), \
                inbox(broker.port, f"{live.base}/sessions/{sid}/#") as box:
            await c.speak(speak("Turn on the kitchen light."))
            first = await c.until("response.done", 120)
            call = first["response"]["output"][0]
            assert call["type"] == "function_call" and call["name"] == "set_light", first
            output = await c.until(lambda e: e["type"] == "conversation.item.created"
                                   and e["item"]["type"] == "function_call_output", 60)
            assert output["item"]["call_id"] == call["call_id"]
            assert json.loads(output["item"]["output"]) == {"ok": True, "state": "on"}
            second = await c.until("response.done", 120)
            await box.wait_for(lambda t, p: t.endswith("/tool_result"))
    finally:
        device_task.cancel()
    (request,) = requests
    assert request["session_id"] == sid and request["call_id"] == call["call_id"] and request["name"] == "set_light"
    assert request["arguments"] == json.loads(call["arguments"]) or request["arguments"] == call["arguments"]
    reply = second["response"]["output"][0]
    assert second["response"]["status"] == "completed" and reply["type"] == "message"
    assert reply["content"][0]["transcript"], "the result is answered in words"
    assert any(e["type"] == "response.output_audio.delta" and e["response_id"] == second["response"]["id"]
               for e in c.events), "and spoken"
    log.info("tool answer spoken: %r", reply["content"][0]["transcript"])
    (published,) = box.on("/tool_call")
    assert published["runs_on"] == "server" and published["call_id"] == call["call_id"]


async def test_an_absent_broker_never_stops_a_reply_and_drops_are_counted(runtime: Runtime, speak) -> None:
    async with bus_server(runtime, port=free_port(), queue_size=3) as srv:  # nothing listens there
        result = await talk(speak("What is the capital of France?"), srv.url, pacing="nothink", timeout_s=90)
        assert not srv.bus.connected.is_set()
        assert srv.bus.dropped > 0 and srv.bus.published == 0
    assert result["errors"] == [] and result["reply_transcript"] and result["reply_audio_s"] > 0.3, result
