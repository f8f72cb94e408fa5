"""The bounded outbox: a client that stops reading loses far-ahead reply audio, then its connection; errors
of one kind never pile up; memory stays bounded whatever the session emits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.config import LimitsConfig
from common.errors import SessionError
from realtime.core import events as ev
from realtime.core.outbox import POLICY_VIOLATION, Outbox, OutboxClosed

LIMITS = LimitsConfig(outbox_max_audio_seconds=2.0, outbox_max_events=100, outbox_max_mb=1.0,
                      outbox_grace_seconds=5.0)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def audio(ms: int, rate: int = 24000) -> ev.AudioDelta:
    return ev.AudioDelta(response_id="resp_1", item_id="item_1", delta=np.zeros(rate * ms // 1000, np.float32))


def error(code: str) -> ev.Error:
    return ev.error_event(SessionError("bad", code=code))


def text(n: int = 0) -> ev.TextDelta:
    return ev.TextDelta(response_id="resp_1", item_id="item_1", delta=f"word {n} ")


def test_reply_audio_beyond_the_bound_is_dropped_and_other_events_still_queue() -> None:
    box = Outbox(LIMITS, clock=Clock())
    for _ in range(30):  # 6 s of audio at 200 ms a delta; the bound is 2 s
        box.put(audio(200))
    box.put(text())
    kinds = [type(e) for e, _, _ in box._queue]
    assert kinds.count(ev.AudioDelta) == 10
    assert kinds[-1] is ev.TextDelta
    assert box.audio_ms == pytest.approx(2000)
    assert box.dropped_audio_ms == pytest.approx(4000)
    assert box.closed is None


def test_audio_length_follows_the_output_rate() -> None:
    box = Outbox(LIMITS, audio_rate=lambda: 8000, clock=Clock())
    for _ in range(30):
        box.put(audio(200, rate=8000))
    assert len(box) == 10


async def test_audio_flows_again_once_the_client_reads() -> None:
    box = Outbox(LIMITS, clock=Clock())
    for _ in range(15):
        box.put(audio(200))
    assert len(box) == 10
    for _ in range(10):
        await box.get()
    box.put(audio(200))
    assert len(box) == 1


async def test_one_pending_error_per_code() -> None:
    box = Outbox(LIMITS, clock=Clock())
    for _ in range(1000):
        box.put(error("rate_limit_exceeded"))
        box.put(error("invalid_json"))
    assert len(box) == 2
    assert box.suppressed_errors["rate_limit_exceeded"] == 999
    # Once the client took it, the next error of that kind is queued again: a reading client sees each one.
    first = await box.get()
    assert isinstance(first, ev.Error) and first.error.code == "rate_limit_exceeded"
    box.put(error("rate_limit_exceeded"))
    assert len(box) == 2


async def test_a_client_over_the_bound_for_the_grace_period_is_disconnected() -> None:
    clock = Clock()
    closes: list[tuple[int, str]] = []
    box = Outbox(LIMITS, clock=clock, on_close=lambda code, reason: closes.append((code, reason)))
    for n in range(150):  # over 100 events, under twice that
        box.put(text(n))
    clock.t = 4.0
    box.put(text())
    assert box.closed is None  # still within the grace period
    clock.t = 6.0
    box.put(text())
    assert box.closed is not None and closes and closes[0][0] == POLICY_VIOLATION
    assert "slow consumer" in closes[0][1]
    assert len(box) == 0 and box.queued_bytes == 0  # what it held is freed
    box.put(text())  # later events are dropped, not queued
    assert len(box) == 0
    with pytest.raises(OutboxClosed):
        await box.get()
    assert [e async for e in box] == []


def test_a_client_that_catches_up_within_the_grace_period_stays() -> None:
    clock = Clock()
    box = Outbox(LIMITS, clock=clock)
    for n in range(150):
        box.put(text(n))

    async def drain() -> None:
        for _ in range(100):
            await box.get()

    asyncio.run(drain())
    clock.t = 10.0
    box.put(text())
    assert box.closed is None


def test_twice_the_bound_disconnects_at_once_and_memory_stays_bounded() -> None:
    box = Outbox(LIMITS, clock=Clock())
    big = "x" * 20_000
    peak = 0
    for n in range(10_000):
        box.put(ev.SessionUpdated(session={"instructions": big + str(n)}))
        peak = max(peak, box.queued_bytes)
    assert box.closed is not None
    assert peak <= 2 * LIMITS.outbox_max_mb * 1024 * 1024 + 64_000  # one event past twice the bound at most


async def test_a_waiting_reader_gets_events_in_order_and_wakes_on_close() -> None:
    box = Outbox(LIMITS, clock=Clock())

    async def read() -> list[ev.ServerEvent]:
        return [e async for e in box]

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)
    box.put(text(1))
    box.put(text(2))
    await asyncio.sleep(0.01)
    box.close(POLICY_VIOLATION, "test")
    got = await asyncio.wait_for(reader, 5)
    assert [e.delta for e in got] == ["word 1 ", "word 2 "]  # type: ignore[attr-defined]


def test_the_transports_write_buffer_counts_towards_the_bound() -> None:
    """A transport whose send returns before the socket takes the data (aiohttp) holds the backlog itself."""
    clock = Clock()
    backlog = [0]
    box = Outbox(LIMITS, clock=clock, backlog=lambda: backlog[0])
    box.put(text())
    assert box.closed is None
    backlog[0] = 3 * 1024 * 1024  # three times outbox_max_mb in the transport's buffer
    box.put(text())
    assert box.closed is not None and box.closed.code == POLICY_VIOLATION
