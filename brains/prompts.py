"""Prompt assembly for the two brains, at the token level.

The MPS rule: the Formulation Brain continues `conversation + <think>`; for reply segment n the
Articulation Brain's prompt is `conversation + <think> all thought so far </think> + reply so far`.
Both are built by concatenating token ids (never by re-tokenizing text), so the AB prompt starts with
exactly the FB's tokens and the engine can reuse the FB's keys/values for that whole prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from brains.tools import tools_prompt
from common.config import LlmConfig, MindConfig

Role = Literal["user", "assistant"]


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
