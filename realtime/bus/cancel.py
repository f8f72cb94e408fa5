"""Cancellation that aiomqtt's waits can lose on Python 3.11, found again; and how long a close waits.

aiomqtt waits for a broker's acknowledgement (and for a clean disconnect) with `asyncio.wait_for`. On Python
3.11, when a task is cancelled in the same loop pass as the awaited acknowledgement lands, `wait_for` returns
the result and the cancellation is gone (cpython gh-86296, fixed in 3.12 by building `wait_for` on
`asyncio.timeout`). An MQTT task that `close()` cancelled then runs on, and `close()` waits for it forever: the
scale-out test's teardown hung CI that way, its bus still waiting to publish the next event. An exception that
`__aexit__` raises on the way out (a disconnect that timed out) hides a cancellation the same way.

The request survives in `Task.cancelling()`, so the bus's loops check it after each wait on the broker.
"""

from __future__ import annotations

import asyncio

# How long a bus or router's close() waits for its cancelled tasks: a disconnect waits up to aiomqtt's 5 s.
CLOSE_WAIT_S = 10.0


def raise_if_cancelled() -> None:
    """Raise CancelledError in a task that was asked to stop, even if an await on the way swallowed it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
