"""Per-session rate limits: token buckets for client events and for input audio (`[limits]` in the config).

A hostile or buggy client must not be able to make the server do unbounded work for it: past the bucket an
event (or a chunk of audio) is dropped with an error event, instead of being queued. We drop rather than
apply back-pressure (stop reading the socket) because a socket we do not read also holds back the client's
`response.cancel` and `input_audio_buffer.clear`, which must keep working for a client that over-sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up. `take(n)` spends n tokens if there are that many."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self, n: float = 1.0) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if n > self._tokens:
            return False
        self._tokens -= n
        return True


class Throttled:
    """Counts repeats of one warning and logs at most one line a `period`: a client spamming past a limit
    must not flood the log with a line per dropped event either."""

    def __init__(self, log: Any, period: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.period = period
        self._clock = clock
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = self._clock()
        self._count[kind] = self._count.get(kind, 0) + 1
        if now - self._last.get(kind, -self.period) >= self.period:
            count = self._count.pop(kind)
            self._last[kind] = now
            self.log.warning(msg + (" (%d times since the last report)" if count > 1 else ""),
                             *args, *((count,) if count > 1 else ()))
