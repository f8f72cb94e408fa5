"""The loop-thread engines' shell (brains/backends/loop_thread.py): what a backend delivers in one pass of the
engine thread's loop reaches a session's loop in one wake-up, in order, endings included."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from brains.backends.loop_thread import LoopThreadEngine, Seq
from brains.engine import Finished, GenerationRequest, TokenStream
from common.config import LlmConfig
from tests.brains.fakes import collect


@dataclass
class _Seq(Seq):
    pass


class BurstEngine(LoopThreadEngine[_Seq]):
    """Every sequence waits for `go`, then delivers three batches and ends, all in one step of its task: as a
    backend's chunks for every sequence of one step arrive together."""

    def __init__(self) -> None:
        super().__init__(LlmConfig(max_seq_len=64), urgent_audio_ms=1500.0, eos_ids=frozenset())
        self.go: asyncio.Event | None = None

    async def _open(self) -> None:
        self.go = asyncio.Event()

    def _new_seq(self, seq_id: int, req: GenerationRequest, stream: TokenStream, loop: asyncio.AbstractEventLoop,
                 stops: frozenset[int], priority: int) -> _Seq:
        return _Seq(seq_id, req, stream, loop, stops, priority)

    async def _generate(self, seq: _Seq) -> None:
        assert self.go is not None
        await self.go.wait()
        for k in range(3):
            self._call(seq, seq.stream._deliver, [seq.seq_id * 10 + k])
        self._finish(seq, Finished("length"))


async def test_one_pass_of_deliveries_wakes_a_session_loop_once() -> None:
    engine = BurstEngine()
    await asyncio.to_thread(engine.start)
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        streams = [engine.submit(GenerationRequest(prompt=[1, 2, 3], max_new_tokens=3)) for _ in range(8)]
        while engine._loop is None or sum(1 for s in engine._seqs.values() if s.task is not None) < 8:
            await asyncio.sleep(0.01)
        assert engine._loop is not None and engine.go is not None
        engine._loop.call_soon_threadsafe(engine.go.set)
        outputs = [await collect(s) for s in streams]
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        await asyncio.to_thread(engine.close)
    assert outputs == [[s.seq_id * 10 + k for k in range(3)] for s in streams], "every batch, in order"
    assert all(s.finish is not None and s.finish.reason == "length" for s in streams)
    # 8 sequences x (3 batches + the ending) = 32 deliveries; one wake-up per engine-loop pass (two at most, if
    # the tasks' wake-ups straddle a pass), where there was one per delivery.
    assert wakeups <= 2, wakeups
