"""The conversation: items as the realtime protocol names them, and the messages the brains see.

The assistant's text here is what the user *heard*: a barge-in truncates it to the played audio, so the
next answer never refers to words that were cut off. The formulation brain's thought is kept on the
item (visible reasoning) but, as in MPS and other reasoning models, not fed back into later prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from brains.prompts import ChatMessage

Role = Literal["user", "assistant", "system"]


@dataclass
class Item:
    id: str
    role: Role
    text: str = ""
    audio: bool = False  # did this message come as (user) or go out as (assistant) audio
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    thought: str = ""
    audio_ms: float = 0.0
    # Assistant audio as sent: (start_ms, end_ms, text) per synthesized chunk, to truncate to what was heard.
    spoken: list[tuple[float, float, str]] = field(default_factory=list)
    # Reply text written but never synthesized when the reply was stopped (whole chunks, as spoken).
    unsent: str = ""
    # After a cut: the words the user did not hear (the rest of the cut chunk, later chunks, `unsent`),
    # which a reply resumed after a false interruption speaks.
    unheard: str = ""
    # The id of the assistant item this one resumes (its reply went on after a false interruption).
    continues: str = ""
    type: Literal["message", "function_call", "function_call_output"] = "message"
    call_id: str = ""
    name: str = ""
    arguments: str = ""

    def heard_text(self, played_ms: float) -> str:
        """The words of the reply that had been played after `played_ms` of its audio; a chunk cut midway
        keeps the share of its words that was played (speech runs at a near-constant rate)."""
        words: list[str] = []
        for start, end, text in self.spoken:
            if played_ms >= end:
                words += text.split()
            elif played_ms > start:
                chunk = text.split()
                words += chunk[: int(len(chunk) * (played_ms - start) / max(end - start, 1e-6))]
        return " ".join(words)

    def unheard_text(self, played_ms: float) -> str:
        """The words of the reply's audio after `played_ms`: exactly those `heard_text` leaves out."""
        words: list[str] = []
        for start, end, text in self.spoken:
            chunk = text.split()
            if played_ms <= start:
                words += chunk
            elif played_ms < end:
                words += chunk[int(len(chunk) * (played_ms - start) / max(end - start, 1e-6)):]
        return " ".join(words)

    def cut_to(self, heard_ms: float) -> None:
        """Keep only what the user heard of this reply: its words up to `heard_ms` of audio; the rest is
        kept aside in `unheard`. Computed from `spoken` each time, so a second cut (the client's truncate
        after the server's) moves the same boundary rather than cutting the cut text."""
        self.text, self.audio_ms, self.status = self.heard_text(heard_ms), heard_ms, "incomplete"
        self.unheard = " ".join(t for t in (self.unheard_text(heard_ms), self.unsent) if t)

    def to_protocol(self, beta: bool) -> dict[str, Any]:
        if self.type == "function_call":
            return {"id": self.id, "object": "realtime.item", "type": "function_call", "status": self.status,
                    "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        if self.type == "function_call_output":
            return {"id": self.id, "object": "realtime.item", "type": "function_call_output",
                    "call_id": self.call_id, "output": self.text}
        if self.role in ("user", "system"):  # the client's words: system messages take input_text too
            part = {"type": "input_audio", "transcript": self.text or None} if self.audio else \
                {"type": "input_text", "text": self.text}
        elif self.audio:
            part = {"type": "audio" if beta else "output_audio", "transcript": self.text}
        else:
            part = {"type": "text" if beta else "output_text", "text": self.text}
        item = {"id": self.id, "object": "realtime.item", "type": "message", "status": self.status,
                "role": self.role, "content": [part]}
        if self.thought:
            item["duet"] = {"thought": self.thought}  # visible reasoning, ignored by standard clients
        return item


class Conversation:
    """`max_items` (0 = no limit) bounds the conversation: adding past it evicts the oldest item and tells
    `on_evict`, so a long call keeps going with bounded memory and prompt-building cost. (A client's own
    `conversation.item.create` is refused at the limit before it gets here: see `full`.)"""

    def __init__(self, max_items: int = 0, on_evict: Callable[[Item], None] | None = None) -> None:
        self.items: list[Item] = []
        self.max_items = max_items
        self.on_evict = on_evict

    @property
    def full(self) -> bool:
        return 0 < self.max_items <= len(self.items)

    def has(self, item_id: str) -> bool:
        return any(item.id == item_id for item in self.items)

    def add(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Insert after `previous_item_id` (end if None); returns the id of the item before it.
        Item ids are unique: an id already present raises ValueError and changes nothing."""
        if self.has(item.id):
            raise ValueError(f"item {item.id} already exists")
        if previous_item_id is not None:
            self.index(previous_item_id)  # KeyError before anything is evicted
        while self.full:
            oldest = self.items.pop(0)
            if oldest.id == previous_item_id:  # inserting after the evicted one: that is now the start
                self.items.insert(0, item)
                if self.on_evict is not None:
                    self.on_evict(oldest)
                return None
            if self.on_evict is not None:
                self.on_evict(oldest)
        if previous_item_id is None:
            before = self.items[-1].id if self.items else None
            self.items.append(item)
            return before
        idx = self.index(previous_item_id)
        self.items.insert(idx + 1, item)
        return previous_item_id

    def index(self, item_id: str) -> int:
        for i, item in enumerate(self.items):
            if item.id == item_id:
                return i
        raise KeyError(item_id)

    def get(self, item_id: str) -> Item:
        return self.items[self.index(item_id)]

    def delete(self, item_id: str) -> None:
        del self.items[self.index(item_id)]

    def messages(self) -> list[ChatMessage]:
        out: list[ChatMessage] = []
        # Function names by call id, once: a lookup per output item would make this quadratic in the items.
        calls = {i.call_id: i.name for i in reversed(self.items) if i.type == "function_call"}  # first wins
        last = ""  # the item behind out[-1]
        for item in self.items:
            if item.type == "function_call":
                out.append(ChatMessage("assistant", f'<tool_call>{{"name": "{item.name}", "arguments": '
                                                    f"{item.arguments or '{}'}}}</tool_call>"))
            elif item.type == "function_call_output":
                # Small chat templates know only user and assistant turns, and small models answer plain words
                # better than markup: the result comes back as the user's message.
                name = calls.get(item.call_id, "the function")
                out.append(ChatMessage("user", f"{name} returned: {item.text}\nAnswer my question with this."))
            elif item.continues and item.continues == last and item.text.strip():
                # A reply resumed after a false interruption is a second item; the model sees one reply,
                # as the user heard it.
                out[-1] = ChatMessage("assistant", f"{out[-1].content} {item.text}")
            elif item.role in ("user", "assistant") and item.text.strip():
                out.append(ChatMessage(item.role, item.text))  # type: ignore[arg-type]
            else:
                continue
            last = item.id
        return out

    def find_call(self, call_id: str) -> Item | None:
        return next((i for i in self.items if i.type == "function_call" and i.call_id == call_id), None)
