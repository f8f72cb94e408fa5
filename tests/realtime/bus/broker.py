"""A real Mosquitto broker on loopback for the bus tests, and a TCP relay that plays a broker going away.

`broker` is a session-scoped fixture (import `broker_fixture`): `mosquitto -c <conf>` on a free port of
127.0.0.1, from a minimal config in a temporary directory, killed at the end. Tests that need it are skipped
(with the reason) only when the `mosquitto` binary is missing; CI installs it (.ci/run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        conf = directory / "mosquitto.conf"
        # No persistence: a test run starts from an empty broker. Anonymous: the tests speak to loopback only.
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\n")
        self.log = directory / "mosquitto.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([shutil.which("mosquitto") or "mosquitto", "-c", str(conf)],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="session", name="broker")
def broker_fixture() -> Iterator[Broker]:
    """Import `broker_fixture` into a test module to use the `broker` fixture there."""
    if shutil.which("mosquitto") is None:
        pytest.skip("the mosquitto binary is missing (Debian: apt-get install mosquitto; .ci/run installs it)")
    with tempfile.TemporaryDirectory(prefix="duet-mosquitto-") as tmp:
        b = Broker(Path(tmp))
        try:
            yield b
        finally:
            b.stop()


class Relay:
    """A TCP relay to the broker that a test opens, closes and cuts: the bus connects through it, so the
    broker can be absent (nothing listens), come back, or drop every connection, while the test's own
    clients stay connected to the broker itself."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Stop listening and cut every relayed connection (as a dead broker or network would)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def relay(broker: Broker) -> AsyncIterator[Relay]:
    r = Relay(broker.port)
    try:
        yield r
    finally:
        await r.close()


class Inbox:
    """Every message on the client's subscriptions, as (topic, JSON payload, retained), kept in order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, Any, bool]] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for m in self.client.messages:
            payload = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else str(m.payload)
            self.messages.append((str(m.topic), json.loads(payload) if payload else None, bool(m.retain)))
            self._new.set()

    async def wait_for(self, match: Callable[[str, Any], bool], timeout: float = 15.0) -> tuple[str, Any, bool]:
        """The first message (seen so far or coming) whose topic and payload match."""
        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages:
                    if match(message[0], message[1]):
                        return message
                self._new.clear()
                await self._new.wait()

    def on(self, suffix: str) -> list[Any]:
        return [p for t, p, _ in self.messages if t.endswith(suffix)]


@contextlib.asynccontextmanager
async def inbox(port: int, *topics: str) -> AsyncIterator[Inbox]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        box = Inbox(client)
        try:
            yield box
        finally:
            box._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await box._task
