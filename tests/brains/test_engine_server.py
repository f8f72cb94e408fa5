"""`duet engine`'s HTTP server (brains/backends/engine_server.py) with the remote backend as its client: Duet's
real `Engine` over the deterministic fake model, on loopback. Every delivered id is checked against the
greedy `reference`; what the engine schedules on (brain, session, audio ahead) must arrive with each request;
a client that goes away must cancel its sequence; bad requests get a clear 400 and touch nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from brains.backends.engine_server import EngineServer, countdown, serve
from brains.backends.remote import RemoteEngine
from brains.engine import GenerationRequest
from brains.scheduler import SchedulerConfig
from common.config import LlmConfig
from tests.brains.fakes import FakeBackend, RecordingEngine, collect, reference

PROMPT = [5, 17, 42, 8, 66, 23]
EOS = 3


@dataclass
class Served:
    engine: RecordingEngine
    backend: FakeBackend
    server: EngineServer
    url: str


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    backend = FakeBackend(slots=8, max_len=256)
    engine = RecordingEngine(backend, SchedulerConfig(token_budget=256, max_batch=8, prefill_chunk=64),
                             eos_ids=frozenset({EOS}))
    engine.start()
    server = EngineServer(engine, "smollm2", api_key="k3y")
    runner = await serve(server, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        yield Served(engine, backend, server, f"http://127.0.0.1:{port}/v1")
    finally:
        await runner.cleanup()
        backend.resume()
        engine.close()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[RemoteEngine]:
    cfg = LlmConfig(backend="remote", remote_url=served.url, max_seq_len=256, max_slots=8,
                    remote_startup_timeout_s=5.0, remote_read_timeout_s=5.0)
    eng = RemoteEngine(cfg, eos_ids=frozenset({EOS}), api_key="k3y")
    await asyncio.to_thread(eng.start)  # blocks until /v1/models answers, and the server runs on this loop
    try:
        yield eng
    finally:
        await asyncio.to_thread(eng.close)


async def test_the_remote_backend_gets_the_engines_tokens_and_its_finish(served: Served,
                                                                        client: RemoteEngine) -> None:
    free = reference(PROMPT, 12, frozenset({EOS}))
    stop = free[4]
    assert stop not in free[:4]
    stream = client.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=12, brain="fb",
                                             stop_ids=frozenset({stop})))
    assert await collect(stream) == free[:4], "the stop token ends the stream and is not delivered"
    assert stream.finish is not None and stream.finish.reason == "stop"
    long = client.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=5))
    assert await collect(long) == reference(PROMPT, 5, frozenset({EOS}))
    assert long.finish is not None and long.finish.reason in ("length", "stop")
    assert client._duet_server, "/v1/models said owned_by duet"


async def test_what_the_engine_schedules_on_goes_with_the_request(served: Served, client: RemoteEngine) -> None:
    stream = client.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=4, brain="ab", session_id="sess_9",
                                             audio_ahead_ms=lambda: 800.0))
    await collect(stream)
    req, _ = served.engine.submitted[-1]
    assert (req.brain, req.session_id) == ("ab", "sess_9")
    assert req.audio_ahead_ms is not None and 0.0 < req.audio_ahead_ms() <= 800.0
    fb = client.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=2, brain="fb", session_id="sess_9"))
    await collect(fb)
    req, _ = served.engine.submitted[-1]
    assert req.brain == "fb" and req.audio_ahead_ms is None


async def test_a_shared_prefix_is_reused_and_reported(served: Served, client: RemoteEngine) -> None:
    thought = await collect(client.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=6, brain="fb")))
    ab_prompt = [*PROMPT, *thought, 61, 62]
    ab = client.submit(GenerationRequest(prompt=ab_prompt, max_new_tokens=4))
    assert await collect(ab) == reference(ab_prompt, 4, frozenset({EOS}))
    assert ab.reused_prefix > 0, "the engine's prefix reuse reaches the client through usage.cached_tokens"
    assert client.stats.prefill_tokens_saved >= ab.reused_prefix


async def test_a_client_that_goes_away_cancels_its_sequence(served: Served, client: RemoteEngine) -> None:
    # Bounds, not timings: generous for a loaded 2-core machine.
    served.backend.pause()
    stream = client.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=200))
    assert await asyncio.to_thread(served.backend.wait_blocked, 30)
    served.backend.allow(3)
    first = await asyncio.wait_for(stream.__anext__(), 30)
    assert first
    stream.cancel()  # closes the HTTP stream
    await collect(stream)
    # A few more steps only (the fake model stays held): the sequence can leave the engine by being cancelled,
    # not by running out its 200 tokens.
    served.backend.allow(5)
    deadline = time.monotonic() + 30
    while served.engine.live_sequences() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert served.engine.live_sequences() == 0 and served.server.cancelled == 1


@pytest.mark.parametrize(("body", "status", "says"), [
    (b"not json", 400, "not JSON"),
    (b'{"max_tokens": 4}', 400, "prompt"),
    (b'{"prompt": [], "max_tokens": 4}', 400, "empty prompt"),
    (b'{"prompt": [1, 2, 5000], "max_tokens": 4}', 400, "vocabulary"),
    (b'{"prompt": [1, 2], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": [1, 2], "duet": {"brain": "xx"}}', 400, "brain"),
    (b'{"prompt": [1, 2], "model": "other"}', 404, "smollm2"),
])
async def test_bad_requests_get_a_clear_error_and_run_nothing(served: Served, body: bytes, status: int,
                                                              says: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer k3y"}) as http:
        resp = await http.post(f"{served.url}/completions", data=body)
        answer: dict[str, Any] = await resp.json()
    assert resp.status == status and says in answer["error"]["message"], answer
    assert served.engine.submitted == [], "a refused request never reaches the engine"
    assert served.engine.live_sequences() == 0


async def test_a_wrong_key_is_refused(served: Served) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer nope"}) as http:
        for resp in (await http.get(f"{served.url}/models"),
                     await http.post(f"{served.url}/completions", json={"prompt": [1], "max_tokens": 1})):
            assert resp.status == 401
    assert served.engine.submitted == []


async def test_a_request_without_stream_gets_one_answer(served: Served) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer k3y"}) as http:
        resp = await http.post(f"{served.url}/completions", json={"prompt": PROMPT, "max_tokens": 5})
        answer = await resp.json()
    choice = answer["choices"][0]
    assert resp.status == 200 and choice["token_ids"] == reference(PROMPT, 5, frozenset({EOS}))
    assert answer["usage"]["completion_tokens"] == len(choice["token_ids"])


def test_audio_ahead_counts_down_from_the_value_at_submit() -> None:
    now = [100.0]
    ahead = countdown(900.0, clock=lambda: now[0])
    assert ahead() == 900.0
    now[0] += 0.25
    assert ahead() == pytest.approx(650.0)
    now[0] += 5.0
    assert ahead() == 0.0

