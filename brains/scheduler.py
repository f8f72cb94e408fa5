"""Mind-paced scheduling: which sequences run in the next engine step. Pure: no tensors, no clocks.

Like vLLM's `schedule()`, it sees a snapshot of every live sequence and returns a plan; the engine
executes it. The policy (Mind-Paced Speaking, docs/architecture.md), `rank`, which the vLLM engine
(brains/backends/vllm_engine.py) also schedules by:

1. Articulation (AB) sequences whose queued audio ahead of playback is under `urgent_audio_ms` go first,
   the one closest to running dry first: a late AB token is an audible gap.
2. Formulation (FB) sequences of all sessions fill the rest, least recently served first, so every
   session's thought keeps moving even when the budget is short.
3. AB sequences with plenty of audio queued run last: their deadline is far, but the step is
   work-conserving, so they still run whenever the budget allows.

A decode costs one token of the step's budget; a prefill costs its chunk (at most `prefill_chunk`
tokens, so a long new prompt never stalls running decodes for long).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Brain = Literal["fb", "ab"]


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int = 256
    max_batch: int = 64
    prefill_chunk: int = 128
    urgent_audio_ms: float = 1500.0


@dataclass(frozen=True)
class SeqView:
    seq_id: int
    session_id: str
    brain: Brain
    prefill_left: int  # prompt tokens whose keys/values are not computed yet (0 = decoding)
    audio_ahead_ms: float  # AB only: audio queued ahead of the client's playback clock
    # When this sequence last ran, as a stamp that grows with every sequence the engine serves (not a step
    # number: sequences served in one step would tie); -1 = never. Lower = waited longer, so it goes first.
    last_step: int
    arrival: int  # admission order, the final tie-break


@dataclass(frozen=True)
class StepPlan:
    decode: tuple[int, ...] = ()
    prefill: tuple[tuple[int, int], ...] = ()  # (seq_id, tokens to prefill this step)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


def rank(brain: Brain, audio_ahead_ms: float, urgent_audio_ms: float) -> tuple[int, float]:
    """The mind-paced policy as (tier, audio key), lower runs first: 0 = urgent AB (closest to running dry
    first), 1 = FB (its audio field means nothing), 2 = AB with plenty of audio queued. The one rule both
    engines schedule by: `priority` below for the torch engine, `request_priority` for vLLM."""
    if brain == "ab" and audio_ahead_ms < urgent_audio_ms:
        return (0, audio_ahead_ms)
    if brain == "fb":
        return (1, 0.0)
    return (2, audio_ahead_ms)


def priority(view: SeqView, cfg: SchedulerConfig) -> tuple[int, float, int, int]:
    """Sort key: lower runs first. `rank`, then least recently served, then admission order."""
    return (*rank(view.brain, view.audio_ahead_ms, cfg.urgent_audio_ms), view.last_step, view.arrival)


def schedule(views: Sequence[SeqView], cfg: SchedulerConfig) -> StepPlan:
    budget = cfg.token_budget
    decode: list[int] = []
    prefill: list[tuple[int, int]] = []
    for view in sorted(views, key=lambda v: priority(v, cfg)):
        if budget <= 0:
            break
        if view.prefill_left > 0:
            n = min(view.prefill_left, cfg.prefill_chunk, budget)
            prefill.append((view.seq_id, n))
            budget -= n
        elif len(decode) < cfg.max_batch:
            decode.append(view.seq_id)
            budget -= 1
    return StepPlan(decode=tuple(decode), prefill=tuple(prefill))
