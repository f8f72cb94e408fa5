"""The session's conversation-item events: create, truncate, delete, retrieve, and the output buffer.

Truncation is how a client that stopped playback tells the server what the user heard: the assistant's
text is cut to the words played by `audio_end_ms`, so the next answer never refers to words the user never
heard. The cut itself is the session's one interrupt path (`SessionContext.interrupt`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from brains.history import Item
from common import audio as audio_codec
from common.errors import SessionError
from realtime.core import events as ev

if TYPE_CHECKING:
    from realtime.core.context import SessionContext


class ItemHandlers:
    """Handlers for the item and output-buffer client events, acting on one session."""

    def __init__(self, session: SessionContext) -> None:
        self.s = session

    async def _on_ConversationItemCreate(self, e: ev.ConversationItemCreate) -> None:
        item, audio = _item_from_protocol(e.item, e.event_id, self.s)
        if self.s.history.has(item.id):
            raise SessionError(f"item {item.id} already exists", code="item_id_already_exists", param="item.id",
                               event_id=e.event_id)
        if self.s.history.full:
            # Refused, not evicted: a client adding items should learn that the conversation is full (turns
            # and replies, which nobody could refuse, evict the oldest instead).
            self.s.log.warning("conversation.item.create refused: %d items", len(self.s.history.items))
            raise SessionError(f"the conversation holds at most {self.s.history.max_items} items: delete some first",
                               code="conversation_item_limit_exceeded", event_id=e.event_id)
        if audio is not None:
            self.s.admit_audio(len(audio) / audio_codec.SPEECH_RATE, e.event_id)
        if item.type == "function_call_output" and self.s.history.find_call(item.call_id) is None:
            raise SessionError(f"no function_call with call_id {item.call_id!r} in the conversation",
                               code="invalid_value", param="item.call_id", event_id=e.event_id)
        try:
            previous = self.s.history.add(item, e.previous_item_id)
        except KeyError:
            raise SessionError(f"previous_item_id {e.previous_item_id} does not exist", code="item_not_found",
                               param="previous_item_id", event_id=e.event_id) from None
        self.s.emit(ev.ItemCreated(previous_item_id=previous, item=item.to_protocol(self.s.settings.beta)))
        if audio is not None:
            self.s.spawn(self._transcribe_item(item, audio), "item-transcribe")

    async def _transcribe_item(self, item: Item, audio: np.ndarray) -> None:
        item.text = await self.s.rt.transcribe(audio)
        item.status = "completed"
        self.s.transcribed(item)

    def _item(self, item_id: str, event_id: str | None) -> Item:
        try:
            return self.s.history.get(item_id)
        except KeyError:
            raise SessionError(f"item {item_id} does not exist", code="item_not_found", param="item_id",
                               event_id=event_id) from None

    async def _on_ConversationItemTruncate(self, e: ev.ConversationItemTruncate) -> None:
        item = self._item(e.item_id, e.event_id)
        if item.role != "assistant" or not item.audio or item.type != "message":
            raise SessionError("only an assistant message with audio can be truncated", code="invalid_value",
                               param="item_id", event_id=e.event_id)
        if e.content_index != 0:
            raise SessionError("content_index must be 0", code="invalid_value", param="content_index",
                               event_id=e.event_id)
        sent_ms = item.spoken[-1][1] if item.spoken else 0.0
        if e.audio_end_ms < 0 or e.audio_end_ms > sent_ms + 1:
            raise SessionError(f"audio_end_ms {e.audio_end_ms} is outside the item's {sent_ms:.0f} ms of audio",
                               code="invalid_value", param="audio_end_ms", event_id=e.event_id)
        # The client stopped playing this reply: stop producing it, and keep what the client says was heard.
        await self.s.interrupt("client_truncated", item=item, heard_ms=e.audio_end_ms)

    async def _on_ConversationItemDelete(self, e: ev.ConversationItemDelete) -> None:
        item = self._item(e.item_id, e.event_id)
        await self.s.stop_reply(item, "item_deleted")
        self.s.history.delete(item.id)
        self.s.emit(ev.ItemDeleted(item_id=item.id))

    async def _on_ConversationItemRetrieve(self, e: ev.ConversationItemRetrieve) -> None:
        self.s.emit(ev.ItemRetrieved(item=self._item(e.item_id, e.event_id).to_protocol(self.s.settings.beta)))

    async def _on_OutputAudioBufferClear(self, e: ev.OutputAudioBufferClear) -> None:
        await self.s.interrupt("client_cleared", clear=True)


def _item_from_protocol(raw: dict[str, Any], event_id: str | None,
                        session: SessionContext) -> tuple[Item, np.ndarray | None]:
    """A client item -> our Item, plus 16 kHz audio to transcribe for `input_audio` content."""
    def bad(msg: str, param: str) -> SessionError:
        return SessionError(msg, code="invalid_value", param=f"item.{param}", event_id=event_id)

    kind = raw.get("type", "message")
    item_id = str(raw.get("id") or ev.new_id("item"))
    if kind == "function_call_output":
        if not isinstance(raw.get("call_id"), str) or not isinstance(raw.get("output"), str):
            raise bad("function_call_output needs string call_id and output", "call_id")
        return Item(id=item_id, role="user", type="function_call_output", call_id=raw["call_id"],
                    text=raw["output"]), None
    if kind != "message":
        raise bad(f"item type {kind!r} is not supported", "type")
    role = raw.get("role")
    if role not in ("user", "assistant", "system"):
        raise bad("role must be user, assistant or system", "role")
    texts: list[str] = []
    audio: np.ndarray | None = None
    for part in raw.get("content") or []:
        if not isinstance(part, dict):
            raise bad("content parts must be objects", "content")
        if part.get("type") == "input_audio" and isinstance(part.get("audio"), str):
            data = ev.decode_audio(part["audio"], event_id)
            fmt = session.settings.input_format
            if fmt.encoding == "pcm16" and len(data) % 2:
                raise bad("pcm16 audio must be a whole number of samples", "content.audio")
            audio = audio_codec.resample(audio_codec.decode(data, fmt), fmt.sample_rate, audio_codec.SPEECH_RATE)
        value = part.get("text") if part.get("text") is not None else part.get("transcript")
        if isinstance(value, str):
            texts.append(value)
    item = Item(id=item_id, role=role, text=" ".join(texts), audio=audio is not None,
                status="in_progress" if audio is not None and not texts else "completed",
                audio_ms=0.0 if audio is None else len(audio) * 1000 / audio_codec.SPEECH_RATE)
    return item, audio if not texts else None



