"""`duet route` without models: the registry's choice (least loaded, full servers skipped, picks counted until
the next presence, silent servers aged out), the HAProxy file (checked by `haproxy -c` where installed), and
the router against a real Mosquitto: stand-in servers publish presence with a last will, one dies, and the
HTTP routes follow."""

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
from types import SimpleNamespace
from typing import Any

import aiohttp
import aiomqtt
import pytest

from common.config import DuetConfig, MqttConfig
from duet.cli import main
from realtime.bus.mqtt import MqttBus
from realtime.bus.router import Registry, Router, RouterOptions, Server, haproxy_config, write_if_changed
from tests.realtime.bus.broker import Broker, broker_fixture, relay  # noqa: F401  (the broker fixture)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def presence(sessions: int, capacity: int = 4, url: str = "ws://10.0.0.1:8765/v1/realtime",
             status: str = "online") -> dict[str, Any]:
    return {"status": status, "sessions": sessions, "capacity": capacity, "url": url, "dropped": 0,
            "timestamp": 0.0}


def registry(clock: Clock | None = None) -> Registry:
    r = Registry(stale_after_s=30, pick_ttl_s=5, clock=clock or Clock())
    return r


# ---- the registry -------------------------------------------------------------------------------------
def test_the_least_loaded_server_is_chosen_by_share_of_its_capacity() -> None:
    r = registry()
    r.update("big", presence(4, capacity=16, url="ws://big:1/v1/realtime"))  # 25 % full
    r.update("small", presence(1, capacity=2, url="ws://small:1/v1/realtime"))  # 50 % full, fewer sessions
    chosen = r.choose()
    assert chosen is not None and chosen.server_id == "big"


def test_each_pick_counts_until_the_next_presence_so_a_burst_is_spread() -> None:
    clock = Clock()
    r = registry(clock)
    r.update("a", presence(0))
    r.update("b", presence(0))
    picks = [r.choose() for _ in range(4)]
    assert [p.server_id for p in picks if p] == ["a", "b", "a", "b"]
    # a's presence now counts its two new sessions itself: the picks are not counted twice
    r.update("a", presence(2))
    assert r.servers["a"].load == 2 and r.servers["b"].load == 2
    # picks whose client never connected stop counting after pick_ttl_s
    clock.now += 6
    assert r.servers["b"].load == 2 and [s.load for s in r.live()] == [2, 0]


def test_full_servers_are_skipped_and_none_when_all_are_full() -> None:
    r = registry()
    r.update("a", presence(4, capacity=4))
    r.update("b", presence(3, capacity=4))
    assert (chosen := r.choose()) is not None and chosen.server_id == "b"
    assert r.choose() is None, "b is full now that a client was sent there"


@pytest.mark.parametrize("payload", [
    presence(0, status="offline"), presence(0, status="draining"), None, {"status": "online"},
    presence(0, url="http://not-a-websocket"), {**presence(0), "sessions": True}, {**presence(0), "capacity": 0},
    ["not", "an", "object"],
])
def test_a_server_leaves_on_offline_draining_or_a_presence_it_cannot_use(payload: Any) -> None:
    r = registry()
    r.update("a", presence(0))
    assert r.update("a", payload) is True
    assert r.servers == {} and r.choose() is None


def test_membership_changes_only_when_servers_come_go_or_move() -> None:
    r = registry()
    assert r.update("a", presence(0)) is True
    assert r.update("a", presence(3)) is False, "load alone does not touch the proxy's file"
    assert r.update("a", presence(3, url="ws://10.0.0.2:8765/v1/realtime")) is True


def test_a_silent_server_ages_out_but_not_while_the_router_has_lost_the_broker() -> None:
    clock = Clock()
    r = registry(clock)
    r.update("a", presence(0))
    r.update("b", presence(0))
    clock.now += 20
    r.update("b", presence(0))
    r.pause()
    clock.now += 100  # the router is away from the broker: nobody's silence counts
    assert [s.server_id for s in r.live()] == ["a", "b"]
    r.resume()
    clock.now += 11  # a: 31 s of silence while connected, b: 11 s
    assert [s.server_id for s in r.live()] == ["b"]


# ---- the HAProxy file ------------------------------------------------------------------------------
SERVERS = [Server("duet-2", "wss://duet-2.example.com/v1/realtime", 0, 128, 0.0),
           Server("duet-1", "ws://10.0.0.1:8765/v1/realtime", 5, 64, 0.0),
           Server("duet-v6", "ws://[::1]:9000/v1/realtime", 0, 8, 0.0)]


def test_the_haproxy_config_balances_by_least_connections_over_the_live_servers() -> None:
    text = haproxy_config(SERVERS, bind=":443", cert="/etc/duet/proxy.pem")
    lines = [line.strip() for line in text.splitlines()]
    assert "balance leastconn" in lines and "bind :443 ssl crt /etc/duet/proxy.pem" in lines
    # HAProxy 2.x sizes its tables from the fd limit: unbounded (2^30 in Docker) it exhausts memory at start.
    assert lines[lines.index("global") + 1] == "fd-hard-limit 1048576"
    servers = [line for line in lines if line.startswith("server ")]
    assert servers == [
        "server duet-1 10.0.0.1:8765 check inter 2s fall 2 rise 1 maxconn 64",
        "server duet-2 duet-2.example.com:443 check inter 2s fall 2 rise 1 maxconn 128 ssl verify required "
        "ca-file @system-ca sni str(duet-2.example.com)",
        "server duet-v6 [::1]:9000 check inter 2s fall 2 rise 1 maxconn 8",
    ]
    assert text == haproxy_config(list(reversed(SERVERS)), bind=":443", cert="/etc/duet/proxy.pem")


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy missing (Debian: apt-get install haproxy)")
def test_haproxy_accepts_the_generated_config(tmp_path: Path) -> None:
    for servers in (SERVERS, []):  # an empty backend is valid too: the proxy answers 503
        path = tmp_path / "duet.cfg"
        path.write_text(haproxy_config(servers, bind="127.0.0.1:18765"))  # -c binds nothing
        check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_proxy_file_is_replaced_whole_and_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "haproxy.cfg"
    assert write_if_changed(path, "one\n") is True
    assert write_if_changed(path, "one\n") is False
    assert write_if_changed(path, "two\n") is True and path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["haproxy.cfg"], "no temporary file left behind"


# ---- against a real broker --------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def stand_in(port: int, topic: str, body: dict[str, Any]) -> AsyncIterator[aiomqtt.Client]:
    """A server's bus as far as presence goes: retained presence, and the last will mqtt.py leaves."""
    will = aiomqtt.Will(topic, json.dumps({"status": "offline"}), qos=1, retain=True)
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"stand-in-{uuid.uuid4().hex[:8]}", will=will) as c:
        await c.publish(topic, json.dumps(body), qos=1, retain=True)
        try:
            yield c
        finally:
            # aiomqtt never retrieves the error of a connection cut under it: asyncio would log it as noise.
            lost = c._disconnected
            if lost.done() and not lost.cancelled():
                lost.exception()


async def until(predicate: Any, what: str, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)
    assert predicate(), what


async def test_the_router_follows_presence_routes_and_redirects_and_drops_a_dead_server(broker: Broker,
                                                                                         tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"  # the broker lives for the whole run: keep other tests' presence out
    cfg = MqttConfig(port=broker.port, topic_prefix=prefix, reconnect_min_s=0.05, reconnect_max_s=0.2)
    proxy_file = tmp_path / "haproxy.cfg"
    router = await Router(cfg, RouterOptions(haproxy_config=str(proxy_file), settle_s=0.05), environ={}).start()
    a_url, b_url = "ws://127.0.0.1:9001/v1/realtime", "ws://127.0.0.1:9002/v1/realtime"
    try:
        port = await router.serve("127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{base}/readyz")).status == 503
            none = await http.get(f"{base}/v1/realtime/route")
            assert none.status == 503 and (await none.json())["error"]["code"] == "no_server"

            async with relay(broker) as gate:  # b reaches the broker through a line the test can cut
                await gate.open()
                async with stand_in(broker.port, f"{prefix}/a/presence", presence(3, 8, a_url)), \
                        stand_in(gate.port, f"{prefix}/b/presence", presence(1, 8, b_url)):
                    await until(lambda: len(router.registry.servers) == 2, "both servers known")
                    assert (await http.get(f"{base}/readyz")).status == 200

                    route = await http.get(f"{base}/v1/realtime/route")
                    body = await route.json()
                    assert route.status == 200 and body["server_id"] == "b" and body["url"] == b_url
                    assert body["client_secrets_url"] == "http://127.0.0.1:9002/v1/realtime/client_secrets"
                    # b: 1 session + 1 routed; the next two go to b then a (a wins the 3-3 tie by name)
                    moved = await http.get(f"{base}/v1/realtime?duet_events=all", allow_redirects=False)
                    assert moved.status == 307
                    assert moved.headers["Location"] == "ws://127.0.0.1:9002/v1/realtime?duet_events=all"
                    nxt = await http.get(f"{base}/realtime/", allow_redirects=False)
                    assert nxt.headers["Location"] == "ws://127.0.0.1:9001/realtime/"

                    await until(lambda: "server b 127.0.0.1:9002" in _read(proxy_file), "b in the proxy file")
                    assert "server a 127.0.0.1:9001" in _read(proxy_file)

                    # b's process dies: the broker publishes its last will, and b is chosen no more.
                    await gate.close()
                    await until(lambda: set(router.registry.servers) == {"a"}, "b's last will applied")
                    for _ in range(3):
                        body = await (await http.get(f"{base}/v1/realtime/route")).json()
                        assert body["server_id"] == "a"
                    await until(lambda: "server b " not in _read(proxy_file), "b gone from the proxy file")
                    listed = await (await http.get(f"{base}/servers")).json()
                    assert listed["connected"] is True and [s["server_id"] for s in listed["servers"]] == ["a"]
                    # a says it is draining (SIGTERM): no new clients, though it still serves its own.
                    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                        await c.publish(f"{prefix}/a/presence", json.dumps(presence(3, url=a_url,
                                                                                     status="draining")),
                                        qos=1, retain=True)
                    await until(lambda: not router.registry.servers, "a draining")
                    assert (await http.get(f"{base}/v1/realtime", allow_redirects=False)).status == 503
    finally:
        await router.close()
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:  # clear the retained presence we left
            for sid in ("a", "b"):
                await c.publish(f"{prefix}/{sid}/presence", b"", qos=1, retain=True)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_duet_route_once_writes_the_haproxy_file_from_retained_presence(broker: Broker, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def publish(payload: bytes) -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.publish(f"{prefix}/solo/presence", payload, qos=1, retain=True)

    asyncio.run(publish(json.dumps(presence(0, capacity=32, url="ws://127.0.0.1:9100/v1/realtime")).encode()))
    try:
        out = tmp_path / "haproxy.cfg"
        assert main(["route", "--once", "--haproxy-config", str(out), "--set", f"mqtt.port={broker.port}",
                     "--set", f'mqtt.topic_prefix="{prefix}"']) == 0
        assert "    server solo 127.0.0.1:9100 check inter 2s fall 2 rise 1 maxconn 32" in out.read_text()
    finally:
        asyncio.run(publish(b""))


async def test_a_real_bus_is_routed_to_at_its_advertised_url_until_it_drains(broker: Broker) -> None:
    """MqttBus and Router together: presence carries `mqtt.url` (not the listening URL), a draining server
    leaves the router at once, and a clean close says offline."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    public = "wss://duet-7.example.com/v1/realtime"
    cfg = MqttConfig(enabled=True, port=broker.port, server_id="duet-7", topic_prefix=prefix, url=public,
                     reconnect_min_s=0.05)
    rt = SimpleNamespace(config=dataclasses.replace(DuetConfig(), mqtt=cfg), sessions={}, session_observers=[],
                         server_tools=None)
    router = await Router(cfg, environ={}).start()
    bus = await MqttBus(rt, environ={}).start("ws://0.0.0.0:8765/v1/realtime")  # type: ignore[arg-type]
    try:
        await until(lambda: "duet-7" in router.registry.servers, "the bus's presence")
        chosen = router.registry.choose()
        assert chosen is not None and chosen.url == public and chosen.capacity == DuetConfig().server.max_sessions
        bus.set_status("draining")
        await until(lambda: not router.registry.servers, "the draining presence")
        bus.set_status("online")
        await until(lambda: "duet-7" in router.registry.servers, "online again")
        await bus.close()
        await until(lambda: not router.registry.servers, "the offline presence of a clean close")
    finally:
        await bus.close()
        await router.close()
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.publish(f"{prefix}/duet-7/presence", b"", qos=1, retain=True)
