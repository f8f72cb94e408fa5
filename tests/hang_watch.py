"""A test that hangs ends the run within minutes, saying what it was waiting for.

Without this, one test stuck on an await that never completes holds CI until its job limit (90 minutes) and
prints nothing but the dots so far: that happened once, at the scale-out tests, and could not be reproduced.
A watchdog thread per test (setup, call and teardown together) fires after `DUET_TEST_HANG_S` seconds
(default 600; the slowest test takes ~2 minutes on 2 cores, loading the runtime included). It prints every
thread's stack and every pending asyncio task's stack (a hung await shows only the selector in the thread
dump), then interrupts the run as Ctrl-C would, so pytest reports the test and exits non-zero at once.

pytest's own `faulthandler_timeout` dumps threads but neither shows the tasks nor stops the run; pytest-timeout
also shows no tasks, and its signal method would break out of the shared event loop mid-iteration.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest

HANG_S = float(os.environ.get("DUET_TEST_HANG_S", "600"))


def running_loop_of(thread_id: int) -> asyncio.AbstractEventLoop | None:
    """The event loop `thread_id` is running, found on its stack (another thread's running loop is not
    reachable through asyncio's API)."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "run_forever" and isinstance(candidate, asyncio.AbstractEventLoop):
            return candidate
        frame = frame.f_back
    return None


def print_tasks() -> None:
    """On the loop's own thread: every pending task and where it waits."""
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    print(f"\n---- {len(tasks)} pending asyncio tasks ----", file=sys.stderr)
    for task in tasks:
        print(f"{task.get_name()}:", file=sys.stderr)
        for line in await_chain(task.get_coro()):
            print(f"    {line}", file=sys.stderr)
    sys.stderr.flush()


def await_chain(coro: object) -> Iterator[str]:
    """Where a coroutine waits, outermost first, down the chain of awaits (`Task.print_stack` shows only the
    outermost frame of a coroutine)."""
    for _ in range(64):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            yield f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        inner = (getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
                 or getattr(coro, "gi_yieldfrom", None))
        if inner is None:
            if coro is not None and frame is None:
                yield repr(coro)[:300]  # a future or other awaitable: what the chain ends on
            return
        coro = inner


def report_hang(config: pytest.Config, nodeid: str, main_id: int) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # the test's output is captured: this goes to the real stderr
        capture.suspend_global_capture(in_=False)
    print(f"\n==== {nodeid} still running after {HANG_S:g} s: stacks, then the run is interrupted ====",
          file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    loop = running_loop_of(main_id)
    if loop is not None:
        loop.call_soon_threadsafe(print_tasks)
        time.sleep(2.0)  # the loop prints its tasks unless a blocking call holds it (the thread dump shows that)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGINT)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    timer = threading.Timer(HANG_S, report_hang, args=(item.config, item.nodeid, threading.get_ident()))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()
