"""The mind pacer on a real Engine with the fake backend: when each brain is asked, and with what prompt."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from brains.engine import GenerationRequest, TokenStream
from brains.pacer import MindPacer, PacerDone, PacerEvent, ReplyDelta, ThoughtDelta, _Thought
from brains.prompts import ChatMessage, PromptBuilder
from brains.scheduler import SchedulerConfig
from common.config import LlmConfig, MindConfig, PacingMode
from tests.brains.fakes import FakeBackend, FakeTokenizer, RecordingEngine, collect

THOUGHT = "one two three four five six seven eight nine ten."
REPLY = "Fine. Sure thing. All done."
SEG = 4  # thought segment, tokens (= characters here)
REPLY_SEG = 6

# Both brains start together unless a test gives the AB a head start (those tests say so): the segment rules
# tested here do not depend on it, and each test then knows the FB's request exists when the AB's does.
MIND = MindConfig(thought_segment_tokens=SEG, reply_segment_tokens=REPLY_SEG, max_thought_tokens=200,
                  ab_head_start_tokens=0)
LLM = LlmConfig(max_reply_tokens=100, temperature=0.0)


class ScriptedModel:
    """The fake model's next token, read from the slot's cached history only.

    After the assistant header: `<think>\\n` + body  -> FB: the next character of THOUGHT, then `</think>`;
    `<think>\\n` + thought + `\\n</think>\\n` + reply -> AB: the next character of REPLY, then end of turn;
    no think block (nothink) + reply -> AB likewise.
    `hold_fb_at=k` makes the FB's forward for thought character k block until `release` is set.
    """

    def __init__(self, tok: FakeTokenizer, hold_fb_at: int | None = None) -> None:
        self.tok = tok
        self.im_start = tok.specials["<|im_start|>"]
        self.header = tok.encode("assistant\n")
        self.think_open = tok.encode(MIND.think_open)
        self.close_id = tok.specials["</think>"]
        self.eos = tok.eos_token_id
        self.hold_fb_at = hold_fb_at
        self.ab_tag_with_thought = ""  # an AB prompted with a think block writes this first (e.g. "<x>")
        self.release = threading.Event()
        self.held = threading.Event()

    def __call__(self, history: Sequence[int]) -> int:
        hist = list(history)
        if self.im_start not in hist:
            return self.eos
        start = len(hist) - hist[::-1].index(self.im_start) + len(self.header)
        rest = hist[start:]
        if rest[: len(self.think_open)] == self.think_open:
            body = rest[len(self.think_open):]
            if self.close_id in body:  # AB: the reply starts after "</think>\n"
                said = body[body.index(self.close_id) + 2:]
                script = self.ab_tag_with_thought + REPLY
                return ord(script[len(said)]) if len(said) < len(script) else self.eos
            k = len(body)
            if k == self.hold_fb_at and not self.release.is_set():
                self.held.set()
                self.release.wait(timeout=5)
            return ord(THOUGHT[k]) if k < len(THOUGHT) else self.close_id
        return self._reply(rest)

    def _reply(self, said: Sequence[int]) -> int:
        k = len(said)
        return ord(REPLY[k]) if k < len(REPLY) else self.eos


@dataclass
class Rig:
    engine: RecordingEngine
    backend: FakeBackend
    model: ScriptedModel
    prompts: PromptBuilder
    conversation: list[int]
    consumed: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> tokens the pacer has read

    def tokens(self, ids: Sequence[int]) -> str:
        return str(self.prompts.tokenizer.decode(list(ids), skip_special_tokens=False))

    def split_ab(self, prompt: Sequence[int]) -> tuple[list[int] | None, list[int]]:
        """An AB prompt -> (thought, reply) per the MPS rule; thought None when there is no think block."""
        conv, p = self.conversation, list(prompt)
        assert p[: len(conv)] == conv, "AB prompt does not start with the conversation"
        rest = p[len(conv):]
        open_, close = self.prompts.think_open, self.prompts.think_close
        if rest[: len(open_)] != open_:
            return None, rest
        body = rest[len(open_):]
        for i in range(len(body) - len(close) + 1):
            if body[i: i + len(close)] == close:
                return body[:i], body[i + len(close):]
        raise AssertionError(f"no think close in {self.tokens(prompt)!r}")


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    tok = FakeTokenizer(native_think=True)
    prompts = PromptBuilder(tok, LLM, MIND)
    model = ScriptedModel(tok)
    backend = FakeBackend(slots=8, max_len=512, vocab=FakeTokenizer.unk_token_id + 1, next_token=model)
    engine = RecordingEngine(backend, SchedulerConfig(token_budget=256, max_batch=16, prefill_chunk=128))
    conv = prompts.conversation([ChatMessage("user", "What is one plus one?")], thinking=True)
    r = Rig(engine, backend, model, prompts, conv)

    original = TokenStream.__anext__

    async def spy(self: TokenStream) -> list[int]:
        batch = await original(self)
        r.consumed.setdefault(self.seq_id, []).extend(batch)
        return batch

    monkeypatch.setattr(TokenStream, "__anext__", spy)
    engine.start()
    yield r
    model.release.set()
    backend.resume()
    engine.close()


async def run_pacer(pacer: MindPacer, conversation: list[int], timeout: float = 10.0) -> list[PacerEvent]:
    async def run() -> list[PacerEvent]:
        return [event async for event in pacer.run(conversation)]

    return await asyncio.wait_for(run(), timeout)


def make_pacer(r: Rig, mode: PacingMode, mind: MindConfig = MIND) -> MindPacer:
    return MindPacer(r.engine, r.prompts, mind, LLM, mode, session_id="s1")


def check_done(events: list[PacerEvent], thinking: bool, full_thought: bool = False) -> PacerDone:
    """The turn's events: deltas, then exactly one PacerDone at the end, all consistent with each other.

    The turn ends when the AB has finished its reply; a still-running FB is cut off then, so its thought
    is whole only where the mode waits for it (`full_thought`).
    """
    done = events[-1]
    assert isinstance(done, PacerDone)
    assert not any(isinstance(e, PacerDone) for e in events[:-1])
    assert not done.cancelled
    assert done.reply == REPLY
    assert "".join(e.text for e in events if isinstance(e, ReplyDelta)) == REPLY
    thought_text = "".join(e.text for e in events if isinstance(e, ThoughtDelta))
    if not thinking:
        assert done.thought == thought_text == ""
        return done
    assert THOUGHT.startswith(thought_text)
    # (The FB may still push a delta between the AB's end and PacerDone, so the deltas can run ahead of
    # done.thought by a token or two: see the report.)
    assert thought_text.startswith(done.thought) and THOUGHT.startswith(done.thought)
    if full_thought:
        assert done.thought == thought_text == THOUGHT
    return done


def ab_thoughts(r: Rig) -> list[list[int] | None]:
    return [r.split_ab(req.prompt)[0] for req, _ in r.engine.by_brain("ab")]


# ---------------------------------------------------------------- modes


async def test_nothink_never_asks_the_fb(rig: Rig) -> None:
    pacer = make_pacer(rig, "nothink")
    done = check_done(await run_pacer(pacer, rig.conversation), thinking=False)
    assert rig.engine.by_brain("fb") == []
    assert rig.engine.by_brain("ab")
    for req, _ in rig.engine.by_brain("ab"):
        thought, _reply = rig.split_ab(req.prompt)
        assert thought is None  # no think block at all
        assert rig.prompts.think_end_id not in req.prompt[len(rig.conversation):]
    assert done.stats.mode == "nothink"
    assert done.stats.thought_tokens == 0
    assert done.stats.fb_first_token is None


async def test_tbs_speaks_only_after_the_fb_finished(rig: Rig) -> None:
    pacer = make_pacer(rig, "tbs")
    at_first_ab: dict[str, object] = {}

    def on_submit(req: GenerationRequest, _stream: TokenStream) -> None:
        if req.brain == "ab" and not at_first_ab:
            at_first_ab["fb_finished"] = pacer.stats.fb_finished
            at_first_ab["fb_submitted"] = len(rig.engine.by_brain("fb"))

    rig.engine.on_submit = on_submit
    done = check_done(await run_pacer(pacer, rig.conversation), thinking=True, full_thought=True)
    assert at_first_ab["fb_submitted"] == 1
    assert at_first_ab["fb_finished"] is not None
    # Think fully, then speak: one AB request, prompted with the whole thought.
    assert ab_thoughts(rig) == [rig.prompts.encode(THOUGHT)]
    assert done.stats.ab_segments == 1
    assert done.stats.fb_tokens_before_reply == len(THOUGHT)
    fb_req = rig.engine.by_brain("fb")[0][0]
    assert list(fb_req.prompt) == rig.prompts.fb_prompt(rig.conversation)
    assert fb_req.max_new_tokens == MIND.max_thought_tokens


async def test_think_first_waits_for_one_thought_segment(rig: Rig) -> None:
    hold_at = 2 * SEG  # the FB stalls after two segments until the AB has been asked
    rig.model.hold_fb_at = hold_at
    pacer = make_pacer(rig, "think-first")
    at_first_ab: dict[str, object] = {}

    def on_submit(req: GenerationRequest, _stream: TokenStream) -> None:
        if req.brain == "ab" and not at_first_ab:
            fb_stream = rig.engine.by_brain("fb")[0][1]
            at_first_ab["fb_read"] = list(rig.consumed.get(fb_stream.seq_id, []))
            at_first_ab["fb_finished"] = pacer.stats.fb_finished
            rig.model.release.set()

    rig.engine.on_submit = on_submit
    done = check_done(await run_pacer(pacer, rig.conversation), thinking=True)
    first_thought = ab_thoughts(rig)[0]
    assert first_thought is not None
    assert SEG <= len(first_thought) <= hold_at
    assert first_thought == rig.prompts.encode(THOUGHT[: len(first_thought)])
    # The AB started while the FB was still thinking (not think-fully-then-speak).
    assert at_first_ab["fb_finished"] is None
    assert first_thought == at_first_ab["fb_read"]
    assert done.stats.fb_tokens_before_reply >= SEG


async def test_speak_first_without_head_start_asks_both_brains_at_once(rig: Rig) -> None:
    rig.backend.pause()  # no forward runs: the FB cannot have written anything
    pacer = make_pacer(rig, "speak-first")
    task = asyncio.create_task(run_pacer(pacer, rig.conversation))

    async def both_submitted() -> None:
        while not (rig.engine.by_brain("ab") and rig.engine.by_brain("fb")):
            rig.engine.submit_event.clear()
            await rig.engine.submit_event.wait()

    await asyncio.wait_for(both_submitted(), 5)
    assert rig.backend.passed == 0
    assert pacer.stats.fb_first_token is None
    first_thought = ab_thoughts(rig)[0]
    assert first_thought == []  # an empty think block: nothing thought yet
    rig.backend.resume()
    done = check_done(await task, thinking=True)
    assert done.stats.ab_segments >= 2


async def test_speak_first_asks_the_ab_at_once_and_the_fb_after_its_head_start(rig: Rig) -> None:
    head = 3
    rig.backend.pause()
    pacer = make_pacer(rig, "speak-first", dataclasses.replace(MIND, ab_head_start_tokens=head))
    fb_asked_after: list[int] = []

    def on_submit(req: GenerationRequest, _stream: TokenStream) -> None:
        if req.brain == "fb":
            ab_stream = rig.engine.by_brain("ab")[0][1]
            fb_asked_after.append(len(rig.consumed.get(ab_stream.seq_id, [])))

    rig.engine.on_submit = on_submit
    task = asyncio.create_task(run_pacer(pacer, rig.conversation))
    while not rig.engine.by_brain("ab"):
        rig.engine.submit_event.clear()
        await asyncio.wait_for(rig.engine.submit_event.wait(), 5)
    await asyncio.sleep(0.05)  # time enough for a wrongly eager FB to be submitted
    assert rig.engine.by_brain("fb") == [], "the FB was asked before the AB wrote a token"
    assert ab_thoughts(rig)[0] == []
    rig.backend.resume()
    done = check_done(await task, thinking=True)
    assert fb_asked_after and fb_asked_after[0] >= head
    assert done.stats.fb_tokens_before_reply == 0
    # The FB prefilled nothing: its whole prompt but the last token was copied from the AB's keys/values.
    fb_req, fb_stream = rig.engine.by_brain("fb")[0]
    assert fb_stream.reused_prefix == len(fb_req.prompt) - 1
    assert done.stats.ab_segments >= 2  # and its thought still reached the later segments
    assert any(thought for thought in ab_thoughts(rig)[1:])


async def test_the_fb_starts_when_the_first_segment_ends_short_of_the_head_start(rig: Rig) -> None:
    """A first segment shorter than the head start (here capped at REPLY_SEG tokens) must not leave the FB
    waiting for tokens that never come: it is asked when the segment ends, and the turn completes."""
    pacer = make_pacer(rig, "speak-first", dataclasses.replace(MIND, ab_head_start_tokens=10 * REPLY_SEG))
    check_done(await run_pacer(pacer, rig.conversation), thinking=True)
    assert len(rig.engine.by_brain("fb")) == 1
    first_ab = rig.engine.by_brain("ab")[0][1]
    assert len(rig.consumed.get(first_ab.seq_id, [])) == REPLY_SEG


async def test_only_speak_first_gives_the_ab_a_head_start(rig: Rig) -> None:
    mind = dataclasses.replace(MIND, ab_head_start_tokens=5)
    for mode in ("think-first", "tbs", "nothink"):
        assert make_pacer(rig, mode, mind).head_start == 0
    assert make_pacer(rig, "speak-first", mind).head_start == 5


# ---------------------------------------------------------------- segment prompts


async def test_each_ab_segment_is_prompted_with_all_thought_so_far(rig: Rig) -> None:
    pacer = make_pacer(rig, "speak-first")
    seen: list[tuple[list[int] | None, list[int], list[int], bool, list[int]]] = []

    def on_submit(req: GenerationRequest, _stream: TokenStream) -> None:
        if req.brain != "ab":
            return
        thought, reply = rig.split_ab(req.prompt)
        fb_stream = rig.engine.by_brain("fb")[0][1]
        fb_read = list(rig.consumed.get(fb_stream.seq_id, []))
        said = [t for _, s in rig.engine.by_brain("ab")[:-1] for t in rig.consumed.get(s.seq_id, [])]
        seen.append((thought, reply, fb_read, pacer.stats.fb_finished is not None, said))

    rig.engine.on_submit = on_submit
    done = check_done(await run_pacer(pacer, rig.conversation), thinking=True)
    full = rig.prompts.encode(THOUGHT)
    # The first segment is capped at REPLY_SEG tokens, so the reply takes at least two.
    assert len(seen) == done.stats.ab_segments >= 2
    previous: list[int] = []
    for n, (thought, reply, fb_read, fb_done, said) in enumerate(seen):
        assert thought is not None
        assert reply == said, "the AB prompt must carry everything the AB already said"
        # All thought so far: every token the FB has handed over (minus its closing tag), from the start.
        if fb_done:
            assert thought == full
        else:
            assert thought == fb_read[: len(thought)] == full[: len(thought)]
            assert len(thought) >= SEG * (len(fb_read) // SEG), (n, len(thought), len(fb_read))
        assert thought[: len(previous)] == previous  # it only grows
        previous = thought
        assert reply == rig.prompts.encode(REPLY[: len(reply)])
    assert seen[0][0] == []  # speak-first: the first segment starts before any thought
    assert seen[1][0], "the second segment saw no thought"
    # The later segments reuse cached keys/values (the FB's thought prefix or the previous segment).
    assert done.stats.prefill_reused > 0


async def test_reply_segments_end_at_sentences_when_thought_arrives(rig: Rig) -> None:
    """A segment ends at its token limit, or early on a sentence boundary because new thought arrived."""
    pacer = make_pacer(rig, "speak-first")
    await run_pacer(pacer, rig.conversation)
    replies = [rig.split_ab(req.prompt)[1] for req, _ in rig.engine.by_brain("ab")]
    cut_early = 0
    for before, after in itertools.pairwise(replies):
        produced = len(after) - len(before)
        assert 0 < produced <= REPLY_SEG
        if produced < REPLY_SEG:
            cut_early += 1
            assert rig.prompts.decode(after).rstrip().endswith((".", "!", "?")), rig.prompts.decode(after)
    assert cut_early > 0


async def test_pacer_cancel_cancels_the_engine_streams(rig: Rig) -> None:
    rig.model.hold_fb_at = 2  # stall the engine mid-turn
    pacer = make_pacer(rig, "speak-first")
    task = asyncio.create_task(run_pacer(pacer, rig.conversation))
    assert await asyncio.to_thread(rig.model.held.wait, 5)
    first = list(rig.engine.submitted)
    assert {r.brain for r, _ in first} == {"fb", "ab"}
    pacer.cancel()
    rig.model.release.set()
    events = await task
    assert isinstance(events[-1], PacerDone)
    for _req, stream in rig.engine.submitted:
        await collect(stream)  # whatever the pacer left unread, up to the end
    for _req, stream in first:
        assert stream.finish is not None and stream.finish.reason == "cancelled"
    assert rig.engine.live_sequences() == 0


async def test_pacer_cancel_ends_the_turn(rig: Rig) -> None:
    rig.model.hold_fb_at = 2
    pacer = make_pacer(rig, "speak-first")
    task = asyncio.create_task(run_pacer(pacer, rig.conversation))
    assert await asyncio.to_thread(rig.model.held.wait, 5)
    submitted_before = len(rig.engine.submitted)
    pacer.cancel()
    rig.model.release.set()
    events = await task
    done = events[-1]
    assert isinstance(done, PacerDone)
    assert len(rig.engine.submitted) == submitted_before, "new requests after cancel"
    assert done.cancelled
    assert done.reply != REPLY


async def test_an_ab_that_opens_a_tag_before_a_word_still_answers(rig: Rig) -> None:
    """A small model may start its reply with markup ("<think>" again); the turn must not end silent."""
    rig.model.ab_tag_with_thought = "<x>"
    events = await run_pacer(make_pacer(rig, "speak-first"), rig.conversation)
    done = events[-1]
    assert isinstance(done, PacerDone) and done.reply == REPLY.strip()
    assert "".join(e.text for e in events if isinstance(e, ReplyDelta)).strip() == REPLY.strip()
    assert "<" not in "".join(e.text for e in events if isinstance(e, ReplyDelta))
    # It retried with more thought, then spoke without the thought block.
    assert ab_thoughts(rig)[-1] is None and len(ab_thoughts(rig)) >= 2


async def test_a_forced_tool_call_is_the_whole_answer(rig: Rig) -> None:
    """A call with no words around it is an answer, not a silent turn to retry."""
    from brains.pacer import ToolCall

    pacer = MindPacer(rig.engine, rig.prompts, MIND, LLM, "nothink", session_id="s1",
                      tool_prefix='<tool_call>{"name": "f", "arguments": {"a": 1}}')
    events = await run_pacer(pacer, rig.conversation)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 1 and '"name": "f"' in calls[0].text
    assert not [e for e in events if isinstance(e, ReplyDelta)]
    assert len(ab_thoughts(rig)) == 1, "no second AB request after the call"


@pytest.mark.parametrize("mode", ["nothink", "speak-first", "think-first"])
async def test_the_reply_never_exceeds_max_reply_tokens(rig: Rig, mode: PacingMode) -> None:
    """`llm.max_reply_tokens` caps the whole reply, across AB segments and restarts (issue 11)."""
    cap = 10  # REPLY is 27 tokens (one a character); segments are REPLY_SEG = 6
    llm = dataclasses.replace(LLM, max_reply_tokens=cap)
    pacer = MindPacer(rig.engine, rig.prompts, MIND, llm, mode, session_id="s1")
    events = await run_pacer(pacer, rig.conversation)
    done = events[-1]
    assert isinstance(done, PacerDone)
    said = "".join(e.text for e in events if isinstance(e, ReplyDelta))
    assert 0 < len(said) <= cap and REPLY.startswith(said)
    assert done.stats.reply_tokens <= cap
    assert all(req.max_new_tokens <= cap for req, _ in rig.engine.by_brain("ab"))


async def test_a_reply_prefix_is_written_on_from_and_not_said_again(rig: Rig) -> None:
    """A reply resumed after a false interruption: the AB goes on after what was already said."""
    prefix = "Fine. Sure"
    pacer = MindPacer(rig.engine, rig.prompts, MIND, LLM, "nothink", session_id="s1", reply_prefix=prefix)
    events = await run_pacer(pacer, rig.conversation)
    said = "".join(e.text for e in events if isinstance(e, ReplyDelta))
    assert said == REPLY[len(prefix):]
    done = events[-1]
    assert isinstance(done, PacerDone) and done.reply == REPLY[len(prefix):].strip()


async def test_a_barge_in_as_new_thought_lands_still_stops_the_reply() -> None:
    """The AB driver waits for the next thought segment with a timeout; a cancellation (a barge-in) in the same
    loop pass as the thought's wake-up must end it. Python 3.11's `asyncio.wait_for` returned instead, and the
    reply spoke on."""
    pacer = SimpleNamespace(mind=MindConfig(), audio_ahead_ms=lambda: 10_000.0)  # plenty of audio: it waits
    thought = _Thought()
    waiting = asyncio.create_task(MindPacer._wait_for_next_segment(pacer, thought, 0))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)  # waiting on `changed`
    thought.segments += 1
    thought.changed.set()
    waiting.cancel()  # the barge-in, in the same pass
    await asyncio.wait([waiting], timeout=5)
    assert waiting.cancelled(), "the wait returned as if no one had asked it to stop"
