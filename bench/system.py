"""The whole server under N concurrent spoken sessions: where each turn's time goes, and which resource bounds it.

Starts `duet serve` (bench/latency.py's machinery), then for each pacing mode and session count streams spoken
questions through `clients.talk` from N sessions at once (starts spread over one ~4 s turn cycle), and reports
per level: voice-to-voice p50/p95, the per-stage medians of `duet.turn.metrics` (turn decision, transcript, first
token, first audio synthesized and sent, after the turn's commit), underruns, and, scraped from the server's
`/metrics` before and after the level, the busy shares over it: the engine thread (GPU steps), the event loop
thread, the whole process's CPU (in cores), and the peak ASR/TTS queue depth seen by a 0.5 s poller.

    .venv/bin/python bench/system.py --sessions 1,2 --modes nothink --out bench/out/system.json
    python3 bench/system.py --config configs/gpu.toml --set llm.model=smollm2-gguf --sessions 1,8,32,64 \
        --modes nothink,speak-first --out $OUT/system.json --md $OUT/system.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.latency import QUESTIONS, STAGGER_CYCLE_S, median, pct, synthesize_questions, wait_ready
from clients.talk import talk

STAGES = ("turn_decision_ms", "transcript_ms", "ab_first_token_ms", "first_audio_synthesized_ms",
          "first_audio_sent_ms")


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics as {name{labels}: value} (the Prometheus text format, one sample a line)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def busy_shares(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float | None]:
    def rate(name: str) -> float | None:
        if name not in after or name not in before or wall_s <= 0:
            return None
        return round((after[name] - before[name]) / wall_s, 3)

    return {"engine_busy_share": rate("duet_engine_busy_seconds_total"),  # the GPU's thread, steps in flight
            "event_loop_busy_share": rate("duet_event_loop_busy_seconds_total"),
            "process_cpu_cores": rate("process_cpu_seconds_total")}


async def poll_queues(port: int, peaks: dict[str, float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            m = await asyncio.to_thread(scrape, port)
            for pool in ("asr", "tts"):
                key = f'duet_worker_queue_depth{{pool="{pool}"}}'
                peaks[pool] = max(peaks.get(pool, 0.0), m.get(key, 0.0))
            peaks["loop_lag_s"] = max(peaks.get("loop_lag_s", 0.0), m.get("duet_event_loop_lag_seconds", 0.0))
        except OSError:
            pass
        with_timeout = asyncio.create_task(stop.wait())
        await asyncio.wait({with_timeout}, timeout=0.5)
        with_timeout.cancel()


async def run_level(port: int, audio: list[np.ndarray], mode: str, sessions: int, turns: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/v1/realtime"

    async def one_session(i: int) -> list[dict[str, Any]]:
        await asyncio.sleep(STAGGER_CYCLE_S * i / sessions)  # independent callers, not a synchronized burst
        out = []
        for t in range(turns):
            q = (i + t) % len(audio)
            try:
                result = await talk(audio[q], url, pacing=mode, timeout_s=90)
            except Exception as exc:  # a session that failed is counted, the level goes on
                result = {"voice_to_voice_ms": None, "server_metrics": {}, "underruns": 0, "errors": [repr(exc)],
                          "speech_stopped_after_ms": None, "user_transcript": "", "reply_transcript": ""}
            result["question"] = QUESTIONS[q]
            out.append(result)
        return out

    before = await asyncio.to_thread(scrape, port)
    peaks: dict[str, float] = {}
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_queues(port, peaks, stop))
    t0 = time.perf_counter()
    per_session = await asyncio.gather(*(one_session(i) for i in range(sessions)))
    wall = time.perf_counter() - t0
    stop.set()
    await poller
    after = await asyncio.to_thread(scrape, port)
    results = [r for rs in per_session for r in rs]
    v2v = [r["voice_to_voice_ms"] for r in results if r["voice_to_voice_ms"] is not None]
    m = [r["server_metrics"] for r in results]
    return {
        "mode": mode, "sessions": sessions, "turns": len(results), "answered": len(v2v), "wall_s": round(wall, 1),
        "voice_to_voice_p50_ms": pct(v2v, 50), "voice_to_voice_p95_ms": pct(v2v, 95),
        **{f"{stage[:-3]}_p50_ms": median([x.get(stage) for x in m]) for stage in STAGES},
        "underruns": sum(int(r.get("underruns") or 0) for r in results),
        "errors": sum(len(r.get("errors") or []) for r in results),
        **busy_shares(before, after, wall),
        "asr_queue_peak": peaks.get("asr"), "tts_queue_peak": peaks.get("tts"),
        "event_loop_lag_peak_ms": round(1000 * peaks.get("loop_lag_s", 0.0), 1),
        "samples": [{"question": r["question"], "user_transcript": r.get("user_transcript"),
                     "reply_transcript": r.get("reply_transcript"), "voice_to_voice_ms": r["voice_to_voice_ms"],
                     **{k: r["server_metrics"].get(k) for k in STAGES}} for r in results],
    }


COLUMNS = [("mode", "mode"), ("sessions", "sessions"), ("answered", "answered/turns"),
           ("voice_to_voice_p50_ms", "v2v p50"), ("voice_to_voice_p95_ms", "v2v p95"),
           ("turn_decision_p50_ms", "turn decision"), ("transcript_p50_ms", "transcript"),
           ("ab_first_token_p50_ms", "first token"), ("first_audio_synthesized_p50_ms", "audio synth."),
           ("first_audio_sent_p50_ms", "audio sent"), ("underruns", "underruns"),
           ("engine_busy_share", "engine busy"), ("event_loop_busy_share", "loop busy"),
           ("process_cpu_cores", "CPU cores"), ("asr_queue_peak", "ASR q peak"), ("tts_queue_peak", "TTS q peak")]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['machine']}; overrides: {' '.join(report['overrides']) or 'none'}", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["results"]:
        cells = [f"{row['answered']}/{row['turns']}" if k == "answered" else
                 ("" if row.get(k) is None else str(row[k])) for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Stage columns: medians in ms after the turn's commit (turn decision: end of speech to commit). "
                 "Busy shares: over the level's wall time, from /metrics counters.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="duet serve --config")
    ap.add_argument("--set", action="append", default=[], help="server config override, as duet serve --set")
    ap.add_argument("--modes", default="nothink,speak-first")
    ap.add_argument("--sessions", default="1,8")
    ap.add_argument("--turns", type=int, default=0, help="turns per session (default: 4 at 1 session, else 2)")
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--out", default="bench/out/system.json")
    ap.add_argument("--md", default=None, help="also write the table as markdown here")
    ap.add_argument("--server-log", default=None, help="the server's stderr (its log) goes here")
    ap.add_argument("--deadline-s", type=float, default=0, help="skip levels that would start after this many "
                    "seconds (a time-boxed run still writes what it measured)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    audio = synthesize_questions()
    cmd = [sys.executable, "-m", "duet.cli", "serve", "--port", str(args.port),
           *(["--config", args.config] if args.config else []), *[x for s in args.set for x in ("--set", s)]]
    t_load = time.perf_counter()
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL  # noqa: SIM115 (lives with the server)
    server = wait_ready(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True))
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": _cpu_name(), "gpu": _gpu_name(),
        "config": args.config, "overrides": args.set, "server_start_s": round(time.perf_counter() - t_load, 1),
        "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for mode in args.modes.split(","):
            for n in (int(x) for x in args.sessions.split(",")):
                if args.deadline_s and time.perf_counter() - started > args.deadline_s:
                    print(f"skipped {mode} x {n}: past --deadline-s", flush=True)
                    continue
                turns = args.turns or (4 if n == 1 else 2)
                row = asyncio.run(run_level(args.port, audio, mode, n, turns))
                report["results"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
                out.write_text(json.dumps(report, indent=2))  # after every level: a killed run keeps its rows
    finally:
        server.terminate()
        server.wait(timeout=30)
    out.write_text(json.dumps(report, indent=2))
    if args.md:
        Path(args.md).write_text(markdown(report))
    print(markdown(report))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


if __name__ == "__main__":
    main()
