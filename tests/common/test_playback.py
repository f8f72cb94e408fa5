"""The server's model of the client's playback clock (explicit `now`, in seconds)."""

from __future__ import annotations

import pytest

from common.playback import PlaybackClock


def test_nothing_queued() -> None:
    clock = PlaybackClock()
    assert clock.played_ms(now=5.0) == 0.0
    assert clock.ahead_ms(now=5.0) == 0.0
    assert clock.underruns == 0


def test_playback_starts_with_the_first_chunk() -> None:
    clock = PlaybackClock()
    clock.add(1000.0, now=10.0)
    assert clock.start == 10.0
    assert clock.played_ms(now=10.0) == 0.0
    assert clock.ahead_ms(now=10.0) == 1000.0
    assert clock.played_ms(now=10.25) == pytest.approx(250.0)
    assert clock.ahead_ms(now=10.25) == pytest.approx(750.0)


def test_played_never_exceeds_what_was_queued() -> None:
    clock = PlaybackClock()
    clock.add(400.0, now=0.0)
    assert clock.played_ms(now=3.0) == 400.0
    assert clock.ahead_ms(now=3.0) == 0.0


def test_chunks_sent_faster_than_real_time_accumulate_ahead() -> None:
    clock = PlaybackClock()
    for i in range(10):  # 10 x 200 ms of audio sent within 90 ms
        clock.add(200.0, now=i * 0.01)
    assert clock.queued_ms == 2000.0
    assert clock.ahead_ms(now=0.09) == pytest.approx(2000.0 - 90.0)
    assert clock.played_ms(now=0.5) == pytest.approx(500.0)
    assert clock.underruns == 0


def test_no_underrun_when_a_chunk_arrives_in_time() -> None:
    clock = PlaybackClock()
    clock.add(100.0, now=0.0)
    clock.add(100.0, now=0.05)  # still 50 ms of audio to play
    clock.add(100.0, now=0.2)  # exactly when the queue runs dry: no gap
    assert clock.underruns == 0
    assert clock.played_ms(now=0.25) == pytest.approx(250.0)


def test_underrun_when_a_chunk_arrives_after_playback_ran_dry() -> None:
    clock = PlaybackClock()
    clock.add(100.0, now=0.0)
    clock.add(100.0, now=0.3)  # playback ran dry at 0.1: a 200 ms gap
    assert clock.underruns == 1
    # The clock restarts where it stalled: the new chunk starts playing now.
    assert clock.played_ms(now=0.3) == pytest.approx(100.0)
    assert clock.ahead_ms(now=0.3) == pytest.approx(100.0)
    assert clock.played_ms(now=0.35) == pytest.approx(150.0)
    assert clock.ahead_ms(now=0.35) == pytest.approx(50.0)


def test_underruns_count_each_gap() -> None:
    clock = PlaybackClock()
    clock.add(100.0, now=0.0)
    clock.add(100.0, now=0.15)  # gap 1
    clock.add(100.0, now=0.2)  # in time (the restarted clock has 50 ms left)
    clock.add(100.0, now=1.0)  # gap 2
    assert clock.underruns == 2
    assert clock.queued_ms == 400.0
    assert clock.ahead_ms(now=1.0) == pytest.approx(100.0)


def test_default_clock_is_monotonic_time() -> None:
    """Without `now`, the clock reads time.perf_counter (injected as `_now`)."""
    clock = PlaybackClock()
    t = [100.0]
    clock._now = lambda: t[0]
    clock.add(500.0)
    t[0] = 100.2
    assert clock.played_ms() == pytest.approx(200.0)
    assert clock.ahead_ms() == pytest.approx(300.0)
