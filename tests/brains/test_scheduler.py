"""The pure mind-paced scheduler: deadline order, fairness, budgets, prefill chunking."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import pytest

from brains.scheduler import Brain, SchedulerConfig, SeqView, StepPlan, priority, schedule

_arrivals = itertools.count()

CFG = SchedulerConfig(token_budget=256, max_batch=64, prefill_chunk=128, urgent_audio_ms=1500.0)


def view(seq_id: int, brain: Brain = "fb", *, session: str | None = None, prefill_left: int = 0,
         ahead: float = 0.0, last_step: int = -1, arrival: int | None = None) -> SeqView:
    return SeqView(seq_id=seq_id, session_id=session if session is not None else f"s{seq_id}", brain=brain,
                   prefill_left=prefill_left, audio_ahead_ms=ahead, last_step=last_step,
                   arrival=next(_arrivals) if arrival is None else arrival)


def cfg(**changes: float) -> SchedulerConfig:
    return dataclasses.replace(CFG, **changes)


def run_order(plan: StepPlan) -> list[int]:
    """Every sequence the plan runs, prefills first (each in plan order), then decodes."""
    return [seq_id for seq_id, _ in plan.prefill] + list(plan.decode)


def tokens_used(plan: StepPlan) -> int:
    return len(plan.decode) + sum(n for _, n in plan.prefill)


# ---------------------------------------------------------------- basics


def test_empty_input_gives_empty_plan() -> None:
    plan = schedule([], CFG)
    assert plan == StepPlan()
    assert plan.empty


def test_plan_with_work_is_not_empty() -> None:
    assert not schedule([view(1)], CFG).empty
    assert not StepPlan(prefill=((1, 3),)).empty


def test_zero_budget_runs_nothing() -> None:
    assert schedule([view(1), view(2, "ab")], cfg(token_budget=0)).empty


# ---------------------------------------------------------------- deadline order


def test_ab_with_least_audio_ahead_runs_first() -> None:
    views = [view(1, "ab", ahead=900.0), view(2, "ab", ahead=50.0), view(3, "ab", ahead=400.0)]
    assert schedule(views, CFG).decode == (2, 3, 1)
    # With room for one token only the AB closest to running dry runs.
    assert schedule(views, cfg(token_budget=1)).decode == (2,)


def test_urgent_ab_before_fb_and_fb_before_relaxed_ab() -> None:
    views = [
        view(1, "ab", ahead=5000.0),  # plenty of audio queued: its deadline is far
        view(2, "fb", last_step=-1),
        view(3, "ab", ahead=1000.0),  # urgent
        view(4, "fb", last_step=7),
        view(5, "ab", ahead=2000.0),
        view(6, "ab", ahead=10.0),  # most urgent
    ]
    assert schedule(views, CFG).decode == (6, 3, 2, 4, 5, 1)


def test_urgency_threshold_is_strict() -> None:
    at = view(1, "ab", ahead=1500.0)
    below = view(2, "ab", ahead=1499.9)
    fb = view(3, "fb")
    assert schedule([at, below, fb], CFG).decode == (2, 3, 1)
    # A larger threshold makes the same AB urgent.
    assert schedule([at, below, fb], cfg(urgent_audio_ms=2000.0)).decode == (2, 1, 3)


def test_relaxed_ab_yields_to_fb_when_budget_is_short() -> None:
    views = [view(1, "ab", ahead=3000.0), view(2, "fb")]
    assert schedule(views, cfg(token_budget=1)).decode == (2,)


def test_relaxed_abs_still_run_when_budget_allows() -> None:
    """Work-conserving: a far deadline never leaves budget unused."""
    views = [view(1, "ab", ahead=3000.0), view(2, "ab", ahead=8000.0)]
    assert schedule(views, CFG).decode == (1, 2)


def test_ties_break_on_last_step_then_arrival() -> None:
    a = view(1, "ab", ahead=100.0, last_step=5, arrival=0)
    b = view(2, "ab", ahead=100.0, last_step=3, arrival=1)
    c = view(3, "ab", ahead=100.0, last_step=3, arrival=2)
    assert schedule([a, b, c], CFG).decode == (2, 3, 1)
    assert priority(b, CFG) < priority(c, CFG) < priority(a, CFG)


def test_fb_ignores_its_audio_field() -> None:
    """An FB has no audio; only how long it waited orders it."""
    a = view(1, "fb", ahead=0.0, last_step=4)
    b = view(2, "fb", ahead=99999.0, last_step=2)
    assert schedule([a, b], CFG).decode == (2, 1)


# ---------------------------------------------------------------- budget and batch size


@pytest.mark.parametrize("budget", [1, 3, 7, 20])
def test_token_budget_bounds_decodes(budget: int) -> None:
    views = [view(i, "fb", last_step=i) for i in range(10)]
    plan = schedule(views, cfg(token_budget=budget))
    assert plan.decode == tuple(range(min(budget, 10)))
    assert tokens_used(plan) <= budget


def test_max_batch_bounds_decodes_and_keeps_priority() -> None:
    views = [view(i, "ab", ahead=float(1000 - i)) for i in range(10)]
    plan = schedule(views, cfg(max_batch=3))
    assert plan.decode == (9, 8, 7)


def test_max_batch_does_not_block_prefill() -> None:
    """A full decode batch leaves the rest of the budget to prefill chunks."""
    views = [view(1, "ab", ahead=10.0), view(2, "ab", ahead=20.0), view(3, "fb", prefill_left=50)]
    plan = schedule(views, cfg(max_batch=1))
    assert plan.decode == (1,)
    assert plan.prefill == ((3, 50),)


def test_budget_spent_on_prefill_stops_later_sequences() -> None:
    views = [view(1, "ab", ahead=0.0, prefill_left=200), view(2, "fb"), view(3, "ab", ahead=9000.0)]
    plan = schedule(views, cfg(token_budget=129, prefill_chunk=128))
    assert plan.prefill == ((1, 128),)
    assert plan.decode == (2,)
    assert tokens_used(plan) == 129


# ---------------------------------------------------------------- prefill chunking


@pytest.mark.parametrize(("left", "chunk", "budget", "expected"), [
    (300, 128, 256, 128),  # the chunk caps it
    (300, 128, 100, 100),  # the budget caps it
    (10, 128, 256, 10),  # a short prompt goes in one piece
    (128, 128, 256, 128),
])
def test_prefill_chunk_size(left: int, chunk: int, budget: int, expected: int) -> None:
    plan = schedule([view(1, "fb", prefill_left=left)], cfg(prefill_chunk=chunk, token_budget=budget))
    assert plan.prefill == ((1, expected),)
    assert plan.decode == ()


def test_two_long_prompts_share_the_budget() -> None:
    views = [view(1, "fb", prefill_left=300, arrival=0), view(2, "fb", prefill_left=300, arrival=1),
             view(3, "fb", prefill_left=300, arrival=2)]
    plan = schedule(views, cfg(prefill_chunk=128, token_budget=300))
    assert plan.prefill == ((1, 128), (2, 128), (3, 44))
    assert tokens_used(plan) == 300


def test_long_prefill_never_stalls_running_decodes() -> None:
    """Chunking bounds how long a new prompt holds a step: urgent decodes run every step."""
    state = {1: 1000}  # seq 1: a 1000-token prompt; seq 2: an urgent AB decoding
    last = {1: -1, 2: -1}
    steps_with_decode = 0
    step = 0
    while state[1] > 0:
        views = [view(1, "fb", prefill_left=state[1], last_step=last[1], arrival=0),
                 view(2, "ab", ahead=100.0, last_step=last[2], arrival=1)]
        plan = schedule(views, cfg(prefill_chunk=64, token_budget=100))
        steps_with_decode += 2 in plan.decode
        for seq_id, n in plan.prefill:
            assert n <= 64
            state[seq_id] -= n
            last[seq_id] = step
        for seq_id in plan.decode:
            last[seq_id] = step
        step += 1
    assert step == math.ceil(1000 / 64)
    assert steps_with_decode == step


# ---------------------------------------------------------------- fairness (simulations)


def simulate(views: Sequence[SeqView], config: SchedulerConfig, steps: int,
             stamp: str = "step") -> dict[int, list[int]]:
    """Run `steps` steps, updating `last_step`; return the steps each sequence ran in.

    `stamp="step"` sets `last_step` to the step number; `stamp="serve"` to a counter that grows with every
    sequence served, in plan order (a round-robin queue position), as the engine does.
    """
    current = {v.seq_id: v for v in views}
    ran: dict[int, list[int]] = {v.seq_id: [] for v in views}
    served = itertools.count()
    for step in range(steps):
        plan = schedule(list(current.values()), config)
        assert tokens_used(plan) <= config.token_budget
        assert len(plan.decode) <= config.max_batch
        for seq_id in run_order(plan):
            ran[seq_id].append(step)
            mark = step if stamp == "step" else next(served)
            current[seq_id] = dataclasses.replace(current[seq_id], last_step=mark)
    return ran


def max_gap(steps: list[int], total: int) -> int:
    marks = [-1, *steps, total]
    return max(b - a for a, b in itertools.pairwise(marks))


@pytest.mark.parametrize(("sessions", "budget"), [(5, 2), (7, 3), (10, 1), (4, 3)])
def test_fb_fairness_when_budget_is_short(sessions: int, budget: int) -> None:
    # Later arrivals first in the list, so list order cannot be what makes it fair.
    views = [view(i, "fb", session=f"s{i}", arrival=i) for i in reversed(range(sessions))]
    steps = 60
    ran = simulate(views, cfg(token_budget=budget), steps)
    period = math.ceil(sessions / budget)
    for seq_id, hits in ran.items():
        assert hits, f"session of seq {seq_id} starved"
        assert max_gap(hits, steps) <= period, (seq_id, hits)
    assert sum(len(h) for h in ran.values()) == steps * budget  # the budget is never left unused


@pytest.mark.parametrize(("sessions", "budget"), [(5, 2), (7, 3), (4, 3), (3, 2)])
def test_fb_equal_shares_with_serve_order_stamps(sessions: int, budget: int) -> None:
    """Fed a serve-order stamp as `last_step`, least-recently-served is an exact round robin.

    (With step numbers instead, sequences served in the same step tie and the arrival tie-break favours the
    oldest sessions; the engine feeds serve-order stamps: see test_engine.py::test_fb_sequences_get_equal_shares.)
    """
    views = [view(i, "fb", session=f"s{i}", arrival=i) for i in reversed(range(sessions))]
    steps = 60
    ran = simulate(views, cfg(token_budget=budget), steps, stamp="serve")
    for seq_id, hits in ran.items():
        assert abs(len(hits) - steps * budget / sessions) <= 1, (seq_id, len(hits))
        assert max_gap(hits, steps) <= math.ceil(sessions / budget), (seq_id, hits)


def test_fb_fairness_is_per_sequence_not_per_arrival() -> None:
    """A session that has just run waits behind one that has not, whatever their arrival order."""
    early = view(1, "fb", arrival=0, last_step=10)
    late = view(2, "fb", arrival=5, last_step=9)
    assert schedule([early, late], cfg(token_budget=1)).decode == (2,)


def test_fb_falling_behind_urgent_abs_keep_priority_fbs_progress() -> None:
    """Three sessions, each with an FB and a speaking AB; playback drains audio every step.

    Every step, every urgent AB must run (while the budget allows); the FBs share what is left and
    none of them starves; once an AB has audio queued well ahead, the FBs go before it.
    """
    sessions = 3
    budget = 4  # room for the three ABs and one FB: the FBs fall behind unless the ABs get ahead
    config = cfg(token_budget=budget, urgent_audio_ms=1500.0)
    ms_per_token = 150.0  # each AB token adds this much reply audio
    ms_per_step = 100.0  # playback consumes this much per step
    ahead = dict.fromkeys(range(sessions), 0.0)
    last: dict[int, int] = {}
    fb_tokens = dict.fromkeys(range(sessions), 0)
    fb_last_ran = dict.fromkeys(range(sessions), -1)
    fb_gaps: list[int] = []
    relaxed_skipped_for_fb = 0
    steps = 120
    for step in range(steps):
        views = []
        for s in range(sessions):
            views.append(view(100 + s, "ab", session=f"s{s}", ahead=ahead[s], last_step=last.get(100 + s, -1),
                              arrival=2 * s))
            views.append(view(s, "fb", session=f"s{s}", last_step=last.get(s, -1), arrival=2 * s + 1))
        plan = schedule(views, config)
        urgent = [v.seq_id for v in views if v.brain == "ab" and v.audio_ahead_ms < config.urgent_audio_ms]
        relaxed = [v.seq_id for v in views if v.brain == "ab" and v.seq_id not in urgent]
        # Deadline order: the urgent ABs come first, least audio first, and all of them fit.
        first = plan.decode[: len(urgent)]
        assert set(first) == set(urgent)
        assert [ahead[i - 100] for i in first] == sorted(ahead[i - 100] for i in first)
        fbs_run = [i for i in plan.decode if i < 100]
        relaxed_run = [i for i in plan.decode if i in relaxed]
        if relaxed_run:
            # A relaxed AB only runs once every FB has been served this step.
            assert len(fbs_run) == sessions
        if len(relaxed_run) < len(relaxed) and len(fbs_run) == sessions:
            relaxed_skipped_for_fb += 1
        for seq_id in plan.decode:
            last[seq_id] = step
            if seq_id >= 100:
                ahead[seq_id - 100] += ms_per_token
            else:
                fb_tokens[seq_id] += 1
                fb_gaps.append(step - fb_last_ran[seq_id])
                fb_last_ran[seq_id] = step
        for s in range(sessions):
            ahead[s] = max(0.0, ahead[s] - ms_per_step)
    # Every FB made progress, round robin while the ABs were urgent (at most `sessions` steps apart).
    assert all(n > 0 for n in fb_tokens.values()), fb_tokens
    assert max(fb_gaps) <= sessions
    assert max(fb_tokens.values()) - min(fb_tokens.values()) <= 1
    # The ABs got ahead of playback (150 ms of audio per 100 ms step), after which the FBs caught up.
    assert all(a >= config.urgent_audio_ms - ms_per_step for a in ahead.values()), ahead
    assert sum(fb_tokens.values()) > steps  # more than one FB per step on average once ABs relaxed
    assert relaxed_skipped_for_fb > 0
