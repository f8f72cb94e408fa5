"""The mind pacer: one turn of Mind-Paced Speaking on the shared engine.

The Formulation Brain (FB) runs as one long sequence writing thought. The Articulation Brain (AB)
speaks in segments: each segment is a fresh request whose prompt is rebuilt by the MPS rule with all
thought so far, so every new segment of thought feeds the next segment of speech. The engine reuses
the FB's keys/values for the shared prefix, so a new AB segment costs only its few new tokens.

Modes (MPS §3): `speak-first` (AB at once; FB keeps ahead), `think-first` (one thought segment first),
`tbs` (think fully, then speak), `nothink` (AB alone, the latency baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from brains.engine import GenerationEngine, GenerationRequest, TokenStream
from brains.prompts import IncrementalText, PromptBuilder
from brains.tools import call_complete
from common.config import LlmConfig, MindConfig, PacingMode

log = logging.getLogger(__name__)

SENTENCE_END = (".", "!", "?")
TAG = re.compile(r"</?[A-Za-z_]+>")
PARTIAL_TAG = re.compile(r"</?[A-Za-z_]*$")


@dataclass(frozen=True)
class ThoughtDelta:
    text: str


@dataclass(frozen=True)
class ReplyDelta:
    text: str


@dataclass
class TurnStats:
    mode: str
    fb_first_token: float | None = None
    ab_first_token: float | None = None
    fb_tokens_before_reply: int = 0
    thought_tokens: int = 0
    reply_tokens: int = 0
    ab_segments: int = 0
    prefill_reused: int = 0
    fb_finished: float | None = None


@dataclass(frozen=True)
class ToolCall:
    """The AB asked for a tool: the text between <tool_call> and </tool_call> (JSON with name, arguments)."""

    text: str


@dataclass(frozen=True)
class PacerDone:
    reply: str
    thought: str
    stats: TurnStats
    cancelled: bool = False


PacerEvent = ThoughtDelta | ReplyDelta | ToolCall | PacerDone


@dataclass
class _Thought:
    """What the FB has written so far; `changed` wakes the AB driver on each new segment or the end."""

    ids: list[int] = field(default_factory=list)
    segments: int = 0
    done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the FB may start: at once, or (speak-first) after the AB's head start.
    may_start: asyncio.Event = field(default_factory=asyncio.Event)


class MindPacer:
    def __init__(self, engine: GenerationEngine, prompts: PromptBuilder, mind: MindConfig, llm: LlmConfig,
                 mode: PacingMode, session_id: str = "",
                 audio_ahead_ms: Callable[[], float] | None = None, tool_prefix: str | None = None,
                 reply_prefix: str = "") -> None:
        self.engine = engine
        self.prompts = prompts
        self.mind = mind
        self.llm = llm
        self.mode = mode
        self.session_id = session_id
        self.audio_ahead_ms = audio_ahead_ms or (lambda: 0.0)
        # With tools offered, "<tool_call>" in the AB's text starts a call instead of ending the reply;
        # a forced call (tool_choice) starts the reply with this prefix, e.g. '<tool_call>{"name": "f", '.
        self.tools = tool_prefix is not None
        self.tool_prefix = tool_prefix or ""
        # The start of the reply, already said: the AB goes on writing after it (a reply resumed after a
        # false interruption, cut while it was being written). Not part of the deltas or the returned reply.
        self.reply_prefix = reply_prefix
        self._streams: set[TokenStream] = set()
        self._out: asyncio.Queue[PacerEvent | None] = asyncio.Queue()
        self.stats = TurnStats(mode=mode)
        self.cancelled = False

    @property
    def thinking(self) -> bool:
        return self.mode != "nothink"

    @property
    def head_start(self) -> int:
        """AB tokens written before the FB is submitted. Only speak-first's AB starts with no thought to wait
        for; there, an FB submitted with it would share its first steps: the engine makes the AB wait for
        the FB's prefill of their common prefix (a step), then every step runs both (on a CPU, a batch of 2
        costs more than 1). Started after the AB's first tokens, the FB copies that prefix from the AB's
        slot instead (brains/engine.py), so it still prefills nothing, and the AB's first token comes as soon
        as in nothink. Its price: the FB's thought starts about that many steps later."""
        return self.mind.ab_head_start_tokens if self.mode == "speak-first" else 0

    def cancel(self) -> None:
        """End the turn: no brain submits anything more, and the running streams stop."""
        self.cancelled = True
        for stream in list(self._streams):
            stream.cancel()

    async def run(self, conversation: list[int]) -> AsyncIterator[PacerEvent]:
        """Yield thought and reply deltas as they come, then one PacerDone."""
        thought = _Thought()
        if not self.head_start:
            thought.may_start.set()
        tasks = []
        if self.thinking:
            tasks.append(asyncio.create_task(self._formulate(conversation, thought)))
        speaker = asyncio.create_task(self._articulate(conversation, thought))
        tasks.append(speaker)
        speaker.add_done_callback(lambda _: self._out.put_nowait(None))
        streamed_thought = ""  # what the client saw, which PacerDone must agree with
        try:
            while (event := await self._out.get()) is not None:
                if isinstance(event, ThoughtDelta):
                    streamed_thought += event.text
                yield event
            reply, _ = speaker.result()
            self.stats.thought_tokens = len(thought.ids)
            yield PacerDone(reply, streamed_thought.strip(), self.stats, cancelled=self.cancelled)
        finally:
            self.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _submit(self, prompt: list[int], max_new: int, brain: str) -> TokenStream:
        req = GenerationRequest(
            prompt=prompt, max_new_tokens=max_new, brain="fb" if brain == "fb" else "ab",
            session_id=self.session_id, stop_ids=self.prompts.stop_ids, temperature=self.llm.temperature,
            audio_ahead_ms=self.audio_ahead_ms if brain == "ab" else None)
        stream = self.engine.submit(req)
        self._streams.add(stream)
        return stream

    # ---- formulation brain --------------------------------------------------------------------
    async def _formulate(self, conversation: list[int], thought: _Thought) -> None:
        await thought.may_start.wait()
        if self.cancelled:
            thought.done = True
            thought.changed.set()
            return
        stream = self._submit(self.prompts.fb_prompt(conversation), self.mind.max_thought_tokens, "fb")
        text = IncrementalText(self.prompts)
        seg = self.mind.thought_segment_tokens
        try:
            async for ids in stream:
                if self.stats.fb_first_token is None:
                    self.stats.fb_first_token = time.perf_counter()
                thought.ids.extend(ids)
                end = self.prompts.thought_end(thought.ids)
                if end is not None:
                    del thought.ids[end:]
                    stream.cancel()
                delta = text.push(ids) if end is None else ""
                if delta:
                    self._out.put_nowait(ThoughtDelta(delta))
                if end is not None:
                    break
                if len(thought.ids) >= (thought.segments + 1) * seg:
                    thought.segments += 1
                    thought.changed.set()
        finally:
            self._streams.discard(stream)
            self.stats.thought_tokens = len(thought.ids)
            self.stats.fb_finished = time.perf_counter()
            thought.done = True
            thought.changed.set()

    # ---- articulation brain -------------------------------------------------------------------
    async def _articulate(self, conversation: list[int], thought: _Thought) -> tuple[str, str]:
        reply = IncrementalText(self.prompts)
        if self.tool_prefix:
            reply.ids.extend(self.prompts.encode(self.tool_prefix))
            reply.text = self.prompts.decode(reply.ids)
        sent = 0  # characters of reply.text already handed out as deltas
        if self.reply_prefix:
            reply.ids.extend(self.prompts.encode(self.reply_prefix))
            reply.text = self.prompts.decode(reply.ids)
            sent = len(reply.text)
        said = sent  # reply.text[:said] is the prefix
        if self.mode == "think-first":
            await self._wait(thought, lambda: thought.segments >= 1 or thought.done)
        elif self.mode == "tbs":
            await self._wait(thought, lambda: thought.done)
        budget = self.llm.max_reply_tokens
        silent_restarts = 0
        called = False  # the AB called a tool: that is its answer, not silence
        plain = False  # speak without the thought block (after the AB twice began with a tag)
        while budget > 0 and not self.cancelled:
            used = list(thought.ids) if self.thinking and not plain else None
            final = not self.thinking or thought.done
            limit = budget if final else min(budget, self.mind.reply_segment_tokens)
            seen_segments = thought.segments
            ended = False
            prompt = self.prompts.ab_prompt(conversation, used, reply.ids)
            stream = self._submit(prompt, limit, "ab")
            self.stats.ab_segments += 1
            produced = 0
            try:
                async for ids in stream:
                    if self.stats.ab_first_token is None:
                        self.stats.ab_first_token = time.perf_counter()
                        self.stats.fb_tokens_before_reply = len(thought.ids)
                    produced += len(ids)
                    reply.push(ids)
                    if produced >= self.head_start:  # tokens written now: a tool or resumed prefix is no head start
                        thought.may_start.set()
                    tag = TAG.search(reply.text)
                    if self.tools and tag is not None and tag.group() == "<tool_call>":
                        call = reply.text[tag.end():]
                        if not call_complete(call):
                            continue  # the call is still being written
                        self._out.put_nowait(ToolCall(call))
                        reply.text = reply.text[: tag.start()]
                        ended = called = True
                    elif tag is not None:
                        # The AB opened or closed a tag ("</think>", "<step>"): its reply is over, and none
                        # of that markup may reach the listener.
                        reply.text = reply.text[: tag.start()]
                        ended = True
                    # Hold back a trailing "<..." until we know whether it starts a tag.
                    pending = PARTIAL_TAG.search(reply.text)
                    safe = pending.start() if pending is not None and not ended else len(reply.text)
                    if safe > sent:
                        self._out.put_nowait(ReplyDelta(reply.text[sent:safe]))
                        sent = safe
                    if ended:
                        stream.cancel()
                        break
                    # New thought arrived: end this segment at a sentence boundary and re-prompt with it.
                    if (not final and (thought.segments > seen_segments or thought.done)
                            and reply.text.rstrip().endswith(SENTENCE_END)):
                        stream.cancel()
                        break
            finally:
                self._streams.discard(stream)
                self.stats.prefill_reused += stream.reused_prefix
                # The first segment ended short of the head start (a short reply, a tag, a cancel): the FB
                # may not wait for tokens that will never come.
                thought.may_start.set()
            budget -= produced
            self.stats.reply_tokens = len(reply.ids)
            reason = stream.finish.reason if stream.finish is not None else None
            if self.tools and not ended and (reason == "stop" or budget <= 0):
                # The AB stopped inside an unclosed call: hand over what it wrote; the client judges it.
                tag = TAG.search(reply.text)
                if tag is not None and tag.group() == "<tool_call>":
                    self._out.put_nowait(ToolCall(reply.text[tag.end():].strip()))
                    reply.text = reply.text[: tag.start()]
                    ended = called = True
            if ended and not called and not reply.text.strip() and silent_restarts < 2 and budget > 0:
                # The AB opened a tag (another <think>...) before saying a word: a turn must not end silent.
                # Try again with more thought, then without the thought block at all.
                silent_restarts += 1
                plain = silent_restarts == 2 or final
                reply = IncrementalText(self.prompts)
                sent = 0
                if not final and not plain:
                    await self._wait_for_next_segment(thought, seen_segments)
                continue
            if self.cancelled or ended or (stream.finish is not None and stream.finish.reason == "stop"):
                break  # the AB ended its reply
            if produced == 0 and final:
                break
            if not final:
                await self._wait_for_next_segment(thought, seen_segments)
        return reply.text[said:].strip(), self.prompts.decode(thought.ids).strip()

    async def _wait_for_next_segment(self, thought: _Thought, seen: int) -> None:
        """Until new thought arrives, the thought ends, or audio would run dry (then speak on regardless)."""
        low_water = self.mind.urgent_audio_ms / 2
        while not (thought.segments > seen or thought.done):
            if self.audio_ahead_ms() < low_water:
                return
            thought.changed.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation (a barge-in) that comes
            # as the thought lands (realtime/bus/cancel.py), and this reply would speak on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await thought.changed.wait()

    @staticmethod
    async def _wait(thought: _Thought, ready: Callable[[], bool]) -> None:
        while not ready():
            thought.changed.clear()
            if ready():
                return
            await thought.changed.wait()
