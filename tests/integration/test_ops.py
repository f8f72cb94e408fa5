"""Operations on the real server: after a spoken turn, /metrics on the same port has the turn's stage latencies
and the session gauge moved while the client was connected; the turn's transcripts land in the JSONL log."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.talk import talk
from realtime import transcripts

pytestmark = pytest.mark.integration


async def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def stage(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("duet_turn_stage_seconds_count", (("stage", name),))


async def test_a_spoken_turn_shows_in_metrics_and_transcripts(server: Any, runtime: Any, speak: Any,
                                                              tmp_path: Any) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(base + path) as r:
                assert r.status == 200, path
    log = transcripts.TranscriptLog(tmp_path / "transcripts")
    runtime.observers.append(log)
    try:
        before = await scrape(base)
        idle_sessions = before[("duet_sessions_active", ())]
        turn = asyncio.create_task(talk(speak("What is the capital of France?"), f"ws://127.0.0.1:{server.port}"
                                        "/v1/realtime", timeout_s=90))
        seen_sessions = idle_sessions
        while not turn.done():  # the gauge while the client is connected
            seen_sessions = max(seen_sessions, (await scrape(base))[("duet_sessions_active", ())])
            await asyncio.sleep(0.25)
        result = turn.result()
        await log.flush()
    finally:
        runtime.observers.remove(log)
        log.close()
    assert result["reply_transcript"], result
    assert seen_sessions >= idle_sessions + 1

    after = await scrape(base)
    for name in ("turn_decision", "transcript", "first_token", "first_audio_synthesized", "first_audio_sent"):
        assert after[stage(name)] >= before.get(stage(name), 0) + 1, name
    v2v = ("duet_voice_to_voice_seconds_count", ())
    assert after[v2v] >= before.get(v2v, 0) + 1  # the server's estimate: turn decision + first audio sent
    assert after[("duet_turns_total", (("status", "completed"),))] >= \
        before.get(("duet_turns_total", (("status", "completed"),)), 0) + 1
    assert after[("duet_engine_steps_total", ())] > before[("duet_engine_steps_total", ())]
    assert after[("duet_engine_step_seconds_count", ())] > before[("duet_engine_step_seconds_count", ())]
    for _ in range(40):  # the session leaves the registry as its connection's handler ends
        if after[("duet_sessions_active", ())] <= idle_sessions:
            break
        await asyncio.sleep(0.25)
        after = await scrape(base)
    assert after[("duet_sessions_active", ())] <= idle_sessions

    files = list((tmp_path / "transcripts").glob("*.jsonl"))
    assert len(files) == 1
    (line,) = transcripts.read(files[0])
    assert "france" in line["user_text"].lower() and line["user_item_id"]
    assert "paris" in line["assistant_text"].lower() or line["assistant_text"] == result["reply_transcript"]
    assert line["status"] == "completed" and line["finished_at"] > line["started_at"]
