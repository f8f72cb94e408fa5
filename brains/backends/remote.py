"""The brains on a remote OpenAI-compatible completions server (vLLM or SGLang, which scale a model past one GPU
with tensor and pipeline parallelism): the same surface as `brains.engine.Engine`, over HTTP.

`RemoteEngine` keeps its HTTP client (aiohttp) on an event loop of its own thread, like `VllmEngine`: sessions on
any loop submit `GenerationRequest`s and read the same `TokenStream`s, `close()` works after the server's loop is
gone, and parsing the server's stream never runs on the sessions' loop.

Each request is one `POST {remote_url}/completions` with `stream: true`, read as server-sent events:
- the prompt goes as token ids (`prompt: [ids]`), tokenized by our `PromptBuilder`, so the FB prompt and each AB
  segment's prompt (which starts with the FB's whole prompt and thought) share an exact id prefix and the
  server's automatic prefix cache reuses its KV blocks; `usage.prompt_tokens_details.cached_tokens` (vLLM with
  `--enable-prompt-tokens-details`) is counted in `stats.prefill_tokens_saved` and `TokenStream.reused_prefix`;
- the reply comes back as token ids (`return_token_ids`, each chunk's `choices[0].token_ids`), so
  detokenization stays ours (`IncrementalText`), exactly as with the in-process engines;
- the mind-paced priority (`request_priority`, i.e. `brains.scheduler.rank`, lower runs first) goes in the
  `priority` field (vLLM needs `--scheduling-policy priority`; SGLang `--enable-priority-scheduling
  --schedule-low-priority-values-first`, since its default runs higher values first). A server that refuses
  priorities gets none after one warning. Past `remote_max_requests` in flight, requests wait here in the same
  order;
- cancelling closes the HTTP connection, which makes vLLM abort the request (its batch slot and KV blocks go).

Failures of the server (unreachable, an HTTP error, a stream cut or silent past `remote_read_timeout_s`) end only
that request's stream with an error (`EngineError` for the reader): the response fails, the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from brains.backends.engine_server import OWNER as DUET_OWNER
from brains.backends.loop_thread import LoopThreadEngine, Seq
from brains.backends.vllm_engine import engine_args
from brains.engine import Finished, GenerationRequest, TokenStream
from common.config import LlmConfig
from common.errors import EngineError

log = logging.getLogger(__name__)

API_KEY_ENV = "DUET_LLM_API_KEY"
# OpenAI finish reasons as Duet's; "abort" is vLLM's for a request aborted on its side.
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


def vllm_serve_args(cfg: LlmConfig, model_dir: str, served_name: str = "") -> list[str]:
    """`vllm serve` arguments (the model as `--model`, which every vLLM entry point takes) for a server that the
    remote backend uses as the in-process engine uses vLLM: `engine_args(cfg)` (prefix caching, priority
    scheduling, the same batch and cache sizes) as flags, plus the cached-token counts in `usage` that
    `stats.prefill_tokens_saved` reads."""
    args = engine_args(dataclasses.replace(cfg, model=model_dir))
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    if served_name:
        argv += ["--served-model-name", served_name]
    return [*argv, "--enable-prompt-tokens-details"]


class RemoteError(Exception):
    """One request's failure at the server, with the message a client should see."""


@dataclass
class _Seq(Seq):
    generated: int = 0


class PriorityGate:
    """At most `limit` requests in flight; the others wait, lowest priority value first (FIFO among equals), so
    an urgent AB segment is never stuck behind FB thought that arrived before it. Loop-bound, not thread-safe."""

    def __init__(self, limit: int, on_change: Callable[[], None] | None = None) -> None:
        self.limit = max(1, limit)
        self.busy = 0
        self._on_change = on_change or (lambda: None)
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, fut in self._heap if not fut.done())

    async def acquire(self, priority: int) -> None:
        if self.busy < self.limit and not self.waiting:
            self.busy += 1
            self._on_change()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._order), fut))
        self._on_change()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted and cancelled in the same breath: pass the place on
            else:
                self._on_change()
            raise

    def release(self) -> None:
        self.busy -= 1
        while self._heap and self.busy < self.limit:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():  # a cancelled waiter's future is done: skip it
                self.busy += 1
                fut.set_result(None)
        self._on_change()


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to `data: [DONE]`. One `data:` line per event is all
    that vLLM and SGLang send; comments (`:` keep-alives) and other fields are skipped."""
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise RemoteError(f"the server sent an event that is not JSON: {data[:200]!r}") from exc
        if not isinstance(event, dict):
            raise RemoteError(f"the server sent an event that is not an object: {data[:200]!r}")
        yield event


def _has_tokens(event: dict[str, Any]) -> bool:
    choices = event.get("choices") or []
    return bool(choices and isinstance(choices[0], dict) and choices[0].get("token_ids"))


def _ends_with_stop_token(choice: dict[str, Any], last: int) -> bool:
    """Whether a "stop" chunk's last id is the token that stopped it: vLLM's `stop_reason` is that token's id, or
    None for the model's EOS (which vLLM returns among the ids); SGLang's `matched_stop` is the token's id. A stop
    string (a str in either) is text, not a token of ours to drop."""
    matched = choice.get("stop_reason", choice.get("matched_stop"))
    if "stop_reason" in choice and matched is None:
        return True
    return isinstance(matched, int) and matched == last


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}} or {"message": ...}), else the text."""
    with contextlib.suppress(ValueError, AttributeError):
        doc = json.loads(body)
        err = doc.get("error", doc)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return body.decode(errors="replace").strip()[:500] or "(empty body)"


class RemoteEngine(LoopThreadEngine[_Seq]):
    """`Engine`'s public surface (start, close, submit, cancel, live_sequences, stats, eos_ids) over HTTP.

    `stats` holds what the server tells per request: tokens received (`decode_tokens`), prompt tokens it computed
    (`prefill_tokens`) and found in its prefix cache (`prefill_tokens_saved`), requests waiting here for a place
    (`waiting`) and in flight (`live`, most at once in `max_batch`), and failed requests. The server's steps are
    its own: `steps` and `busy_seconds` stay 0.
    """

    thread_name = "duet-remote"
    what = "the remote LLM client"

    def __init__(self, cfg: LlmConfig, urgent_audio_ms: float = 1500.0, eos_ids: frozenset[int] = frozenset(),
                 api_key: str | None = None) -> None:
        super().__init__(cfg, urgent_audio_ms, eos_ids)
        self.base_url = cfg.remote_url.rstrip("/")
        self.model = cfg.remote_model
        key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._send_priority = cfg.remote_priority
        self._duet_server = False  # set by _open: the server is `duet engine`
        self._max_requests = cfg.remote_max_requests or cfg.max_slots
        self._http: aiohttp.ClientSession | None = None
        self._gate: PriorityGate | None = None

    # `start` (LoopThreadEngine) waits up to `remote_startup_timeout_s` for the server to list its models, and
    # raises EngineError if it never does or does not serve `remote_model`.

    def _new_seq(self, seq_id: int, req: GenerationRequest, stream: TokenStream, loop: asyncio.AbstractEventLoop,
                 stops: frozenset[int], priority: int) -> _Seq:
        return _Seq(seq_id, req, stream, loop, stops, priority)

    def _accepting(self) -> bool:
        return self._http is not None

    async def _abandon(self) -> None:
        await self._close_http()

    # ---- client thread ------------------------------------------------------------------------
    async def _open(self) -> None:
        cfg = self.cfg
        self._gate = PriorityGate(self._max_requests, on_change=self._count_live)
        # No total timeout: a reply streams as long as it speaks. sock_read bounds the silence between chunks.
        timeout = aiohttp.ClientTimeout(total=None, connect=cfg.remote_connect_timeout_s,
                                        sock_connect=cfg.remote_connect_timeout_s,
                                        sock_read=cfg.remote_read_timeout_s)
        # The gate bounds requests in flight; the connector must not queue them again in arrival order.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self._http = aiohttp.ClientSession(timeout=timeout, connector=connector, headers=self._headers)
        served = await self._wait_for_models(cfg.remote_startup_timeout_s)
        models = [str(m["id"]) for m in served]
        if not self.model:
            if not models:
                raise EngineError(f"the LLM server at {self.base_url} serves no model")
            self.model = models[0]
        elif models and self.model not in models:
            raise EngineError(f"the LLM server at {self.base_url} does not serve llm.remote_model = "
                              f"{self.model!r}; it serves {models}")
        # `duet engine` (brains/backends/engine_server.py) schedules on what each request is, not on a priority.
        self._duet_server = any(m["id"] == self.model and m.get("owned_by") == DUET_OWNER for m in served)
        log.info("remote LLM: %s at %s (%s, at most %d requests in flight)", self.model, self.base_url,
                 "Duet's engine: mind-paced" if self._duet_server
                 else f"priorities {'on' if self._send_priority else 'off'}", self._max_requests)

    async def _wait_for_models(self, timeout_s: float) -> list[dict[str, Any]]:
        """The models of GET /models (each with an `id`), polled until the server answers (it may still be
        loading its model)."""
        assert self._http is not None
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            try:
                async with self._http.get(f"{self.base_url}/models") as resp:
                    body = await resp.read()
                    if resp.status in (401, 403):
                        raise EngineError(f"the LLM server at {self.base_url} refused us (HTTP {resp.status}): "
                                          f"{_error_message(body)}; set {API_KEY_ENV}")
                    if resp.status == 200:
                        data = json.loads(body).get("data") or []
                        return [m for m in data if isinstance(m, dict) and "id" in m]
                    last = f"HTTP {resp.status}: {_error_message(body)}"
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise EngineError(f"the LLM server at {self.base_url} did not answer within {timeout_s:g}s "
                                  f"(llm.remote_url, llm.remote_startup_timeout_s): {last}")
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _body(self, seq: _Seq) -> dict[str, Any]:
        req = seq.req
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(req.prompt),
            # The torch engine ends a sequence at the context's end ("length"); a server refuses the request.
            "max_tokens": max(1, min(req.max_new_tokens, self.max_len - len(req.prompt))),
            "temperature": max(0.0, req.temperature),
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop_token_ids": sorted(seq.stops),
            "return_token_ids": True,  # vLLM >= 0.10.2: the reply as ids, so our detokenizer sees the real ids
            "skip_special_tokens": False,
            # Sampling is exactly what the request says, as in the other engines: a server otherwise fills the
            # fields left out from the model folder's generation_config (top_k, top_p, repetition_penalty).
            "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
        }
        if self._duet_server:
            ahead = req.audio_ahead_ms() if req.audio_ahead_ms is not None else None
            if ahead is not None:  # JSON has no inf or NaN; none queued is 0 (as `request_priority` reads it)
                ahead = min(ahead, 1e9) if ahead > 0 else 0.0
            body["duet"] = {"brain": req.brain, "session_id": req.session_id, "audio_ahead_ms": ahead}
        elif self._send_priority:
            body["priority"] = seq.priority
        return body

    async def _generate(self, seq: _Seq) -> None:
        assert self._gate is not None
        gate = self._gate
        await gate.acquire(seq.priority)  # a cancel while waiting ends here: _cancel has finished the stream
        try:
            self._finish(seq, await self._stream(seq))
        except asyncio.CancelledError:
            self._finish(seq, Finished("cancelled"))  # the connection is closed: the server aborts the request
        except EngineError as exc:
            self._fail(seq, str(exc))
        except RemoteError as exc:
            self._fail(seq, f"the LLM server: {exc}")
        except aiohttp.ClientConnectorError as exc:
            self._fail(seq, f"the LLM server is unreachable ({exc.os_error.strerror or exc.os_error})", exc)
        except aiohttp.ConnectionTimeoutError as exc:
            self._fail(seq, "the LLM server is unreachable: no connection within "
                            f"{self.cfg.remote_connect_timeout_s:g}s (llm.remote_connect_timeout_s)", exc)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            self._fail(seq, f"the LLM server sent nothing for {self.cfg.remote_read_timeout_s:g}s "
                            "(llm.remote_read_timeout_s)", exc)
        except (aiohttp.ClientError, ValueError) as exc:  # a dropped connection, a broken stream
            self._fail(seq, f"the LLM server failed: {type(exc).__name__}", exc)
        finally:
            gate.release()

    async def _stream(self, seq: _Seq) -> Finished:
        """Deliver the request's tokens as they stream in; return how it finished. The finish is returned only at
        the stream's end (`[DONE]`, right after the finish reason), so the usage event between them can set the
        stream's `reused_prefix` before its reader sees the end."""
        assert self._http is not None
        body = self._body(seq)
        resp = await self._http.post(f"{self.base_url}/completions", json=body)
        clean = False
        try:
            if resp.status != 200:
                message = _error_message(await resp.read())
                if resp.status == 400 and "priority" in body and "priorit" in message.lower():
                    # The server runs without priority scheduling: say so once and go on without priorities.
                    log.warning("the LLM server refuses request priorities (%s); sending none. For mind-paced "
                                "scheduling start vLLM with --scheduling-policy priority", message)
                    self._send_priority = False
                    return await self._stream(seq)
                hint = f"; set {API_KEY_ENV}" if resp.status in (401, 403) else ""
                raise RemoteError(f"HTTP {resp.status}: {message}{hint}")
            result: Finished | None = None
            async for event in sse_events(resp.content):
                if result is None:
                    result = self._on_event(seq, event)
                elif self._on_event(seq, event, deliver=False) is None and _has_tokens(event):
                    break  # tokens past a stop the server did not stop at: stop reading (closing aborts it)
            else:
                clean = True
            if result is None:
                raise RemoteError("the stream ended without a finish reason")
            return result
        finally:
            if clean:
                resp.release()  # the whole stream was read: the connection goes back to the pool
            else:
                # Closing drops the connection, which is what tells the server to abort a request we stopped
                # reading (a cancel, a failure, a stop token it went past).
                resp.close()

    def _on_event(self, seq: _Seq, event: dict[str, Any], deliver: bool = True) -> Finished | None:
        """Deliver one event's tokens (with `deliver`); return the finish it reports, if any."""
        if "error" in event:  # vLLM reports a failure inside a started stream as an event
            err = event["error"]
            raise RemoteError(str(err.get("message", err)) if isinstance(err, dict) else str(err))
        usage = event.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            if isinstance(cached, int) and cached > 0:
                seq.cached = cached
                self._call(seq, setattr, seq.stream, "reused_prefix", cached)
        choices = event.get("choices") or []
        if not choices or not deliver:
            return None  # the usage event (after the finish reason), or events past our finish
        choice = choices[0]
        ids = choice.get("token_ids")
        if ids is None:
            if choice.get("text"):
                raise RemoteError("the server streams text without token ids (`return_token_ids`): Duet needs "
                                  "a server that returns them (vLLM >= 0.10.2)")
            ids = []
        reason = choice.get("finish_reason")
        out: list[int] = []
        stopped = False
        for token in ids:
            if token in seq.stops:  # like the torch engine: the stop token ends the sequence and is not delivered
                stopped = True
                break
            out.append(int(token))
        if not stopped and reason == "stop" and out and _ends_with_stop_token(choice, out[-1]):
            out.pop()  # stopped by a token we do not know as a stop (the model's own EOS): drop it too
        seq.generated += len(out)
        self.stats.decode_tokens += len(out)
        if out:
            self._call(seq, seq.stream._deliver, out)
        if stopped:
            return Finished("stop")
        if reason is None:
            return None
        if reason not in _FINISH:
            raise RemoteError(f"finish reason {reason!r}")
        return Finished(_FINISH[reason])  # type: ignore[arg-type]

    def _fail(self, seq: _Seq, error: str, cause: BaseException | None = None) -> None:
        """End `seq` with `error`, which the client sees (response failed): it names no address of ours; the
        log has the URL and the full cause."""
        if seq.finished:
            return
        log.warning("remote request %d to %s failed: %s%s", seq.seq_id, self.base_url, error,
                    f" ({type(cause).__name__}: {cause})" if cause is not None else "")
        self.stats.failed_requests += 1
        self._finish(seq, Finished("error", error))

    def _count_live(self) -> None:
        gate = self._gate
        if gate is not None:
            self.stats.live, self.stats.waiting = gate.busy, gate.waiting
            self.stats.max_batch = max(self.stats.max_batch, gate.busy)

    async def _close_backend(self) -> None:
        # (A cancelled sequence's task closes its connection in `_stream`'s finally, which aborts the request.)
        await self._close_http()

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
