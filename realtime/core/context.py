"""What a session offers the parts of the core that act for it (responses, item events).

`Response` and `ItemHandlers` need a few of the session's services; naming them here as a Protocol lets
`session.py` import those parts without them importing it back (no import circle), and lets unit tests
drive a response or an item handler with a small stand-in.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from brains.history import Conversation, Item
from brains.pacer import MindPacer
from brains.prompts import ChatMessage
from common.config import LlmConfig
from common.playback import PlaybackClock
from realtime.core import events as ev
from realtime.core.settings import SessionSettings

if TYPE_CHECKING:
    from realtime.core.options import ResponseOptions
    from realtime.runtime import Runtime


class SessionContext(Protocol):
    id: str
    rt: Runtime
    settings: SessionSettings
    history: Conversation
    log: logging.LoggerAdapter  # type: ignore[type-arg]

    def emit(self, event: ev.ServerEvent) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> Any: ...

    def transcribed(self, item: Item) -> None: ...

    def admit_audio(self, seconds: float, event_id: str | None) -> None: ...

    def rate_limits(self) -> ev.RateLimitsUpdated: ...

    def new_pacer(self, options: ResponseOptions, playback: PlaybackClock, llm: LlmConfig,
                  reply_prefix: str = "") -> MindPacer: ...

    def conversation_ids(self, messages: list[ChatMessage], options: ResponseOptions, thinking: bool) -> list[int]: ...

    async def interrupt(self, reason: str, *, item: Item | None = None, heard_ms: float | None = None,
                        clear: bool = False) -> None: ...

    async def stop_reply(self, item: Item, reason: str) -> None: ...
