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
import gc
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
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


def task_report() -> list[str]:
    """On the loop's own thread: every pending task and where it waits."""
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    lines = [f"---- {len(tasks)} pending asyncio tasks ----"]
    for task in tasks:
        lines.append(f"{task.get_name()}:")
        lines.extend(f"    {line}" for line in await_chain(task.get_coro()))
    return lines


def await_chain(coro: object) -> Iterator[str]:
    """Where a coroutine waits, outermost first, down the chain of awaits (`Task.print_stack` shows only the
    outermost frame of a coroutine). An awaitable without a frame (an async generator's `asend`, a future's
    iterator) is looked through to the generator or future it holds, so a fixture's teardown shows too."""
    for _ in range(64):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            yield f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
            inner = (getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
                     or getattr(coro, "gi_yieldfrom", None))
        else:
            inner = held_awaitable(coro)
            if inner is None:
                if coro is not None:
                    yield repr(coro)[:300]  # a future or other awaitable: what the chain ends on
                return
        if inner is None:
            return
        coro = inner


def held_awaitable(obj: object) -> object | None:
    """The generator, coroutine or future that a frameless awaitable wraps (`async_generator_asend` holds its
    generator, `FutureIter` its future); None for anything else."""
    if isinstance(obj, asyncio.Future):
        return None
    for ref in gc.get_referents(obj):
        if any(hasattr(ref, a) for a in ("cr_frame", "ag_frame", "gi_frame")) or isinstance(ref, asyncio.Future):
            return ref
    return None


# What the last hang showed, printed again at the very end of the run: CI keeps only the tail of the output.
REPORT: list[str] = []
INSTALL_PREFIX = re.compile(r"/\S*/(site-packages|lib/python3\.\d+)/")


def short(line: str) -> str:
    """A frame line without the long install and checkout prefixes (the tail of CI's output is short)."""
    return INSTALL_PREFIX.sub("", line).replace(os.getcwd() + os.sep, "")


def report_hang(config: pytest.Config, nodeid: str, main_id: int) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # the test's output is captured: this goes to the real stderr
        capture.suspend_global_capture(in_=False)
    # Handlers left pointing at a closed capture stream would print a traceback per log line from here on.
    logging.raiseExceptions = False
    REPORT.append(f"==== {nodeid} still running after {HANG_S:g} s ====")
    print(f"\n{REPORT[0]}: stacks, then the run is interrupted", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    frame = sys._current_frames().get(main_id)
    if frame is not None:  # (format_stack(None) would show this timer thread instead)
        REPORT.append("main thread, innermost last:")
        REPORT.extend(f"    {short(line.strip())}" for line in traceback.format_stack(frame)[-12:]
                      if "File" in line)
    loop = running_loop_of(main_id)
    if loop is not None:
        loop.call_soon_threadsafe(lambda: REPORT.extend(task_report()))
        time.sleep(2.0)  # the loop lists its tasks unless a blocking call holds it (the thread dump shows that)
    print("\n".join(REPORT[1:]), file=sys.stderr)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGINT)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("hang watch")
        for line in REPORT:
            terminalreporter.write_line(short(line))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    timer = threading.Timer(HANG_S, report_hang, args=(item.config, item.nodeid, threading.get_ident()))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()
