"""A failure inside one generation request ends only that response, with an error event: the session goes on,
and another session's reply at the same time completes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from brains.engine import GenerationRequest

pytestmark = pytest.mark.integration


async def open_session(url: str) -> tuple[ClientConnection, str]:
    ws = await connect(url, max_size=None)
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created"
    await ws.send(json.dumps({"type": "session.update", "session": {"duet": {"pacing": "nothink"}}}))
    return ws, created["session"]["id"]


async def ask(ws: ClientConnection, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A text turn; returns response.done's response and the error events that came before it."""
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
    errors = []
    async with asyncio.timeout(90):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "error":
                errors.append(event["error"])
            if event["type"] == "response.done":
                return event["response"], errors


async def test_a_failing_request_fails_its_response_only(url: str, runtime: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bad_ws, bad_id = await open_session(url)
    good_ws, _ = await open_session(url)
    engine = runtime.engine
    submit = engine.submit
    failed: list[int] = []

    def broken_pacer() -> float:
        raise RuntimeError("pacer state broke")

    def failing_once(req: GenerationRequest) -> Any:
        if req.session_id == bad_id and not failed:
            failed.append(1)
            # Runs on the engine thread, inside its step loop: the request-specific failure under test.
            req = dataclasses.replace(req, audio_ahead_ms=broken_pacer)
        return submit(req)

    monkeypatch.setattr(engine, "submit", failing_once)
    errors_before = engine.stats.failed_requests
    try:
        (bad, bad_errors), (good, good_errors) = await asyncio.gather(
            ask(bad_ws, "What is the capital of France?"), ask(good_ws, "What is the capital of Italy?"))
        assert failed == [1]
        assert bad["status"] == "failed" and [e["code"] for e in bad_errors] == ["response_failed"]
        assert "pacer state broke" in bad_errors[0]["message"]
        assert good["status"] == "completed" and good_errors == []
        assert good["output"][0]["content"][0]["text"]
        assert engine.stats.failed_requests == errors_before + 1
        # The failed session goes on: its next response completes.
        again, again_errors = await ask(bad_ws, "And of Spain?")
        assert again["status"] == "completed" and again_errors == []
    finally:
        await bad_ws.close()
        await good_ws.close()
