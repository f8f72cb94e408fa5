"""`duet engine` as a real process on the bundled SmolLM2: it lists its model as Duet's, streams a completion of
token ids, refuses a bad one with a clear error and keeps serving, and exits 0 on SIGTERM. It refuses to listen
on a public address without a key before loading anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from brains.backends.remote import sse_events
from tests.duet.serve_process import REPO, start_duet

pytestmark = pytest.mark.integration


async def test_duet_engine_serves_completions_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, url, log = start_duet(tmp_path, "engine", "serving engine", "--served-model-name", "smol")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/models") as resp:
                models = (await resp.json())["data"]
            assert [(m["id"], m["owned_by"]) for m in models] == [("smol", "duet")]

            prompt = list(range(400, 424))
            body = {"model": "smol", "prompt": prompt, "max_tokens": 8, "stream": True,
                    "duet": {"brain": "fb", "session_id": "sess_t"}}
            async with http.post(f"{url}/completions", json=body) as resp:
                assert resp.status == 200
                events = [e async for e in sse_events(resp.content)]
            ids = [t for e in events for c in e.get("choices", []) for t in c["token_ids"]]
            finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]]
            assert 1 <= len(ids) <= 8 and finishes in (["length"], ["stop"]), events
            assert events[-1]["usage"]["completion_tokens"] == len(ids)
            assert events[-1]["usage"]["prompt_tokens"] == len(prompt)

            async with http.post(f"{url}/completions", json={"prompt": [10**7], "max_tokens": 2}) as resp:
                assert resp.status == 400 and "vocabulary" in (await resp.json())["error"]["message"]
            base = url.removesuffix("/v1")
            async with http.get(f"{base}/healthz") as resp:
                health = await resp.json()
            assert health == {"live_sequences": 0, "requests": {"fb": 1}}, health
            async with http.get(f"{base}/metrics") as resp:
                scraped = {s.name: s.value for f in text_string_to_metric_families(await resp.text())
                           for s in f.samples}
            assert scraped["duet_engine_decode_tokens_total"] >= len(ids) and scraped["duet_engine_steps_total"] > 0
            assert scraped["process_cpu_seconds_total"] > 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_duet_engine_will_not_serve_a_public_address_without_a_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DUET_LLM_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "duet.cli", "engine", "--host", "0.0.0.0", "--port", "0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "DUET_LLM_API_KEY" in done.stderr, done.stderr
    assert done.stdout == "", "the refusal comes before any model is loaded"
