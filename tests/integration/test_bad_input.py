"""Whatever a client sends, the server answers bad input with an `error` event and keeps the session."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.integration import schema

pytestmark = pytest.mark.integration


async def recv_until(ws: ClientConnection, kind: str, limit: int = 50) -> dict[str, Any]:
    for _ in range(limit):
        event = schema.check(json.loads(await ws.recv()))  # errors too must fit the schema strict clients use
        if event["type"] == kind:
            return dict(event)
    raise AssertionError(f"no {kind} in {limit} events")


async def expect_error(ws: ClientConnection, payload: str | bytes, code: str, event_id: str | None = None) -> None:
    await ws.send(payload)
    err = (await recv_until(ws, "error"))["error"]
    assert err["code"] == code, err
    assert err["message"]
    if event_id is not None:
        assert err["event_id"] == event_id


async def still_works(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
    updated = await recv_until(ws, "session.updated")
    assert updated["session"]["instructions"] == "Be brief."


async def test_each_kind_of_bad_input_gets_an_error_and_the_session_survives(url, server) -> None:
    async with connect(url, max_size=None) as ws, connect(url) as bystander:
        assert schema.check(json.loads(await ws.recv()))["type"] == "session.created"
        assert schema.check(json.loads(await bystander.recv()))["type"] == "session.created"
        await expect_error(ws, "{not json", "invalid_json")
        await expect_error(ws, "[1, 2]", "invalid_json")
        await expect_error(ws, json.dumps({"no": "type"}), "missing_type")
        await expect_error(ws, json.dumps({"type": "nope.nothing", "event_id": "ev_1"}), "unknown_event_type", "ev_1")
        await expect_error(ws, json.dumps({"type": "input_audio_buffer.append", "audio": "@@@not base64@@@",
                                           "event_id": "ev_2"}), "invalid_base64", "ev_2")
        await expect_error(ws, json.dumps({"type": "input_audio_buffer.append", "audio": 42}), "invalid_value")
        await expect_error(ws, json.dumps({"type": "session.update", "session": {"input_audio_format": "mp3"}}),
                           "invalid_value")
        odd = base64.b64encode(b"\x00\x01\x02").decode()
        await expect_error(ws, json.dumps({"type": "input_audio_buffer.append", "audio": odd}), "invalid_audio_length")
        await expect_error(ws, b"\x00\x01binary", "binary_not_supported")
        too_big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (server.cfg.max_message_bytes + 8)})
        await expect_error(ws, too_big, "message_too_large")
        await expect_error(ws, json.dumps({"type": "response.cancel"}), "response_cancel_not_active")
        await still_works(ws)
        # The other session saw none of it and works as before.
        await still_works(bystander)


async def test_audio_before_session_update_is_accepted_with_defaults(url) -> None:
    """Real clients append audio before (or without) session.update; the protocol's defaults apply."""
    async with connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        silence = base64.b64encode(np.zeros(4800, dtype="<i2").tobytes()).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert (await recv_until(ws, "input_audio_buffer.cleared"))["type"] == "input_audio_buffer.cleared"


async def test_unknown_path_is_rejected_with_404(url) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        async with connect(url.replace("/v1/realtime", "/nope")):
            pass
    assert info.value.response.status_code == 404
