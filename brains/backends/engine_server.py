"""Duet's own engine behind the HTTP API that `llm.backend = "remote"` speaks: one engine process, many servers.

One `duet serve` process holds its sockets, VAD, ASR, TTS and the engine under one GIL; at 64-128 sessions on
the GPU machine the event loop and the engine thread wait for each other there (docs/benchmarks.md 7c-7d).
`duet engine` runs the engine alone, and any number of `duet serve` front-end processes (behind `duet route` or
HAProxy) use it as their remote brains. This is vLLM V1's split, with Duet's mind-paced scheduler kept whole.

The API is the subset of OpenAI's completions that `brains/backends/remote.py` uses with vLLM: GET /v1/models,
POST /v1/completions with `prompt` as token ids, `max_tokens`, `temperature`, `stop_token_ids`, `stream`
(server-sent events with `token_ids` per chunk, then a `usage` event whose `prompt_tokens_details.cached_tokens`
is the prefix the engine reused, then `[DONE]`). Text stays the client's: the reply goes back as ids only.

What the engine schedules on goes with each request as a Duet extension, `duet: {brain, session_id,
audio_ahead_ms}` (the remote backend sends it once /v1/models says `owned_by: "duet"`; vLLM's `priority` is
accepted and not needed). The server cannot see the client's playback, so a segment's audio ahead is the
value at submit, counted down in real time: a segment gets more urgent the longer it runs without tokens,
as it would in process. A closed connection cancels the sequence.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import msgspec
from aiohttp import web

from brains.engine import Finished, GenerationEngine, GenerationRequest, TokenStream
from common.errors import EngineError

log = logging.getLogger(__name__)

OWNER = "duet"  # /v1/models' `owned_by`: the remote backend sends the `duet` fields to such a server
# Duet's finish reasons as OpenAI's ("abort" is vLLM's for a request stopped on the server's side).
_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


class DuetFields(msgspec.Struct):  # unknown fields ignored: a newer front end still works with an older engine
    brain: Literal["ab", "fb"] = "ab"
    session_id: str = ""
    audio_ahead_ms: float | None = None  # an AB segment's audio ahead of playback at submit; None: FB, or unknown


class CompletionRequest(msgspec.Struct):
    """The fields this server reads; the others an OpenAI client sends (top_p, stream_options...) are ignored,
    as vLLM ignores what it does not know. Sampling is greedy or plain temperature, as in the in-process engine."""

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = False
    stop_token_ids: list[int] = []
    priority: int = 0
    model: str = ""
    duet: DuetFields | None = None


def countdown(ahead_ms: float, clock: Callable[[], float] = time.monotonic) -> Callable[[], float]:
    """Audio ahead as the engine thread reads it each step: the submitted value less the time since."""
    t0 = clock()
    return lambda: max(0.0, ahead_ms - (clock() - t0) * 1000.0)


class EngineServer:
    """An aiohttp app around one started engine. The engine's lifetime is the caller's."""

    def __init__(self, engine: GenerationEngine, model: str, api_key: str = "") -> None:
        # `api_key` guards the models and completions; /healthz (and `duet engine`'s /metrics) stay open, as
        # `duet serve`'s ops routes do: counts and load only, for the machine's own monitoring.
        self.engine = engine
        self.model = model
        self.api_key = api_key
        self.requests: Counter[str] = Counter()  # by brain
        self.cancelled = 0  # streams whose client went away before the end
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/healthz", self.healthz)

    def _authorized(self, request: web.Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"live_sequences": self.engine.live_sequences(), "requests": dict(self.requests)})

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "a valid API key is required")
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": OWNER, "created": 0}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "a valid API key is required")
        try:
            body = msgspec.json.decode(await request.read(), type=CompletionRequest)
        except msgspec.ValidationError as exc:
            return _error(400, f"bad request: {exc}")
        except msgspec.DecodeError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        if body.model and body.model != self.model:
            return _error(404, f"the model {body.model!r} does not exist; this server serves {self.model!r}")
        if body.max_tokens < 1 or body.temperature < 0:
            return _error(400, "max_tokens must be at least 1 and temperature not negative")
        duet = body.duet or DuetFields()
        req = GenerationRequest(
            prompt=body.prompt, max_new_tokens=body.max_tokens, brain=duet.brain, session_id=duet.session_id,
            stop_ids=frozenset(body.stop_token_ids), temperature=body.temperature,
            audio_ahead_ms=countdown(duet.audio_ahead_ms) if duet.audio_ahead_ms is not None else None)
        try:
            stream = self.engine.submit(req)
        except ValueError as exc:  # too long for the cache, ids outside the vocabulary, an empty prompt
            return _error(400, str(exc))
        except EngineError as exc:
            return _error(503, str(exc))
        self.requests[duet.brain] += 1
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        try:
            if body.stream:
                return await self._stream(request, stream, rid, len(body.prompt))
            return await self._whole(stream, rid, len(body.prompt))
        except ConnectionResetError:  # the client went away mid-stream: nothing to answer
            return web.Response(status=499)
        finally:
            if stream.finish is None:  # the client went away (the handler was cancelled) or a write failed
                stream.cancel()
                self.cancelled += 1

    async def _stream(self, request: web.Request, stream: TokenStream, rid: str, prompt_len: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        made = 0
        try:
            async for ids in stream:
                made += len(ids)
                await _send(resp, _chunk(rid, self.model, ids, None))
            # (An error finish raises EngineError from the stream.) The finish goes in a chunk of its own with no
            # ids: the client drops a "stop" chunk's last id as the stop token, and this engine never delivers one.
            finish = stream.finish or Finished("stop")
            await _send(resp, _chunk(rid, self.model, [], _FINISH[finish.reason]))
        except EngineError as exc:
            await _send(resp, {"error": {"message": str(exc), "type": "engine_error", "code": 500}})
        await _send(resp, {"id": rid, "object": "text_completion", "model": self.model, "choices": [],
                           "usage": _usage(prompt_len, made, stream.reused_prefix)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _whole(self, stream: TokenStream, rid: str, prompt_len: int) -> web.Response:
        ids: list[int] = []
        try:
            async for batch in stream:
                ids.extend(batch)
        except EngineError as exc:
            return _error(500, str(exc))
        finish = stream.finish or Finished("stop")
        choice = {"index": 0, "text": "", "token_ids": ids, "finish_reason": _FINISH[finish.reason]}
        return web.json_response({"id": rid, "object": "text_completion", "model": self.model, "choices": [choice],
                                  "usage": _usage(prompt_len, len(ids), stream.reused_prefix)})


def _chunk(rid: str, model: str, ids: list[int], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": "", "token_ids": ids, "finish_reason": finish}]}


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _send(resp: web.StreamResponse, event: dict[str, Any]) -> None:
    await resp.write(b"data: " + msgspec.json.encode(event) + b"\n\n")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                             status=status)


async def serve(server: EngineServer, host: str, port: int, reuse_port: bool = False) -> web.AppRunner:
    """Listen; returns the runner (`await runner.cleanup()` stops it). A client that goes away cancels its
    handler, which cancels its sequence in the engine. `reuse_port`: bind beside a supervisor's socket holding
    the port (duet/front_ends.py)."""
    # A short shutdown: streams still open at stop are cut after 5 s (their clients see the stream end and fail
    # that response), not the 60 s aiohttp would wait while the engine goes on generating for them.
    runner = web.AppRunner(server.app, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    log.info("engine server: %s at http://%s:%d/v1", server.model, host, port)
    return runner
