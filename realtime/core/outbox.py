"""The bounded queue of server events waiting for a client to read them, transport-neutral.

A session emits events synchronously (`Outbox.put`), a transport's send loop drains them (`get`, or
`async for`). A client that stops reading must not make the server's memory grow, so the outbox has a policy,
applied in this order:

1. Error events: at most one of each code waits unsent. A client spamming bad events while not reading gets
   one error per kind, not one per event (the rest are counted and logged).
2. Reply audio far ahead of the client: an audio delta that would put more than `outbox_max_audio_seconds`
   of audio in the queue is dropped. Reply audio is made faster than real time, but a client that reads at
   all drains it in well under that; only a stalled client loses audio, and it loses the newest.
3. Everything else queues, up to `outbox_max_events` events or `outbox_max_mb` (estimated). Over either
   bound for `outbox_grace_seconds`, or over twice a bound at once, the client is disconnected: the outbox
   closes with code 1008 and a reason, drops what it holds, and tells the transport (`on_close`), which
   closes the connection even while its own send is blocked on the stalled socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from common.config import LimitsConfig
from realtime.core import events as ev

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008  # the WebSocket close code for a client that broke the server's policy


class OutboxClosed(Exception):
    """The outbox was closed (slow consumer): the transport must close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def estimate_bytes(value: Any, depth: int = 0) -> int:
    """A cheap upper-ish estimate of an event's size: string and array lengths plus a little per field.
    Strings are measured with len() (O(1)), so this costs the event's structure, not its text."""
    if isinstance(value, str | bytes):
        return len(value) + 16
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):  # numpy audio
        return nbytes + 16
    if depth > 8:
        return 64
    if isinstance(value, msgspec.Struct):
        return 16 + sum(estimate_bytes(getattr(value, f), depth + 1) for f in value.__struct_fields__)
    if isinstance(value, dict):
        return 16 + sum(estimate_bytes(k, depth + 1) + estimate_bytes(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return 16 + sum(estimate_bytes(v, depth + 1) for v in value)
    return 16


class Outbox:
    def __init__(self, limits: LimitsConfig, *, audio_rate: Callable[[], int] = lambda: 24000,
                 on_close: Callable[[int, str], None] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, backlog: Callable[[], int] = lambda: 0) -> None:
        self.limits = limits
        # The session's output sample rate, read at put time (session.update may change it).
        self.audio_rate = audio_rate
        self.on_close = on_close
        # Bytes the transport took but the socket has not (its write buffer): aiohttp's send returns long
        # before the peer reads, so a stalled client's backlog piles up there, out of our queue's sight.
        self.backlog = backlog
        self.log = logger or log
        self._clock = clock
        self._queue: deque[tuple[ev.ServerEvent, int, float]] = deque()  # (event, bytes, audio ms)
        self._bytes = 0
        self._audio_ms = 0.0
        self._errors: Counter[str] = Counter()  # unsent error events by code
        self._wakeup = asyncio.Event()
        self._over_since: float | None = None
        self.closed: OutboxClosed | None = None
        self.suppressed_errors: Counter[str] = Counter()
        self.dropped_audio_ms = 0.0
        self._dropping_audio = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def audio_ms(self) -> float:
        return self._audio_ms

    # ---- producer -----------------------------------------------------------------------------
    def put(self, event: ev.ServerEvent) -> None:
        if self.closed is not None:
            return
        if isinstance(event, ev.Error):
            code = event.error.code
            if self._errors[code]:
                if not self.suppressed_errors[code]:
                    self.log.warning("client is not reading its %r errors; holding back more of them", code)
                self.suppressed_errors[code] += 1
                return
            self._errors[code] += 1
        audio_ms = 0.0
        if isinstance(event, ev.AudioDelta):
            audio_ms = len(event.delta) * 1000.0 / max(self.audio_rate(), 1)
            if self._audio_ms + audio_ms > self.limits.outbox_max_audio_seconds * 1000:
                if not self._dropping_audio:
                    self.log.warning("client is %.0f s of reply audio behind: dropping reply audio",
                                     self._audio_ms / 1000)
                    self._dropping_audio = True
                self.dropped_audio_ms += audio_ms
                return
        size = estimate_bytes(event)
        self._queue.append((event, size, audio_ms))
        self._bytes += size
        self._audio_ms += audio_ms
        self._wakeup.set()
        self._check_bounds()

    def _check_bounds(self) -> None:
        lim = self.limits
        max_bytes = lim.outbox_max_mb * 1024 * 1024
        over = len(self._queue) / lim.outbox_max_events
        over = max(over, (self._bytes + self.backlog()) / max_bytes)
        if over <= 1.0:
            self._over_since = None
            return
        now = self._clock()
        if self._over_since is None:
            self._over_since = now
        if over > 2.0 or now - self._over_since >= lim.outbox_grace_seconds:
            self.close(POLICY_VIOLATION, f"slow consumer: {len(self._queue)} events "
                                         f"({self._bytes / 1e6:.1f} MB) unsent for {now - self._over_since:.1f} s")

    def close(self, code: int, reason: str) -> None:
        """Drop everything queued and end the stream; the transport closes the connection with `code`."""
        if self.closed is not None:
            return
        self.closed = OutboxClosed(code, reason)
        self.log.warning("disconnecting: %s (close code %d)", reason, code)
        self._queue.clear()
        self._bytes, self._audio_ms = 0, 0.0
        self._errors.clear()
        self._wakeup.set()
        if self.on_close is not None:
            self.on_close(code, reason)

    # ---- consumer -----------------------------------------------------------------------------
    async def get(self) -> ev.ServerEvent:
        """The next event; raises OutboxClosed once the outbox was closed."""
        while not self._queue:
            if self.closed is not None:
                raise self.closed
            self._wakeup.clear()
            await self._wakeup.wait()
        event, size, audio_ms = self._queue.popleft()
        self._bytes -= size
        self._audio_ms -= audio_ms
        if isinstance(event, ev.Error):
            self._errors[event.error.code] -= 1
        if self._dropping_audio and self._audio_ms < self.limits.outbox_max_audio_seconds * 500:
            self.log.info("client caught up; %.1f s of reply audio were dropped", self.dropped_audio_ms / 1000)
            self._dropping_audio = False
        if self._over_since is not None:
            self._check_bounds()
        return event

    def __aiter__(self) -> AsyncIterator[ev.ServerEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ev.ServerEvent]:
        while True:
            try:
                yield await self.get()
            except OutboxClosed:
                return
