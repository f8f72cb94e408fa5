"""A Python thread that wants the GIL all the time, as a busy VAD thread, Whisper's decode loop or an event loop
does: what bench/engine_host.py and bench/loop_convoy.py set beside the thread they measure."""

from __future__ import annotations

import threading


def contend(stop: threading.Event) -> None:
    """Pure-Python work until `stop` is set."""
    x = 0
    while not stop.is_set():
        for i in range(2000):
            x += i * i
