"""`duet serve` as a real process, stopped by SIGTERM mid-reply: the reply finishes (response.done reaches the
client), new connections and /readyz get 503 while it drains, the session is closed with 1001, the process
exits 0 within the grace period plus a margin, and the turn is in the session's JSONL transcript."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from realtime import transcripts
from tests.duet.serve_process import serve

pytestmark = pytest.mark.integration

# Generous: on a loaded 2-core machine a reply can take tens of seconds, and the test waits only as long as the
# reply does. The reply is kept short (nothink, 40 tokens) so that it mostly does not.
GRACE_S = 120.0
MARGIN_S = 30.0  # closing the runtime (engine thread, pools) on a loaded 2-core machine


def start(tmp_path: Path) -> tuple[subprocess.Popen[str], str, Path]:
    return serve(tmp_path, "--log-format", "json", "--set", f"server.shutdown_grace_seconds={GRACE_S}",
                 "--set", 'mind.mode="nothink"', "--set", "llm.max_reply_tokens=40",
                 "--set", f"server.transcripts_dir={json.dumps(str(tmp_path / 'transcripts'))}")


async def test_sigterm_mid_reply_drains_then_closes_1001_and_exits_0(tmp_path: Path) -> None:
    proc, url, stderr = start(tmp_path)
    base = url.replace("ws://", "http://").rsplit("/v1/realtime", 1)[0]
    try:
        types: list[str] = []
        done: dict[str, Any] = {}
        during: dict[str, int] = {}
        signalled_at = 0.0
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Tell me about the history of Rome."}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            checks: asyncio.Task[None] | None = None

            async def while_draining() -> None:
                async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as r:
                    during["readyz"] = r.status
                try:
                    async with connect(url, open_timeout=10):
                        during["new_session"] = 101
                except InvalidStatus as exc:
                    during["new_session"] = exc.response.status_code

            try:
                async with asyncio.timeout(GRACE_S + 60):
                    async for message in ws:
                        event = json.loads(message)
                        types.append(event["type"])
                        if event["type"] == "response.output_audio.delta" and checks is None:
                            proc.send_signal(signal.SIGTERM)  # mid-reply: the first audio is out, more to come
                            signalled_at = time.monotonic()
                            checks = asyncio.create_task(while_draining())
                        if event["type"] == "response.done":
                            done = event["response"]
            except ConnectionClosed:
                pass
            close_code = ws.close_code
            assert checks is not None, types
            await checks
        exit_code = await asyncio.to_thread(proc.wait, GRACE_S + MARGIN_S)
        stopped_in = time.monotonic() - signalled_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert done, types
    assert done["status"] == "completed", done
    assert types.index("response.done") < len(types)
    assert close_code == 1001
    assert during == {"readyz": 503, "new_session": 503}
    assert exit_code == 0 and stopped_in < GRACE_S + MARGIN_S
    # The finished turn is on disk, and the logs were JSON with the session as a field.
    (path,) = (tmp_path / "transcripts").glob("*.jsonl")
    (turn,) = transcripts.read(path)
    assert turn["response_id"] == done["id"] and "rome" in turn["user_text"].lower()
    assert turn["assistant_text"] and turn["status"] == "completed"
    records = [json.loads(line) for line in stderr.read_text().splitlines() if line.startswith("{")]
    assert any(r.get("event") == "response.done" and r.get("response_id") == done["id"] and r.get("session_id")
               for r in records)
