"""The engine thread on a fake backend: streaming, stops, batching, cancellation, prefix reuse, failures; and a
step's prefill chunks in one forward (padded rows, or one ragged pass) on the fake and on a tiny real model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from brains.backends.cuda_graphs import GraphedDecoder
from brains.backends.decoder import ArchSpec, DecoderLM
from brains.backends.torch_backend import TorchBackend
from brains.engine import Engine, GenerationRequest, SlotPool, TokenStream, common_prefix
from brains.scheduler import SchedulerConfig
from common.errors import EngineError
from tests.brains.fakes import FakeBackend, collect, first_batch, reference

MakeEngine = Callable[..., tuple[Engine, FakeBackend]]

DEFAULT_CFG = SchedulerConfig(token_budget=256, max_batch=64, prefill_chunk=128)


@pytest.fixture
def make_engine() -> Iterator[MakeEngine]:
    made: list[tuple[Engine, FakeBackend]] = []

    def make(backend: FakeBackend | None = None, cfg: SchedulerConfig = DEFAULT_CFG,
             eos_ids: frozenset[int] = frozenset(), start: bool = True) -> tuple[Engine, FakeBackend]:
        backend = backend or FakeBackend()
        engine = Engine(backend, cfg, eos_ids=eos_ids)
        made.append((engine, backend))
        if start:
            engine.start()
        return engine, backend

    yield make
    for engine, backend in made:
        backend.resume()
        engine.close()
        if engine._thread is not None:
            assert not engine._thread.is_alive(), "engine thread did not stop"


def req(prompt: list[int], max_new: int = 8, **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=max_new, **kw)  # type: ignore[arg-type]


async def fresh_output(prompt: list[int], max_new: int, make_engine: MakeEngine) -> list[int]:
    """What a brand-new engine (empty cache) produces for `prompt`."""
    engine, _ = make_engine(FakeBackend(slots=2))
    return await collect(engine.submit(req(prompt, max_new)))


# ---------------------------------------------------------------- helpers under test


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_slot_pool_reuses_cached_slots_lru() -> None:
    pool = SlotPool(2)
    a, b = pool.take(), pool.take()
    assert {a, b} == {0, 1}
    assert not pool.available()
    pool.release(a, [1, 2])
    pool.release(b, [3])
    assert pool.available()
    assert pool.take() == a  # least recently cached goes first
    pool.release(a, [])  # nothing computed: back to the free list, not the cache
    assert pool.free == [a]
    assert list(pool.cached) == [b]


# ---------------------------------------------------------------- streaming


async def test_tokens_stream_in_order(make_engine: MakeEngine) -> None:
    engine, backend = make_engine()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    stream = engine.submit(req(prompt, max_new=20))
    batches = []
    async for batch in stream:
        assert batch, "an empty batch was delivered"
        batches.append(batch)
    tokens = [t for b in batches for t in b]
    assert tokens == reference(prompt, 20)
    assert stream.finish is not None and stream.finish.reason == "length"
    assert not backend.misuse
    assert engine.stats.decode_tokens == 20
    assert engine.stats.prefill_tokens == len(prompt) - 1


async def test_max_new_tokens_honoured(make_engine: MakeEngine) -> None:
    engine, _ = make_engine()
    for n in (1, 2, 7):
        stream = engine.submit(req([10, 20, 30], max_new=n))
        assert await collect(stream) == reference([10, 20, 30], n)
        assert stream.finish is not None and stream.finish.reason == "length"


def _stop_candidate(ref: list[int]) -> int:
    """The index of the first token that did not appear before it (so it stops exactly there)."""
    return next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])


async def test_stop_id_ends_the_stream_and_is_not_delivered(make_engine: MakeEngine) -> None:
    engine, _ = make_engine()
    prompt = [7, 7, 2]
    ref = reference(prompt, 30)
    i = _stop_candidate(ref)
    stream = engine.submit(req(prompt, max_new=30, stop_ids=frozenset({ref[i], 999})))
    out = await collect(stream)
    assert out == ref[:i]
    assert ref[i] not in out
    assert stream.finish is not None and stream.finish.reason == "stop"


async def test_engine_eos_ids_stop_every_request(make_engine: MakeEngine) -> None:
    prompt = [4, 8, 15]
    ref = reference(prompt, 30)
    i = _stop_candidate(ref)
    engine, _ = make_engine(eos_ids=frozenset({ref[i]}))
    stream = engine.submit(req(prompt, max_new=30))
    assert await collect(stream) == ref[:i]
    assert stream.finish is not None and stream.finish.reason == "stop"


async def test_length_capped_by_cache_size(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=1, max_len=16))
    stream = engine.submit(req([1, 2, 3, 4, 5, 6], max_new=100))
    out = await collect(stream)
    assert out == reference([1, 2, 3, 4, 5, 6], 10)  # 6 prompt + 10 new = max_len
    assert stream.finish is not None and stream.finish.reason == "length"
    assert not backend.misuse


async def test_submit_validates_prompt(make_engine: MakeEngine) -> None:
    engine, _ = make_engine(FakeBackend(max_len=8))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(req([]))
    with pytest.raises(ValueError, match="exceeds"):
        engine.submit(req(list(range(8))))
    assert await collect(engine.submit(req(list(range(7)), max_new=1))) == reference(list(range(7)), 1)


async def test_submit_after_close_raises(make_engine: MakeEngine) -> None:
    engine, _ = make_engine()
    engine.close()
    with pytest.raises(EngineError):
        engine.submit(req([1, 2]))


# ---------------------------------------------------------------- batching


async def test_concurrent_requests_share_batched_steps(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=8), start=False)
    prompts = [[i, i + 1, i * 3 % 7] + [i] * i for i in range(6)]  # different lengths and contents
    streams = [engine.submit(req(p, max_new=12, session_id=f"s{i}")) for i, p in enumerate(prompts)]
    engine.start()
    outs = await asyncio.gather(*(collect(s) for s in streams))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == reference(prompt, 12)
    decodes = backend.decode_calls()
    assert max(c.batch for c in decodes) == 6
    assert engine.stats.max_batch == 6
    # Batched: 6 x 12 tokens in far fewer forwards than 72.
    assert len(decodes) <= 13
    assert not backend.misuse


async def test_a_steps_tokens_for_every_sequence_wake_the_loop_once(make_engine: MakeEngine,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wake-up of the loop is a syscall that hands the GIL away: one per engine pass, not per sequence."""
    loop = asyncio.get_running_loop()
    from_engine = 0
    original = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal from_engine
        from_engine += threading.current_thread().name == "duet-engine"
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    engine, _ = make_engine(FakeBackend(slots=8), start=False)
    prompts = [[i + 1, 2 * i + 3, 5] for i in range(8)]
    streams = [engine.submit(req(p, max_new=6)) for p in prompts]
    engine.start()
    outs = await asyncio.gather(*(collect(s) for s in streams))
    assert outs == [reference(p, 6) for p in prompts]  # each stream's tokens, complete and in order
    # One post per engine pass (a step, or a pass that only ended sequences): per sequence it was >= 8 x 6.
    assert 0 < from_engine <= engine.stats.steps + 2, (from_engine, engine.stats.steps)


async def test_audio_deadline_orders_engine_steps(make_engine: MakeEngine) -> None:
    """Budget of one token per step: the AB about to run dry goes first, then the FB, then the relaxed AB."""
    cfg = SchedulerConfig(token_budget=1, max_batch=1, prefill_chunk=1, urgent_audio_ms=1500.0)
    engine, backend = make_engine(FakeBackend(slots=4), cfg=cfg, start=False)
    relaxed = engine.submit(req([1, 2], max_new=3, brain="ab", audio_ahead_ms=lambda: 5000.0))
    fb = engine.submit(req([3, 4], max_new=3, brain="fb"))
    urgent = engine.submit(req([5, 6], max_new=3, brain="ab", audio_ahead_ms=lambda: 100.0))
    engine.start()
    await asyncio.gather(collect(relaxed), collect(fb), collect(urgent))
    first_token = {c.slots[0]: c.tokens[0][0] for c in reversed(backend.calls)}  # slot -> its first token
    owner = {first_token[s]: s for s in first_token}
    order = [c.slots[0] for c in backend.calls]
    assert all(c.batch == 1 for c in backend.calls)
    last = {slot: max(i for i, s in enumerate(order) if s == slot) for slot in set(order)}
    first = {slot: min(i for i, s in enumerate(order) if s == slot) for slot in set(order)}
    u, f, r = owner[5], owner[3], owner[1]
    assert last[u] < first[f] and last[f] < first[r], order


async def test_decode_batch_respects_max_batch(make_engine: MakeEngine) -> None:
    cfg = SchedulerConfig(token_budget=256, max_batch=2, prefill_chunk=128)
    engine, backend = make_engine(FakeBackend(slots=4), cfg=cfg, start=False)
    prompts = [[i, i + 1, i + 2] for i in range(4)]
    streams = [engine.submit(req(p, max_new=4)) for p in prompts]
    engine.start()
    outs = await asyncio.gather(*(collect(s) for s in streams))
    assert outs == [reference(p, 4) for p in prompts]
    assert max(c.batch for c in backend.decode_calls()) <= cfg.max_batch
    assert engine.stats.max_batch <= cfg.max_batch


async def test_fb_sequences_get_equal_shares(make_engine: MakeEngine) -> None:
    """Four sessions thinking, room for three FB tokens a step: each should get ~3/4 of the steps."""
    cfg = SchedulerConfig(token_budget=3, max_batch=64, prefill_chunk=128)
    engine, backend = make_engine(FakeBackend(slots=4, max_len=512), cfg=cfg, start=False)
    streams = [engine.submit(req([i + 1], max_new=400, brain="fb", session_id=f"s{i}")) for i in range(4)]
    counts = [0] * 4

    async def count(i: int, stream: TokenStream) -> None:
        async for batch in stream:
            counts[i] += len(batch)

    backend.pause()
    engine.start()
    tasks = [asyncio.create_task(count(i, s)) for i, s in enumerate(streams)]
    assert await asyncio.to_thread(backend.step, 40)
    for s in streams:
        s.cancel()
    backend.resume()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sum(counts) >= 120
    assert max(counts) - min(counts) <= 2, counts


# ---------------------------------------------------------------- cancellation


async def test_cancel_frees_the_slot_for_a_waiting_request(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=1), start=False)
    backend.pause()
    engine.start()
    a_prompt, b_prompt = [1, 2, 3], [50, 60, 70]
    a = engine.submit(req(a_prompt, max_new=200))
    b = engine.submit(req(b_prompt, max_new=5))  # no slot left: waits
    backend.allow(2)  # A's prefill and its first decode
    got = await first_batch(a)
    assert got == reference(a_prompt, 1)
    assert await asyncio.to_thread(backend.wait_blocked)  # A's second decode is in progress
    assert all(50 not in row for c in backend.calls for row in c.tokens)  # B has not run yet
    a.cancel()
    backend.resume()
    rest = await collect(a)
    assert a.finish is not None and a.finish.reason == "cancelled"
    a_tokens = got + rest
    assert len(a_tokens) <= 2 and a_tokens == reference(a_prompt, len(a_tokens))
    assert await collect(b) == reference(b_prompt, 5)
    assert b.finish is not None and b.finish.reason == "length"
    # A ran no step after the one in progress when it was cancelled; B took the slot right away.
    b_first = next(i for i, c in enumerate(backend.calls) if 50 in c.tokens[0])
    assert len(backend.calls[:b_first]) == 3  # A: prefill, decode, decode
    assert all(50 not in c.tokens[0] for c in backend.calls[:b_first])
    assert len(backend.calls) - b_first == 1 + 5  # B alone from then on: its prefill and 5 decodes
    assert engine.live_sequences() == 0


async def test_cancel_a_waiting_request(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=1), start=False)
    backend.pause()
    engine.start()
    a = engine.submit(req([1, 2, 3], max_new=6))
    b = engine.submit(req([9, 9, 9], max_new=6))
    b.cancel()
    backend.resume()
    assert await collect(b) == []
    assert b.finish is not None and b.finish.reason == "cancelled"
    assert await collect(a) == reference([1, 2, 3], 6)
    assert all(9 not in row for c in backend.calls for row in c.tokens)


async def test_cancel_after_finish_is_harmless(make_engine: MakeEngine) -> None:
    engine, _ = make_engine()
    a = engine.submit(req([1, 2], max_new=3))
    await collect(a)
    a.cancel()
    assert await collect(engine.submit(req([2, 1], max_new=3))) == reference([2, 1], 3)


async def test_close_cancels_in_flight_streams(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(start=False)
    backend.pause()
    engine.start()
    a = engine.submit(req([1, 2, 3], max_new=200))
    assert await asyncio.to_thread(backend.wait_blocked)
    closer = threading.Thread(target=engine.close)
    closer.start()

    def wait_closing() -> None:
        while not engine._closed:
            time.sleep(0.001)

    await asyncio.wait_for(asyncio.to_thread(wait_closing), 5)
    backend.resume()
    await asyncio.to_thread(closer.join, 10)
    out = await collect(a)
    assert a.finish is not None and a.finish.reason == "cancelled"
    assert len(out) < 200


# ---------------------------------------------------------------- prefix reuse


async def test_prefix_reuse_from_a_finished_sequence(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=2))
    prompt = [3, 1, 4, 1, 5, 9]
    first = await collect(engine.submit(req(prompt, max_new=6)))
    saved_before = engine.stats.prefill_tokens_saved
    prefill_before = engine.stats.prefill_tokens
    second_prompt = [*prompt, *first, 2, 7, 1]
    stream = engine.submit(req(second_prompt, max_new=10))
    out = await collect(stream)
    # Everything the first sequence computed: its prompt and all generated tokens but the last.
    assert stream.reused_prefix == len(prompt) + len(first) - 1
    assert engine.stats.prefill_tokens_saved - saved_before == stream.reused_prefix
    assert engine.stats.prefill_tokens - prefill_before == len(second_prompt) - 1 - stream.reused_prefix
    assert out == await fresh_output(second_prompt, 10, make_engine)
    assert out == reference(second_prompt, 10)
    assert not backend.misuse


async def test_prefix_reuse_from_a_live_sequence_copies_its_cache(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=3), start=False)
    backend.pause()
    engine.start()
    prompt = [8, 6, 7, 5, 3, 0, 9]
    a = engine.submit(req(prompt, max_new=40))
    backend.allow(2)  # prefill + first decode
    g1 = await first_batch(a)
    assert await asyncio.to_thread(backend.wait_blocked)  # A's next decode is in progress
    g2 = reference(prompt, 2)[1]
    b_prompt = [*prompt, *g1, (g2 + 1) % backend.vocab, 11]
    b = engine.submit(req(b_prompt, max_new=12))
    backend.resume()
    b_out = await collect(b)
    a_out = g1 + await collect(a)
    assert a_out == reference(prompt, 40)
    assert b.reused_prefix == len(prompt) + 1
    assert engine.stats.prefill_tokens_saved == b.reused_prefix
    assert len(backend.copies) == 1
    src, dst, n = backend.copies[0]
    assert n == b.reused_prefix and src != dst
    assert b_out == await fresh_output(b_prompt, 12, make_engine)
    assert not backend.misuse


async def test_sibling_sharing_a_prefix_waits_for_its_prefill(make_engine: MakeEngine) -> None:
    """FB and AB of one turn arrive together: the second copies the first's prefix instead of computing it."""
    cfg = SchedulerConfig(token_budget=256, max_batch=64, prefill_chunk=8)
    engine, backend = make_engine(FakeBackend(slots=4), cfg=cfg, start=False)
    shared = [(7 * i + 3) % 50 for i in range(60)]
    fb_prompt, ab_prompt = [*shared, 90], [*shared, 91, 92]
    fb = engine.submit(req(fb_prompt, max_new=6, brain="fb"))
    ab = engine.submit(req(ab_prompt, max_new=6, brain="ab"))
    engine.start()
    fb_out, ab_out = await asyncio.gather(collect(fb), collect(ab))
    assert fb_out == reference(fb_prompt, 6)
    assert ab_out == reference(ab_prompt, 6)
    assert ab.reused_prefix > 0
    assert len(backend.copies) == 1 and backend.copies[0][2] == ab.reused_prefix
    # Most of the shared prefix was computed once (the engine waits while 16 or more tokens are left).
    assert ab.reused_prefix >= len(shared) - 16
    assert engine.stats.prefill_tokens_saved == ab.reused_prefix
    assert not backend.misuse


async def test_prefix_reuse_of_a_shorter_prompt(make_engine: MakeEngine) -> None:
    """A prompt that is a prefix of a cached sequence reuses all but its last token."""
    engine, backend = make_engine(FakeBackend(slots=2))
    long_prompt = [5, 4, 3, 2, 1, 0, 1, 2]
    await collect(engine.submit(req(long_prompt, max_new=4)))
    short = long_prompt[:5]
    stream = engine.submit(req(short, max_new=6))
    out = await collect(stream)
    assert stream.reused_prefix == len(short) - 1
    assert out == reference(short, 6)
    assert not backend.misuse


async def test_unrelated_prompt_reuses_nothing(make_engine: MakeEngine) -> None:
    engine, _ = make_engine(FakeBackend(slots=2))
    await collect(engine.submit(req([1, 2, 3, 4], max_new=4)))
    stream = engine.submit(req([9, 8, 7], max_new=4))
    assert await collect(stream) == reference([9, 8, 7], 4)
    assert stream.reused_prefix == 0
    assert engine.stats.prefill_tokens_saved == 0


async def test_evicted_cache_is_never_reused(make_engine: MakeEngine) -> None:
    """With one slot, each new sequence overwrites the cache; outputs must stay right."""
    engine, backend = make_engine(FakeBackend(slots=1))
    prompts = [[1, 2, 3, 4], [1, 2, 9, 9], [7, 7], [1, 2, 3, 4, 5]]
    for p in prompts:
        assert await collect(engine.submit(req(p, max_new=5))) == reference(p, 5)
    assert not backend.misuse


# ---------------------------------------------------------------- failures


async def test_backend_exception_fails_in_flight_streams_and_engine_recovers(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=4), start=False)
    a = engine.submit(req([1, 2, 3], max_new=10))
    b = engine.submit(req([4, 5], max_new=10))
    backend.fail_next = RuntimeError("boom")
    engine.start()
    for stream in (a, b):
        with pytest.raises(EngineError, match="boom"):
            await collect(stream)
        assert stream.finish is not None and stream.finish.reason == "error"
    # The engine goes on serving, including a request with the same prompt as a failed one.
    c = engine.submit(req([1, 2, 3], max_new=10))
    assert await collect(c) == reference([1, 2, 3], 10)
    assert c.finish is not None and c.finish.reason == "length"
    assert engine.live_sequences() == 0
    assert not backend.misuse


async def test_failure_mid_stream_keeps_tokens_already_delivered(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=2), start=False)
    backend.pause()
    engine.start()
    a = engine.submit(req([1, 2, 3], max_new=50))
    backend.allow(3)  # prefill, decode, decode
    got: list[int] = []
    while len(got) < 2:
        got += await first_batch(a)
    assert await asyncio.to_thread(backend.wait_blocked)
    backend.fail_next = ValueError("cuda fell over")
    backend.resume()
    with pytest.raises(EngineError, match="ValueError: cuda fell over"):
        got += await collect(a)
    assert got == reference([1, 2, 3], 2)
    assert await collect(engine.submit(req([3, 2, 1], max_new=4))) == reference([3, 2, 1], 4)


async def test_a_failed_step_fails_only_the_sequences_it_ran(make_engine: MakeEngine) -> None:
    # One decode row a step: the failing forward carries one of the two sequences; the other goes on.
    engine, backend = make_engine(FakeBackend(slots=4), cfg=replace(DEFAULT_CFG, max_batch=1), start=False)
    backend.pause()
    # Both queued before the engine thread starts, so its first step admits both (after the start, the thread could
    # plan on the first alone, and a later forward carry a row of each).
    a = engine.submit(req([1, 2, 3], max_new=6))
    b = engine.submit(req([4, 5], max_new=6))
    engine.start()
    # Step 1 (both prefills, one decode row), then wait until step 2's forward is at the gate. Not allow + wait_blocked:
    # the first forward may already wait at the gate, so `blocked` is still true from it, the failure was armed for
    # the prefill of both, and both failed (CI, once).
    assert await asyncio.to_thread(backend.step, 2)
    backend.fail_next = RuntimeError("one row broke")
    backend.resume()
    results = await asyncio.gather(collect(a), collect(b), return_exceptions=True)
    failed = [r for r in results if isinstance(r, EngineError)]
    assert len(failed) == 1 and "one row broke" in str(failed[0])
    survivor, prompt = (results[1], [4, 5]) if results[0] is failed[0] else (results[0], [1, 2, 3])
    assert survivor == reference(prompt, 6)
    assert engine.stats.failed_steps == 1 and engine.stats.failed_requests == 1


async def test_a_request_whose_own_callback_raises_fails_alone(make_engine: MakeEngine) -> None:
    def broken_pacer() -> float:
        raise KeyError("pacer state")

    engine, backend = make_engine(FakeBackend(slots=4), start=False)
    bad = engine.submit(req([1, 2, 3], max_new=8, audio_ahead_ms=broken_pacer))
    good = engine.submit(req([4, 5, 6], max_new=8, audio_ahead_ms=lambda: 100.0))
    engine.start()
    with pytest.raises(EngineError, match="pacer state"):
        await collect(bad)
    assert await collect(good) == reference([4, 5, 6], 8)
    assert engine.stats.failed_requests == 1 and engine.stats.failed_steps == 0
    assert await collect(engine.submit(req([1, 2, 3], max_new=3))) == reference([1, 2, 3], 3)
    assert not backend.misuse


async def test_a_row_whose_sampling_fails_fails_alone(make_engine: MakeEngine) -> None:
    engine, _ = make_engine(FakeBackend(slots=4), start=False)
    bad = engine.submit(req([1, 2, 3], max_new=8, temperature=float("nan")))  # NaN probabilities
    good = engine.submit(req([4, 5, 6], max_new=8))
    engine.start()
    with pytest.raises(EngineError):
        await collect(bad)
    assert await collect(good) == reference([4, 5, 6], 8)


async def test_a_prompt_outside_the_vocabulary_is_refused_at_submit(make_engine: MakeEngine) -> None:
    engine, backend = make_engine(FakeBackend(slots=2))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit(req([1, backend.vocab, 3]))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit(req([-1, 2]))
    assert await collect(engine.submit(req([1, 2, 3], max_new=4))) == reference([1, 2, 3], 4)


async def test_stats_count_steps_batches_and_queue(make_engine: MakeEngine) -> None:
    engine, _ = make_engine(FakeBackend(slots=4))
    streams = [engine.submit(req([i, i + 1], max_new=5)) for i in (1, 10, 20)]
    for s in streams:
        await collect(s)
    st = engine.stats
    # The last token reaches its stream inside the step, before the engine thread records the step's time and
    # then its live count: wait for the count, so every step is recorded (this raced on a loaded machine).
    for _ in range(200):
        if st.live == 0 and st.waiting == 0:
            break
        await asyncio.sleep(0.01)
    assert sum(st.step_seconds.counts) == st.steps > 0
    assert st.step_seconds.cumulative()[-1] == (float("inf"), st.steps)
    assert st.batch_size.total == st.decode_tokens == 15
    assert max(b for b, n in zip((*st.batch_size.bounds, float("inf")), st.batch_size.counts, strict=True)
               if n) >= 2  # the three were batched
    assert st.waiting == 0 and st.live == 0


# ---------------------------------------------------------------- one forward per step


class RaggedFakeBackend(FakeBackend):
    """The fake with the optional `forward_ragged`: a step's tokens of any sequences, flat, in one call."""

    ragged = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ragged_calls: list[tuple[list[int], list[int], list[int], list[int]]] = []

    def forward_ragged(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       logit_rows: torch.Tensor) -> torch.Tensor:
        self._gate()
        toks, pos, sl, rows = tokens.tolist(), positions.tolist(), slots.tolist(), logit_rows.tolist()
        self.ragged_calls.append((toks, pos, sl, rows))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if not len(toks) == len(pos) == len(sl) or tokens.dim() != 1:
            self._misuse(f"ragged shapes {tuple(tokens.shape)} {tuple(positions.shape)} {tuple(slots.shape)}")
        if len(set(zip(sl, pos, strict=True))) != len(sl):
            self._misuse("one (slot, position) twice in a ragged call")
        for tok, p, s in zip(toks, pos, sl, strict=True):  # all writes, in order, before any read
            if not 0 <= s < self.slots or p >= self.max_len:
                self._misuse(f"slot {s} / position {p} out of range")
            if p > self.valid[s]:
                self._misuse(f"slot {s}: write at position {p} but only {self.valid[s]} valid")
            self.cache[s][p] = tok
            self.valid[s] = p + 1
        logits = torch.zeros((len(rows), self.vocab))
        for r, row in enumerate(rows):
            logits[r, self.next_token(self.cache[sl[row]][: pos[row] + 1])] = 1.0
        return logits


def _distinct_prompts(lengths: list[int]) -> list[list[int]]:
    """Prompts that share no prefix (so no sibling waits for another's prefill)."""
    return [[(11 * i + 5 * j + 1) % 90 for j in range(n)] for i, n in enumerate(lengths)]


async def test_a_steps_prefill_chunks_share_one_padded_forward(make_engine: MakeEngine) -> None:
    cfg = SchedulerConfig(token_budget=256, max_batch=64, prefill_chunk=8)
    engine, backend = make_engine(FakeBackend(slots=6), cfg=cfg, start=False)
    prompts = _distinct_prompts([3, 9, 20, 17, 2, 30])
    streams = [engine.submit(req(p, max_new=7)) for p in prompts]
    engine.start()
    outs = await asyncio.gather(*(collect(s) for s in streams))
    assert outs == [reference(p, 7) for p in prompts]
    # Step 1: six chunks (2, 1 and four of 8 tokens) as one [6, 8] forward, then the three completed prompts decode.
    first = backend.calls[0]
    assert (first.batch, first.width) == (6, 8)
    assert [c.batch for c in backend.calls[1:2]] == [3] and backend.calls[1].width == 1
    # Four steps prefill (the longest prompt has 29 tokens to prefill): one prefill forward each.
    assert len([c for c in backend.calls if c.width > 1]) == 4
    assert len(backend.calls) <= 2 * engine.stats.steps
    assert engine.stats.prefill_tokens == sum(len(p) - 1 for p in prompts)
    assert not backend.misuse


async def test_padded_prefill_never_writes_past_the_cache(make_engine: MakeEngine) -> None:
    """A row whose padding would run past max_len is not padded: it runs on its own."""
    cfg = SchedulerConfig(token_budget=256, max_batch=64, prefill_chunk=9)
    engine, backend = make_engine(FakeBackend(slots=2, max_len=32), cfg=cfg, start=False)
    a_prompt, b_prompt = _distinct_prompts([31, 20])
    backend.pause()
    engine.start()
    a = engine.submit(req(a_prompt, max_new=5))
    backend.allow(2)  # A's chunks at 0 and 9; the one at 18 is in progress when B arrives
    assert await asyncio.to_thread(backend.wait_blocked)
    b = engine.submit(req(b_prompt, max_new=5))
    backend.resume()
    a_out, b_out = await asyncio.gather(collect(a), collect(b))
    assert a_out == reference(a_prompt, 1)  # 31 + 1 tokens fill the cache
    assert b_out == reference(b_prompt, 5)
    assert all(p < 32 for c in backend.calls for row in c.positions for p in row)
    # The step with A's last chunk (27..29) and B's first (0..8): A alone (27 + 9 > 32), B alone in its batch.
    assert any(c.positions == [[27, 28, 29]] for c in backend.calls)
    assert any(c.positions == [list(range(9))] and c.batch == 1 for c in backend.calls)
    assert not backend.misuse


async def test_ragged_backend_runs_each_step_in_one_forward(make_engine: MakeEngine) -> None:
    cfg = SchedulerConfig(token_budget=256, max_batch=64, prefill_chunk=8)
    backend = RaggedFakeBackend(slots=6)
    engine, _ = make_engine(backend, cfg=cfg, start=False)
    prompts = _distinct_prompts([3, 9, 20, 17, 2, 30])
    streams = [engine.submit(req(p, max_new=7)) for p in prompts]
    engine.start()
    outs = await asyncio.gather(*(collect(s) for s in streams))
    assert outs == [reference(p, 7) for p in prompts]
    assert len(backend.calls) + len(backend.ragged_calls) == engine.stats.steps  # one forward a step
    assert len(backend.ragged_calls) == 4  # the steps with prefill chunks
    assert all(c.width == 1 for c in backend.calls)  # the others: the plain batched decode
    toks, pos, slots, rows = backend.ragged_calls[0]
    assert len(set(slots)) == 6 and len(toks) == 2 + 1 + 4 * 8 + 3  # six chunks, then three decode rows
    assert rows == [len(toks) - 3, len(toks) - 2, len(toks) - 1]  # logits for the decode rows only
    # A prompt completed in this step decodes right after its chunk, at the next position of its slot.
    for row in rows:
        assert pos[row] == max(p for p, s in zip(pos, slots, strict=True) if s == slots[row])
    assert not backend.misuse


async def test_ragged_backend_with_prefix_reuse_and_siblings(make_engine: MakeEngine) -> None:
    cfg = SchedulerConfig(token_budget=64, max_batch=64, prefill_chunk=8)
    backend = RaggedFakeBackend(slots=4)
    engine, _ = make_engine(backend, cfg=cfg, start=False)
    shared = [(7 * i + 3) % 50 for i in range(60)]
    fb_prompt, ab_prompt, other = [*shared, 90], [*shared, 91, 92], _distinct_prompts([1, 1, 25])[2]
    fb = engine.submit(req(fb_prompt, max_new=6, brain="fb"))
    ab = engine.submit(req(ab_prompt, max_new=6, brain="ab"))
    oth = engine.submit(req(other, max_new=9))
    engine.start()
    fb_out, ab_out, other_out = await asyncio.gather(collect(fb), collect(ab), collect(oth))
    assert (fb_out, ab_out, other_out) == (reference(fb_prompt, 6), reference(ab_prompt, 6), reference(other, 9))
    assert ab.reused_prefix >= len(shared) - 16
    # A follow-up turn reuses the finished FB's cache and prefills its tail in a ragged step.
    follow = [*fb_prompt, *fb_out, 3, 1, 4]
    stream = engine.submit(req(follow, max_new=5))
    assert await collect(stream) == reference(follow, 5)
    assert stream.reused_prefix == len(fb_prompt) + len(fb_out) - 1
    assert not backend.misuse


async def test_ragged_failure_leaves_no_half_computed_cache(make_engine: MakeEngine) -> None:
    backend = RaggedFakeBackend(slots=2)
    engine, _ = make_engine(backend, start=False)
    a = engine.submit(req([1, 2, 3, 4, 5], max_new=10))
    b = engine.submit(req([9, 8, 7], max_new=10))
    backend.fail_next = RuntimeError("boom")
    engine.start()
    for stream in (a, b):
        with pytest.raises(EngineError, match="boom"):
            await collect(stream)
    # The failed prefill's keys were never counted as computed: the same prompts start from scratch.
    c = engine.submit(req([1, 2, 3, 4, 5], max_new=10))
    assert await collect(c) == reference([1, 2, 3, 4, 5], 10)
    assert c.reused_prefix == 0
    assert not backend.misuse


# A tiny real model: batched prefill (padded rows, or one ragged pass) against each request alone.
TINY = ArchSpec(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=64,
                rms_eps=1e-6, rope_theta=1e4, qk_norm=True)


async def _run_engine(backend: Any, prompts: list[list[int]], cfg: SchedulerConfig,
                      together: bool) -> list[list[int]]:
    async def run(batch: list[list[int]]) -> list[list[int]]:
        engine = Engine(backend, cfg)
        streams = [engine.submit(req(p, max_new=6)) for p in batch]  # all admitted at the first step
        engine.start()
        try:
            return list(await asyncio.gather(*(collect(s, timeout=60) for s in streams)))
        finally:
            engine.close()

    if together:
        return await run(prompts)
    return [(await run([p]))[0] for p in prompts]


@pytest.mark.parametrize("kind", ["padded", "ragged"])
async def test_batched_prefill_matches_per_sequence_on_a_real_model(kind: str) -> None:
    model = DecoderLM.random(TINY, 64, "cpu", torch.float64, seed=5)
    # Small ragged buckets: step 1 (31 prefill tokens + 2 decode rows) runs as two consecutive pieces.
    backend = TorchBackend(model, 6, cuda_graphs=kind == "ragged", ragged_buckets=(8, 16, 32))
    assert bool(getattr(backend, "ragged", False)) == (kind == "ragged")
    cfg = SchedulerConfig(token_budget=64, max_batch=16, prefill_chunk=8)
    prompts = [[(13 * i + 7 * j + 2) % 64 for j in range(n)] for i, n in enumerate([2, 7, 19, 26, 12])]
    alone = await _run_engine(backend, prompts, cfg, together=False)
    shapes: list[tuple[int, ...]] = []
    forward, forward_ragged = backend.forward, backend.forward_ragged

    def spy(tokens: torch.Tensor, *args: Any) -> torch.Tensor:
        shapes.append(tuple(tokens.shape))
        return forward(tokens, *args)

    def spy_ragged(tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        shapes.append((len(set(slots.tolist())), tokens.shape[0], rows.shape[0]))
        return forward_ragged(tokens, positions, slots, rows)

    backend.forward, backend.forward_ragged = spy, spy_ragged  # type: ignore[method-assign]
    together = await _run_engine(backend, prompts, cfg, together=True)
    assert together == alone and all(len(o) == 6 for o in alone)
    if kind == "padded":
        assert shapes[0] == (5, 8)  # all five chunks as one padded forward
    else:
        assert shapes[0] == (5, 33, 2)  # five sequences, 31 prefill tokens + 2 decode rows, logits for 2
    # And both ways give the same tokens as the other kind of backend.
    other = TorchBackend(model, 6, cuda_graphs=kind != "ragged")
    assert await _run_engine(other, prompts, cfg, together=True) == alone


def test_ragged_step_matches_the_reference_forward_on_cpu() -> None:
    model = DecoderLM.random(TINY, 64, "cpu", torch.float32, seed=9)
    _check_ragged(model, torch.device("cpu"), attention="torch", tol=1e-4)


def _check_ragged(model: DecoderLM, dev: torch.device, attention: str, tol: float) -> None:
    """One ragged call (A decodes at 10, B prefills 0..20 and decodes at 21, C prefills 0..4), then one larger
    than the largest bucket (C prefills 5..44 and decodes 45), against per-sequence eager forwards."""
    g = torch.Generator().manual_seed(3)
    cache, ref = model.new_cache(4), model.new_cache(4)
    gd = GraphedDecoder(model, cache, scratch_slot=3, buckets=(1, 2, 4), attention=attention,  # type: ignore[arg-type]
                        prefill_buckets=(8,), ragged_buckets=(16, 32))
    gd.capture()
    vocab = model.spec.vocab_size
    a_tokens = torch.randint(0, vocab, (11,), generator=g)
    for c in (cache, ref):
        model.forward(c, a_tokens[None, :10].to(dev), torch.arange(10, device=dev)[None], torch.tensor([0], device=dev))
    b_tokens, c_tokens = torch.randint(0, vocab, (22,), generator=g), torch.randint(0, vocab, (46,), generator=g)

    def ref_rows(rows: list[tuple[int, torch.Tensor, int]]) -> torch.Tensor:  # (slot, tokens, first position)
        out = []
        for slot, toks, start in rows:
            pos = torch.arange(start, start + len(toks), device=dev)[None]
            out.append(model.forward(ref, toks[None].to(dev), pos, torch.tensor([slot], device=dev))[0])
        return torch.stack(out)

    def flat(parts: list[tuple[int, torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
        return (torch.cat([t for _, t, _ in parts]), torch.cat([torch.arange(s, s + len(t)) for _, t, s in parts]),
                torch.cat([torch.full((len(t),), slot) for slot, t, _ in parts]))

    parts = [(0, a_tokens[10:], 10), (1, b_tokens, 0), (2, c_tokens[:5], 0)]
    got = gd.ragged(*flat(parts), torch.tensor([0, 22]))  # rows: A's token and B's last
    want = ref_rows(parts[:2])
    ref_rows(parts[2:])
    assert float((got - want).norm() / want.norm()) < tol
    parts = [(2, c_tokens[5:], 5)]  # 41 tokens: pieces of 32 and 9
    got = gd.ragged(*flat(parts), torch.tensor([40]))
    want = ref_rows(parts)
    assert float((got - want).norm() / want.norm()) < tol
    assert gd.ragged(*flat([(1, torch.tensor([4]), 22)]), torch.tensor([], dtype=torch.long)).shape == (0, vocab)
    ref_rows([(1, torch.tensor([4]), 22)])
    for c_, r_ in ((cache.k, ref.k), (cache.v, ref.v)):
        for slot, n in ((0, 11), (1, 23), (2, 46)):
            x, y = c_[:, slot, :, :n].float(), r_[:, slot, :, :n].float()
            assert float((x - y).norm() / y.norm()) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (graphs, Triton)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_graphs_match_the_reference_forward_on_cuda(dtype: torch.dtype) -> None:
    model = DecoderLM.random(replace(TINY, head_dim=16, n_heads=8, n_kv_heads=2), 640, "cuda", dtype, seed=4)
    _check_ragged(model, torch.device("cuda"), attention="auto", tol=3e-2 if dtype == torch.bfloat16 else 1e-2)
