"""Voice-to-voice latency measured in a browser: the Duet page over the WebSocket and over WebRTC, side by side.

Starts `duet serve` as a subprocess, opens the page twice in headless Chromium (the same Playwright setup as
tests/integration/test_browser.py: Debian's chromium, a fake mic), one page per transport, and has each ask
the same spoken questions, taking turns question by question so that machine load drifts hit both alike. A
question is played into what the page sends (`duet.inject`, the path the mic takes); the latency is the
page's own measure: the first reply sound reaching the output minus the end of the question in what the
page sent. The next question waits until the reply has finished playing.

    .venv/bin/python bench/browser_latency.py --turns 5 --out docs/results/browser_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.integration.browser: the browser tests' own setup

from bench.latency import QUESTIONS, launch_server, synthesize_questions, wait_ready  # noqa: E402
from tests.integration import browser as chromium  # noqa: E402

TRANSPORTS = ("websocket", "webrtc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(page: Any, condition: str, timeout_s: float) -> None:
    # Polled with evaluate: the page's Content-Security-Policy forbids the eval that wait_for_function needs.
    deadline = time.monotonic() + timeout_s
    while not await page.evaluate(f"() => Boolean({condition})"):
        if time.monotonic() > deadline:
            raise TimeoutError(condition)
        await asyncio.sleep(0.05)


async def one_turn(page: Any, transport: str, audio: np.ndarray, question: str) -> dict[str, Any]:
    n = len(await chromium.turns(page))
    await page.evaluate("b64 => duet.inject(b64)", chromium.pcm16_b64(audio))
    # The reply has played out: its response is done and no reply audio is queued (WebRTC: the server says
    # its buffer stopped, and the track's jitter buffer gets a moment).
    done = f"duet.turns.length > {n} && duet.turns.slice({n}).some(t => t.status !== null && t.latencyMs !== null)"
    await wait_for(page, done, 90)
    if transport == "websocket":
        await wait_for(page, "duet.queuedMs() === 0", 60)
    else:
        stopped = "(duet.stats.events['output_audio_buffer.stopped'] || 0)"
        await wait_for(page, f"{stopped} >= duet.stats.responses", 60)
    await asyncio.sleep(0.5)
    turn = next(t for t in (await chromium.turns(page))[n:] if t["latencyMs"] is not None)
    m = turn.get("metrics") or {}
    return {"transport": transport, "question": question, "heard": turn["user"], "reply": turn["reply"],
            "voice_to_voice_ms": turn["latencyMs"], "server_first_audio_sent_ms": m.get("first_audio_sent_ms"),
            "server_transcript_ms": m.get("transcript_ms"), "server_first_token_ms": m.get("ab_first_token_ms")}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    v = [r["voice_to_voice_ms"] for r in rows]
    s = [r["server_first_audio_sent_ms"] for r in rows if r["server_first_audio_sent_ms"] is not None]
    return {"turns": len(v), "median_ms": round(statistics.median(v)), "mean_ms": round(statistics.mean(v)),
            "min_ms": min(v), "max_ms": max(v),
            "server_first_audio_sent_median_ms": round(statistics.median(s)) if s else None,
            # What the browser adds on top of the server's commit-to-first-audio: the VAD's silence window,
            # the wire, the page's playout.
            "browser_minus_server_median_ms": round(statistics.median(
                r["voice_to_voice_ms"] - r["server_first_audio_sent_ms"] for r in rows
                if r["server_first_audio_sent_ms"] is not None)) if s else None}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=5, help="measured turns per transport")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured turns per transport first")
    ap.add_argument("--pacing", default="speak-first")
    ap.add_argument("--url", help="use a running server (http://HOST:PORT) instead of starting one")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "browser_latency.json")
    args = ap.parse_args()
    if (why := chromium.missing()) is not None:
        raise SystemExit(why)
    from playwright.async_api import async_playwright

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    audio = synthesize_questions()
    server = None
    base = args.url
    if base is None:
        port = free_port()
        server = wait_ready(launch_server(port, []))
        base = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        silence = chromium.write_wav(ROOT / "bench" / "out" / "silence.wav", np.zeros(24000, np.float32))
        async with async_playwright() as pw:
            browser = await chromium.launch(pw, silence)  # a silent mic: Chromium's default fake mic beeps
            pages = {}
            for transport in TRANSPORTS:
                pages[transport] = page = await chromium.open_page(
                    browser, base, transport=transport, pacing=args.pacing, autoconnect="1")
                await wait_for(page, f"duet.stats.connected && duet.stats.transport === '{transport}'", 30)
            for i in range(args.warmup + args.turns):
                q = i % len(QUESTIONS)
                for transport in TRANSPORTS if i % 2 == 0 else TRANSPORTS[::-1]:
                    row = await one_turn(pages[transport], transport, audio[q], QUESTIONS[q])
                    print(json.dumps(row), flush=True)
                    if i >= args.warmup:
                        rows.append(row)
            await browser.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    result = {
        "what": "voice to voice in the browser: first reply sound at the output minus the end of the question "
                "in what the page sent (Duet page, headless Chromium, same machine as the server)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other work (loaded)",
        "pacing": args.pacing,
        "summary": {t: summary([r for r in rows if r["transport"] == t]) for t in TRANSPORTS},
        "turns": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
