"""A reply started on a speculative transcript while the VAD's silence window is still open.

When the user falls silent the server transcribes at once (the turn may be over) and, as soon as the
transcript is ready, starts the brains on it. Nothing reaches the client yet: events wait in a queue.
If the silence window closes with the same transcript, the response adopts this prefetch and the
first reply audio is ~silence_duration_ms closer; if the user speaks again, it is cancelled and only
compute was spent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from brains.pacer import MindPacer, PacerEvent
from brains.prompts import ChatMessage
from common.playback import PlaybackClock


class Prefetch:
    def __init__(self, pacer: MindPacer, playback: PlaybackClock, text: str, messages: list[ChatMessage],
                 conversation: list[int]) -> None:
        self.pacer = pacer
        self.playback = playback
        self.text = text
        self.messages = messages
        self._queue: asyncio.Queue[PacerEvent | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(conversation))

    async def _run(self, conversation: list[int]) -> None:
        try:
            async for event in self.pacer.run(conversation):
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

    def cancel(self) -> None:
        self.pacer.cancel()
        self._task.cancel()
