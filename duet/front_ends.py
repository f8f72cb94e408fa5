"""`duet serve` with `server.front_ends = N`: the process split as one command.

On the GPU machine one `duet serve` process tops out near 32 sessions: its event loop, the engine thread and the
VAD, Whisper and TTS threads take turns at one GIL. `duet engine` plus N `duet serve` front ends with their brains
remote on it held 64 sessions at a third of the latency (docs/benchmarks.md 7f). This runs that split:

- `duet engine` on a free loopback port, with a fresh random key (DUET_LLM_API_KEY) unless one is set;
- N `duet serve` front ends on the one configured address, each bound with SO_REUSEPORT, so the kernel deals new
  connections among them: no proxy in between, and clients see one server;
- a front end or the engine that dies is started again (after 1 s, doubling to 30 s while it keeps dying);
- SIGTERM or SIGINT drains the front ends (their own `shutdown_grace_seconds`; a second signal cuts it short),
  then stops the engine; exit 0. The children are stopped only this way (STOP_SIGNAL).

Limits are per process, so each front end takes a share of `server.max_sessions` (`session_share`). Per-client caps
(`auth.max_connections_per_client`) hold per front end. `/metrics` on the shared port answers for whichever front
end the kernel picks: set `server.metrics_port` for one port per front end (metrics_port + k) and scrape the
engine's `/metrics` at the URL this prints. Each front end announces itself on MQTT as `<server_id>-fe<k>`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from common.config import DuetConfig

log = logging.getLogger(__name__)

# Set in every child. A child then stops only when its supervisor says so, with STOP_SIGNAL, and ignores SIGTERM and
# SIGINT: a terminal's Ctrl-C reaches the whole process group, and systemd (KillMode=control-group) and `timeout`
# signal every process at once, which would stop the engine under front ends still draining, and give each front
# end a second signal that cuts its drain short. It also stops by itself if the supervisor is gone.
SUPERVISOR_ENV = "DUET_SUPERVISOR_PID"
STOP_SIGNAL = signal.SIGUSR1
RESTART_BACKOFF_S = (1.0, 30.0)
STOP_MARGIN_S = 15.0  # past a front end's grace period before it is killed


def front_end_sets(config: DuetConfig, k: int, engine_url: str) -> list[str]:
    """The `--set` overrides that make front end `k` of `config.server.front_ends` (after the user's own)."""
    server, n = config.server, config.server.front_ends
    server_id = f"{config.mqtt.server_id or socket.gethostname()}-fe{k}"
    sets = ["server.front_ends=0", "server.reuse_port=true", 'llm.backend="remote"',
            f"llm.remote_url={json.dumps(engine_url)}", f"server.max_sessions={session_share(server.max_sessions, n)}",
            f"mqtt.server_id={json.dumps(server_id)}"]  # a JSON string is a TOML basic string
    if server.metrics_port:
        sets.append(f"server.metrics_port={server.metrics_port + k}")
    return sets


def session_share(max_sessions: int, front_ends: int) -> int:
    """Each front end's `max_sessions`: its even share and a quarter more. The kernel deals connections at random,
    so with even shares the busiest front end would refuse sessions well before the total is reached (128 into 4:
    the busiest gets ~38 on average); the total may then exceed max_sessions by up to a quarter."""
    return math.ceil(max_sessions * 1.25 / front_ends)


def _hold_port(host: str, port: int, *, exclusive_check: bool) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, not listening: it keeps the port ours (a restart of the
    process that listens there finds it free of strangers, and port 0 becomes one port for all). With
    `exclusive_check`, first make sure nothing else holds the port: SO_REUSEPORT would quietly share it with
    another server of the same user, such as an old `duet serve` still draining."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    if exclusive_check and port:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            probe.bind(address)  # OSError (address in use) if any socket holds it
    hold = socket.socket(family, kind, proto)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind(address)
    return hold


@dataclass
class Child:
    """One supervised process: how to start it, and the line on its stdout that says it is ready."""

    name: str
    argv: list[str]  # after `duet` and its global flags
    ready: str
    flags: list[str] = field(default_factory=list)  # `duet`'s own flags (-v), before the command
    proc: subprocess.Popen[str] | None = None
    ready_line: str = ""
    backoff_s: float = RESTART_BACKOFF_S[0]
    due: float = 0.0  # when a dead child may start again (time.monotonic)
    started: float = 0.0

    def start(self, env: dict[str, str], out: TextIO) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "duet.cli", *self.flags, *self.argv],
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.started = time.monotonic()
        self.ready_line = ""
        self._ready = threading.Event()
        threading.Thread(target=self._relay, args=(self.proc, self._ready, out), daemon=True,
                         name=f"duet-{self.name}-stdout").start()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s) and bool(self.ready_line)

    def ended(self) -> bool:
        """It ended before saying it was ready (exited, or its stdout closed without the ready line)."""
        assert self.proc is not None
        return not self.ready_line and (self.proc.poll() is not None or self._ready.is_set())

    def _relay(self, proc: subprocess.Popen[str], ready: threading.Event, out: TextIO) -> None:
        """Its stdout, read to the end (a full pipe would block it), shown as `name: line`; the ready line kept."""
        assert proc.stdout is not None
        for line in proc.stdout:
            if not ready.is_set() and line.startswith(self.ready):
                self.ready_line = line.strip()
                ready.set()
            print(f"{self.name}: {line.rstrip()}", file=out, flush=True)
        ready.set()  # it ended: whoever waits learns it never got ready


class FrontEnds:
    """`duet engine` and N `duet serve` front ends on one address (see the module's docstring)."""

    def __init__(self, config: DuetConfig, config_args: list[str], host: str, port: int, *,
                 flags: list[str] | None = None, out: TextIO = sys.stdout) -> None:
        self.config, self.config_args, self.host, self.port, self.out = config, config_args, host, port, out
        self.flags = flags or []
        # Set by the signal handler, so plain flags: a handler that took a lock (Event.set) could interrupt the
        # main thread inside that same lock and wait on it forever.
        self.stopping = False
        self.hurry = False  # a second signal: the front ends' drains are cut short too
        key = os.environ.get("DUET_LLM_API_KEY") or secrets.token_urlsafe(24)
        self.env = {**os.environ, "DUET_LLM_API_KEY": key, SUPERVISOR_ENV: str(os.getpid())}
        self.engine: Child | None = None
        self.engine_port, self.engine_url = 0, ""  # taken in run()
        self.fronts: list[Child] = []
        self._held: list[socket.socket] = []

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            try:  # before the engine loads: a port in use fails now, not a minute from now
                front_hold = _hold_port(self.host, self.port, exclusive_check=True)
                engine_hold = _hold_port("127.0.0.1", 0, exclusive_check=False)
            except OSError as exc:
                log.error("cannot serve %s:%s: %s", self.host, self.port, exc)
                return 1
            self._held = [front_hold, engine_hold]
            self.port, self.engine_port = front_hold.getsockname()[1], engine_hold.getsockname()[1]
            self.engine_url = f"http://127.0.0.1:{self.engine_port}/v1"
            if not self._start_all():
                return 0 if self.stopping else 1
            print(f"{len(self.fronts)} front ends on port {self.port}, engine at {self.engine_url}", file=self.out)
            print(f"listening on ws://{self.host}:{self.port}/v1/realtime", file=self.out, flush=True)
            while not self.stopping:
                time.sleep(0.5)
                self._restart_dead()
            return 0
        finally:
            self._stop()
            for sock in self._held:
                sock.close()
            print("stopped", file=self.out, flush=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.hurry = self.stopping
        self.stopping = True

    def _ready(self, children: list[Child], timeout_s: float = 600.0) -> bool:
        """Whether every child said it is ready within `timeout_s`; False at once if one ended or a signal came."""
        deadline = time.monotonic() + timeout_s
        for child in children:
            while not child.wait_ready(0.5):
                if self.stopping or child.ended() or time.monotonic() > deadline:
                    if not self.stopping:
                        log.error("%s did not start", child.name)
                    return False
        return True

    def engine_child(self) -> Child:
        # It binds its port beside our held socket (SO_REUSEPORT), so a restart finds the port free.
        return Child("engine", ["engine", "--host", "127.0.0.1", "--port", str(self.engine_port), *self.config_args,
                                "--set", "server.reuse_port=true"], "serving engine", self.flags)

    def front_child(self, k: int) -> Child:
        sets = [x for s in front_end_sets(self.config, k, self.engine_url) for x in ("--set", s)]
        return Child(f"front end {k}", ["serve", "--host", self.host, "--port", str(self.port), *self.config_args,
                                        *sets], "listening on", self.flags)

    def _start_all(self) -> bool:
        engine = self.engine = self.engine_child()
        engine.start(self.env, self.out)
        if not self._ready([engine]):
            return False
        self.fronts = [self.front_child(k) for k in range(self.config.server.front_ends)]
        for child in self.fronts:  # together: one after another, 8 took 6 minutes on the GPU machine
            child.start(self.env, self.out)
        return self._ready(self.fronts)

    def _restart_dead(self) -> None:
        now = time.monotonic()
        assert self.engine is not None
        for child in [self.engine, *self.fronts]:
            assert child.proc is not None
            if child.proc.poll() is None:
                if now - child.started > 60:
                    child.backoff_s = RESTART_BACKOFF_S[0]  # it has lived a while: the next death starts afresh
                continue
            if not child.due:
                child.due = now + child.backoff_s
                log.error("%s exited with %s; starting it again in %.0f s", child.name, child.proc.returncode,
                          child.backoff_s)
                child.backoff_s = min(RESTART_BACKOFF_S[1], child.backoff_s * 2)
            elif now >= child.due:
                child.due = 0.0
                child.start(self.env, self.out)

    def _stop(self) -> None:
        """The front ends first (each drains its sessions; asked twice, it stops at once), then the engine."""
        grace = self.config.server.shutdown_grace_seconds + STOP_MARGIN_S
        engine = [self.engine] if self.engine is not None else []
        for group, passes_hurry in ((self.fronts, True), (engine, False)):
            live = [c.proc for c in group if c.proc is not None and c.proc.poll() is None]
            for proc in live:
                proc.send_signal(STOP_SIGNAL)
            hurried = not passes_hurry
            deadline = time.monotonic() + grace
            while any(proc.poll() is None for proc in live) and time.monotonic() < deadline:
                if self.hurry and not hurried:  # a second signal, however early: a second one to each front end
                    hurried = True
                    for proc in live:
                        if proc.poll() is None:
                            proc.send_signal(STOP_SIGNAL)
                time.sleep(0.1)
            for proc in live:
                if proc.poll() is None:
                    log.error("pid %d did not stop in %.0f s: killed", proc.pid, grace)
                    proc.kill()
                proc.wait()


def supervised() -> int | None:
    """The supervisor's pid when this process is one of its children, else None."""
    pid = os.environ.get(SUPERVISOR_ENV, "")
    return int(pid) if pid.isdigit() else None


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals a `duet serve` or `duet engine` stops on: SIGTERM and SIGINT, or a supervised child's
    STOP_SIGNAL alone, ignoring the others from here on, model loading included (see STOP_SIGNAL)."""
    if supervised() is None:
        return (signal.SIGTERM, signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Until the event loop takes it over: a stop while the models load unwinds (the `finally`s close what loaded)
    # rather than SIGUSR1's default, which ends the process on the spot.
    signal.signal(STOP_SIGNAL, _exit_while_loading)
    return (STOP_SIGNAL,)


def _exit_while_loading(signum: int, frame: object) -> None:
    raise SystemExit(0)


async def watch_supervisor(stop: Callable[[], None], interval_s: float = 1.0) -> None:
    """In a supervised child: `stop()` once the supervisor is gone (killed, so it could not stop this child)."""
    pid = supervised()
    if pid is None:
        return
    while os.getppid() == pid:
        await asyncio.sleep(interval_s)
    log.warning("the supervisor (pid %d) is gone: stopping", pid)
    stop()
