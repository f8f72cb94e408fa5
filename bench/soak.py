"""Soak: N concurrent spoken sessions for M minutes against a real `duet serve`, watching for leaks and drift.

Starts `duet serve` (bench/latency.py's machinery), lets it settle idle, then keeps N callers talking: each one
loops over the synthesized questions through `clients.talk` (a new WebSocket session per question, so session
set-up and tear-down are soaked too). Every `--interval` seconds it records the server's resident memory and open
files (psutil, else /proc/<pid>/), its thread count, and from `/metrics` the asyncio tasks on its event loop
(`duet_asyncio_tasks`) and the open sessions. After the load, it samples the idle server again: a leak shows as
more tasks or files at idle after than before. Writes JSON (every sample and every turn's voice-to-voice latency,
plus a summary with latency per `--window` minutes) and a plot.

    .venv/bin/python bench/soak.py --sessions 4 --minutes 20 --out bench/out/soak.json --plot docs/soak.png
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
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.latency import QUESTIONS, STAGGER_CYCLE_S, pct, synthesize_questions, wait_ready
from bench.system import _cpu_name, scrape
from clients.talk import talk


def process_sample(pid: int) -> dict[str, float | int | None]:
    """Resident memory (MB), open file descriptors and threads of the server process."""
    try:
        import psutil

        p = psutil.Process(pid)
        return {"rss_mb": round(p.memory_info().rss / 2**20, 1), "open_fds": p.num_fds(), "threads": p.num_threads()}
    except ImportError:
        pass
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {k.strip(): v.split()[0] for k, _, v in (line.partition(":") for line in status) if v.split()}
    return {"rss_mb": round(int(fields["VmRSS"]) / 1024, 1), "open_fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}


def sample(pid: int, port: int, t0: float, phase: str) -> dict[str, Any]:
    row: dict[str, Any] = {"t_s": round(time.perf_counter() - t0, 1), "phase": phase, **process_sample(pid)}
    try:
        m = scrape(port)
        row["asyncio_tasks"] = m.get("duet_asyncio_tasks")
        row["sessions_active"] = m.get("duet_sessions_active")
        row["event_loop_lag_ms"] = round(1000 * m.get("duet_event_loop_lag_seconds", 0.0), 1)
    except OSError as exc:  # a scrape that failed is a data point too (the server may be wedged)
        row["scrape_error"] = repr(exc)
    return row


async def soak(pid: int, port: int, audio: list[np.ndarray], sessions: int, seconds: float, interval: float,
               idle_s: float, mode: str, t0: float, report: dict[str, Any], save: Any) -> None:
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    samples: list[dict[str, Any]] = report["samples"]
    turns: list[dict[str, Any]] = report["turns"]

    # Idle before: the baseline that the idle samples after the load are compared with.
    for _ in range(max(1, int(idle_s / interval))):
        samples.append(await asyncio.to_thread(sample, pid, port, t0, "idle_before"))
        await asyncio.sleep(interval)
    load_start = time.perf_counter()
    end = load_start + seconds

    async def caller(i: int) -> None:
        await asyncio.sleep(STAGGER_CYCLE_S * i / sessions)  # independent callers, not a synchronized burst
        k = i
        while time.perf_counter() < end:
            q = k % len(audio)
            k += 1
            started = time.perf_counter()
            try:
                r = await talk(audio[q], url, pacing=mode, timeout_s=90)
                v2v, errors, underruns = r["voice_to_voice_ms"], r.get("errors") or [], int(r.get("underruns") or 0)
                reply = r.get("reply_transcript", "")
            except Exception as exc:  # a failed turn is counted and the caller goes on
                v2v, errors, underruns, reply = None, [repr(exc)], 0, ""
            turns.append({"t_s": round(started - t0, 1), "load_t_s": round(started - load_start, 1), "caller": i,
                          "question": QUESTIONS[q], "voice_to_voice_ms": v2v, "underruns": underruns,
                          "errors": [str(e)[:200] for e in errors], "reply": reply[:200]})

    async def sampler() -> None:
        while time.perf_counter() < end:
            samples.append(await asyncio.to_thread(sample, pid, port, t0, "load"))
            save()
            await asyncio.sleep(interval)

    await asyncio.gather(sampler(), *(caller(i) for i in range(sessions)))
    report["load_seconds"] = round(time.perf_counter() - load_start, 1)
    # Idle after: sessions are closed; give the server a moment to finish closing them, then sample.
    for _ in range(max(1, int(idle_s / interval))):
        await asyncio.sleep(interval)
        samples.append(await asyncio.to_thread(sample, pid, port, t0, "idle_after"))


def summarize(report: dict[str, Any], window_s: float) -> dict[str, Any]:
    s, turns = report["samples"], report["turns"]
    load = [x for x in s if x["phase"] == "load"]
    before = [x for x in s if x["phase"] == "idle_before"]
    after = [x for x in s if x["phase"] == "idle_after"]
    rss = [x["rss_mb"] for x in s]
    windows = []
    if turns:
        n = int(max(t["load_t_s"] for t in turns) // window_s) + 1
        for w in range(n):
            in_w = [t for t in turns if w * window_s <= t["load_t_s"] < (w + 1) * window_s]
            v = [t["voice_to_voice_ms"] for t in in_w if t["voice_to_voice_ms"] is not None]
            windows.append({"from_min": round(w * window_s / 60, 1), "to_min": round((w + 1) * window_s / 60, 1),
                            "turns": len(in_w), "answered": len(v), "v2v_p50_ms": pct(v, 50),
                            "v2v_p95_ms": pct(v, 95), "underruns": sum(t["underruns"] for t in in_w)})

    def last(rows: list[dict[str, Any]], key: str) -> Any:
        return rows[-1].get(key) if rows else None

    v2v = [t["voice_to_voice_ms"] for t in turns if t["voice_to_voice_ms"] is not None]
    # Memory's trend once warmed up: a least-squares slope over the second half of the load (the first minutes
    # grow as allocators, caches and worker threads fill, which says nothing about a leak).
    half = load[len(load) // 2:]
    slope = (float(np.polyfit([x["t_s"] / 60 for x in half], [x["rss_mb"] for x in half], 1)[0])
             if len(half) >= 3 else None)
    return {
        "turns": len(turns), "answered": len(v2v), "failed_turns": sum(1 for t in turns if t["errors"]),
        "v2v_p50_ms": pct(v2v, 50), "v2v_p95_ms": pct(v2v, 95),
        "rss_mb_idle_before": last(before, "rss_mb"), "rss_mb_load_first": load[0]["rss_mb"] if load else None,
        "rss_mb_load_last": last(load, "rss_mb"), "rss_mb_idle_after": last(after, "rss_mb"),
        "rss_mb_max": max(rss) if rss else None,
        "rss_mb_per_min_second_half": None if slope is None else round(slope, 2),
        "tasks_idle_before": last(before, "asyncio_tasks"), "tasks_idle_after": last(after, "asyncio_tasks"),
        "tasks_load_max": max((x.get("asyncio_tasks") or 0 for x in load), default=None),
        "fds_idle_before": last(before, "open_fds"), "fds_idle_after": last(after, "open_fds"),
        "fds_load_max": max((x["open_fds"] for x in load), default=None),
        "threads_idle_before": last(before, "threads"), "threads_idle_after": last(after, "threads"),
        "latency_windows": windows,
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"{report['sessions']} sessions x {report['load_seconds'] / 60:.0f} min ({report['mode']}), "
             f"{report['machine']} ({report['cpu']}), started {report['started_utc']}", "",
             "| | idle before | load: first sample | load: last sample | idle after | max |",
             "|---|---|---|---|---|---|",
             f"| server RSS (MB) | {s['rss_mb_idle_before']} | {s['rss_mb_load_first']} | {s['rss_mb_load_last']} | "
             f"{s['rss_mb_idle_after']} | {s['rss_mb_max']} |",
             f"| asyncio tasks | {s['tasks_idle_before']} | | | {s['tasks_idle_after']} | {s['tasks_load_max']} |",
             f"| open files | {s['fds_idle_before']} | | | {s['fds_idle_after']} | {s['fds_load_max']} |",
             f"| threads | {s['threads_idle_before']} | | | {s['threads_idle_after']} | |", "",
             f"RSS slope over the second half of the load: {s.get('rss_mb_per_min_second_half')} MB/min. "
             f"Turns: {s['answered']}/{s['turns']} answered, {s['failed_turns']} failed.", "",
             "| minutes of load | turns | v2v p50 (ms) | v2v p95 (ms) | underruns |", "|---|---|---|---|---|"]
    for w in s["latency_windows"]:
        lines.append(f"| {w['from_min']:g}-{w['to_min']:g} | {w['answered']}/{w['turns']} | {w['v2v_p50_ms']} | "
                     f"{w['v2v_p95_ms']} | {w['underruns']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (the `bench` extra): no plot", file=sys.stderr)
        return
    s, turns = report["samples"], report["turns"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(t, [x["rss_mb"] for x in s], marker=".")
    axes[0].set_ylabel("server RSS (MB)")
    axes[1].plot(t, [x.get("asyncio_tasks") for x in s], marker=".", label="asyncio tasks")
    axes[1].plot(t, [x["open_fds"] for x in s], marker=".", label="open files")
    axes[1].plot(t, [x["threads"] for x in s], marker=".", label="threads")
    axes[1].set_ylabel("count")
    axes[1].legend(loc="upper left", fontsize=8)
    ok = [x for x in turns if x["voice_to_voice_ms"] is not None]
    axes[2].scatter([x["t_s"] / 60 for x in ok], [x["voice_to_voice_ms"] for x in ok], s=6, alpha=0.5,
                    label="one turn")
    w = report["summary"]["latency_windows"]
    load_t0 = (turns[0]["t_s"] - turns[0]["load_t_s"]) / 60 if turns else 0.0
    for j, x in enumerate(w):  # one segment per window (a step line draws nothing for a single window)
        if x["v2v_p50_ms"] is not None:
            axes[2].hlines(x["v2v_p50_ms"], load_t0 + x["from_min"], load_t0 + min(x["to_min"], report["load_seconds"]
                                                                                    / 60), color="C3", lw=2,
                           label=f"p50 per {report['window_minutes']:g} min" if j == 0 else None)
    axes[2].set_ylabel("voice-to-voice (ms)")
    axes[2].set_xlabel("minutes since the server was ready (idle, load, idle)")
    axes[2].legend(loc="upper left", fontsize=8)
    for ax in axes:
        for x in s:
            if x["phase"] != "load":
                ax.axvspan(x["t_s"] / 60 - 0.05, x["t_s"] / 60 + 0.05, color="0.9", zorder=0)
    fig.suptitle(f"Soak: {report['sessions']} sessions x {report['load_seconds'] / 60:.0f} min, {report['machine']}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--interval", type=float, default=10, help="seconds between resource samples")
    ap.add_argument("--idle", type=float, default=30, help="seconds of idle samples before and after the load")
    ap.add_argument("--window", type=float, default=5, help="minutes per latency window in the summary")
    ap.add_argument("--mode", default="speak-first", help="pacing mode of every session")
    ap.add_argument("--config", default=None, help="duet serve --config")
    ap.add_argument("--set", action="append", default=[], help="server config override, as duet serve --set")
    ap.add_argument("--port", type=int, default=8797)
    ap.add_argument("--out", default="bench/out/soak.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--server-log", default=None, help="the server's stderr (its log) goes here")
    ap.add_argument("--from-json", default=None, help="no run: summarize, plot and tabulate this earlier --out")
    args = ap.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["summary"] = summarize(report, report["window_minutes"] * 60)
        Path(args.from_json).write_text(json.dumps(report, indent=1))
        print(markdown(report))
        if args.plot:
            plot(report, Path(args.plot))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    audio = synthesize_questions()
    cmd = [sys.executable, "-m", "duet.cli", "serve", "--port", str(args.port),
           *(["--config", args.config] if args.config else []), *[x for s in args.set for x in ("--set", s)],
           "--set", "server.front_ends=0"]  # one process: its RSS, fds and threads are what the soak samples
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL  # noqa: SIM115 (lives with the server)
    server = wait_ready(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True))
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": _cpu_name(), "config": args.config,
        "overrides": args.set, "sessions": args.sessions, "minutes": args.minutes, "mode": args.mode,
        "interval_s": args.interval, "window_minutes": args.window, "load_seconds": 0.0,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "samples": [], "turns": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # as it goes: a killed run keeps what it measured
        out.write_text(json.dumps(report, indent=1))

    try:
        asyncio.run(soak(server.pid, args.port, audio, args.sessions, args.minutes * 60, args.interval, args.idle,
                         args.mode, t0, report, save))
    finally:
        server.terminate()
        server.wait(timeout=60)
        report["server_exit_code"] = server.returncode
        report["summary"] = summarize(report, args.window * 60)
        save()
    print(json.dumps(report["summary"], indent=1))
    print(markdown(report))
    if args.plot:
        plot(report, Path(args.plot))


if __name__ == "__main__":
    main()
