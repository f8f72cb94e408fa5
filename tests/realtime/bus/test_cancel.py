"""A bus task cancelled as the broker's ack lands still stops (Python 3.11's `wait_for` drops that cancel).

No broker: the race is made exact with a client that waits for its acks the way aiomqtt 2.x does
(`asyncio.wait_for` on an event), and the ack is given in the same loop pass as the cancellation. On 3.11,
without the check in realtime/bus/cancel.py, the sender goes back to its queue and the connection task
waits for it forever: the CI hang of the scale-out test's teardown.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from common.config import DuetConfig, MqttConfig
from realtime.bus.cancel import raise_if_cancelled
from realtime.bus.mqtt import MqttBus


class AckingClient:
    """Acks the presence at once; holds every other publish until the test acks it."""

    def __init__(self, presence_topic: str) -> None:
        self.presence_topic = presence_topic
        self.held: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def subscribe(self, topic: str, qos: int = 0) -> None:
        return None

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False,
                      timeout: float | None = None) -> None:
        if topic == self.presence_topic:
            return
        ack = asyncio.Event()
        self.held.put_nowait(ack)
        await asyncio.wait_for(ack.wait(), 5.0)  # as aiomqtt.Client._wait_for does

    @property
    def messages(self) -> AsyncIterator[Any]:
        async def never() -> AsyncIterator[Any]:
            await asyncio.Event().wait()
            yield None
        return never()


async def test_a_connection_cancelled_as_an_ack_lands_still_stops() -> None:
    cfg = MqttConfig(enabled=True, server_id="t")
    runtime = SimpleNamespace(config=dataclasses.replace(DuetConfig(), mqtt=cfg), sessions={},
                              session_observers=[], server_tools=None)
    bus = MqttBus(runtime, environ={})  # type: ignore[arg-type]
    client = AckingClient(bus.presence_topic)
    serving = asyncio.create_task(bus._serve(client))  # type: ignore[arg-type]
    bus.publish(f"{bus.base}/sessions/s/lifecycle", {"event": "ended"})
    ack = await asyncio.wait_for(client.held.get(), 5)  # the sender waits for the broker's ack
    ack.set()
    serving.cancel()  # close(), in the same loop pass
    done, _ = await asyncio.wait([serving], timeout=5)
    assert serving in done and serving.cancelled(), "the connection task ignored its cancellation"
    assert bus.published == 1


async def test_raise_if_cancelled_finds_a_cancellation_a_wait_swallowed() -> None:
    ran_on: list[str] = []

    async def worker(ack: asyncio.Event) -> None:
        raise_if_cancelled()  # not asked to stop: goes on
        ran_on.append("started")
        try:
            await asyncio.wait_for(ack.wait(), 5.0)
        except asyncio.CancelledError:  # Python 3.12 and later keep the cancellation
            ran_on.append("raised at once")
            raise
        ran_on.append("swallowed")  # Python 3.11: the result came back instead
        raise_if_cancelled()
        ran_on.append("not stopped")

    ack = asyncio.Event()
    task = asyncio.create_task(worker(ack))
    await asyncio.sleep(0)
    ack.set()
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.cancelled() and ran_on[0] == "started" and "not stopped" not in ran_on, ran_on
