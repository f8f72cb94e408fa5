"""The shared worker pools take turns among sessions (`FairPool`): one session's pile of work cannot make
another session wait behind all of it."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from common.config import AsrConfig, TtsConfig
from realtime.runtime import FairPool, LoopMonitor, pool_workers, work_owner
from tests.realtime.fake_runtime import fake_runtime


async def test_a_session_with_many_jobs_does_not_starve_another() -> None:
    order: list[str] = []
    lock = threading.Lock()

    def job(owner: str) -> str:
        time.sleep(0.005)  # fake model work
        with lock:
            order.append(owner)
        return owner

    with ThreadPoolExecutor(1) as executor:
        pool = FairPool(executor)
        hog = [asyncio.create_task(pool.run("hog", job, "hog")) for _ in range(50)]
        await asyncio.sleep(0.02)  # the hog's pile is queued first
        bystander = [asyncio.create_task(pool.run("bystander", job, "bystander")) for _ in range(3)]
        assert await asyncio.wait_for(asyncio.gather(*bystander), 30) == ["bystander"] * 3
        # Each of the bystander's jobs waited behind at most one of the hog's (plus the one running).
        positions = [i for i, owner in enumerate(order) if owner == "bystander"]
        assert positions[-1] <= 4 + 2 * 3, order[:20]
        await asyncio.wait_for(asyncio.gather(*hog), 30)
    assert order.count("hog") == 50


async def test_results_errors_and_cancelled_waiters() -> None:
    started = threading.Event()
    release = threading.Event()

    def blocker() -> str:
        started.set()
        release.wait(10)
        return "done"

    def fail() -> None:
        raise ValueError("boom")

    ran: list[str] = []
    with ThreadPoolExecutor(1) as executor:
        pool = FairPool(executor)
        first = asyncio.create_task(pool.run("a", blocker))
        await asyncio.to_thread(started.wait, 10)
        skipped = asyncio.create_task(pool.run("b", ran.append, "skipped"))
        failing = asyncio.create_task(pool.run("c", fail))
        await asyncio.sleep(0.01)
        skipped.cancel()  # cancelled while queued: it never runs
        release.set()
        assert await asyncio.wait_for(first, 10) == "done"
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wait_for(failing, 10)
        assert await asyncio.wait_for(pool.run("d", lambda: 7), 10) == 7
    assert ran == []
    assert pool.waiting == 0


async def test_work_owner_is_inherited_by_spawned_tasks() -> None:
    async def owner_in_child() -> str:
        return work_owner.get()

    async def session_task() -> str:
        work_owner.set("sess_1")
        return await asyncio.create_task(owner_in_child())

    assert await asyncio.create_task(session_task()) == "sess_1"
    assert work_owner.get() == ""  # the setting stayed in that session's task


async def test_sooner_deadlines_run_first_across_sessions() -> None:
    """While the one worker is busy, a first audio chunk (overdue deadline) queued last still runs before later
    chunks of other replies whose audio is not due yet; equal deadlines keep their round-robin order."""
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def blocker() -> None:
        started.set()
        release.wait(10)

    now = time.perf_counter()
    with ThreadPoolExecutor(1) as executor:
        pool = FairPool(executor)
        busy = asyncio.create_task(pool.run("x", blocker))
        await asyncio.to_thread(started.wait, 10)
        jobs = [asyncio.create_task(pool.run(owner, order.append, name, deadline=deadline))
                for owner, name, deadline in [("a", "a-later", now + 3.0), ("b", "b-later", now + 1.0),
                                              ("c", "c-none", float("inf")), ("d", "d-none", float("inf")),
                                              ("e", "e-first", now - 0.5)]]
        await asyncio.sleep(0.01)  # all queued behind the blocker
        release.set()
        await asyncio.wait_for(asyncio.gather(busy, *jobs), 10)
    assert order == ["e-first", "b-later", "a-later", "c-none", "d-none"]


async def test_one_session_s_own_jobs_run_by_deadline() -> None:
    started, release = threading.Event(), threading.Event()
    order: list[int] = []

    def blocker() -> None:
        started.set()
        release.wait(10)

    with ThreadPoolExecutor(1) as executor:
        pool = FairPool(executor)
        busy = asyncio.create_task(pool.run("s", blocker))
        await asyncio.to_thread(started.wait, 10)
        jobs = [asyncio.create_task(pool.run("s", order.append, i, deadline=float(d))) for i, d in
                enumerate([5, 1, 3])]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(asyncio.gather(busy, *jobs), 10)
    assert order == [1, 2, 0]


async def test_a_pool_of_several_workers_runs_sessions_in_parallel() -> None:
    """Two sessions' jobs overlap in a two-thread pool (each job waits until the other has started), and never
    more than `workers` run at once."""
    barrier = threading.Barrier(2, timeout=5)

    def job(name: str) -> str:
        barrier.wait()  # raises BrokenBarrierError unless both jobs run at the same time
        return name

    with ThreadPoolExecutor(2) as executor:
        pool = FairPool(executor, workers=2)
        results = await asyncio.wait_for(asyncio.gather(pool.run("a", job, "a"), pool.run("b", job, "b")), 10)
        assert results == ["a", "b"]
        await asyncio.wait_for(asyncio.gather(*(pool.run(str(i), time.sleep, 0.01) for i in range(6))), 10)
    assert pool.peak == 2


def test_pool_sizes_follow_the_config_then_the_cores() -> None:
    assert pool_workers(3, cores=2) == 3  # configured wins
    assert pool_workers(0, cores=2) == 2  # auto: one per core...
    assert pool_workers(0, cores=16) == 4  # ...at most 4
    assert pool_workers(0, cores=16, per_worker_threads=8) == 2
    assert pool_workers(0, cores=1, per_worker_threads=2) == 1  # never 0


def test_config_defaults_auto_size_tts_and_keep_one_asr_worker() -> None:
    # One ASR worker on 2 cores: two replicas at one thread each transcribe one turn ~2x slower (docs/benchmarks.md).
    assert TtsConfig().workers == 0 and AsrConfig().workers == 1


async def test_loop_monitor_sees_a_busy_loop_and_its_lag() -> None:
    monitor = LoopMonitor(interval_s=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.1)
        idle = monitor.busy_ratio
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # the loop computes instead of routing: it is busy and late
            sum(range(1000))
        await asyncio.sleep(0.05)
        assert monitor.lag_max_s > 0.2
        # CPU time, not wall time: on a shared 2-core machine the spinning thread gets only part of a core.
        assert monitor.busy_ratio > max(0.15, 3 * idle)
        assert monitor.busy_seconds > 0.1
    finally:
        monitor.stop()


def test_speculative_asr_only_while_an_asr_thread_is_free() -> None:
    rt = fake_runtime()
    rt.asr_pool = ThreadPoolExecutor(3)  # e.g. asr.engine = "torch": threads that wait on one batched decode
    for inflight, room in ((0, True), (2, True), (3, False), (5, False)):
        rt.asr_inflight = inflight
        assert rt.asr_has_room() is room
    rt.asr_pool = ThreadPoolExecutor(32)  # configs/gpu.toml: partial transcripts leave half the batch to final ones
    rt.asr_inflight = 15
    assert rt.asr_has_room(0.5)
    rt.asr_inflight = 16
    assert not rt.asr_has_room(0.5) and rt.asr_has_room()
    rt.asr_pool = ThreadPoolExecutor(1)  # the CPU stack's one Whisper thread: only when it is idle
    rt.asr_inflight = 1
    assert not rt.asr_has_room() and not rt.asr_has_room(0.5)
    rt.asr_inflight = 0
    assert rt.asr_has_room(0.5)


@pytest.mark.integration
def test_the_loaded_runtime_sets_the_configured_gil_switch_interval(runtime: object) -> None:
    """Every torch and socket call gives the GIL away; the interval bounds how long taking it back can wait."""
    assert sys.getswitchinterval() == pytest.approx(runtime.config.server.gil_switch_interval_ms / 1000)  # type: ignore[attr-defined]
