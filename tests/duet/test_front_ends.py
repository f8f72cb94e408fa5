"""`duet serve` with server.front_ends = N (duet/front_ends.py): `duet engine` and N front ends on one port.

The process test runs the real thing on the bundled CPU models: the kernel deals connections over both front ends,
a spoken turn is answered through them, a killed front end is started again, and SIGTERM stops every process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from clients.talk import talk
from common.config import ConfigError, load_config
from duet import front_ends
from duet.cli import build_parser
from tests.duet.serve_process import serve


def test_each_front_end_is_a_remote_brained_share_of_the_server() -> None:
    config = load_config(None, ["server.front_ends=3", "server.max_sessions=64", "server.metrics_port=9300",
                                'mqtt.server_id="box"'])
    url = "http://127.0.0.1:41234/v1"
    fronts = [load_config(None, front_ends.front_end_sets(config, k, url)) for k in range(3)]
    for k, front in enumerate(fronts):
        assert front.server.front_ends == 0  # a front end does not supervise in turn
        assert front.server.reuse_port
        assert (front.llm.backend, front.llm.remote_url) == ("remote", url)
        # A share of 64 with slack for the kernel's random dealing: 3 x 27 holds 64 even when dealt unevenly.
        assert front.server.max_sessions == front_ends.session_share(64, 3) == 27
        assert front.server.metrics_port == 9300 + k  # one scrape port each
        assert front.mqtt.server_id == f"box-fe{k}"  # one presence each


def test_children_parse_as_duet_commands_with_the_global_flags_first(tmp_path: Path) -> None:
    config = load_config(None, ["server.front_ends=2", 'mqtt.server_id="a \\"b\\""'])
    sup = front_ends.FrontEnds(config, ["--config", str(tmp_path / "x.toml"), "--set", "llm.max_slots=8"],
                               "127.0.0.1", 8765, flags=["-v"])
    sup.engine_port, sup.engine_url = 41234, "http://127.0.0.1:41234/v1"
    for child in (sup.engine_child(), sup.front_child(1)):
        args = build_parser().parse_args([*child.flags, *child.argv])
        assert args.verbose and args.command == child.argv[0]
        settings = load_config(None, args.set)  # every override is valid TOML, quotes in the server id included
        assert settings.server.reuse_port and settings.llm.max_slots == 8
    assert settings.mqtt.server_id == 'a "b"-fe1' and args.port == 8765


def test_a_port_in_use_fails_at_once_before_any_model_loads() -> None:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sup = front_ends.FrontEnds(load_config(None, ["server.front_ends=2"]), [], "127.0.0.1",
                                   taken.getsockname()[1], out=io.StringIO())
        try:
            assert sup.run() == 1
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    assert sup.engine is None and sup.fronts == []  # nothing was started


def test_no_metrics_port_stays_none_and_a_negative_count_is_refused() -> None:
    config = load_config(None, ["server.front_ends=2"])
    assert load_config(None, front_ends.front_end_sets(config, 1, "http://x/v1")).server.metrics_port == 0
    with pytest.raises(ConfigError, match="front_ends"):
        load_config(None, ["server.front_ends=-1"])


async def test_a_supervised_child_stops_when_its_supervisor_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped: list[bool] = []
    monkeypatch.setenv(front_ends.SUPERVISOR_ENV, str(os.getppid()))  # our parent lives: keep waiting
    watch = asyncio.create_task(front_ends.watch_supervisor(lambda: stopped.append(True), interval_s=0.01))
    await asyncio.sleep(0.1)
    assert not stopped and not watch.done()
    watch.cancel()
    monkeypatch.setenv(front_ends.SUPERVISOR_ENV, "1" if os.getppid() != 1 else "2")  # not our parent: gone
    await asyncio.wait_for(front_ends.watch_supervisor(lambda: stopped.append(True), interval_s=0.01), 5)
    assert stopped == [True]


def test_a_supervised_child_stops_only_on_its_supervisors_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert front_ends.stop_signals() == (signal.SIGTERM, signal.SIGINT)  # unsupervised: as ever
        monkeypatch.setenv(front_ends.SUPERVISOR_ENV, str(os.getppid()))
        assert front_ends.stop_signals() == (front_ends.STOP_SIGNAL,)
        # systemd and `timeout` signal the whole group: the engine must outlive the front ends' drains.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _children(pid: int) -> dict[int, str]:
    """{pid: the duet command} of `pid`'s child processes, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status and b"duet.cli" in argv:
            found[int(entry.name)] = argv[argv.index(b"duet.cli") + 1].decode()
    return found


def _sessions_open(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("duet_sessions_active "):
                return float(line.split()[1])
    raise AssertionError("no duet_sessions_active")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free just now (the front ends' metrics ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two free ports")


@pytest.mark.integration
async def test_two_front_ends_share_one_port_restart_and_stop(tmp_path: Path, speak: Any) -> None:
    metrics_port = _free_port_pair()
    lines: list[str] = []
    proc, url, stderr = serve(tmp_path, "--set", "server.front_ends=2", "--set", f"server.metrics_port={metrics_port}",
                              "--set", 'mind.mode="nothink"', "--set", "llm.max_reply_tokens=24", lines=lines)
    pids: set[int] = set()
    try:
        children = _children(proc.pid)
        pids |= set(children)
        assert sorted(children.values()) == ["engine", "serve", "serve"], children
        # The kernel deals connections over the listeners of the port: 16 sessions all on one front end would
        # happen about once in 30,000 runs.
        async def opened() -> ClientConnection:
            ws = await connect(url, open_timeout=30)
            assert json.loads(await ws.recv())["type"] == "session.created"
            return ws

        sockets = await asyncio.gather(*(opened() for _ in range(16)))
        per_front = [_sessions_open(metrics_port + k) for k in range(2)]
        for ws in sockets:
            await ws.close()
        assert sum(per_front) == 16 and min(per_front) > 0, per_front

        result = await talk(speak("What is the capital of France?"), url, timeout_s=120)
        assert result["errors"] == [] and "france" in result["user_transcript"].lower(), result
        assert result["reply_audio_s"] > 0.3 and result["reply_transcript"], result

        # A front end that dies is started again; the port keeps answering meanwhile (the other listens on it).
        victim = next(pid for pid, cmd in children.items() if cmd == "serve")
        os.kill(victim, signal.SIGKILL)
        # Until the supervisor has reaped it: a connection dealt to it as it dies is reset, and neither an empty
        # /proc/PID/cmdline nor a zombie main thread means its sockets are closed (its other threads may still be
        # exiting, holding the files).
        while Path(f"/proc/{victim}").exists():
            await asyncio.sleep(0.05)
        async with connect(url, open_timeout=30) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        deadline = time.monotonic() + 240
        while sum("listening on" in line and line.startswith("front end") for line in lines) < 3:
            assert time.monotonic() < deadline, (lines[-20:], stderr.read_text()[-2000:])
            assert proc.poll() is None
            await asyncio.sleep(1)
        restarted = _children(proc.pid)
        pids |= set(restarted)
        assert victim not in restarted and sorted(restarted.values()) == ["engine", "serve", "serve"], restarted
        assert "exited with -9" in stderr.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, 90)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *pids]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise
    assert code == 0, stderr.read_text()[-3000:]
    # Every child stopped and reaped by the supervisor: none left holding the port or the model.
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], pids
    for _ in range(100):  # the reader thread may not have read the last line yet
        if lines and lines[-1] == "stopped":
            break
        await asyncio.sleep(0.05)
    assert lines[-1] == "stopped", lines[-10:]
