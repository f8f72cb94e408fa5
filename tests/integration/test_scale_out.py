"""Scale-out end to end: two real Duet servers (over the test run's one runtime, each with its own session
registry and MQTT bus) on one real Mosquitto broker, and `duet route` in front of them.

The router sends a new connection to the less-loaded server (a WebSocket client follows its 307 to a real
session there), stops choosing a server whose process dies (the broker's last will), and the HAProxy file it
writes balances real connections over both servers by least connections. No speech: a session's load is its
open connection, so `session.created` is all a test needs to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from common.config import MqttConfig
from realtime.bus.mqtt import MqttBus
from realtime.bus.router import Router, RouterOptions, haproxy_config
from realtime.runtime import Runtime
from realtime.transports.websocket import DuetServer
from tests.realtime.bus.broker import Broker, Relay, broker_fixture, free_port  # noqa: F401  (the broker fixture)

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class Node:
    """One `duet serve` as the cluster sees it: a server, its sessions and its bus."""

    server_id: str
    rt: Runtime
    server: DuetServer
    bus: MqttBus
    url: str


@contextlib.asynccontextmanager
async def node(runtime: Runtime, server_id: str, prefix: str, broker_port: int) -> AsyncIterator[Node]:
    cfg = MqttConfig(enabled=True, port=broker_port, server_id=server_id, topic_prefix=prefix, reconnect_min_s=0.1,
                     reconnect_max_s=0.5)
    # A copy of the shared runtime with its own session registry: each node counts only its own sessions.
    rt = dataclasses.replace(runtime, config=dataclasses.replace(runtime.config, mqtt=cfg), sessions={},
                             observers=[], session_observers=[], server_tools=None)
    server = DuetServer(rt)
    await server.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    bus = await MqttBus(rt, environ={}).start(url)
    try:
        await asyncio.wait_for(bus.connected.wait(), 15)
        yield Node(server_id, rt, server, bus, url)
    finally:
        await server.close()
        await bus.close()


@dataclasses.dataclass
class Cluster:
    a: Node
    b: Node
    b_line: Relay  # b's only way to the broker: cutting it is b's process dying, as the broker sees it
    router: Router
    base: str  # the router's HTTP base URL


async def until(predicate: Any, what: str, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def cluster(runtime: Runtime, broker: Broker) -> AsyncIterator[Cluster]:
    prefix = f"scale{uuid.uuid4().hex[:6]}"  # the broker serves the whole run: other tests' presence stays out
    b_line = Relay(broker.port)
    await b_line.open()
    router = await Router(MqttConfig(port=broker.port, topic_prefix=prefix, reconnect_min_s=0.1),
                          RouterOptions(), environ={}).start()
    try:
        # Ids that sort a < b: on equal load the router takes a.
        async with node(runtime, "a-node", prefix, broker.port) as a, node(runtime, "b-node", prefix, b_line.port) as b:
            port = await router.serve("127.0.0.1", 0)
            await until(lambda: set(router.registry.servers) == {"a-node", "b-node"}, "both nodes' presence")
            yield Cluster(a, b, b_line, router, f"http://127.0.0.1:{port}")
    finally:
        await router.close()
        await b_line.close()


@contextlib.asynccontextmanager
async def session(url: str) -> AsyncIterator[tuple[ClientConnection, str]]:
    """An open realtime session (following any redirect), and its id once `session.created` arrived."""
    async with connect(url, open_timeout=30) as ws:
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert event["type"] == "session.created", event
        yield ws, event["session"]["id"]


def where(c: Cluster, session_id: str) -> str:
    owners = [n.server_id for n in (c.a, c.b) if session_id in n.rt.sessions]
    assert len(owners) == 1, owners
    return owners[0]


async def test_new_connections_go_to_the_less_loaded_server_and_never_to_a_dead_one(cluster: Cluster) -> None:
    c = cluster
    realtime = c.base.replace("http://", "ws://") + "/v1/realtime"
    async with contextlib.AsyncExitStack() as stack:
        # Two sessions on a, opened straight at it (as clients that do not use the router would).
        for _ in range(2):
            await stack.enter_async_context(session(c.a.url))
        await until(lambda: c.router.registry.servers["a-node"].sessions == 2, "a's presence to count 2 sessions")

        # Through the router: websockets follows the 307 to b, the less-loaded server, twice.
        for _ in range(2):
            _, sid = await stack.enter_async_context(session(realtime))
            assert where(c, sid) == "b-node"
        await until(lambda: c.router.registry.servers["b-node"].sessions == 2, "b's presence to count 2 sessions")
        assert len(c.a.rt.sessions) == 2 and len(c.b.rt.sessions) == 2

        # 2 and 2: the next goes to a (equal load, the first by name); the JSON route names it first.
        async with aiohttp.ClientSession() as http:
            route = await (await http.get(f"{c.base}/v1/realtime/route")).json()
            assert route["server_id"] == "a-node" and route["url"] == c.a.url
            _, sid = await stack.enter_async_context(session(route["url"]))
            assert where(c, sid) == "a-node"

            # b's process dies (its broker connection drops without a goodbye): the broker publishes b's last
            # will, and the router sends everyone to a, though a is the busier.
            await c.b_line.close()
            await until(lambda: "b-node" not in c.router.registry.servers, "b's last will to reach the router")
            for _ in range(2):
                moved = await http.get(f"{c.base}/v1/realtime", allow_redirects=False)
                assert moved.status == 307 and moved.headers["Location"] == c.a.url
            _, sid = await stack.enter_async_context(session(realtime))
            assert where(c, sid) == "a-node"


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy missing (Debian: apt-get install haproxy)")
async def test_the_generated_haproxy_config_spreads_connections_over_both_servers(cluster: Cluster,
                                                                                  tmp_path: Path) -> None:
    c = cluster
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(c.router.registry.live(), bind=f"127.0.0.1:{port}"))
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        front = f"ws://127.0.0.1:{port}/v1/realtime"
        async with aiohttp.ClientSession() as http:
            async def proxied_ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    return (await http.get(f"http://127.0.0.1:{port}/readyz")).status == 200
                return False

            async with asyncio.timeout(20):
                while not await proxied_ready():
                    assert proxy.poll() is None, proxy.stdout.read().decode() if proxy.stdout else ""
                    await asyncio.sleep(0.1)
        async with session(front) as (_, first), session(front) as (_, second), session(front) as (_, third):
            # leastconn: while the first is open, the second goes to the other server; 1-1, then either.
            assert {where(c, first), where(c, second)} == {"a-node", "b-node"}
            assert where(c, third) in {"a-node", "b-node"}
            assert len(c.a.rt.sessions) + len(c.b.rt.sessions) == 3
    finally:
        proxy.terminate()
        proxy.wait(10)
