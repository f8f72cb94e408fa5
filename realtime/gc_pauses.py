"""The cyclic garbage collector's pauses, and keeping the loaded models out of them.

A collection runs with the GIL held, so every thread of the server stops while it runs: the event loop, the VAD
thread, the engine's scheduler, the ASR and TTS workers. A full (generation 2) collection walks every tracked
object, and a server with its models loaded holds ~375k of them (torch modules, tokenizers, onnxruntime
sessions, transformers' registries): one full collection took ~260 ms on the 2-core EPYC, and under load they
come every few seconds (docs/benchmarks.md 7c). `freeze_heap`, once after loading, moves everything alive into
the permanent generation (`gc.freeze`), so later collections only walk what the sessions allocate; the models
live as long as the process anyway. `GC_PAUSES` counts and times every collection, for /metrics.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

GENERATIONS = (0, 1, 2)


class GcPauses:
    """Collections and their wall time per generation, from `gc.callbacks` (installed once per process)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0
        self._lock = threading.Lock()
        self._installed = False

    def install(self) -> None:
        with self._lock:
            if not self._installed:
                gc.callbacks.append(self._callback)
                self._installed = True

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Collections never overlap (they hold the GIL), so one start time is enough.
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = int(info.get("generation", 0))
        if generation in GENERATIONS:
            took = time.perf_counter() - self._started
            self.collections[generation] += 1
            self.seconds[generation] += took
            self.longest[generation] = max(self.longest[generation], took)


GC_PAUSES = GcPauses()


def freeze_heap() -> int:
    """Collect once, then exclude every object alive now from later collections; the number frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
