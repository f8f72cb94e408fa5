"""Voice-to-voice latency of a real Duet server, per pacing mode and number of concurrent sessions.

Starts `duet serve` as a subprocess, synthesizes spoken questions with the bundled Piper voice, streams
them at real-time pace through `clients.talk` (N sessions at once), and writes JSON: voice-to-voice
p50/p95, per-stage medians, tokens generated before the first reply token, and audio underruns.

    .venv/bin/python bench/latency.py --out bench/out/latency.json
    .venv/bin/python bench/latency.py --modes nothink,speak-first,think-first,tbs --sessions 1,2,4,8

A/B comparison on one machine in one run (one server per variant; the variants and modes take turns, question
by question, so machine load drifts hit every variant alike; one session at a time):

    .venv/bin/python bench/latency.py --modes nothink,speak-first --rounds 3 \
        --variant 'before=tts.first_chunk_max_words=0;mind.ab_head_start_tokens=0' --variant after
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
import tempfile
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
    return wait_ready(launch_server(port, extra))


def launch_server(port: int, extra: list[str], tree: Path | None = None) -> subprocess.Popen[str]:
    """`duet serve` from this checkout, or from `tree` (an exported older revision: see `export_tree`)."""
    if tree is None:
        cmd = [sys.executable, "-m", "duet.cli", "serve", "--port", str(port), *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # Older revisions had the CLI in realtime/cli.py. The tree goes first on the path and is the working
    # directory, so its packages shadow this checkout's editable install.
    cli = "duet.cli" if (tree / "duet" / "cli.py").exists() else "realtime.cli"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, "-m", cli, "serve", "--port", str(port), *extra], cwd=tree, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def export_tree(ref: str, into: Path) -> Path:
    """The code of git revision `ref` (its packages and configs), for a baseline server beside this one."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def wait_ready(proc: subprocess.Popen[str], ready: str = "listening on") -> subprocess.Popen[str]:
    """Until the server prints its `ready` line (`duet serve`'s; `duet engine` says "serving engine")."""
    assert proc.stdout is not None
    deadline = time.time() + 600
    for line in proc.stdout:
        if line.startswith(ready):
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
    return summarize([r for rs in per_session for r in rs], mode, sessions)


def summarize(results: list[dict[str, Any]], mode: str, sessions: int) -> dict[str, Any]:
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
        "first_audio_synthesized_p50_ms": median([x.get("first_audio_synthesized_ms") for x in m]),
        "first_audio_sent_p50_ms": median([x.get("first_audio_sent_ms") for x in m]),
        "tokens_before_first_reply_p50": median([x.get("fb_tokens_before_reply") for x in m]),
        "underruns": sum(r["underruns"] for r in results),
        "errors": sum(len(r["errors"]) for r in results),
        "samples": [{**{k: r[k] for k in ("question", "user_transcript", "reply_transcript", "voice_to_voice_ms",
                                          "underruns")},
                     **{k: r["server_metrics"].get(k) for k in ("transcript_ms", "ab_first_token_ms",
                                                                "first_audio_sent_ms")}} for r in results],
    }


async def compare(urls: dict[str, str], audio: list[np.ndarray], modes: list[str], rounds: int) -> list[dict[str, Any]]:
    """Every question in every mode on every variant's server, interleaved turn by turn: one session at a time."""
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {(v, m): [] for v in urls for m in modes}
    for _ in range(rounds):
        for q, question in enumerate(QUESTIONS):
            for mode in modes:
                for variant, url in urls.items():
                    result = await talk(audio[q], url, pacing=mode, timeout_s=60)
                    result["question"] = question
                    raw[(variant, mode)].append(result)
    return [{"variant": v, **summarize(rs, m, 1)} for (v, m), rs in raw.items()]


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
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[=KEY=VALUE;...]",
                    help="compare server configs side by side (repeat; overrides as --set, ';' between them)")
    ap.add_argument("--rounds", type=int, default=2, help="with --variant: passes over the questions")
    ap.add_argument("--baseline", default=None, metavar="GIT_REF",
                    help="also run the server of this git revision, interleaved with this checkout's (a before/after "
                         "pair measured side by side); implies variants 'head' and 'base'")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    audio = synthesize_questions()
    extra = [x for s in args.set for x in ("--set", s)]
    if args.baseline and not args.variant:
        args.variant = ["head"]
    if args.variant:
        run_variants(args, audio, extra)
        return
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


def run_variants(args: argparse.Namespace, audio: list[np.ndarray], extra: list[str]) -> None:
    servers: list[subprocess.Popen[str]] = []
    urls: dict[str, str] = {}
    overrides: dict[str, list[str]] = {}
    try:
        for i, spec in enumerate(args.variant):  # all load at once; they idle while another variant runs
            name, _, sets = spec.partition("=")
            overrides[name] = [x for x in sets.split(";") if x]
            port = args.port + i
            servers.append(launch_server(port, extra + [y for x in overrides[name] for y in ("--set", x)]))
            urls[name] = f"ws://127.0.0.1:{port}/v1/realtime"
        if args.baseline:
            tree = export_tree(args.baseline, Path(tempfile.mkdtemp(prefix="duet-base-")))
            port = args.port + len(args.variant)
            servers.append(launch_server(port, extra, tree))
            urls[f"base:{args.baseline}"] = f"ws://127.0.0.1:{port}/v1/realtime"
        for server in servers:
            wait_ready(server)
        results = asyncio.run(compare(urls, audio, args.modes.split(","), args.rounds))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    for row in results:
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "overrides": args.set,
              "variants": overrides, "interleaved": True, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
