"""The remote backend (brains/backends/remote.py) against a tiny OpenAI-compatible completions server on loopback.

`FakeServer` speaks the part of vLLM's HTTP API the backend uses: GET /v1/models, and POST /v1/completions with
`prompt` as token ids, streamed as server-sent events with `token_ids` per chunk, `usage` with
`prompt_tokens_details.cached_tokens` (an exact-prefix cache), `stop_token_ids`, `priority`, [DONE]. Its model is
the brains tests' deterministic `hash_next`, so every delivered id can be checked against `reference`. The real
server (`vllm serve`) is tests_vllm/test_remote_server.py's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from brains.backends.remote import PriorityGate, RemoteEngine, vllm_serve_args
from brains.backends.vllm_engine import request_priority
from brains.engine import GenerationRequest, TokenStream
from common.config import LlmConfig
from common.errors import EngineError
from tests.brains.fakes import hash_next, reference

EOS = 3


@dataclass
class FakeServer:
    model: str = "fake-model"
    delay_s: float = 0.0  # between tokens
    api_key: str = ""
    priorities: bool = True  # False: refuse nonzero priorities, like vLLM without --scheduling-policy priority
    fail: str = ""  # "http500" | "midstream" | "stall" | "no-ids"
    model_eos: int = -1  # the model's own EOS, which the server stops at unasked (vLLM: stop_reason None)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    seen_prompts: list[list[int]] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    disconnects: int = 0
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        # handler_cancellation: a client's disconnect cancels its handler at once, as vLLM's server notices it.
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _authorized(self, request: web.Request) -> bool:
        return not self.api_key or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        body = await request.json()
        self.bodies.append(body)
        if self.fail == "http500":
            return web.json_response({"error": {"message": "engine dead", "code": 500}}, status=500)
        if body.get("priority", 0) and not self.priorities:
            return web.json_response({"error": {"message": "Got priority 1500 but Priority scheduling is not "
                                                           "enabled.", "code": 400}}, status=400)
        prompt: list[int] = body["prompt"]
        cached = max((_prefix(prompt, seen) for seen in self.seen_prompts), default=0)
        self.seen_prompts.append(prompt)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        stops = set(body.get("stop_token_ids") or [])
        history, n, reason = list(prompt), 0, "length"
        try:
            while n < body["max_tokens"]:
                if self.fail == "stall":
                    await asyncio.sleep(3600)
                if self.fail == "midstream" and n == 2:
                    await self._send(resp, {"error": {"message": "KV cache exhausted", "code": 500}})
                    return resp
                token = hash_next(history)
                history.append(token)
                n += 1
                choice: dict[str, Any] = {"index": 0, "text": f"<{token}>", "finish_reason": None}
                if self.fail != "no-ids":
                    choice["token_ids"] = [token]
                if token in stops:  # like vLLM: the stop token is the last id, with the finish reason
                    choice.update(finish_reason="stop", stop_reason=token)
                    reason = ""
                elif token == self.model_eos:
                    choice.update(finish_reason="stop", stop_reason=None)
                    reason = ""
                elif n == body["max_tokens"]:
                    choice["finish_reason"] = "length"
                await self._send(resp, {"object": "text_completion", "model": self.model, "choices": [choice]})
                if not reason:
                    break
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            await self._send(resp, {"choices": [], "usage": {
                "prompt_tokens": len(prompt), "completion_tokens": n,
                "prompt_tokens_details": {"cached_tokens": cached}}})
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1  # the client closed the stream: vLLM aborts the request here
            raise
        finally:
            self.active -= 1
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, event: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def config(server: FakeServer, **kw: Any) -> LlmConfig:
    args: dict[str, Any] = dict(backend="remote", remote_url=server.url, max_seq_len=512, max_slots=8,
                                remote_startup_timeout_s=5.0, remote_read_timeout_s=5.0)
    args.update(kw)
    return LlmConfig(**args)


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    srv = FakeServer()
    await srv.start()
    yield srv
    await srv.stop()


async def started(cfg: LlmConfig, **kw: Any) -> RemoteEngine:
    engine = RemoteEngine(cfg, eos_ids=frozenset({EOS}), **kw)
    # start() blocks until the server answers, and the fake server runs on this test's loop.
    await asyncio.to_thread(engine.start)
    return engine


@pytest.fixture
async def engine(server: FakeServer) -> AsyncIterator[RemoteEngine]:
    eng = await started(config(server))
    yield eng
    await asyncio.to_thread(eng.close)


async def collect(stream: TokenStream) -> list[int]:
    ids: list[int] = []
    async for batch in stream:
        ids.extend(batch)
    return ids


PROMPT = [5, 17, 42, 8, 99, 23]


async def test_streams_the_models_tokens_from_a_prompt_sent_as_ids(server: FakeServer, engine: RemoteEngine) -> None:
    stream = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=12, brain="fb", stop_ids=frozenset()))
    ids = await collect(stream)
    expected = reference(PROMPT, 12, frozenset({EOS}))
    assert ids == expected and len(ids) == 12, "every id, in order, exactly the model's greedy tokens"
    assert stream.finish is not None and stream.finish.reason == "length"
    body = server.bodies[-1]
    assert body["prompt"] == PROMPT and body["model"] == "fake-model" and body["stream"] is True
    assert body["max_tokens"] == 12 and body["return_token_ids"] is True and EOS in body["stop_token_ids"]
    fb = GenerationRequest(prompt=PROMPT, max_new_tokens=1, brain="fb")
    assert body["priority"] == request_priority(fb, engine.urgent_audio_ms) > 0
    assert engine.stats.decode_tokens >= 12 and engine.live_sequences() == 0


async def test_a_stop_token_ends_the_stream_and_is_not_delivered(server: FakeServer, engine: RemoteEngine) -> None:
    free = reference(PROMPT, 12)
    stop = free[4]
    assert stop not in free[:4]
    stream = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=12, stop_ids=frozenset({stop})))
    assert await collect(stream) == free[:4]
    assert stream.finish is not None and stream.finish.reason == "stop"
    assert stop in server.bodies[-1]["stop_token_ids"]


async def test_the_models_own_eos_is_not_delivered_either(server: FakeServer) -> None:
    free = reference(PROMPT, 12)
    server.model_eos = free[5]
    eng = RemoteEngine(config(server))  # no eos_ids: the server knows the EOS, Duet's stop ids do not
    await asyncio.to_thread(eng.start)
    try:
        stream = eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=12))
        assert await collect(stream) == free[:5]
        assert stream.finish is not None and stream.finish.reason == "stop"
    finally:
        await asyncio.to_thread(eng.close)


async def test_max_tokens_never_runs_past_the_context(server: FakeServer) -> None:
    eng = await started(config(server, max_seq_len=len(PROMPT) + 3))
    try:
        ids = await collect(eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=50)))
        assert server.bodies[-1]["max_tokens"] == 3 and len(ids) == 3
        with pytest.raises(ValueError, match="exceeds"):
            eng.submit(GenerationRequest(prompt=list(range(len(PROMPT) + 3)), max_new_tokens=1))
    finally:
        await asyncio.to_thread(eng.close)


async def test_the_servers_prefix_cache_hits_are_counted(server: FakeServer, engine: RemoteEngine) -> None:
    """The AB prompt extends the FB's: sent as the same ids, the server's prefix cache finds the shared part."""
    fb = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=6, brain="fb"))
    thought = await collect(fb)
    saved_before = engine.stats.prefill_tokens_saved
    ab_prompt = [*PROMPT, *thought, 61, 62]
    ab = engine.submit(GenerationRequest(prompt=ab_prompt, max_new_tokens=4, brain="ab"))
    assert await collect(ab) == reference(ab_prompt, 4, frozenset({EOS}))
    assert ab.reused_prefix == len(PROMPT), "set before the stream ends, from the usage event"
    assert engine.stats.prefill_tokens_saved - saved_before == len(PROMPT)


async def test_cancel_closes_the_stream_and_the_server_sees_it(server: FakeServer, engine: RemoteEngine) -> None:
    server.delay_s = 0.05
    stream = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=400))
    first = await stream.__anext__()
    assert first
    stream.cancel()
    rest = await collect(stream)
    assert stream.finish is not None and stream.finish.reason == "cancelled"
    assert len(first) + len(rest) < 100
    deadline = time.monotonic() + 5
    while (server.disconnects == 0 or server.active) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert server.disconnects == 1 and server.active == 0, "closing the HTTP stream is vLLM's abort"
    assert engine.live_sequences() == 0


async def test_http_errors_fail_only_that_request(server: FakeServer, engine: RemoteEngine) -> None:
    server.fail = "http500"
    with pytest.raises(EngineError, match="HTTP 500: engine dead"):
        await collect(engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=4)))
    server.fail = "midstream"
    stream = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=8))
    got: list[int] = []
    with pytest.raises(EngineError, match="KV cache exhausted"):
        async for batch in stream:
            got.extend(batch)
    assert got == reference(PROMPT, 2, frozenset({EOS})), "tokens before the failure were delivered"
    assert stream.finish is not None and stream.finish.reason == "error"
    server.fail = ""
    assert await collect(engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=4))) == \
        reference(PROMPT, 4, frozenset({EOS})), "the engine goes on"
    assert engine.stats.failed_requests == 2


async def test_a_silent_server_times_out(server: FakeServer) -> None:
    server.fail = "stall"
    eng = await started(config(server, remote_read_timeout_s=0.3))
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=r"sent nothing for 0\.3s"):
            await collect(eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=4)))
        assert time.monotonic() - t0 < 3
    finally:
        await asyncio.to_thread(eng.close)


async def test_a_server_without_token_ids_is_a_clear_error(server: FakeServer, engine: RemoteEngine) -> None:
    server.fail = "no-ids"
    with pytest.raises(EngineError, match="token ids"):
        await collect(engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=4)))


async def test_an_unreachable_server_fails_requests_then_recovers() -> None:
    srv = FakeServer()
    await srv.start()
    eng = await started(config(srv, remote_connect_timeout_s=1.0))
    port = srv.port
    try:
        await srv.stop()
        with pytest.raises(EngineError, match="unreachable"):
            await collect(eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=4)))
        back = FakeServer(port=port)
        await back.start()
        try:
            assert await collect(eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=4))) == \
                reference(PROMPT, 4, frozenset({EOS}))
        finally:
            await back.stop()
    finally:
        await asyncio.to_thread(eng.close)


async def test_start_says_clearly_that_the_server_is_not_there(server: FakeServer) -> None:
    dead = config(server, remote_url="http://127.0.0.1:9/v1", remote_startup_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"http://127\.0\.0\.1:9/v1 did not answer within 0\.5s"):
        await started(dead)
    assert time.monotonic() - t0 < 5
    with pytest.raises(EngineError, match=r"does not serve llm\.remote_model = 'other'"):
        await started(config(server, remote_model="other"))


async def test_the_api_key_comes_from_the_environment(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.api_key = "sk-remote"
    with pytest.raises(EngineError, match="DUET_LLM_API_KEY"):
        await started(config(server))
    monkeypatch.setenv("DUET_LLM_API_KEY", "sk-remote")
    eng = await started(config(server))
    try:
        assert len(await collect(eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=3)))) == 3
    finally:
        await asyncio.to_thread(eng.close)


async def test_a_server_without_priorities_is_sent_none(server: FakeServer, engine: RemoteEngine) -> None:
    server.priorities = False
    fb = GenerationRequest(prompt=PROMPT, max_new_tokens=3, brain="fb")
    assert await collect(engine.submit(fb)) == reference(PROMPT, 3, frozenset({EOS}))
    assert server.bodies[-2]["priority"] > 0 and "priority" not in server.bodies[-1]
    await collect(engine.submit(fb))
    assert "priority" not in server.bodies[-1], "refused once, never sent again"


async def test_requests_past_the_limit_wait_most_urgent_first(server: FakeServer) -> None:
    server.delay_s = 0.02
    eng = await started(config(server, remote_max_requests=1))
    try:
        first = eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=20, brain="fb"))
        await first.__anext__()  # in flight: the others must wait
        relaxed = eng.submit(GenerationRequest(prompt=[1, 2, 3], max_new_tokens=2, brain="ab",
                                               audio_ahead_ms=lambda: 9000.0))
        fb = eng.submit(GenerationRequest(prompt=[4, 5, 6], max_new_tokens=2, brain="fb"))
        urgent = eng.submit(GenerationRequest(prompt=[7, 8, 9], max_new_tokens=2, brain="ab",
                                              audio_ahead_ms=lambda: 100.0))
        await asyncio.sleep(0.1)
        assert eng.stats.waiting == 3 and eng.stats.live == 1
        await asyncio.gather(*(collect(s) for s in (first, relaxed, fb, urgent)))
        assert [b["prompt"] for b in server.bodies[1:]] == [[7, 8, 9], [4, 5, 6], [1, 2, 3]]
        assert server.max_active == 1
    finally:
        await asyncio.to_thread(eng.close)


async def test_priority_gate_skips_cancelled_waiters() -> None:
    gate = PriorityGate(1)
    await gate.acquire(5)
    waiter = asyncio.create_task(gate.acquire(0))
    later = asyncio.create_task(gate.acquire(9))
    await asyncio.sleep(0)
    assert gate.waiting == 2
    waiter.cancel()
    await asyncio.sleep(0)
    gate.release()
    await asyncio.wait_for(later, 1)
    assert gate.busy == 1 and gate.waiting == 0


async def test_close_cancels_live_streams(server: FakeServer) -> None:
    server.delay_s = 0.05
    eng = await started(config(server))
    stream = eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=400))
    await stream.__anext__()
    await asyncio.to_thread(eng.close)
    await collect(stream)
    assert stream.finish is not None and stream.finish.reason == "cancelled"
    with pytest.raises(EngineError, match="closed"):
        eng.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=1))


def test_vllm_serve_args_match_the_in_process_engine(tmp_path: Any) -> None:
    """A `vllm serve` for the remote backend gets the in-process engine's arguments, and the cached-token counts."""
    argv = vllm_serve_args(LlmConfig(max_slots=8, max_seq_len=2048, vllm_kv_cache_gib=0.5), str(tmp_path), "duet")
    flags = {flag: value for flag, value in zip(argv, [*argv[1:], ""], strict=True)
             if flag.startswith("--") and not value.startswith("--")}
    assert argv[:2] == ["--model", str(tmp_path)]
    assert flags["--scheduling-policy"] == "priority" and flags["--max-num-seqs"] == "8"
    assert flags["--max-model-len"] == "2048" and flags["--kv-cache-memory-bytes"] == str(1 << 29)
    assert flags["--served-model-name"] == "duet" and flags["--generation-config"] == "vllm"
    for flag in ("--enable-prefix-caching", "--enforce-eager", "--enable-prompt-tokens-details"):
        assert flag in argv
