"""Voice-to-voice latency of a real Duet server, per pacing mode and number of concurrent sessions.

Starts `duet serve` as a subprocess, synthesizes spoken questions with the bundled Piper voice, streams
them at real-time pace through `clients.talk` (N sessions at once), and writes JSON: voice-to-voice
p50/p95, per-stage medians, tokens generated before the first reply token, and audio underruns.

    .venv/bin/python bench/latency.py --out bench/out/latency.json
    .venv/bin/python bench/latency.py --modes nothink,speak-first,think-first,tbs --sessions 1,2,4,8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from clients.talk import talk

STAGGER_CYCLE_S = 4.0
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "How many days are there in a week?",
]


def synthesize_questions() -> list[np.ndarray]:
    from common.config import TtsConfig
    from tts.synthesizer import Synthesizer

    synth = Synthesizer.load(dataclasses.replace(TtsConfig(), noise_scale=0.0, noise_w=0.0))
    return [soxr.resample(synth.synthesize(q), synth.sample_rate, 24000).astype(np.float32) for q in QUESTIONS]


def start_server(port: int, extra: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "duet.cli", "serve", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("listening on"):
            return proc
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError("server did not start")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(values, q)), 1)


def median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(statistics.median(values)), 1) if values else None


async def run_level(url: str, audio: list[np.ndarray], mode: str, sessions: int, turns: int) -> dict[str, Any]:
    async def one_session(i: int) -> list[dict[str, Any]]:
        # Spread session starts evenly over one turn cycle (~4 s: a question, then its reply), as independent
        # callers would be; starting all at once would measure a synchronized burst instead.
        await asyncio.sleep(STAGGER_CYCLE_S * i / sessions)
        out = []
        for t in range(turns):
            q = (i + t) % len(audio)
            result = await talk(audio[q], url, pacing=mode, timeout_s=60)
            result["question"] = QUESTIONS[q]
            out.append(result)
        return out

    per_session = await asyncio.gather(*(one_session(i) for i in range(sessions)))
    results = [r for rs in per_session for r in rs]
    v2v = [r["voice_to_voice_ms"] for r in results if r["voice_to_voice_ms"] is not None]
    m = [r["server_metrics"] for r in results]
    return {
        "mode": mode, "sessions": sessions, "turns": len(results),
        "answered": len(v2v),
        "voice_to_voice_p50_ms": pct(v2v, 50), "voice_to_voice_p95_ms": pct(v2v, 95),
        "vad_end_after_speech_p50_ms": median([r["speech_stopped_after_ms"] for r in results]),
        "transcript_p50_ms": median([x.get("transcript_ms") for x in m]),
        "fb_first_token_p50_ms": median([x.get("fb_first_token_ms") for x in m]),
        "ab_first_token_p50_ms": median([x.get("ab_first_token_ms") for x in m]),
        "first_audio_sent_p50_ms": median([x.get("first_audio_sent_ms") for x in m]),
        "tokens_before_first_reply_p50": median([x.get("fb_tokens_before_reply") for x in m]),
        "underruns": sum(r["underruns"] for r in results),
        "errors": sum(len(r["errors"]) for r in results),
        "samples": [{k: r[k] for k in ("question", "user_transcript", "reply_transcript", "voice_to_voice_ms",
                                       "underruns")} for r in results],
    }


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in dict.fromkeys(r["mode"] for r in report["results"]):
        rows = [r for r in report["results"] if r["mode"] == mode]
        ax.plot([r["sessions"] for r in rows], [r["voice_to_voice_p50_ms"] for r in rows], marker="o", label=mode)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("voice-to-voice p50 (ms)")
    ax.set_title(report["machine"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="speak-first")
    ap.add_argument("--sessions", default="1")
    ap.add_argument("--turns", type=int, default=0, help="turns per session (default: 6 at 1 session, else 2)")
    ap.add_argument("--port", type=int, default=8781)
    ap.add_argument("--set", action="append", default=[], help="server config override, as duet serve --set")
    ap.add_argument("--out", default="bench/out/latency.json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    audio = synthesize_questions()
    extra = [x for s in args.set for x in ("--set", s)]
    server = start_server(args.port, extra)
    url = f"ws://127.0.0.1:{args.port}/v1/realtime"
    results = []
    try:
        for mode in args.modes.split(","):
            for n in (int(x) for x in args.sessions.split(",")):
                turns = args.turns or (len(QUESTIONS) if n == 1 else 2)
                row = asyncio.run(run_level(url, audio, mode, n, turns))
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "overrides": args.set, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, Path(args.plot))


if __name__ == "__main__":
    main()
