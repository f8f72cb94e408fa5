"""The session's conversation-item events: create, truncate, delete, retrieve, and the output buffer.

A mixin of `Session` (realtime/core/session.py), kept apart so each module stays small. Truncation is how a
client that stopped playback tells the server what the user heard: the assistant's text is cut to the
words played by `audio_end_ms`, so the next answer never refers to words the user never heard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from brains.history import Item
from common import audio as audio_codec
from common.errors import SessionError
from realtime.core import events as ev

if TYPE_CHECKING:
    from realtime.core.session import Session

VAD_RATE = 16000


class ItemEvents:
    async def _on_ConversationItemCreate(self: Session, e: ev.ConversationItemCreate) -> None:
        item, audio = _item_from_protocol(e.item, e.event_id, self)
        if item.type == "function_call_output" and self.history.find_call(item.call_id) is None:
            raise SessionError(f"no function_call with call_id {item.call_id!r} in the conversation",
                               code="invalid_value", param="item.call_id", event_id=e.event_id)
        try:
            previous = self.history.add(item, e.previous_item_id)
        except KeyError:
            raise SessionError(f"previous_item_id {e.previous_item_id} does not exist", code="item_not_found",
                               param="previous_item_id", event_id=e.event_id) from None
        self.emit(ev.ItemCreated(previous_item_id=previous, item=item.to_protocol(self.settings.beta)))
        if audio is not None:
            self._spawn(self._transcribe_item(item, audio), "item-transcribe")

    async def _transcribe_item(self: Session, item: Item, audio: np.ndarray) -> None:
        item.text = await self.rt.transcribe(audio)
        item.status = "completed"
        self.transcribed(item)

    def _item(self: Session, item_id: str, event_id: str | None) -> Item:
        try:
            return self.history.get(item_id)
        except KeyError:
            raise SessionError(f"item {item_id} does not exist", code="item_not_found", param="item_id",
                               event_id=event_id) from None

    async def _on_ConversationItemTruncate(self: Session, e: ev.ConversationItemTruncate) -> None:
        item = self._item(e.item_id, e.event_id)
        if item.role != "assistant" or not item.audio or item.type != "message":
            raise SessionError("only an assistant message with audio can be truncated", code="invalid_value",
                               param="item_id", event_id=e.event_id)
        if e.content_index != 0:
            raise SessionError("content_index must be 0", code="invalid_value", param="content_index",
                               event_id=e.event_id)
        if self.response is not None and self.response.item is item and not self.response.done:
            # The client stopped playing this reply: stop producing it, then apply the client's cut.
            await self.response.stop("client_truncated")
        sent_ms = item.spoken[-1][1] if item.spoken else 0.0
        if e.audio_end_ms < 0 or e.audio_end_ms > sent_ms + 1:
            raise SessionError(f"audio_end_ms {e.audio_end_ms} is outside the item's {sent_ms:.0f} ms of audio",
                               code="invalid_value", param="audio_end_ms", event_id=e.event_id)
        item.text = item.heard_text(e.audio_end_ms)
        item.audio_ms = e.audio_end_ms
        item.status = "incomplete"
        self.emit(ev.ItemTruncated(item_id=item.id, content_index=0, audio_end_ms=e.audio_end_ms))
        self.log.info("truncated %s to %d ms: %r", item.id, e.audio_end_ms, item.text)

    async def _on_ConversationItemDelete(self: Session, e: ev.ConversationItemDelete) -> None:
        item = self._item(e.item_id, e.event_id)
        if self.response is not None and self.response.item is item and not self.response.done:
            await self.response.stop("item_deleted")
        self.history.delete(item.id)
        self.emit(ev.ItemDeleted(item_id=item.id))

    async def _on_ConversationItemRetrieve(self: Session, e: ev.ConversationItemRetrieve) -> None:
        self.emit(ev.ItemRetrieved(item=self._item(e.item_id, e.event_id).to_protocol(self.settings.beta)))

    async def _on_OutputAudioBufferClear(self: Session, e: ev.OutputAudioBufferClear) -> None:
        response_id = self.response.id if self.response is not None else None
        if self.response is not None and not self.response.done:
            await self.response.stop("client_cleared")
        self.emit(ev.OutputAudioBufferCleared(response_id=response_id))


def _item_from_protocol(raw: dict[str, Any], event_id: str | None, session: Session) -> tuple[Item, np.ndarray | None]:
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
            audio = audio_codec.resample(audio_codec.decode(data, fmt), fmt.sample_rate, VAD_RATE)
        value = part.get("text") if part.get("text") is not None else part.get("transcript")
        if isinstance(value, str):
            texts.append(value)
    item = Item(id=item_id, role=role, text=" ".join(texts), audio=audio is not None,
                status="in_progress" if audio is not None and not texts else "completed")
    return item, audio if not texts else None



