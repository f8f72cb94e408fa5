"""The WebSocket transport: the OpenAI Realtime protocol over `websockets`, one Session per connection.

Each connection is a TaskGroup of a receive loop and an emit loop. Client input is parsed here and
every failure that a client can cause becomes an `error` event: a malformed message never ends the
session, and an exception in one session never reaches another or the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from common.errors import SessionError
from realtime.core import events as ev
from realtime.core.session import Session
from realtime.runtime import Runtime
from realtime.transports.telephony import TelephonyCall, run_call

log = logging.getLogger(__name__)

REALTIME_PATHS = ("/v1/realtime", "/v1/realtime/realtime", "/realtime")
TELEPHONY_PATHS = {"/twilio": "twilio", "/telnyx": "telnyx"}  # Media Streams bridges (realtime/transports/telephony.py)


class DuetServer:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.cfg = runtime.config.server
        self.sessions: dict[str, Session] = runtime.sessions  # type: ignore[assignment]  # the same registry
        self._server: Server | None = None

    async def start(self, host: str | None = None, port: int | None = None) -> Server:
        await self.rt.warm()
        self._server = await serve(
            self._handle, host or self.cfg.host, self.cfg.port if port is None else port,
            process_request=self._route, select_subprotocol=_select_subprotocol,
            # The library closes a connection past this; below it our own limit answers with an error.
            max_size=2 * self.cfg.max_message_bytes, max_queue=64, ping_interval=20, ping_timeout=20)
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, conn: ServerConnection, request: Request) -> Response | None:
        path = _endpoint(request.path)
        if path not in REALTIME_PATHS and path not in TELEPHONY_PATHS:
            return conn.respond(HTTPStatus.NOT_FOUND, f"no endpoint at {path}; use /v1/realtime (or /twilio, "
                                                      "/telnyx for phone calls)\n")
        try:
            _duet_events(request.path)
        except ValueError as exc:
            return conn.respond(HTTPStatus.BAD_REQUEST, f"duet_events: {exc}\n")
        if len(self.sessions) >= self.cfg.max_sessions:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server is at its session limit\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        dialect = TELEPHONY_PATHS.get(_endpoint(ws.request.path)) if ws.request else None
        if dialect is not None:
            await self._handle_telephony(ws, dialect)
            return
        session_id = ev.new_id("sess")
        beta = "realtime=v1" in (ws.request.headers.get("OpenAI-Beta", "") if ws.request else "")
        outbox: asyncio.Queue[ev.ServerEvent] = asyncio.Queue()
        session = Session(self.rt, session_id, outbox.put_nowait, beta=beta)
        session.settings.duet_events = _duet_events(ws.request.path) if ws.request else frozenset()
        self.sessions[session_id] = session
        session.log.info("connected from %s", ws.remote_address)
        try:
            async with asyncio.TaskGroup() as tg:
                session.start()
                sender = tg.create_task(self._emit_loop(ws, session, outbox))
                await self._receive_loop(ws, session)
                sender.cancel()
        except* ConnectionClosed:
            pass
        except* Exception as group:  # a bug in one session must not reach the server or others
            session.log.error("session ended by an internal error", exc_info=group)
        finally:
            await session.close()
            self.sessions.pop(session_id, None)
            session.log.info("disconnected")

    async def _receive_loop(self, ws: ServerConnection, session: Session) -> None:
        limit = self.cfg.max_message_bytes
        async for message in ws:
            try:
                if isinstance(message, bytes):
                    raise SessionError("binary frames are not supported: send JSON text events",
                                       code="binary_not_supported")
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

    async def _handle_telephony(self, ws: ServerConnection, dialect: str) -> None:
        """A phone call over Twilio/Telnyx Media Streams: the platform takes no error events, so bad input
        is logged and ignored by the bridge, and the call's session counts towards the session limit."""
        call = TelephonyCall(self.rt, dialect)
        await call.start()
        self.sessions[call.id] = cast(Session, call.session)
        call.log.info("%s call connected from %s", dialect, ws.remote_address)
        try:
            await run_call(call, ws, ws.send)
        except ConnectionClosed:
            pass
        except Exception:  # a bug in one call must not reach the server or others
            call.log.exception("call ended by an internal error")
        finally:
            await call.close()
            self.sessions.pop(call.id, None)

    @staticmethod
    async def _emit_loop(ws: ServerConnection, session: Session, outbox: asyncio.Queue[ev.ServerEvent]) -> None:
        while True:
            event = await outbox.get()
            if not ev.visible(event, session.settings.duet_events):
                continue  # the one filter of Duet's own events: a client gets them only if it opted in
            await ws.send(ev.encode_server_event(event, beta=session.settings.beta,
                                                 audio_format=session.settings.output_format))


def _duet_events(path: str) -> frozenset[str]:
    """Duet's own events a client asks for on the URL: `?duet_events=all` or `?duet_events=thought,turn_metrics`
    (the query is the one place a client can ask before session.created; `session.update` can change it)."""
    return ev.parse_duet_events(",".join(parse_qs(urlsplit(path).query).get("duet_events", [])))


def _endpoint(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/")


def _select_subprotocol(conn: ServerConnection, offered: Sequence[str]) -> Subprotocol | None:
    """Browsers offer `realtime` (plus `openai-insecure-api-key.<key>`); other clients offer none."""
    return Subprotocol("realtime") if "realtime" in offered else None


async def serve_forever(runtime: Runtime, host: str, port: int,
                        ready: Callable[[str], Awaitable[None] | None] | None = None) -> None:
    server = DuetServer(runtime)
    await server.start(host, port)
    url = f"ws://{host}:{server.port}/v1/realtime"
    print(f"listening on {url}", flush=True)
    if ready is not None:
        result = ready(url)
        if asyncio.iscoroutine(result):
            await result
    try:
        await asyncio.Future()
    finally:
        await server.close()
