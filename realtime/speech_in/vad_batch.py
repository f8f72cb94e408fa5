"""One VAD thread for every session: each round runs one frame of every stream that has audio in one ONNX call.

Per session, a VAD job per input chunk meant, at 64 sessions, ~3,000 small jobs a second through one thread,
each an executor hand-off and a wake-up of the event loop, and Silero run one row at a time. Here a session
submits its chunk and awaits a future as before, but the thread takes every submitted job at once, and in each
round gives every segmenter with a frame left one row of a single batched `SileroVad.probs` call, then feeds
the turn detectors. Results of a round go back to the event loop in one `call_soon_threadsafe`, so the loop
wakes once per round instead of once per chunk.

Order per segmenter is the order of submission: a segmenter's next job starts only when its previous one is
done, so a `call` (take the turn's audio, reset) sees every chunk submitted before it. Different segmenters
never wait for each other beyond one round. The segmenters' state is only touched on this thread, like the one-
thread pool it replaces. (semantic_vad's turn model runs inside the detector, so a Smart Turn call still holds
up the round for every stream: ~60 ms once per pause, as with the one-thread pool.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from realtime.speech_in.vad import FloatArray, TurnEvent, VadSegmenter

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(eq=False)
class _Job:
    segmenter: VadSegmenter
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    # A feed: audio to run through the segmenter, then `then(events)` on this thread gives the result.
    samples: FloatArray | None = None
    then: Callable[[list[TurnEvent]], Any] | None = None
    # A call: `fn()` on this thread, in order with the segmenter's feeds.
    fn: Callable[[], Any] | None = None
    frames: deque[FloatArray] | None = None  # the feed's frames, split when the job reaches the head
    events: list[TurnEvent] = field(default_factory=list)
    error: Exception | None = None  # the detector failed on one of the frames: the job ends with it


class VadBatcher:
    """The VAD thread. `feed` and `call` are awaited on the event loop; the work runs on the thread."""

    def __init__(self, max_rows: int = 256) -> None:
        self.max_rows = max_rows  # rows of one model call; more streams take the next round
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._submitted: list[_Job] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        # Read by /metrics without the lock (a stale count is fine there).
        self.waiting = 0  # jobs submitted and not yet done
        self.rounds = 0
        self.rows = 0  # frames run, over all rounds: rows / rounds is the mean batch

    async def feed(self, segmenter: VadSegmenter, samples: FloatArray,
                   then: Callable[[list[TurnEvent]], R]) -> R:
        """Run `samples` through `segmenter`; `then(events)`, on the VAD thread, makes the result."""
        return await self._submit(_Job(segmenter, *self._here(), samples=samples, then=then))

    async def call(self, segmenter: VadSegmenter, fn: Callable[[], R]) -> R:
        """`fn()` on the VAD thread once every chunk submitted before for `segmenter` went through it."""
        return await self._submit(_Job(segmenter, *self._here(), fn=fn))

    @staticmethod
    def _here() -> tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        return loop, loop.create_future()

    async def _submit(self, job: _Job) -> Any:
        with self._wake:
            if self._closed:
                raise RuntimeError("the VAD thread is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="duet-vad", daemon=True)
                self._thread.start()
            self._submitted.append(job)
            self.waiting += 1
            self._wake.notify()
        # Cancelling the awaiting task does not stop the job: like a started executor job it runs, and its
        # result is dropped (a segmenter must see every chunk in order anyway).
        return await job.future

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ---- the thread -------------------------------------------------------------------------------------
    def _serve(self) -> None:
        # Per segmenter, its jobs in submission order; the head is the one in progress.
        queues: OrderedDict[int, deque[_Job]] = OrderedDict()
        while True:
            with self._wake:
                while not self._submitted and not queues and not self._closed:
                    self._wake.wait()
                closed = self._closed
                for job in self._submitted:
                    queues.setdefault(id(job.segmenter), deque()).append(job)
                self._submitted.clear()
            if closed:
                gone = RuntimeError("the VAD thread is closed")
                self._post([(job, False, gone) for jobs in queues.values() for job in jobs])
                return
            done: list[tuple[_Job, bool, Any]] = []
            try:
                self._round(queues, done)
            except Exception as exc:  # a bug outside the model call (that one fails only its group, in _round)
                log.exception("VAD round failed")
                for key in list(queues):
                    head = queues[key][0]
                    if head.frames:
                        head.frames, head.error = deque(), exc
                    self._advance(queues, key, done)
            self._post(done)

    def _round(self, queues: OrderedDict[int, deque[_Job]], done: list[tuple[_Job, bool, Any]]) -> None:
        """Finish what needs no model, then run one frame of up to `max_rows` segmenters in one call."""
        heads: list[_Job] = []
        for key in list(queues):
            if self._advance(queues, key, done) and len(heads) < self.max_rows:
                heads.append(queues[key][0])
        if not heads:
            return
        for job in heads:
            queues.move_to_end(id(job.segmenter))  # streams left out of a full round go first in the next
        by_model: dict[int, list[_Job]] = {}
        for job in heads:
            by_model.setdefault(id(job.segmenter.stream.vad), []).append(job)
        ran = 0  # frames the model ran this round: what `rows` and `rounds` count (not a failed call's)
        for group in by_model.values():  # one model in practice: the runtime's Silero
            frames = [job.frames.popleft() for job in group]  # type: ignore[union-attr]
            try:
                probs = group[0].segmenter.stream.vad.probs([job.segmenter.stream for job in group], frames)
            except Exception as exc:  # the model call failed: exactly these feeds fail (their frame is gone),
                log.exception("VAD model call failed for %d streams", len(group))  # later jobs still run
                for job in group:
                    job.frames, job.error = deque(), exc
                continue
            ran += len(group)
            for job, frame, prob in zip(group, frames, probs, strict=True):
                try:
                    job.events.extend(job.segmenter.step(frame, float(prob)))
                except Exception as exc:  # one session's detector failing ends only its job
                    job.frames, job.error = deque(), exc
        if ran:
            self.rounds += 1
            self.rows += ran
        for job in heads:  # a job that took its last frame is answered with this round, not the next
            self._advance(queues, id(job.segmenter), done)

    def _advance(self, queues: OrderedDict[int, deque[_Job]], key: int, done: list[tuple[_Job, bool, Any]]) -> bool:
        """Settle the segmenter's finished jobs from the head; True if a job with frames to run is left."""
        jobs = queues[key]
        while jobs and self._settle(jobs[0], done):
            jobs.popleft()
        if not jobs:
            del queues[key]
            return False
        return True

    def _settle(self, job: _Job, done: list[tuple[_Job, bool, Any]]) -> bool:
        """Finish `job` if it needs no more frames (True); else make sure its frames are split."""
        try:
            if job.fn is not None:
                result = job.fn()
            else:
                if job.frames is None:
                    job.frames = deque(job.segmenter.split(job.samples if job.samples is not None
                                                           else np.zeros(0, np.float32)))
                if job.frames:
                    return False
                if job.error is not None:
                    raise job.error
                result = job.then(job.events) if job.then is not None else job.events
        except Exception as exc:
            done.append((job, False, exc))
            return True
        done.append((job, True, result))
        return True

    def _post(self, done: list[tuple[_Job, bool, Any]]) -> None:
        if not done:
            return
        with self._lock:
            self.waiting -= len(done)
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]]] = {}
        for item in done:
            by_loop.setdefault(id(item[0].loop), (item[0].loop, []))[1].append(item)
        for loop, items in by_loop.values():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits for these any more
                loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[_Job, bool, Any]]) -> None:
    for job, ok, value in items:
        if job.future.done():
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)
