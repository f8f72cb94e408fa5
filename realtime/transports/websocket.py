"""The server's one front: the OpenAI Realtime protocol over WebSocket and plain HTTP on one port (aiohttp).

Routes: the realtime WebSocket (`/v1/realtime`, `/v1/realtime/realtime`, `/realtime`), the phone bridges
(`/twilio`, `/telnyx`, realtime/transports/telephony.py), `POST /v1/realtime/client_secrets` (ephemeral keys
for browsers), `POST /v1/realtime/calls` (WebRTC, realtime/transports/webrtc.py), the browser page at `/`
(realtime/transports/web_page.py), then the ops routes when that module is present, and a 404 text for everything else.

Every handshake is judged before any session or model work, in this order: Origin (and, on an open server,
Host), credentials (realtime/transports/auth.py), `?duet_events=`, the per-client cap, the session cap.
A refusal is an HTTP status and a log line, counted by reason in `DuetServer.refused`.

Each connection is a TaskGroup of a receive loop and an emit loop. Client input is parsed here and every
failure that a client can cause becomes an `error` event: a malformed message never ends the session, and
an exception in one session never reaches another or the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from common.config import DuetConfig
from common.errors import SessionError
from realtime.bus import mqtt as mqtt_bus
from realtime.core import events as ev
from realtime.core.outbox import Outbox
from realtime.core.session import Session
from realtime.core.settings import SessionSettings
from realtime.lifecycle import Lifecycle
from realtime.runtime import Runtime
from realtime.transports.auth import (
    Authenticator,
    Refusal,
    is_loopback,
    offered_subprotocols,
    origin_allowed,
    server_ssl_context,
)
from realtime.transports.ops_routes import add_ops_routes
from realtime.transports.telephony import TelephonyCall, run_call
from realtime.transports.web_page import add_page_routes
from realtime.transports.webrtc import WebRTCEndpoint

log = logging.getLogger(__name__)

REALTIME_PATHS = ("/v1/realtime", "/v1/realtime/realtime", "/realtime")
TELEPHONY_PATHS = {"/twilio": "twilio", "/telnyx": "telnyx"}  # Media Streams bridges (realtime/transports/telephony.py)
CLIENT_SECRETS_PATH = "/v1/realtime/client_secrets"
HEARTBEAT_S = 20.0  # ping every 20 s; a peer that does not answer within half of it is dropped


class DuetServer:
    """`DuetServer(runtime)` serves `runtime.config`; a `config` changes only the `[server]` and `[auth]`
    sections (sessions always use the runtime's), so a test can start a keyed server over a shared runtime."""

    def __init__(self, runtime: Runtime, config: DuetConfig | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        cfg = config or runtime.config
        self.rt = runtime
        self.cfg = cfg.server
        self.auth = Authenticator(cfg.auth, os.environ if environ is None else environ)
        self.sessions: dict[str, Session] = runtime.sessions  # type: ignore[assignment]  # the same registry
        # Refused requests by reason (unauthorized, origin, host, per_client_limit, session_limit, ...), for
        # the metrics endpoint to export.
        self.refused: Counter[str] = Counter()
        self._per_client: Counter[str] = Counter()  # open realtime connections by remote address
        self._handshaking = 0  # accepted but not yet registered sessions, so a burst cannot pass the cap
        self._sockets: set[web.WebSocketResponse] = set()
        self._kicks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        self.ssl_context = server_ssl_context(self.cfg.tls_cert_file, self.cfg.tls_key_file)
        # Ready/draining state, shared with the ops routes; `duet serve` drains it on SIGTERM.
        self.lifecycle = Lifecycle(runtime, cfg.server.shutdown_grace_seconds)
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._browser_guard])
        for path in REALTIME_PATHS:
            app.router.add_get(path, self._realtime)
            app.router.add_get(path + "/", self._realtime)
        for path in TELEPHONY_PATHS:
            app.router.add_get(path, self._telephony)
            app.router.add_get(path + "/", self._telephony)
        app.router.add_post(CLIENT_SECRETS_PATH, self._client_secrets)
        # WebRTC calls (realtime/transports/webrtc.py), judged and counted like WebSocket sessions; the page at /.
        self.webrtc = WebRTCEndpoint(self.rt, self.auth, self.sessions, self._per_client, refuse=self._refuse,
                                     capacity=self._capacity)
        self.webrtc.add_routes(app)
        add_page_routes(app)
        # Ops routes (/metrics, /healthz, /readyz and the shutdown drain) go here, before the catch-all and
        # before our own shutdown hook, so a drain runs while sessions are still open.
        add_ops_routes(app, self.rt, self.lifecycle, refusals=lambda: self.refused)
        app.on_shutdown.append(self._close_sockets)
        app.on_shutdown.append(self.webrtc.close_all)  # after the drain, like the sockets
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self, host: str | None = None, port: int | None = None) -> web.AppRunner:
        host = host or self.cfg.host
        self.auth.check_bind(host)  # before model warm-up: an open public server must not start at all
        await self.rt.warm()
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log_class=_AccessLog,
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, self.cfg.port if port is None else port,
                           ssl_context=self.ssl_context, reuse_port=self.cfg.reuse_port or None)
        await site.start()
        self._log_policy(host)
        return self._runner

    @property
    def port(self) -> int:
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    @property
    def scheme(self) -> str:
        return "wss" if self.ssl_context is not None else "ws"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close_sockets(self, app: web.Application) -> None:
        # Without this, shutdown waits for every open session to end by itself.
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                               for ws in list(self._sockets)), return_exceptions=True)

    def _log_policy(self, host: str) -> None:
        a = self.auth
        if a.open and is_loopback(host):
            log.warning("no API key configured: open to anyone on this machine (listening on loopback %s only); "
                        "set DUET_API_KEYS to require keys and serve other hosts", host)
        elif a.open:
            log.warning("no API key configured and auth.allow_unauthenticated_public: open to anyone who reaches "
                        "%s; only safe behind a proxy that authenticates", host)
        else:
            log.info("API keys required (Bearer or openai-insecure-api-key subprotocol); client secrets at %s",
                     CLIENT_SECRETS_PATH)
        phone = [name for name, on in (("twilio signature", a.twilio_auth_token), ("url token", a.telephony_token))
                 if on]
        log.info("telephony endpoints: %s; TLS %s; per-client cap %s", ", ".join(phone) or
                 ("open" if a.telephony_open else "API key only"), "on" if self.ssl_context else "off",
                 a.cfg.max_connections_per_client or "off")

    # ---- refusals -----------------------------------------------------------------------------
    def _refuse(self, request: web.BaseRequest, refusal: Refusal, as_json: bool = False) -> web.Response:
        self.refused[refusal.reason] += 1
        # The path only: a query string may carry a telephony token.
        level = logging.INFO if refusal.reason == "not_found" else logging.WARNING
        log.log(level, "refused %s %s from %s: %d %s", request.method, request.path, request.remote,
                refusal.status, refusal.reason)
        headers = {"WWW-Authenticate": 'Bearer realm="duet"'} if refusal.status == 401 else None
        if as_json:
            body = {"error": {"message": refusal.message, "type": "invalid_request_error", "code": refusal.reason,
                              "param": None}}
            return web.json_response(body, status=refusal.status, headers=headers)
        return web.Response(status=refusal.status, text=refusal.message + "\n", headers=headers)

    @web.middleware
    async def _browser_guard(self, request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Browsers attach the page's Origin; a page may only use the server from an allowed origin (its own,
        or one in auth.allowed_origins). On an open server the Host must be loopback too: else a web page
        could reach it by DNS rebinding (its own name resolving to 127.0.0.1 makes it "same-origin")."""
        if self.auth.open and not self.auth.cfg.allow_unauthenticated_public and not is_loopback(request.host):
            return self._refuse(request, Refusal(403, "host", "this server without keys serves loopback hosts only"))
        if not origin_allowed(request.headers.get("Origin"), request.host, self.auth.cfg.allowed_origins):
            return self._refuse(request, Refusal(403, "origin", "origin not allowed"))
        return await handler(request)

    async def _not_found(self, request: web.Request) -> web.Response:
        return self._refuse(request, Refusal(404, "not_found", f"no endpoint at {request.path}; use /v1/realtime "
                                                               "(or /twilio, /telnyx for phone calls)"))

    def _capacity(self, request: web.Request, remote: str | None) -> web.Response | None:
        """`remote` is the address the per-client cap counts, or None for connections it does not cover."""
        cap = self.auth.cfg.max_connections_per_client
        if remote is not None and cap and self._per_client[remote] >= cap:
            return self._refuse(request, Refusal(429, "per_client_limit",
                                                 f"too many open connections from your address (limit {cap})"))
        if len(self.sessions) + self._handshaking >= self.cfg.max_sessions:
            return self._refuse(request, Refusal(503, "session_limit", "server is at its session limit"))
        return None

    def _websocket(self, request: web.Request, protocols: tuple[str, ...] = ()) -> web.WebSocketResponse | None:
        ws = web.WebSocketResponse(
            protocols=protocols, heartbeat=HEARTBEAT_S,
            # aiohttp closes a connection past this (1009); below it our own limit answers with an error event.
            max_msg_size=2 * self.cfg.max_message_bytes)
        return ws if ws.can_prepare(request).ok else None

    # ---- realtime -----------------------------------------------------------------------------
    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        verdict = self.auth.authenticate(request.headers.get("Authorization"),
                                         offered_subprotocols(request.headers.get("Sec-WebSocket-Protocol")))
        if isinstance(verdict, Refusal):
            return self._refuse(request, verdict)
        _credential, secret = verdict
        try:
            duet_events = _duet_events(request)
        except ValueError as exc:
            return self._refuse(request, Refusal(400, "bad_request", f"duet_events: {exc}"))
        remote = request.remote or "unknown"
        if (refused := self._capacity(request, remote)) is not None:
            return refused
        # Browsers offer `realtime` (plus `openai-insecure-api-key.<key>`); other clients offer none.
        ws = self._websocket(request, protocols=("realtime",))
        if ws is None:
            return self._refuse(request, Refusal(426, "not_websocket", "this endpoint speaks WebSocket only"))
        # Counted before the first await, so concurrent handshakes from one address cannot all pass the cap.
        self._per_client[remote] += 1
        self._handshaking += 1
        registered = False
        try:
            await ws.prepare(request)
            self._sockets.add(ws)
            session_id = ev.new_id("sess")
            beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "")
            session: Session | None = None
            outbox = Outbox(self.rt.config.limits,
                            audio_rate=lambda: session.settings.output_format.sample_rate if session else 24000,
                            on_close=lambda code, reason: self._kick(ws, request, code, reason),
                            backlog=lambda: request.transport.get_write_buffer_size() if request.transport else 0)
            session = Session(self.rt, session_id, outbox.put, beta=beta)
            outbox.log = session.log
            if secret is not None and secret.session:
                try:
                    session.settings.apply(secret.session)  # validated when the secret was made
                except SessionError:
                    session.log.exception("the client secret's session configuration no longer applies")
            if duet_events or secret is None:
                session.settings.duet_events = duet_events
            self.sessions[session_id] = session
            self._handshaking -= 1
            registered = True
            await self._run_session(ws, session, outbox, remote)
        finally:
            if not registered:
                self._handshaking -= 1
            self._sockets.discard(ws)
            self._per_client[remote] -= 1
            if self._per_client[remote] <= 0:
                del self._per_client[remote]
        return ws

    async def _run_session(self, ws: web.WebSocketResponse, session: Session, outbox: Outbox, remote: str) -> None:
        session.log.info("connected from %s", remote)
        try:
            async with asyncio.TaskGroup() as tg:
                session.start()
                sender = tg.create_task(self._emit_loop(ws, session, outbox))
                await self._receive_loop(ws, session)
                sender.cancel()
        except* ConnectionError:  # the client went away while we were sending
            pass
        except* Exception as group:  # a bug in one session must not reach the server or others
            session.log.error("session ended by an internal error", exc_info=group)
        finally:
            await session.close()
            self.sessions.pop(session.id, None)
            session.log.info("disconnected")

    def _kick(self, ws: web.WebSocketResponse, request: web.Request, code: int, reason: str) -> None:
        """The outbox gave up on a client that does not read: close now, even while a send is blocked on the
        stalled socket (close waits at most 2 s for the close frame, then drops the transport)."""
        async def close() -> None:
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(2.0):
                    await ws.close(code=code, message=reason.encode()[:120], drain=False)
            # Always drop the transport: a graceful close (transport.close) waits to flush a write buffer that a
            # client that does not read never takes, leaving the socket and its buffer alive for good.
            if request.transport is not None:
                request.transport.abort()
        task = asyncio.get_running_loop().create_task(close())
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)

    async def _receive_loop(self, ws: web.WebSocketResponse, session: Session) -> None:
        limit = self.cfg.max_message_bytes
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:  # past the hard cap, or a protocol error: aiohttp closed it
                session.log.info("connection error: %r", ws.exception())
                return
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            try:
                if msg.type == WSMsgType.BINARY:
                    raise SessionError("binary frames are not supported: send JSON text events",
                                       code="binary_not_supported")
                message = cast(str, msg.data)
                if len(message) > limit:
                    raise SessionError(f"message of {len(message)} bytes exceeds the {limit}-byte limit",
                                       code="message_too_large")
                await session.handle(ev.decode_client_event(message))
            except SessionError as err:
                session.emit(ev.error_event(err))
            except Exception as exc:
                session.log.exception("error handling a client event")
                session.emit(ev.error_event(SessionError(f"internal error: {exc}", code="internal_error",
                                                         type="server_error")))

    @staticmethod
    async def _emit_loop(ws: web.WebSocketResponse, session: Session, outbox: Outbox) -> None:
        async for event in outbox:  # ends when the outbox closes a slow client (it closes the socket)
            if not ev.visible(event, session.settings.duet_events):
                continue  # the one filter of Duet's own events: a client gets them only if it opted in
            await ws.send_str(ev.encode_server_event(event, beta=session.settings.beta,
                                                     audio_format=session.settings.output_format))

    # ---- client secrets -------------------------------------------------------------------------
    async def _client_secrets(self, request: web.Request) -> web.Response:
        """OpenAI's `POST /v1/realtime/client_secrets`: a real key buys an `ek_` key that a browser may hold,
        valid for new sessions until `expires_at`; its `session` configuration starts each of them."""
        refusal = self.auth.authenticate_minting(request.headers.get("Authorization"))
        if refusal is not None:
            return self._refuse(request, refusal, as_json=True)

        def bad(message: str) -> web.Response:
            return self._refuse(request, Refusal(400, "bad_request", message), as_json=True)

        try:
            body: Any = await request.json() if request.can_read_body else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return bad("the body must be a JSON object")
        if not isinstance(body, dict):
            return bad("the body must be a JSON object")
        try:
            seconds = self.auth.client_secret_seconds(body)
        except ValueError as exc:
            return bad(str(exc))
        wanted = body.get("session") or {}
        if not isinstance(wanted, dict) or wanted.get("type", "realtime") != "realtime":
            return bad("session must be a realtime session configuration (transcription sessions are not served)")
        settings = SessionSettings.from_config(self.rt.config)
        try:
            settings.apply(wanted)
        except SessionError as err:
            return bad(str(err))
        try:
            value, secret = self.auth.client_secrets.mint(seconds, wanted)
        except OverflowError as exc:
            return self._refuse(request, Refusal(429, "client_secret_limit", str(exc)), as_json=True)
        log.info("client secret made for %s, valid %d s", request.remote, seconds)
        return web.json_response({"value": value, "expires_at": int(secret.expires_at),
                                  "session": settings.to_protocol(ev.new_id("sess"))})

    # ---- telephony ------------------------------------------------------------------------------
    async def _telephony(self, request: web.Request) -> web.StreamResponse:
        """A phone call over Twilio/Telnyx Media Streams: the platform takes no error events, so bad input
        is logged and ignored by the bridge, and the call's session counts towards the session limit. Not
        under the per-client cap: one platform address carries many callers."""
        dialect = TELEPHONY_PATHS[request.path.rstrip("/")]
        verdict = self.auth.authenticate_telephony(
            dialect, url=self.auth.twilio_url(request.host, request.raw_path), token=request.query.get("token"),
            signature=request.headers.get("X-Twilio-Signature"), authorization=request.headers.get("Authorization"))
        if isinstance(verdict, Refusal):
            return self._refuse(request, verdict)
        try:
            _duet_events(request)
        except ValueError as exc:
            return self._refuse(request, Refusal(400, "bad_request", f"duet_events: {exc}"))
        if (refused := self._capacity(request, None)) is not None:
            return refused
        ws = self._websocket(request)
        if ws is None:
            return self._refuse(request, Refusal(426, "not_websocket", "this endpoint speaks WebSocket only"))
        self._handshaking += 1
        registered = False
        try:
            await ws.prepare(request)
            self._sockets.add(ws)
            call = TelephonyCall(self.rt, dialect)
            await call.start()
            self.sessions[call.id] = cast(Session, call.session)
            self._handshaking -= 1
            registered = True
            call.log.info("%s call connected from %s (%s)", dialect, request.remote, verdict)
            try:
                await run_call(call, _messages(ws), ws.send_str)
            except ConnectionError:
                pass
            except Exception:  # a bug in one call must not reach the server or others
                call.log.exception("call ended by an internal error")
            finally:
                await call.close()
                self.sessions.pop(call.id, None)
        finally:
            if not registered:
                self._handshaking -= 1
            self._sockets.discard(ws)
        return ws


class _AccessLog(AbstractAccessLogger):
    """aiohttp's default access line includes the query string, where a telephony token may be: log the
    path only."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %.3fs', request.remote, request.method, request.path, response.status, time)


async def _messages(ws: web.WebSocketResponse) -> AsyncIterator[str | bytes]:
    """The platform's messages as `run_call` takes them; ends when the connection does."""
    async for msg in ws:
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            yield msg.data
        elif msg.type == WSMsgType.ERROR:
            return


def _duet_events(request: web.BaseRequest) -> frozenset[str]:
    """Duet's own events a client asks for on the URL: `?duet_events=all` or `?duet_events=thought,turn_metrics`
    (the query is the one place a client can ask before session.created; `session.update` can change it)."""
    return ev.parse_duet_events(",".join(v for v in request.query.getall("duet_events", []) if v))


async def serve_forever(runtime: Runtime, host: str, port: int,
                        ready: Callable[[str], Awaitable[None] | None] | None = None) -> None:
    server = DuetServer(runtime)
    await server.start(host, port)
    url = f"{server.scheme}://{host}:{server.port}/v1/realtime"
    bus = await mqtt_bus.start(runtime, url)  # None unless [mqtt] enabled
    print(f"listening on {url}", flush=True)
    if ready is not None:
        result = ready(url)
        if asyncio.iscoroutine(result):
            await result
    try:
        await asyncio.Future()
    finally:
        await server.close()
        if bus is not None:
            await bus.close()
