"""`duet route`: send each new connection to the least-loaded of several Duet servers sharing one broker.

Every `duet serve` with `[mqtt] enabled` publishes a retained `<prefix>/<server_id>/presence` message
(`{status, sessions, capacity, url, ...}`, realtime/bus/mqtt.py) and leaves a last will marking it offline.
The router subscribes to `<prefix>/+/presence`, keeps the servers that are `online`, not full and recently
heard from (`Registry`, sans-I/O), and serves on its own port (`Router`):

- `GET /v1/realtime/route`: `{server_id, url, client_secrets_url, sessions, capacity}` of the least-loaded
  server (503 when none). The robust way for any client: ask, then connect to `url` with its own headers.
- `GET /v1/realtime` (and `/v1/realtime/realtime`, `/realtime`): a 307 redirect to that server, with the path
  and query kept. Python's `websockets` and aiohttp follow a redirect on the WebSocket handshake (websockets
  strips `Authorization` on a cross-origin redirect; the `openai-insecure-api-key.` subprotocol survives it);
  browsers do not follow it at all, so they use the JSON route.
- `GET /servers`: the live servers as the router sees them; `/healthz`, `/readyz` (200 once the router is
  connected to the broker and knows a live server).
- With `haproxy_config`, an HAProxy configuration rendered from the live servers (`balance leastconn`, a
  `/readyz` health check, `maxconn` = each server's capacity), rewritten when servers come or go, and an
  optional reload command run after each write: the production front, where the proxy rather than the
  client connects to the chosen server, so keys, client secrets and telephony need nothing special.

No cluster manager: the broker's retained presence and last wills are the membership, and this process holds
no state that a restart loses (it reads the retained messages again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from aiohttp import web

from common.config import MqttConfig
from realtime.bus.cancel import CLOSE_WAIT_S, raise_if_cancelled

log = logging.getLogger(__name__)

REALTIME_PATHS = ("/v1/realtime", "/v1/realtime/realtime", "/realtime")  # as the server's (transports/websocket.py)
ROUTE_PATH = "/v1/realtime/route"


@dataclasses.dataclass
class Server:
    """One server as its last presence described it."""

    server_id: str
    url: str  # the realtime WebSocket URL clients should use (`mqtt.url`, else the listening one)
    sessions: int
    capacity: int
    seen: float  # router clock when its last presence arrived
    picks: list[float] = dataclasses.field(default_factory=list)  # router clock of each route since then

    @property
    def load(self) -> int:
        """Open sessions plus connections routed here that its presence does not count yet."""
        return self.sessions + len(self.picks)

    @property
    def address(self) -> tuple[str, int, bool]:
        """(host, port, tls) of `url`, for a proxy's server line."""
        parts = urlsplit(self.url)
        tls = parts.scheme in ("wss", "https")
        return parts.hostname or "", parts.port or (443 if tls else 80), tls

    def describe(self) -> dict[str, Any]:
        base = urlsplit(self.url)
        http = "https" if base.scheme in ("wss", "https") else "http"
        return {"server_id": self.server_id, "url": self.url, "sessions": self.sessions, "routed": len(self.picks),
                "capacity": self.capacity,
                # Client secrets live in the memory of the server that minted them: mint on the one you join.
                "client_secrets_url": f"{http}://{base.netloc}/v1/realtime/client_secrets"}


class Registry:
    """The live servers, from presence messages; no I/O, a clock passed in so tests can move time.

    A server is live while its last presence says `online` and arrived within `stale_after_s` (a process
    that stops refreshing without the broker noticing, or a retained message left by one that died while the
    broker was down, ages out). `choose` picks the lowest load / capacity (then fewest sessions, then
    server id, so equal servers are taken in a fixed order) among those below capacity, and counts the pick
    until that server's next presence, or `pick_ttl_s`: presence lags a routed client by its handshake, and
    without this a burst of connections would all go to the server that looked emptiest."""

    def __init__(self, stale_after_s: float = 30.0, pick_ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after_s = stale_after_s
        self.pick_ttl_s = pick_ttl_s
        self.clock = clock
        self.servers: dict[str, Server] = {}
        self.paused_at: float | None = None  # while the router has lost the broker: see `pause`

    def update(self, server_id: str, payload: Any) -> bool:
        """Apply one presence message; True if the set of live servers or their addresses changed."""
        before = self.membership()
        body = payload if isinstance(payload, dict) else {}
        url, sessions, capacity = body.get("url"), _count(body.get("sessions")), _count(body.get("capacity"))
        if (body.get("status") == "online" and isinstance(url, str) and url.startswith(("ws://", "wss://"))
                and sessions is not None and capacity):
            self.servers[server_id] = Server(server_id, url, sessions, capacity, self.clock())
        else:
            # offline (last will or clean close), draining, a retained message cleared, or one we cannot use
            if server_id in self.servers:
                log.info("router: %s left (%s)", server_id, body.get("status", "no presence"))
            self.servers.pop(server_id, None)
        return self.membership() != before

    def pause(self) -> None:
        """The router lost the broker: that silence is ours, not the servers', so nothing ages meanwhile."""
        if self.paused_at is None:
            self.paused_at = self.clock()

    def resume(self) -> None:
        """Connected again: the time away does not count (the retained presence will refresh everyone, and
        the last will of a server that died meanwhile is among it)."""
        if self.paused_at is not None:
            away = self.clock() - self.paused_at
            for s in self.servers.values():
                s.seen += away
            self.paused_at = None

    def expire(self) -> bool:
        """Forget servers not heard from within `stale_after_s`; True if any went."""
        if self.paused_at is not None:
            return False
        now = self.clock()
        gone = [sid for sid, s in self.servers.items() if now - s.seen > self.stale_after_s]
        for sid in gone:
            log.warning("router: %s silent for %.0f s, dropped", sid, now - self.servers[sid].seen)
            del self.servers[sid]
        return bool(gone)

    def live(self) -> list[Server]:
        self.expire()
        now = self.clock()
        for s in self.servers.values():
            s.picks = [t for t in s.picks if now - t < self.pick_ttl_s]
        return sorted(self.servers.values(), key=lambda s: s.server_id)

    def choose(self) -> Server | None:
        """The least-loaded live server with room, counted as one more connection; None if all are full."""
        free = [s for s in self.live() if s.load < s.capacity]
        if not free:
            return None
        best = min(free, key=lambda s: (s.load / s.capacity, s.load, s.server_id))
        best.picks.append(self.clock())
        return best

    def membership(self) -> tuple[tuple[str, str, int], ...]:
        """What a proxy's configuration depends on: who is live, where, and how many sessions each takes."""
        return tuple((s.server_id, s.url, s.capacity) for s in sorted(self.servers.values(),
                                                                        key=lambda s: s.server_id))


def _count(value: Any) -> int | None:
    """A count from JSON: a non-negative integer (true is not 1 here), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def haproxy_config(servers: Iterable[Server], bind: str = ":8765", cert: str = "") -> str:
    """An HAProxy configuration for these servers: one HTTP frontend (WebSocket upgrades pass through it),
    `balance leastconn` over the servers, each health-checked on `/readyz` (503 while it loads or drains) and
    capped at its capacity. Deterministic for a given set of servers, so an unchanged set rewrites nothing."""
    lines = [
        "# Generated by `duet route` from the servers' MQTT presence; rewritten when servers come or go.",
        # No global maxconn: HAProxy sizes it from the file-descriptor limit it runs under (a fixed number
        # above that limit stops it from starting); each server's own maxconn is what matters here.
        "global",
        # HAProxy (before 3.0) sizes its file-descriptor tables from the process's limit; where that limit is
        # "infinity" (2^30, Docker 23 and later), it allocates tens of GB at start and the machine swaps or
        # kills it (haproxy/haproxy#2043). This bound is 3.0's default, ~2 fds per connection to spare.
        "    fd-hard-limit 1048576",
        "    log stderr format short local0 notice",
        "",
        "defaults",
        "    mode http",
        "    option forwardfor",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        # A WebSocket session lasts as long as the conversation; the servers ping every 20 s.
        "    timeout tunnel 1h",
        # A full cluster answers 503 at once: a voice client should not wait in a queue for a slot.
        "    timeout queue 1s",
        "",
        "frontend duet",
        f"    bind {bind}" + (f" ssl crt {cert}" if cert else ""),
        "    default_backend duet_servers",
        "",
        "backend duet_servers",
        # leastconn: a WebSocket is a long-lived connection, so open connections are the load.
        "    balance leastconn",
        "    option httpchk",
        # A Host the server's open-server guard accepts (a loopback name); a keyed server does not look at it.
        "    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost",
        "    http-check expect status 200",
        # A server name that does not resolve (yet) must not stop the proxy from starting: it stays down.
        "    default-server init-addr last,libc,none",
    ]
    for s in sorted(servers, key=lambda s: s.server_id):
        host, port, tls = s.address
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options = f"check inter 2s fall 2 rise 1 maxconn {s.capacity}"
        if tls:
            options += f" ssl verify required ca-file @system-ca sni str({host})"
        lines.append(f"    server {s.server_id} {addr} {options}")
    return "\n".join(lines) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    """Replace `path` atomically (a proxy reading it never sees half a file); False if it already says this."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


@dataclasses.dataclass(frozen=True)
class RouterOptions:
    stale_after_s: float = 30.0  # 3 presence intervals (mqtt.presence_interval_s = 10)
    pick_ttl_s: float = 5.0
    haproxy_config: str = ""  # a path: keep an HAProxy configuration there
    haproxy_bind: str = ":8765"
    haproxy_cert: str = ""  # a PEM (certificate + key) for HAProxy to terminate TLS with
    reload_command: str = ""  # run (by the shell) after each rewrite, e.g. "systemctl reload haproxy"
    settle_s: float = 0.5  # wait for a burst of presence changes to end before rewriting the proxy's file


class Router:
    """The I/O around a `Registry`: the broker subscription (reconnecting), the HTTP routes and the proxy file.
    `await Router(mqtt_cfg).start()`, then serve `router.app` (or `await router.serve(host, port)`)."""

    def __init__(self, cfg: MqttConfig, options: RouterOptions | None = None, *,
                 environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self.cfg = cfg
        self.options = options or RouterOptions()
        self.password = env.get("DUET_MQTT_PASSWORD") or cfg.password
        self.registry = Registry(self.options.stale_after_s, self.options.pick_ttl_s, clock)
        self.registry.pause()  # nothing is known until the broker's retained presence arrives
        self.connected = asyncio.Event()
        self.updates = 0  # presence messages applied (tests wait on it)
        self.config_writes = 0
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    @property
    def topic(self) -> str:
        return f"{self.cfg.topic_prefix}/+/presence"

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> Router:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._subscribe(), name="duet-router-mqtt"))
        if self.options.haproxy_config:
            self._tasks.append(loop.create_task(self._keep_proxy_config(), name="duet-router-haproxy"))
        return self

    async def serve(self, host: str, port: int) -> int:
        """Listen for HTTP on host:port (0 = any free port); returns the port."""
        self._runner = web.AppRunner(self.app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded, as MqttBus.close: a task that lost its cancellation must not hold a shutdown (bus/cancel.py).
            _, running = await asyncio.wait(self._tasks, timeout=CLOSE_WAIT_S)
            if running:
                log.error("router: %d task(s) still running %.0f s after close: %s", len(running), CLOSE_WAIT_S,
                          ", ".join(t.get_name() for t in running))
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- the broker ---------------------------------------------------------------------------
    def _new_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        tls = aiomqtt.TLSParameters(ca_certs=cfg.tls_ca_file or None, certfile=cfg.tls_cert_file or None,
                                    keyfile=cfg.tls_key_file or None) if cfg.tls else None
        return aiomqtt.Client(cfg.host, cfg.port, username=cfg.username or None, password=self.password or None,
                              identifier=f"duet-router-{uuid.uuid4().hex[:8]}", keepalive=cfg.keepalive_s,
                              timeout=5.0, tls_params=tls)

    async def _subscribe(self) -> None:
        delay = self.cfg.reconnect_min_s
        while True:
            try:
                async with self._new_client() as client:
                    delay = self.cfg.reconnect_min_s
                    await client.subscribe(self.topic, qos=1)
                    raise_if_cancelled()
                    self.registry.resume()
                    self.connected.set()
                    log.info("router: subscribed to %s on %s:%d", self.topic, self.cfg.host, self.cfg.port)
                    async for message in client.messages:
                        self._on_presence(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                log.warning("router: broker %s:%d: %s; retrying in %.1f s (routing on what it knew)",
                            self.cfg.host, self.cfg.port, exc, delay)
            except Exception:  # a TLS file missing, a bug: keep trying, keep routing on what is known
                log.exception("router: subscription failed; retrying in %.1f s", delay)
            finally:
                self.connected.clear()
                self.registry.pause()
            raise_if_cancelled()  # an error raised on the way out of a cancelled connection hid the cancel
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    def _on_presence(self, topic: str, raw: Any) -> None:
        parts = topic.split("/")
        server_id = parts[-2] if len(parts) >= 2 else ""
        try:
            text = bytes(raw).decode() if isinstance(raw, bytes | bytearray) else str(raw or "")
            payload: Any = json.loads(text) if text else None  # empty: the retained message was cleared
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("router: ignored a presence on %s that is not JSON", topic)
            return
        if self.registry.update(server_id, payload):
            log.info("router: %d live servers: %s", len(self.registry.servers),
                     ", ".join(f"{s.server_id}={s.url}" for s in self.registry.live()) or "none")
            self._changed.set()
        self.updates += 1

    # ---- the proxy's file -----------------------------------------------------------------------
    async def _keep_proxy_config(self) -> None:
        path = Path(self.options.haproxy_config)
        await self.connected.wait()
        await asyncio.sleep(self.options.settle_s)  # the retained presence of every server arrives first
        while True:
            self._changed.clear()
            await self.write_proxy_config(path)
            # A server that falls silent changes the membership without a message: look every few seconds.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(5.0, self.options.stale_after_s)):  # not wait_for: bus/cancel.py
                    await self._changed.wait()
            await asyncio.sleep(self.options.settle_s)

    async def write_proxy_config(self, path: Path) -> bool:
        text = haproxy_config(self.registry.live(), self.options.haproxy_bind, self.options.haproxy_cert)
        if not write_if_changed(path, text):
            return False
        self.config_writes += 1
        log.info("router: wrote %s (%d servers)", path, len(self.registry.servers))
        if self.options.reload_command:
            proc = await asyncio.create_subprocess_shell(self.options.reload_command)
            if await proc.wait() != 0:
                log.error("router: %r exited %d", self.options.reload_command, proc.returncode)
        return True

    # ---- HTTP ---------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(ROUTE_PATH, self._route)
        for path in REALTIME_PATHS:
            app.router.add_get(path, self._redirect)
            app.router.add_get(path + "/", self._redirect)
        app.router.add_get("/servers", self._servers)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._ready)
        return app

    def _none(self) -> web.Response:
        reason = "no live Duet server has a free session" if self.registry.servers else "no live Duet server known"
        return web.json_response({"error": {"message": reason, "type": "server_error", "code": "no_server",
                                            "param": None}}, status=503, headers={"Retry-After": "1"})

    async def _route(self, request: web.Request) -> web.Response:
        server = self.registry.choose()
        if server is None:
            return self._none()
        return web.json_response(server.describe(), headers={"Cache-Control": "no-store"})

    async def _redirect(self, request: web.Request) -> web.Response:
        server = self.registry.choose()
        if server is None:
            return self._none()
        target = urlsplit(server.url)
        location = f"{target.scheme}://{target.netloc}{request.path_qs}"
        log.info("router: %s -> %s", request.remote, server.server_id)
        # 307: the client repeats the same GET (with its Upgrade headers) at the new place.
        return web.Response(status=307, headers={"Location": location, "Cache-Control": "no-store"})

    async def _servers(self, request: web.Request) -> web.Response:
        return web.json_response({"connected": self.connected.is_set(),
                                  "servers": [s.describe() for s in self.registry.live()]})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.connected.is_set() and bool(self.registry.live())
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "not ready\n")
