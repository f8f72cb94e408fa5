"""The shared worker pools take turns among sessions (`FairPool`): one session's pile of work cannot make
another session wait behind all of it."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from realtime.runtime import FairPool, work_owner


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
