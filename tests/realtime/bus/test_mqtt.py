"""The MQTT bus against a real Mosquitto on loopback, without models: the bounded queue while the broker is
away (drop oldest, count, flush on reconnect), presence and its last will, session events as topics, tool
calls with correlation ids and timeouts, and control refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest

from brains.history import Conversation, Item
from common.config import DuetConfig, MqttConfig, MqttToolConfig
from realtime.bus.mqtt import MqttBus
from realtime.core import events as ev
from realtime.core.settings import SessionSettings
from tests.realtime.bus.broker import Broker, broker_fixture, inbox, relay  # noqa: F401  (the broker fixture)


def make_bus(port: int, **mqtt: Any) -> tuple[MqttBus, Any]:
    cfg = dataclasses.replace(MqttConfig(enabled=True, port=port, server_id=f"t{uuid.uuid4().hex[:8]}",
                                         reconnect_min_s=0.05, reconnect_max_s=0.2), **mqtt)
    runtime = SimpleNamespace(config=dataclasses.replace(DuetConfig(), mqtt=cfg), sessions={}, session_observers=[],
                              server_tools=None)
    return MqttBus(runtime, environ={}), runtime  # type: ignore[arg-type]


async def test_events_wait_for_an_absent_broker_drop_oldest_and_flush_on_reconnect(broker: Broker) -> None:
    async with relay(broker) as gate:  # the bus's only way to the broker: closed for now
        bus, _ = make_bus(gate.port, queue_size=5)
        await bus.start("ws://example/v1/realtime")
        try:
            for i in range(8):
                bus.publish(f"{bus.base}/test/{i}", {"i": i})  # returns at once: nothing waits for a broker
            assert bus.dropped == 3
            await asyncio.sleep(0.3)
            assert not bus.connected.is_set() and bus.published == 0

            async with inbox(broker.port, f"{bus.base}/#") as box:
                await gate.open()
                await asyncio.wait_for(bus.connected.wait(), 10)
                await box.wait_for(lambda t, p: t.endswith("/test/7"))
                kept = [p["i"] for t, p, _ in box.messages if "/test/" in t]
                assert kept == [3, 4, 5, 6, 7], "the oldest were dropped, the rest arrive in order"
                online = await box.wait_for(lambda t, p: t.endswith("/presence") and p["status"] == "online")
                assert online[1]["url"] == "ws://example/v1/realtime" and online[1]["capacity"] == 64

                # The broker goes away mid-run: its last will marks the server offline, events queue again...
                await gate.close()
                await box.wait_for(lambda t, p: t.endswith("/presence") and p["status"] == "offline")
                bus.publish(f"{bus.base}/test/after", {"i": 8})
                await asyncio.sleep(0.2)
                assert box.on("/test/after") == []
                # ...and flush when it is back.
                await gate.open()
                assert (await box.wait_for(lambda t, p: t.endswith("/test/after")))[1] == {"i": 8}
                assert bus.connections == 2
        finally:
            await bus.close()


async def test_presence_is_retained_and_close_says_offline(broker: Broker) -> None:
    bus, runtime = make_bus(broker.port)
    runtime.sessions["sess_a"] = object()
    await bus.start("ws://h:1/v1/realtime")
    await asyncio.wait_for(bus.connected.wait(), 10)
    async with inbox(broker.port, bus.presence_topic) as box:  # subscribed after it was published: retained
        _, body, retained = await box.wait_for(lambda t, p: p["status"] == "online")
        assert retained and body["sessions"] == 1 and body["server_id"] == bus.server_id
        await bus.close()
        await box.wait_for(lambda t, p: p["status"] == "offline")
    assert runtime.session_observers == []


async def test_session_events_become_topics(broker: Broker) -> None:
    bus, runtime = make_bus(broker.port)
    await bus.start()
    heard = Item(id="item_a", role="assistant", audio=True, text="Paris is the")  # as cut by the session
    session = SimpleNamespace(id="sess_x", history=Conversation(), settings=SessionSettings())
    session.history.add(heard)
    try:
        async with inbox(broker.port, f"{bus.base}/sessions/sess_x/#") as box:
            await asyncio.wait_for(bus.connected.wait(), 10)
            for event in (
                ev.SessionCreated(session={}),
                ev.TranscriptionCompleted(item_id="item_u", transcript="What is the capital of France?",
                                          usage=ev.TranscriptionUsage(seconds=1.2)),
                ev.AudioDelta(response_id="resp_1", item_id="item_a", delta=None),  # not published
                ev.FunctionCallArgumentsDone(response_id="resp_1", item_id="item_c", output_index=1,
                                             call_id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
                ev.TurnMetrics(response_id="resp_1", metrics={"first_audio_sent_ms": 812.5, "status": "completed"}),
                ev.ResponseDone(response={"id": "resp_1", "status": "completed", "output": [
                    {"type": "message", "role": "assistant", "id": "item_a", "duet": {"thought": "France: Paris."},
                     "content": [{"type": "output_audio", "transcript": "Paris is the capital."}]}]}),
                ev.ItemTruncated(item_id="item_a", content_index=0, audio_end_ms=900),
            ):
                runtime.session_observers[0].session_event(session, event)
            bus.session_closed(session)
            await box.wait_for(lambda t, p: t.endswith("/lifecycle") and p["event"] == "ended")
    finally:
        await bus.close()
    kinds = [t.split("/sessions/sess_x/")[1] for t, _, _ in box.messages]
    assert kinds == ["lifecycle", "transcript/user", "tool_call", "metrics", "transcript/assistant", "reasoning",
                     "transcript/assistant", "lifecycle"]
    assert box.on("transcript/user")[0]["text"] == "What is the capital of France?"
    assert box.on("tool_call")[0] | {"timestamp": 0} == {
        "server_id": bus.server_id, "session_id": "sess_x", "timestamp": 0, "response_id": "resp_1",
        "item_id": "item_c", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}',
        "runs_on": "client"}
    done, cut = box.on("transcript/assistant")
    assert done["text"] == "Paris is the capital." and not done["truncated"]
    assert cut["text"] == "Paris is the" and cut["truncated"] and cut["audio_end_ms"] == 900
    assert box.on("reasoning")[0]["text"] == "France: Paris."
    assert box.on("metrics")[0]["metrics"]["first_audio_sent_ms"] == 812.5


async def test_tool_call_publishes_with_a_correlation_id_and_waits_for_its_reply(broker: Broker) -> None:
    prefix = f"home/{uuid.uuid4().hex[:6]}"
    tools = (MqttToolConfig(name="set_light", request_topic=f"{prefix}/set", reply_topic=f"{prefix}/reply"),
             MqttToolConfig(name="silent", request_topic=f"{prefix}/silent", reply_topic=f"{prefix}/never",
                            timeout_s=0.3))
    bus, runtime = make_bus(broker.port, tools=tools)
    await bus.start()
    assert runtime.server_tools is bus
    requests: list[dict[str, Any]] = []

    async def device() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe(f"{prefix}/set", qos=1)
            ready.set()
            async for m in client.messages:
                request = json.loads(m.payload)  # type: ignore[arg-type]
                requests.append(request)
                # A stray reply first (another call's): it must not be taken for this one.
                await client.publish(request["reply_topic"], json.dumps({"correlation_id": "other", "ok": False}))
                await client.publish(request["reply_topic"], json.dumps(
                    {"correlation_id": request["correlation_id"], "ok": True, "state": "on"}))

    ready = asyncio.Event()
    task = asyncio.create_task(device())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await asyncio.wait_for(bus.connected.wait(), 10)
        output = await bus.call("sess_1", "call_1", "set_light", '{"room": "kitchen", "state": "on"}')
        assert json.loads(output) == {"ok": True, "state": "on"}
        (request,) = requests
        assert request["arguments"] == {"room": "kitchen", "state": "on"}
        assert request["session_id"] == "sess_1" and request["call_id"] == "call_1"
        assert len(request["correlation_id"]) == 32
        timed_out = json.loads(await bus.call("sess_1", "call_2", "silent", "{}"))
        assert timed_out["error"] == "timeout"
        assert json.loads(await bus.call("sess_1", "call_3", "nope", "{}"))["error"]
    finally:
        task.cancel()
        await bus.close()
    assert runtime.server_tools is None


@pytest.mark.parametrize(("message", "error"), [
    ({"type": "say", "text": "hi"}, "unauthorized"),
    ({"type": "say", "text": "hi", "token": "s3cret"}, "no session"),
    ({"type": "dance", "token": "s3cret"}, "no session"),
])
async def test_control_is_refused_without_the_token_or_a_session(broker: Broker, message: dict[str, Any],
                                                                 error: str) -> None:
    bus, _ = make_bus(broker.port, control=True, control_token="s3cret")
    await bus.start()
    try:
        async with inbox(broker.port, f"{bus.base}/sessions/sess_nope/control/result") as box:
            await asyncio.wait_for(bus.connected.wait(), 10)
            await box.client.publish(bus.session_topic("sess_nope", "control"), json.dumps({"id": 7, **message}))
            _, result, _ = await box.wait_for(lambda t, p: p.get("id") == 7)
    finally:
        await bus.close()
    assert result["ok"] is False and error in result["error"]


async def test_drops_are_exported_as_a_metric() -> None:
    from realtime.metrics import Metrics
    from tests.realtime.bus.broker import free_port
    from tests.realtime.fake_runtime import fake_runtime

    rt = fake_runtime()
    bus = MqttBus(rt, MqttConfig(enabled=True, port=free_port(), queue_size=2, reconnect_min_s=5), environ={})
    await bus.start()  # nothing listens on that port
    try:
        for i in range(5):
            bus.publish(f"{bus.base}/x", {"i": i})
        text = Metrics(rt).render().decode()
    finally:
        await bus.close()
    assert "duet_mqtt_dropped_events_total 3.0" in text
