"""Token buckets of the per-session rate limits."""

from __future__ import annotations

from realtime.core.limits import Throttled, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_burst_then_the_sustained_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.t = 0.5  # 5 more tokens
    assert sum(bucket.take() for _ in range(10)) == 5
    clock.t = 100.0  # saving up stops at the burst
    assert sum(bucket.take() for _ in range(20)) == 5


def test_audio_seconds_at_one_and_a_half_times_real_time() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.5, burst=10, clock=clock)
    assert bucket.take(10)  # a 10 s burst
    assert not bucket.take(0.1)
    sent = 0.0
    for step in range(1, 3001):  # 60 s of a client sending 0.1 s of audio every 20 ms (5x real time)
        clock.t = step * 0.02
        if bucket.take(0.1):
            sent += 0.1
    assert 1.4 * 60 <= sent <= 1.5 * 60 + 0.2
    assert not bucket.take(11)  # more than the burst at once never fits


def test_a_repeated_warning_is_logged_at_most_once_a_period() -> None:
    lines: list[str] = []

    class Log:
        def warning(self, msg: str, *args: object) -> None:
            lines.append(msg % args)

    clock = Clock()
    throttled = Throttled(Log(), period=1.0, clock=clock)
    for _ in range(1000):
        throttled.warning("events", "dropped a %s", "SessionUpdate")
    clock.t = 1.5
    throttled.warning("events", "dropped a %s", "SessionUpdate")
    assert lines == ["dropped a SessionUpdate", "dropped a SessionUpdate (1000 times since the last report)"]
