"""A server process's life: not ready -> ready -> draining -> stopped.

Ready once the runtime's models are loaded and warmed (`Runtime.warm`): `/readyz` says so and a load
balancer may send sessions. On SIGTERM (`duet serve` installs the handler) the process drains: `/readyz`
turns false and new connections are refused with 503 (realtime/transports/ops_routes.py), replies in flight
finish, for up to `server.shutdown_grace_seconds`, and then the transport closes the sessions left with
WebSocket close code 1001 (going away) and the process exits 0. A client mid-reply gets its `response.done`.

The lifecycle only watches `runtime.sessions`, the registry every transport keeps, so it needs nothing from
the wire: the transport closes its sockets itself once `drain` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sized

from realtime.runtime import Runtime

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a drain looks at the sessions: cheap, and short next to any grace period


def reply_in_flight(session: object) -> bool:
    """Does this session owe its client something the drain should wait for: a response not yet done, a
    committed turn still being transcribed (its response is about to start), or server events queued and
    not yet sent (a response.done among them)?"""
    # Duck-typed: a phone call registers its Session too, and tests register stand-ins.
    response = getattr(session, "response", None)
    if response is not None and not response.done:
        return True
    # A committed turn is transcribed in a task named "<session>-turn" (Session._commit_turn): once the user
    # has finished speaking, the reply is in flight from their side.
    if any(t.get_name().endswith("-turn") and not t.done() for t in getattr(session, "_tasks", ())):
        return True
    # The transports hand `Outbox.put` to the session as its emit: the outbox is the bound method's owner.
    outbox = getattr(getattr(session, "emit", None), "__self__", None)
    return isinstance(outbox, Sized) and len(outbox) > 0


class Lifecycle:
    def __init__(self, runtime: Runtime, grace_seconds: float) -> None:
        self.rt = runtime
        self.grace_seconds = grace_seconds
        self.draining = False
        self.drained = False
        self._stop = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """Models loaded and warmed, and not draining: new sessions are welcome."""
        return self.rt.warmed and not self.draining

    def request_stop(self) -> None:
        """The signal handler: begin the shutdown (`serve` waits on `stopped`). Safe to call twice."""
        if not self._stop.is_set():
            log.info("shutdown requested: draining (grace %.1f s)", self.grace_seconds)
        self.draining = True  # at once: the next handshake is refused, even before the drain task runs
        self._stop.set()

    async def stopped(self) -> None:
        await self._stop.wait()

    def busy_sessions(self) -> list[str]:
        return [sid for sid, s in list(self.rt.sessions.items()) if reply_in_flight(s)]

    async def drain(self) -> None:
        """Refuse new sessions and wait (at most the grace period) until no session has a reply in flight.
        Concurrent and repeated calls share one drain."""
        self.draining = True
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="duet-drain")
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        t0 = time.monotonic()
        busy = self.busy_sessions()
        if busy:
            log.info("draining: waiting for %d session(s) with replies in flight", len(busy))
        # grace_seconds is read each time: a second signal sets it to 0 to cut the wait short.
        while busy and time.monotonic() < t0 + self.grace_seconds:
            await asyncio.sleep(POLL_S)
            busy = self.busy_sessions()
        if busy:
            log.warning("grace period of %.1f s over: closing %d session(s) mid-reply (%s)", self.grace_seconds,
                        len(busy), ", ".join(busy))
        log.info("drained in %.2f s; %d session(s) to close", time.monotonic() - t0, len(self.rt.sessions))
        self.drained = True
