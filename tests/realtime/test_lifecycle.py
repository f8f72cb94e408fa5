"""Ready once warmed; draining waits for replies in flight up to the grace period, and a second signal cuts it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from realtime.lifecycle import Lifecycle, reply_in_flight
from tests.realtime.fake_runtime import fake_runtime


@dataclass
class FakeResponse:
    done: bool = False


@dataclass
class FakeSession:
    response: FakeResponse | None = None
    _tasks: set[Any] = field(default_factory=set)
    queued: list[str] = field(default_factory=list)

    def emit(self, event: str) -> None:  # an outbox stand-in: emit's owner is Sized
        self.queued.append(event)

    def __len__(self) -> int:
        return len(self.queued)


async def test_ready_only_when_warmed_and_not_draining() -> None:
    rt = fake_runtime()
    lc = Lifecycle(rt, grace_seconds=1.0)
    assert not lc.ready
    rt.warmed = True
    assert lc.ready
    lc.request_stop()
    assert lc.draining and not lc.ready
    await asyncio.wait_for(lc.stopped(), 1)


async def test_reply_in_flight() -> None:
    s = FakeSession()
    assert not reply_in_flight(s)
    s.response = FakeResponse()
    assert reply_in_flight(s)
    s.response.done = True
    assert not reply_in_flight(s)
    s.emit("response.done")  # done, but its events are not out yet
    assert reply_in_flight(s)
    s.queued.clear()
    turn = asyncio.create_task(asyncio.sleep(10), name="sess_x-turn")  # a committed turn being transcribed
    s._tasks.add(turn)
    assert reply_in_flight(s)
    turn.cancel()
    await asyncio.gather(turn, return_exceptions=True)
    assert not reply_in_flight(s)
    assert not reply_in_flight(object())


async def test_drain_waits_for_replies_then_returns() -> None:
    rt = fake_runtime()
    busy, idle = FakeSession(response=FakeResponse()), FakeSession()
    rt.sessions.update(busy=busy, idle=idle)
    lc = Lifecycle(rt, grace_seconds=10.0)

    async def finish_later() -> None:
        await asyncio.sleep(0.3)
        busy.response.done = True  # type: ignore[union-attr]

    t0 = time.monotonic()
    finisher = asyncio.create_task(finish_later())
    await asyncio.wait_for(asyncio.gather(lc.drain(), lc.drain()), 5)  # two callers share one drain
    await finisher
    assert 0.25 < time.monotonic() - t0 < 3 and lc.drained and lc.draining


async def test_drain_gives_up_after_the_grace_period_and_a_second_signal_cuts_it() -> None:
    rt = fake_runtime()
    rt.sessions["stuck"] = FakeSession(response=FakeResponse())
    lc = Lifecycle(rt, grace_seconds=0.3)
    t0 = time.monotonic()
    await asyncio.wait_for(lc.drain(), 5)
    assert 0.25 < time.monotonic() - t0 < 3 and lc.drained

    lc2 = Lifecycle(rt, grace_seconds=60.0)
    task = asyncio.create_task(lc2.drain())
    await asyncio.sleep(0.2)
    assert not task.done()
    lc2.grace_seconds = 0.0  # what `duet serve` does on a second SIGTERM/SIGINT
    await asyncio.wait_for(task, 2)
