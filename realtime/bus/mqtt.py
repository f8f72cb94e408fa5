"""The MQTT event and control bus (`[mqtt]`, off unless `enabled`): what every session does, published as
JSON; control of live sessions; and tools the server runs over MQTT (`[[mqtt.tools]]`).

Topics, under `<prefix>/<server_id>` (default prefix `duet`):

- `presence` (retained): `{status: "online", sessions, capacity, url, dropped, timestamp}`, refreshed every
  `presence_interval_s` and when a session starts or ends; `status` is `"draining"` once `set_status` says
  so (a SIGTERM: routers stop sending clients); the broker publishes the last will `{status: "offline"}`
  there if the process dies, and `close` publishes it on a clean shutdown. `url` is `mqtt.url` where set
  (the address clients reach this server at, e.g. behind NAT), else the URL it listens on.
  `duet route` (realtime/bus/router.py) reads these to send new connections to the least-loaded server.
- `sessions/<session_id>/<kind>`, one message per event, each with `server_id`, `session_id`, `timestamp`:
  `lifecycle` (`event`: started | ended), `transcript/user` (`item_id`, `text`), `transcript/assistant`
  (`item_id`, `text` as heard: at response.done, and again with `truncated: true` when the client's
  playback cuts it), `reasoning` (the formulation brain's thought of a response), `tool_call` (`name`,
  `arguments`, `call_id`, `runs_on`: server | client), `tool_result` (`call_id`, `output`), `metrics` (the
  turn's `duet.turn.metrics`), `error` (`code`, `message`).
- `sessions/<session_id>/control` (only with `control = true`), JSON in; the answer goes to
  `sessions/<session_id>/control/result` (`{id, type, ok, error?, response_id?}`, `id` echoed from the
  request):
  `{type: "instructions", instructions, mode: "append" | "replace"}`: a supervisor's whisper, in every next
  prompt; `{type: "message", role: "system" | "user", text, respond: false}`: a conversation item (and a
  response to it); `{type: "say", text, verbatim: true, interrupt: false}`: speak `text` word for word (or,
  with `verbatim: false`, a response told to say it); `{type: "end", reason}`: close the session. With a
  `control_token` configured, every control message must carry it as `token`.

Tools: a call of a `[[mqtt.tools]]` function publishes `{correlation_id, call_id, session_id, server_id,
name, arguments, reply_topic}` to its `request_topic`; the first message on its `reply_topic` with that
`correlation_id` is the result (the rest of that JSON object becomes the function_call_output). No reply
within `timeout_s` is a result too: `{"error": "timeout", ...}`.

The voice path never waits for the broker: events go into a bounded queue (oldest dropped past
`queue_size`, counted in `dropped`); one background task connects, reconnects with backoff and drains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt

from common.config import MqttConfig, MqttToolConfig
from common.errors import SessionError
from realtime.bus.cancel import CLOSE_WAIT_S, raise_if_cancelled
from realtime.core import events as ev
from realtime.core.options import ResponseOptions
from realtime.core.outbox import Outbox
from realtime.core.session import Session
from realtime.runtime import Runtime

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")  # MQTT wildcards and separators never come from a server id
NORMAL_CLOSURE = 1000  # WebSocket close code of a session ended over the bus


@dataclasses.dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False


class ControlError(Exception):
    """A control message that cannot be applied; its text goes back in the result."""


class MqttBus:
    """One per server process: `await MqttBus(runtime).start(url)` hooks it to the runtime (every new session's
    events, `Runtime.server_tools`) and connects in the background; `await close()` unhooks it."""

    def __init__(self, runtime: Runtime, cfg: MqttConfig | None = None, *,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.rt = runtime
        self.cfg = cfg or runtime.config.mqtt
        self.password = env.get("DUET_MQTT_PASSWORD") or self.cfg.password
        self.control_token = env.get("DUET_MQTT_CONTROL_TOKEN") or self.cfg.control_token
        self.server_id = _UNSAFE.sub("_", self.cfg.server_id or socket.gethostname())
        self.base = f"{self.cfg.topic_prefix}/{self.server_id}"
        self.url = ""
        self.status = "online"  # or "draining": still serving its sessions, taking no new ones
        self.tools: dict[str, MqttToolConfig] = {t.name: t for t in self.cfg.tools}
        self.dropped = 0  # events dropped because the queue was full (broker slow or away)
        self.published = 0
        self.connections = 0  # successful connects so far (1 + reconnects)
        self.connected = asyncio.Event()
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=max(1, self.cfg.queue_size))
        self._unsent: Outgoing | None = None  # taken from the queue, its publish interrupted: sent first
        self._replies: dict[str, asyncio.Future[str]] = {}  # tool calls waiting, by correlation id
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._control_tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self, url: str = "") -> MqttBus:
        self.url = self.cfg.url or url
        if self not in self.rt.session_observers:
            self.rt.session_observers.append(self)
        if self.tools:
            self.rt.server_tools = self
        self._task = asyncio.get_running_loop().create_task(self._run(), name="duet-mqtt")
        log.info("mqtt bus %s -> %s:%d (control %s, %d tools)", self.base, self.cfg.host, self.cfg.port,
                 "on" if self.cfg.control else "off", len(self.tools))
        return self

    async def close(self) -> None:
        """Unhook from the runtime, say "offline" (a clean disconnect sends no last will) and disconnect."""
        with contextlib.suppress(ValueError):
            self.rt.session_observers.remove(self)
        if self.rt.server_tools is self:
            self.rt.server_tools = None
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(self.presence_topic, json.dumps(self._presence("offline")), qos=1, retain=True,
                                     timeout=2.0)
        tasks = [t for t in (self._task, *self._control_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a shutdown must finish even if a task ignores its cancellation (see bus/cancel.py).
            _, running = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
            if running:
                log.error("mqtt bus: %d task(s) still running %.0f s after close: %s", len(running), CLOSE_WAIT_S,
                          ", ".join(t.get_name() for t in running))
        for fut in self._replies.values():
            if not fut.done():
                fut.cancel()

    @property
    def presence_topic(self) -> str:
        return f"{self.base}/presence"

    def session_topic(self, session_id: str, kind: str) -> str:
        return f"{self.base}/sessions/{session_id}/{kind}"

    def _presence(self, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {"server_id": self.server_id, "status": status, "timestamp": round(time.time(), 3)}
        if status != "offline":
            body.update(sessions=len(self.rt.sessions), capacity=self.rt.config.server.max_sessions, url=self.url,
                        dropped=self.dropped)
        return body

    def _announce(self) -> None:
        self.publish(self.presence_topic, self._presence(self.status), retain=True)

    def set_status(self, status: str) -> None:
        """Say `draining` (or `online` again) in the presence now, not at the next refresh."""
        self.status = status
        self._announce()

    # ---- the queue: the voice path's side ------------------------------------------------------
    def publish(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        """Queue a message; never waits. A full queue drops its oldest message (the freshest are worth most)."""
        msg = Outgoing(topic, json.dumps(payload, ensure_ascii=False, default=str).encode(), retain)
        while True:
            try:
                self._queue.put_nowait(msg)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._queue.get_nowait()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("mqtt queue full (%d): %d events dropped so far", self.cfg.queue_size, self.dropped)

    def _event(self, session_id: str, kind: str, **fields: Any) -> None:
        self.publish(self.session_topic(session_id, kind),
                     {"server_id": self.server_id, "session_id": session_id, "timestamp": round(time.time(), 3),
                      **fields})

    # ---- session events (Runtime.session_observers) ------------------------------------------
    def session_event(self, session: Any, event: Any) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, session, event)

    def session_closed(self, session: Any) -> None:
        self._event(session.id, "lifecycle", event="ended")
        self._announce()

    def _started(self, session: Any, e: ev.SessionCreated) -> None:
        self._event(session.id, "lifecycle", event="started")
        self._announce()

    def _user_transcript(self, session: Any, e: ev.TranscriptionCompleted) -> None:
        self._event(session.id, "transcript/user", item_id=e.item_id, text=e.transcript)

    def _response_done(self, session: Any, e: ev.ResponseDone) -> None:
        response = e.response
        for item in response.get("output") or []:
            if item.get("type") != "message" or item.get("role") != "assistant":
                continue
            part = (item.get("content") or [{}])[0]
            text = part.get("transcript") if part.get("transcript") is not None else part.get("text", "")
            self._event(session.id, "transcript/assistant", response_id=response.get("id"), item_id=item.get("id"),
                        text=text, status=response.get("status"), truncated=False)
            thought = (item.get("duet") or {}).get("thought")
            if thought:
                self._event(session.id, "reasoning", response_id=response.get("id"), item_id=item.get("id"),
                            text=thought)

    def _truncated(self, session: Any, e: ev.ItemTruncated) -> None:
        # The session cut the item before it announced the cut: its text is what the user heard.
        try:
            text = session.history.get(e.item_id).text
        except KeyError:
            return
        self._event(session.id, "transcript/assistant", item_id=e.item_id, text=text, truncated=True,
                    audio_end_ms=e.audio_end_ms)

    def _tool_call(self, session: Any, e: ev.FunctionCallArgumentsDone) -> None:
        # A client's function wins a name both offer (ResponseOptions.parse).
        server = e.name in self.tools and e.name not in {t.get("name") for t in session.settings.tools}
        self._event(session.id, "tool_call", response_id=e.response_id, item_id=e.item_id, call_id=e.call_id,
                    name=e.name, arguments=e.arguments, runs_on="server" if server else "client")

    def _item_created(self, session: Any, e: ev.ItemCreated) -> None:
        if e.item.get("type") == "function_call_output":
            self._event(session.id, "tool_result", item_id=e.item.get("id"), call_id=e.item.get("call_id"),
                        output=e.item.get("output"))

    def _metrics(self, session: Any, e: ev.TurnMetrics) -> None:
        self._event(session.id, "metrics", response_id=e.response_id, metrics=e.metrics)

    def _error(self, session: Any, e: ev.Error) -> None:
        self._event(session.id, "error", code=e.error.code, message=e.error.message)

    # ---- the connection: the background side ---------------------------------------------------
    def _new_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        tls = aiomqtt.TLSParameters(ca_certs=cfg.tls_ca_file or None, certfile=cfg.tls_cert_file or None,
                                    keyfile=cfg.tls_key_file or None) if cfg.tls else None
        return aiomqtt.Client(
            cfg.host, cfg.port, username=cfg.username or None, password=self.password or None,
            identifier=f"duet-{self.server_id}-{uuid.uuid4().hex[:8]}", keepalive=cfg.keepalive_s, timeout=5.0,
            tls_params=tls,
            will=aiomqtt.Will(self.presence_topic, json.dumps(self._presence("offline")), qos=1, retain=True))

    async def _run(self) -> None:
        delay = self.cfg.reconnect_min_s
        while True:
            try:
                async with self._new_client() as client:
                    delay = self.cfg.reconnect_min_s
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt %s:%d: %s; retrying in %.1f s (%d queued, %d dropped)", self.cfg.host,
                            self.cfg.port, exc, delay, self._queue.qsize(), self.dropped)
            except Exception:  # a TLS file missing, a bug: the bus keeps trying, the voice path never knows
                log.exception("mqtt bus failed; retrying in %.1f s", delay)
            finally:
                self._client = None
                self.connected.clear()
            raise_if_cancelled()  # a disconnect's error raised while closing hid the cancellation
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def _serve(self, client: aiomqtt.Client) -> None:
        if self.cfg.control:
            await client.subscribe(self.session_topic("+", "control"), qos=1)
        for topic in {t.reply_topic for t in self.tools.values()}:
            await client.subscribe(topic, qos=1)
        await client.publish(self.presence_topic, json.dumps(self._presence(self.status)), qos=1, retain=True)
        raise_if_cancelled()
        self._client = client
        self.connections += 1
        self.connected.set()
        log.info("mqtt connected to %s:%d as %s (%d events queued)", self.cfg.host, self.cfg.port, self.base,
                 self._queue.qsize())
        tasks = [asyncio.create_task(c) for c in (self._send(client), self._receive(client), self._refresh(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # the MqttError that ended this connection
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            msg = self._unsent or await self._queue.get()
            self._unsent = msg  # until the broker has it: a dropped connection sends it again first
            await client.publish(msg.topic, msg.payload, qos=self.cfg.qos, retain=msg.retain)
            self._unsent = None
            self.published += 1
            raise_if_cancelled()  # the ack and close()'s cancel in one loop pass: 3.11 drops the cancel

    async def _refresh(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.cfg.presence_interval_s)
            self._announce()

    async def _receive(self, client: aiomqtt.Client) -> None:
        control = self.session_topic("+", "control")
        replies = {t.reply_topic for t in self.tools.values()}
        async for message in client.messages:
            try:
                payload = json.loads(bytes(message.payload) if isinstance(message.payload, bytes | bytearray)
                                     else str(message.payload))
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("mqtt: ignored a message on %s that is not JSON", message.topic)
                continue
            if not isinstance(payload, dict):
                log.warning("mqtt: ignored a message on %s that is not a JSON object", message.topic)
                continue
            topic = str(message.topic)
            if topic in replies:
                self._reply(topic, payload)
            elif self.cfg.control and message.topic.matches(control):
                session_id = topic.split("/")[-2]
                task = asyncio.create_task(self._control(session_id, payload), name=f"{session_id}-mqtt-control")
                self._control_tasks.add(task)
                task.add_done_callback(self._control_tasks.discard)

    # ---- tools (Runtime.server_tools) ----------------------------------------------------------
    async def call(self, session_id: str, call_id: str, name: str, arguments: str) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return json.dumps({"error": f"{name} is not an MQTT tool of this server"})
        try:
            args: Any = json.loads(arguments)
        except json.JSONDecodeError:
            args = arguments  # a small model's broken JSON: the device may still make sense of it
        correlation = uuid.uuid4().hex
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._replies[correlation] = fut
        self.publish(tool.request_topic, {"correlation_id": correlation, "call_id": call_id, "session_id": session_id,
                                          "server_id": self.server_id, "name": name, "arguments": args,
                                          "reply_topic": tool.reply_topic, "timestamp": round(time.time(), 3)})
        log.info("[%s] tool %s(%s) -> %s", session_id, name, arguments, tool.request_topic,
                 extra={"session_id": session_id})
        try:
            async with asyncio.timeout(tool.timeout_s):  # not wait_for: a barge-in's cancel must not be lost
                return await fut
        except TimeoutError:
            log.warning("[%s] tool %s: no reply on %s within %.1f s", session_id, name, tool.reply_topic,
                        tool.timeout_s, extra={"session_id": session_id})
            return json.dumps({"error": "timeout", "detail": f"{name} did not answer within {tool.timeout_s:g} s"})
        finally:
            self._replies.pop(correlation, None)

    def _reply(self, topic: str, payload: dict[str, Any]) -> None:
        fut = self._replies.get(str(payload.get("correlation_id")))
        if fut is None or fut.done():
            log.info("mqtt: a reply on %s matches no call waiting (late, or another server's)", topic)
            return
        fut.set_result(json.dumps({k: v for k, v in payload.items() if k != "correlation_id"}))

    # ---- control --------------------------------------------------------------------------------
    async def _control(self, session_id: str, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        result: dict[str, Any] = {"id": msg.get("id"), "type": kind, "ok": True}
        try:
            if self.control_token and not hmac.compare_digest(str(msg.get("token", "")), self.control_token):
                raise ControlError("unauthorized: wrong or missing token")
            session = self.rt.sessions.get(session_id)
            if not isinstance(session, Session):
                raise ControlError(f"no session {session_id} on this server")
            action = _CONTROLS.get(str(kind))
            if action is None:
                raise ControlError(f"unknown control type {kind!r}; use one of {sorted(_CONTROLS)}")
            result.update(await action(self, session, msg) or {})
            session.log.info("mqtt control %s applied", kind)
        except (ControlError, SessionError) as exc:
            result.update(ok=False, error=str(exc))
            log.warning("[%s] mqtt control %s refused: %s", session_id, kind, exc, extra={"session_id": session_id})
        except Exception as exc:
            result.update(ok=False, error=f"internal error: {exc}")
            log.exception("[%s] mqtt control %s failed", session_id, kind, extra={"session_id": session_id})
        self.publish(self.session_topic(session_id, "control/result"), result)

    async def _instructions(self, session: Session, msg: dict[str, Any]) -> None:
        text, mode = _text(msg, "instructions"), msg.get("mode", "append")
        if mode not in ("append", "replace"):
            raise ControlError("mode must be append or replace")
        current = session.settings.instructions
        session.settings.instructions = f"{current}\n\n{text}" if mode == "append" and current else text
        # Clients keep the session's configuration from session.updated: tell them, as a session.update would.
        session.emit(ev.SessionUpdated(session=session.settings.to_protocol(session.id)))

    async def _message(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        role = msg.get("role", "system")
        if role not in ("system", "user"):
            raise ControlError("role must be system or user")
        item_id = ev.new_id("item")
        await session.handle(ev.ConversationItemCreate(item={
            "id": item_id, "type": "message", "role": role, "content": [{"type": "input_text",
                                                                        "text": _text(msg, "text")}]}))
        if msg.get("respond"):
            await session.handle(ev.ResponseCreate(response={}))
            return {"item_id": item_id, "response_id": session.response.id if session.response else None}
        return {"item_id": item_id}

    async def _say(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        text = _text(msg, "text")
        busy = session.response is not None and not session.response.done
        if busy and not msg.get("interrupt"):
            raise ControlError("a response is in progress (send interrupt: true to cut it)")
        if busy:
            await session.interrupt("supervisor", clear=True)
        options = ResponseOptions.parse({}, session.settings)
        if msg.get("verbatim", True):
            # The words as given, no brain: the path a reply resumed after a false interruption takes.
            options = dataclasses.replace(options, resume_text=text, tool_choice="none")
        else:
            options = dataclasses.replace(options, instructions=f"Say exactly this and nothing else: {text}",
                                          tool_choice="none")
        session.start_response(options)
        return {"response_id": session.response.id if session.response else None}

    async def _end(self, session: Session, msg: dict[str, Any]) -> None:
        # The transport hands its outbox's `put` to the session as emit; closing the outbox closes the socket.
        outbox = getattr(session.emit, "__self__", None)
        if not isinstance(outbox, Outbox):
            raise ControlError("this session's transport cannot be ended over the bus (a phone call?)")
        outbox.close(NORMAL_CLOSURE, str(msg.get("reason") or "ended by a supervisor")[:100])


def _text(msg: dict[str, Any], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ControlError(f"{key} must be a non-empty string")
    return value


_HANDLERS: dict[type, Callable[[MqttBus, Any, Any], None]] = {
    ev.SessionCreated: MqttBus._started,
    ev.TranscriptionCompleted: MqttBus._user_transcript,
    ev.ResponseDone: MqttBus._response_done,
    ev.ItemTruncated: MqttBus._truncated,
    ev.FunctionCallArgumentsDone: MqttBus._tool_call,
    ev.ItemCreated: MqttBus._item_created,
    ev.TurnMetrics: MqttBus._metrics,
    ev.Error: MqttBus._error,
}
_CONTROLS: dict[str, Callable[[MqttBus, Session, dict[str, Any]], Any]] = {
    "instructions": MqttBus._instructions,
    "message": MqttBus._message,
    "say": MqttBus._say,
    "end": MqttBus._end,
}


async def start(runtime: Runtime, url: str = "") -> MqttBus | None:
    """The process's bus where `[mqtt] enabled`, started; None otherwise."""
    if not runtime.config.mqtt.enabled:
        return None
    return await MqttBus(runtime).start(url)
