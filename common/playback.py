"""The server's model of the client's playback: how much reply audio is queued ahead of the speaker.

Audio is sent faster than real time; the client plays it at 1x from the moment the first chunk
arrives. `ahead_ms` drives mind-paced scheduling (an AB close to running dry goes first); `played_ms`
says what the user actually heard when a barge-in cuts the reply; `underruns` counts the moments
playback would have run dry before the next chunk arrived.
"""

from __future__ import annotations

import time


class PlaybackClock:
    def __init__(self) -> None:
        self._now = time.perf_counter
        self.start: float | None = None
        self.queued_ms = 0.0
        self.underruns = 0
        self.finished = False

    def played_ms(self, now: float | None = None) -> float:
        if self.start is None:
            return 0.0
        elapsed = ((now if now is not None else self._now()) - self.start) * 1000.0
        return min(self.queued_ms, elapsed)

    def ahead_ms(self, now: float | None = None) -> float:
        return self.queued_ms - self.played_ms(now)

    def add(self, duration_ms: float, now: float | None = None) -> None:
        now = self._now() if now is None else now
        if self.start is None:
            self.start = now
        elif (now - self.start) * 1000.0 > self.queued_ms:
            # Playback ran dry before this chunk: an audible gap. Restart the clock where it stalled.
            self.underruns += 1
            self.start = now - self.queued_ms / 1000.0
        self.queued_ms += duration_ms
