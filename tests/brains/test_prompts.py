"""Prompt assembly for the two brains (the MPS rule) and incremental detokenization."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from brains.prompts import ChatMessage, IncrementalText, PromptBuilder
from common.config import LlmConfig, MindConfig
from tests.brains.fakes import FakeTokenizer

LLM = LlmConfig(system_prompt="Be brief.")
MIND = MindConfig()


def builder(native_think: bool = True, batch_encoding: bool = False) -> PromptBuilder:
    return PromptBuilder(FakeTokenizer(native_think=native_think, batch_encoding=batch_encoding), LLM, MIND)


@pytest.fixture(params=[True, False], ids=["native-think", "spelled-think"])
def prompts(request: pytest.FixtureRequest) -> PromptBuilder:
    return builder(native_think=request.param)


def text_of(p: PromptBuilder, ids: Sequence[int]) -> str:
    return str(p.tokenizer.decode(list(ids), skip_special_tokens=False))


# ---------------------------------------------------------------- conversation


def test_conversation_is_the_chat_template_with_generation_prompt(prompts: PromptBuilder) -> None:
    conv = prompts.conversation([ChatMessage("user", "hi"), ChatMessage("assistant", "hello"),
                                 ChatMessage("user", "why?")])
    assert text_of(prompts, conv) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nwhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_conversation_accepts_a_batch_encoding() -> None:
    """transformers 5 returns a BatchEncoding (a mapping) from apply_chat_template."""
    plain = builder().conversation([ChatMessage("user", "hi")])
    assert builder(batch_encoding=True).conversation([ChatMessage("user", "hi")]) == plain


def test_system_prompt_instructions_and_thinking(prompts: PromptBuilder) -> None:
    assert prompts.system_prompt(None, thinking=False) == "Be brief."
    assert prompts.system_prompt("  ", thinking=False) == "Be brief."  # blank instructions: the default
    assert prompts.system_prompt(" Talk like a pirate. ", thinking=False) == "Talk like a pirate."
    assert prompts.system_prompt("X", thinking=True) == f"X\n\n{MIND.thinking_prompt}"
    conv = prompts.conversation([ChatMessage("user", "hi")], instructions="X", thinking=True)
    assert f"system\nX\n\n{MIND.thinking_prompt}<|im_end|>" in text_of(prompts, conv)


def test_think_tags_are_the_configured_text(prompts: PromptBuilder) -> None:
    assert text_of(prompts, prompts.think_open) == MIND.think_open
    assert text_of(prompts, prompts.think_close) == MIND.think_close


def test_stop_ids_known_tokens_only() -> None:
    p = builder()
    tok = p.tokenizer
    assert p.stop_ids == frozenset({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id})
    assert tok.unk_token_id not in p.stop_ids


def test_think_end_id_only_for_a_native_tag() -> None:
    assert builder(native_think=True).think_end_id == FakeTokenizer().specials["</think>"]
    assert builder(native_think=False).think_end_id is None


# ---------------------------------------------------------------- the MPS rule


def test_fb_prompt_is_conversation_then_think_open(prompts: PromptBuilder) -> None:
    conv = prompts.conversation([ChatMessage("user", "2+2?")], thinking=True)
    assert prompts.fb_prompt(conv) == conv + prompts.think_open


def test_ab_prompt_follows_the_mps_rule(prompts: PromptBuilder) -> None:
    conv = prompts.conversation([ChatMessage("user", "2+2?")], thinking=True)
    thought = prompts.encode("two plus two is four")
    reply = prompts.encode("It is")
    ab = prompts.ab_prompt(conv, thought, reply)
    assert ab == conv + prompts.think_open + thought + prompts.think_close + reply
    # The AB prompt starts with exactly the FB's tokens: the engine can reuse that whole prefix.
    fb = prompts.fb_prompt(conv)
    assert ab[: len(fb) + len(thought)] == fb + thought
    assert text_of(prompts, ab).endswith("<think>\ntwo plus two is four\n</think>\nIt is")


def test_ab_prompt_concatenates_ids_without_retokenizing(prompts: PromptBuilder) -> None:
    """Ids that would not survive a decode/encode round trip are kept exactly (token-level rule)."""
    conv = [1, 2, 3]
    thought = [prompts.tokenizer.unk_token_id, 65]
    reply = [66, prompts.tokenizer.unk_token_id]
    assert prompts.ab_prompt(conv, thought, reply) == [1, 2, 3, *prompts.think_open, *thought,
                                                       *prompts.think_close, *reply]


def test_ab_prompt_without_thought_is_conversation_then_reply(prompts: PromptBuilder) -> None:
    conv = prompts.conversation([ChatMessage("user", "hi")])
    reply = prompts.encode("Hello")
    assert prompts.ab_prompt(conv, None, reply) == conv + reply
    assert prompts.ab_prompt(conv, None, []) == conv


def test_ab_prompt_with_empty_thought_still_closes_it(prompts: PromptBuilder) -> None:
    """Speak-first's first segment: no thought yet, but the think block is there (and empty)."""
    conv = [5, 6]
    assert prompts.ab_prompt(conv, [], []) == conv + prompts.think_open + prompts.think_close


# ---------------------------------------------------------------- thought_end


def test_thought_end_none_while_open(prompts: PromptBuilder) -> None:
    assert prompts.thought_end(prompts.encode("still thinking about </thin")) is None
    assert prompts.thought_end([]) is None


def test_thought_end_native_tag_returns_its_index() -> None:
    p = builder(native_think=True)
    thought = p.encode("so the answer is 4.</think>")
    end = p.thought_end(thought)
    assert end == len(thought) - 1
    assert p.decode(thought[:end]) == "so the answer is 4."


def test_thought_end_native_tag_followed_by_more() -> None:
    p = builder(native_think=True)
    thought = p.encode("done</think>\nanswer")
    assert p.thought_end(thought) == 4


@pytest.mark.parametrize("tail", ["</think", "</think>", "</think>\n"])
def test_thought_end_spelled_tag_excludes_the_whole_tag(tail: str) -> None:
    p = builder(native_think=False)
    body = "so the answer is 4."
    thought = p.encode(body + tail)
    end = p.thought_end(thought)
    assert end is not None
    assert p.decode(thought[:end]) == body


def test_thought_end_spelled_tag_is_found(prompts: PromptBuilder) -> None:
    """Whatever the tokenizer, a closed thought is detected and the cut lies inside the tag."""
    body = "so the answer is 4."
    thought = prompts.encode(body + "</think>")
    end = prompts.thought_end(thought)
    assert end is not None
    assert len(prompts.encode(body)) <= end < len(thought)
    assert "</think" not in prompts.decode(thought[:end])


# ---------------------------------------------------------------- IncrementalText


class ByteTokenizer(FakeTokenizer):
    """One id per UTF-8 byte: multi-byte characters span several tokens."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def byte_builder() -> PromptBuilder:
    return PromptBuilder(ByteTokenizer(), LLM, MIND)


def test_incremental_text_yields_deltas_in_order() -> None:
    p = builder()
    inc = IncrementalText(p)
    deltas = [inc.push(p.encode(piece)) for piece in ("Hel", "lo", ", ", "", "world.")]
    assert deltas == ["Hel", "lo", ", ", "", "world."]
    assert inc.text == "Hello, world."
    assert inc.ids == p.encode("Hello, world.")


def test_incremental_text_holds_back_an_incomplete_character() -> None:
    p = byte_builder()
    inc = IncrementalText(p)
    euro = "€".encode()  # three bytes
    assert inc.push(list(b"caf")) == "caf"
    assert inc.push([euro[0]]) == ""
    assert inc.push([euro[1]]) == ""
    assert inc.push([euro[2], ord("!")]) == "€!"
    assert inc.text == "caf€!"


def test_incremental_text_deltas_concatenate_to_the_full_text() -> None:
    p = byte_builder()
    inc = IncrementalText(p)
    data = "naïve café – 你好 👋 ok".encode()
    out = "".join(inc.push([b]) for b in data)
    assert out == data.decode("utf-8")
    assert "\ufffd" not in out


def test_incremental_text_skips_special_tokens() -> None:
    p = builder()
    inc = IncrementalText(p)
    assert inc.push([*p.encode("Hi"), p.tokenizer.eos_token_id]) == "Hi"


# ---------------------------------------------------------------- fitting a long conversation


class CountingTokenizer(FakeTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.encoded_chars = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded_chars += len(text)
        return super().encode(text, add_special_tokens)

    def apply_chat_template(self, chat: Sequence[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> object:
        if tokenize:
            self.encoded_chars += sum(len(m["content"]) for m in chat)
        return super().apply_chat_template(chat, add_generation_prompt, tokenize)


def history(n: int) -> list[ChatMessage]:
    return [ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i} says something") for i in range(n)]


def test_fit_is_the_newest_messages_that_fit() -> None:
    p = builder()
    assert p.segmented
    msgs = history(40)
    for budget in (60, 200, 500, 5000):
        ids = p.fit(msgs, budget)
        assert len(ids) <= budget
        # The same prompt as dropping the oldest message until it fits, re-tokenizing each time.
        assert ids == p._fit_slowly(msgs, budget, None, False, ())
    assert p.fit(msgs, 5000, "X", thinking=True) == p.conversation(msgs, "X", thinking=True)
    # A newest message too long on its own keeps its end and the generation prompt.
    long = [ChatMessage("user", "a" * 500)]
    assert text_of(p, p.fit(long, 100)).endswith("aaa<|im_end|>\n<|im_start|>assistant\n")


def test_fit_costs_the_new_text_not_the_history() -> None:
    """1,000 items froze every session for seconds: each dropped message re-tokenized the whole history."""
    tok = CountingTokenizer()
    p = PromptBuilder(tok, LLM, MIND)
    msgs = history(1000)
    tok.encoded_chars = 0
    p.fit(msgs, 300)
    first = tok.encoded_chars
    assert first < 2000  # only the messages that fit (~300 tokens of them), not 1,000 messages
    tok.encoded_chars = 0
    p.fit([*msgs, ChatMessage("user", "and one more")], 300)
    assert tok.encoded_chars < 100  # the new message only: the rest is cached


def test_a_template_that_does_not_split_per_message_falls_back() -> None:
    class Joined(FakeTokenizer):
        def apply_chat_template(self, chat: Sequence[dict[str, str]], add_generation_prompt: bool = False,
                                tokenize: bool = True) -> object:
            # Numbers each message: a message renders differently depending on what came before it.
            text = "".join(f"<|im_start|>{n}{m['role']}\n{m['content']}<|im_end|>\n" for n, m in enumerate(chat))
            if add_generation_prompt:
                text += "<|im_start|>assistant\n"
            return text if not tokenize else self.encode(text)

    p = PromptBuilder(Joined(), LLM, MIND)
    assert not p.segmented
    msgs = history(10)
    assert p.fit(msgs, 10_000) == p.conversation(msgs)
    assert len(p.fit(msgs, 100)) <= 100
