"""A reply started on a speculative transcript while the VAD's silence window is still open.

When the user falls silent the server transcribes at once (the turn may be over) and, as soon as the
transcript is ready, starts the brains on it. Nothing reaches the client yet: events wait in a queue.
If the silence window closes with the same transcript, the response adopts this prefetch and the
first reply audio is ~silence_duration_ms closer; if the user speaks again, it is cancelled and only
compute was spent.

Once the session asks for it (`speak_first_chunk`), the prefetch also synthesizes the reply's first chunk
while the window is open: after the commit, the time to the first audio is otherwise almost all that
chunk's synthesis. Only the first chunk: later ones have the first one's playing time to be synthesized in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from brains.pacer import MindPacer, PacerDone, PacerEvent, ReplyDelta
from brains.prompts import ChatMessage
from common.playback import PlaybackClock
from tts.chunker import SentenceChunker

if TYPE_CHECKING:
    from realtime.runtime import Runtime


class Prefetch:
    def __init__(self, pacer: MindPacer, playback: PlaybackClock, text: str, messages: list[ChatMessage],
                 conversation: list[int]) -> None:
        self.pacer = pacer
        self.playback = playback
        self.text = text
        self.messages = messages
        self._queue: asyncio.Queue[PacerEvent | None] = asyncio.Queue()
        # The reply text so far, exactly what the response will push to its speech (`_Speech.push`: reply
        # deltas only, never thoughts or tool calls), kept so the first chunk can be found however late the
        # session asks for it; and whether the brain finished writing it (then the chunker's flush is the rest).
        self._reply = ""
        self._written = False
        self._closed = False  # no speculative synthesis from now on: cancelled, or the response took over
        self._rt: Runtime | None = None
        self._deadline = 0.0
        self._chunker: SentenceChunker | None = None  # following the reply until its first chunk is known
        self.first_chunk: str | None = None
        self._first_audio: asyncio.Task[np.ndarray] | None = None
        self._task = asyncio.create_task(self._run(conversation))

    async def _run(self, conversation: list[int]) -> None:
        try:
            async for event in self.pacer.run(conversation):
                # Before the event is queued: when the response's speech sees a chunk end, this already has.
                if isinstance(event, ReplyDelta):
                    self._reply += event.text
                    if self._chunker is not None:
                        self._first_chunk(self._chunker.push(event.text))
                elif isinstance(event, PacerDone) and not event.cancelled:
                    self._written = True
                    if self._chunker is not None:
                        self._first_chunk(self._chunker.flush())  # as `_Speech.finish` will: a short reply
                self._queue.put_nowait(event)
        finally:
            self._queue.put_nowait(None)

    def matches(self, text: str, messages: list[ChatMessage]) -> bool:
        return text == self.text and messages == self.messages

    async def events(self) -> AsyncIterator[PacerEvent]:
        while (event := await self._queue.get()) is not None:
            yield event
        if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]

    def speak_first_chunk(self, rt: Runtime, deadline: float) -> None:
        """Synthesize the reply's first chunk as soon as it is written (now, if it already is), in the TTS pool.

        `deadline` (time.perf_counter()) orders the job among every session's TTS work: the moment the silence
        window closes, when the listener starts waiting for exactly this audio. Real first chunks of turns
        already committed are overdue since their commit, so they still go first; later chunks whose
        listeners have seconds of audio queued go after."""
        if self._rt is not None or self._closed:
            return  # already asked; or cancelled, or too late: the response speaks for itself
        self._rt, self._deadline = rt, deadline
        tts = rt.config.tts
        # The settings `_Speech` chunks with, so both find the same first chunk in the same text.
        self._chunker = SentenceChunker(first_chunk_min_words=tts.first_chunk_min_words,
                                        first_chunk_max_words=tts.first_chunk_max_words)
        self._first_chunk(self._chunker.push(self._reply))
        if self._chunker is not None and self._written:
            self._first_chunk(self._chunker.flush())

    def _first_chunk(self, chunks: list[str]) -> None:
        if not chunks or self._rt is None:
            return
        self._chunker = None
        self.first_chunk = chunks[0]
        rt = self._rt
        # A task of its own: it runs while the silence window is open, whether or not anyone awaits it yet.
        # Created in the session's context, so the pool queues it as this session's work.
        self._first_audio = asyncio.create_task(
            rt.run_in(rt.tts_pool, rt.synthesizer.synthesize, self.first_chunk, deadline=self._deadline))
        self._first_audio.add_done_callback(_retrieved)

    def first_audio(self, chunk: str) -> asyncio.Task[np.ndarray] | None:
        """The speculative synthesis of `chunk` if it is this reply's first chunk, else None (and a speculative
        synthesis of other text is dropped). Called once, by the adopting response's speech, for its first chunk."""
        audio, self._first_audio = self._first_audio, None  # the response's now, to await or cancel
        self._close()  # the response synthesizes any chunk this had not found: no speculation after
        if audio is None:
            return None
        if chunk != self.first_chunk or audio.cancelled():
            audio.cancel()
            return None
        return audio

    def drop_first_audio(self) -> None:
        """Cancel the speculative synthesis if nobody took it: a job still queued in the pool is skipped."""
        self._close()
        if self._first_audio is not None:
            self._first_audio.cancel()
            self._first_audio = None

    def _close(self) -> None:
        self._closed = True
        self._chunker = None

    def cancel(self) -> None:
        self.pacer.cancel()
        self._task.cancel()
        self.drop_first_audio()


def _retrieved(task: asyncio.Task[np.ndarray]) -> None:
    """A speculative synthesis nobody took may have failed: that is no error to log (the response that would
    have taken it synthesizes the chunk itself, and fails there if it must)."""
    if not task.cancelled():
        task.exception()
