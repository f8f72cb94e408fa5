"""Prompt assembly for the two brains, at the token level.

The MPS rule: the Formulation Brain continues `conversation + <think>`; for reply segment n the
Articulation Brain's prompt is `conversation + <think> all thought so far </think> + reply so far`.
Both are built by concatenating token ids (never by re-tokenizing text), so the AB prompt starts with
exactly the FB's tokens and the engine can reuse the FB's keys/values for that whole prefix.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from brains.tools import tools_prompt
from common.config import LlmConfig, MindConfig

Role = Literal["user", "assistant"]

_PROBE_SYSTEM = "S"  # a system message to render a lone message after (templates expect one first)
# The per-message token cache, shared by all sessions: ~4 bytes a token, so at most ~8 MB of ids.
_CACHE_TOKENS = 1 << 21
_CACHE_MESSAGES = 1 << 16


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


class PromptBuilder:
    def __init__(self, tokenizer: Any, llm: LlmConfig, mind: MindConfig) -> None:
        self.tokenizer = tokenizer
        self.llm = llm
        self.mind = mind
        self.think_open = self.encode(mind.think_open)
        self.think_close = self.encode(mind.think_close)
        self.stop_ids = self._stop_ids()
        # A native single-token </think> (Qwen3) ends the FB exactly; otherwise we match the text.
        close_id = tokenizer.convert_tokens_to_ids("</think>")
        unk = getattr(tokenizer, "unk_token_id", None)
        self.think_end_id: int | None = close_id if isinstance(close_id, int) and close_id != unk else None
        # Token ids of each message as the chat template renders it, by message (see `fit`), least recently
        # used first; bounded in tokens so a long-lived server's cache stays small.
        self._segments: OrderedDict[ChatMessage, array[int]] = OrderedDict()
        self._segment_tokens = 0
        self._systems: OrderedDict[str, list[int]] = OrderedDict()
        # The model sees at most max_seq_len tokens: a longer message is tokenized from its last this many
        # characters (no tokenizer packs 16 characters into one token), so tokenizing never costs more.
        self.max_message_chars = 16 * llm.max_seq_len
        self._base = self._render([{"role": "system", "content": _PROBE_SYSTEM}], False)
        self._generation = self.encode(
            self._render([{"role": "system", "content": _PROBE_SYSTEM}], True)[len(self._base):])
        self.segmented = self._template_is_segmentable()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _stop_ids(self) -> frozenset[int]:
        ids = set()
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                ids.add(tid)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    def system_prompt(self, instructions: str | None, thinking: bool, tools: Sequence[dict[str, Any]] = ()) -> str:
        base = instructions.strip() if instructions and instructions.strip() else self.llm.system_prompt
        if tools:
            base += "\n\n" + tools_prompt(tools)
        return f"{base}\n\n{self.mind.thinking_prompt}" if thinking else base

    def conversation(self, messages: Sequence[ChatMessage], instructions: str | None = None,
                     thinking: bool = False, tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        """The chat template up to and including the assistant's turn header."""
        chat = [{"role": "system", "content": self.system_prompt(instructions, thinking, tools)}]
        chat += [{"role": m.role, "content": m.content} for m in messages]
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def fit(self, messages: Sequence[ChatMessage], max_tokens: int, instructions: str | None = None,
            thinking: bool = False, tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        """`conversation()` of the newest messages that fit in `max_tokens` (older ones are dropped; a newest
        message too long on its own keeps its end).

        Its cost grows with the new text only: each message is tokenized once (then cached), and only the
        newest messages that can fit are looked at, so a conversation of thousands of items costs no more
        than one of a screenful. Templates that do not render each message on its own (checked once at
        start, `segmented`) fall back to re-tokenizing the whole conversation per dropped message."""
        if not self.segmented:
            return self._fit_slowly(list(messages), max_tokens, instructions, thinking, tools)
        head = self._system_ids(self.system_prompt(instructions, thinking, tools))
        budget = max_tokens - len(head) - len(self._generation)
        picked: list[array[int]] = []
        for message in reversed(messages):
            if budget <= 0:
                break
            ids = self._message_ids(message)
            if len(ids) > budget and picked:
                break
            picked.append(ids)
            budget -= len(ids)
        out = list(head)
        for ids in reversed(picked):
            out.extend(ids)
        out.extend(self._generation)
        return out[-max_tokens:]

    def _fit_slowly(self, messages: list[ChatMessage], max_tokens: int, instructions: str | None,
                    thinking: bool, tools: Sequence[dict[str, Any]]) -> list[int]:
        while True:
            ids = self.conversation(messages, instructions, thinking, tools)
            if len(ids) <= max_tokens or len(messages) <= 1:
                return ids[-max_tokens:]
            messages = messages[1:]

    def _render(self, chat: list[dict[str, str]], generation: bool) -> str:
        return str(self.tokenizer.apply_chat_template(chat, add_generation_prompt=generation, tokenize=False))

    def _system_ids(self, system: str) -> list[int]:
        ids = self._systems.get(system)
        if ids is None:
            ids = self._systems[system] = self.encode(self._render([{"role": "system", "content": system}], False))
            if len(self._systems) > 64:  # per-session instructions: a few live at a time
                self._systems.popitem(last=False)
        else:
            self._systems.move_to_end(system)
        return ids

    def _message_ids(self, message: ChatMessage) -> array[int]:
        ids = self._segments.get(message)
        if ids is not None:
            self._segments.move_to_end(message)
            return ids
        content = message.content[-self.max_message_chars:]
        text = self._render([{"role": "system", "content": _PROBE_SYSTEM},
                             {"role": message.role, "content": content}], False)[len(self._base):]
        ids = self._segments[message] = array("i", self.encode(text))
        self._segment_tokens += len(ids)
        while self._segment_tokens > _CACHE_TOKENS or len(self._segments) > _CACHE_MESSAGES:
            _, old = self._segments.popitem(last=False)
            self._segment_tokens -= len(old)
        return ids

    def _template_is_segmentable(self) -> bool:
        """Does the template render each message on its own, so a prompt is the concatenation of per-message
        token ids? True of ChatML (SmolLM2, Qwen) and Llama 3; checked on a sample conversation, not assumed."""
        sample = [ChatMessage("user", "Hi there."), ChatMessage("assistant", "Hello! How can I help?"),
                  ChatMessage("user", "What is 2 + 2?")]
        try:
            if not self._render([{"role": "system", "content": _PROBE_SYSTEM},
                                 {"role": "user", "content": "x"}], False).startswith(self._base):
                return False
            self.segmented = True
            fitted = self.fit(sample, 1 << 30, "Be brief.")
            return fitted == self.conversation(sample, "Be brief.")
        except Exception:  # a template that refuses a lone message, or anything odd: take the slow path
            return False
        finally:
            self._segments.clear()
            self._segment_tokens = 0
            self._systems.clear()

    def fb_prompt(self, conversation: Sequence[int]) -> list[int]:
        return [*conversation, *self.think_open]

    def ab_prompt(self, conversation: Sequence[int], thought: Sequence[int] | None,
                  reply: Sequence[int]) -> list[int]:
        """`thought=None` is the no-thinking baseline: the plain conversation, then the reply so far."""
        if thought is None:
            return [*conversation, *reply]
        return [*conversation, *self.think_open, *thought, *self.think_close, *reply]

    def thought_end(self, thought: Sequence[int]) -> int | None:
        """Where the thought ends if the FB has closed it (index into `thought`), else None."""
        if self.think_end_id is not None:
            return thought.index(self.think_end_id) if self.think_end_id in thought else None
        if "</think" not in self.decode(thought[-16:]):
            return None
        # The first token from which the text spells the closing tag: the thought ends before it, so the
        # AB prompt carries no fragment of the tag next to its own think_close.
        start = len(thought) - 1
        while start > 0 and "</think" not in self.decode(thought[start:]):
            start -= 1
        return start


class IncrementalText:
    """Token ids in, new text out; holds back an incomplete UTF-8 character at the end."""

    def __init__(self, prompts: PromptBuilder) -> None:
        self.prompts = prompts
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = self.prompts.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta
