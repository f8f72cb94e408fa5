"""The whole server under N concurrent spoken sessions: where each turn's time goes, and which resource bounds it.

Starts `duet serve` (bench/latency.py's machinery), then for each pacing mode and session count streams spoken
questions from N sessions at once (starts spread over one ~4 s turn cycle) and reports per level:

- voice-to-voice p50/p95 (client clock: end of question audio sent -> first reply audio received);
- the turn decision as the client sees it: end of question audio -> `input_audio_buffer.speech_stopped` and
  `input_audio_buffer.committed` received, and the commit backlog: the chunk that completed the decision (the
  VAD's `audio_end_ms` + the server's `turn_decision_ms`, in audio time) sent -> commit received, i.e. how long
  the server's VAD path sat on that audio;
- the per-stage medians of `duet.turn.metrics` (turn decision, transcript, first token, first audio synthesized
  and sent, after the turn's commit), underruns;
- scraped from the server's `/metrics` before and after the level: the busy shares over it (engine thread, event
  loop thread, process CPU in cores), the peak ASR/TTS queue depth and event loop lag seen by a 0.5 s poller;
- the client's own lag, so a reader can tell the client is not the bound: the sessions run in `--client-procs`
  processes (each its own asyncio loop); each records its loop's lag (a 10 ms ticker's overshoot) and how late
  each 20 ms audio chunk left against its real-time schedule, reported as p50/p95/max over the level.

    .venv/bin/python bench/system.py --sessions 1,2 --modes nothink --client-procs 2 --out bench/out/system.json
    python3 bench/system.py --sessions 1,8,32,64,128 --modes nothink --set llm.device=cuda ... \
        --out $OUT/system.json --md $OUT/system.md --plot $OUT/system.png
    .venv/bin/python bench/system.py --from-json a.json b.json --md all.md --plot all.png   # re-render, no run

`--front-ends N` runs the process split instead of one `duet serve`: `duet engine` (the engine alone, on --port
+ 100) and N `duet serve` front ends (--port, --port + 1, ...) with `llm.backend = "remote"` on it; sessions are
dealt round-robin over the front ends, and the /metrics of every process are read as one (counters summed:
busy shares and CPU become cores over the processes; gauges: the largest).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.latency import QUESTIONS, STAGGER_CYCLE_S, median, pct, synthesize_questions
from bench.system_servers import Servers, level_deltas, poll_queues
from clients.talk import CHUNK_MS, RATE, _Collector, _expect, _receive, pcm16_b64, with_duet_events

STAGES = ("turn_decision_ms", "transcript_ms", "ab_first_token_ms", "first_chunk_text_ms",
          "first_audio_synthesized_ms", "first_audio_sent_ms")
READY_TIMEOUT_S = 120.0  # a spawned client imports numpy and websockets: seconds, more on a loaded 2-core machine
TICK_S = 0.01  # the client loop-lag ticker's period


# ---- one client process ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Share:
    """One client process's part of a level. Sessions are dealt round-robin (i % procs), so every process's
    starts span the whole stagger cycle and no process gets all the early (or late) callers."""

    proc: int
    sessions: tuple[int, ...]
    total: int  # sessions in the level: session i starts at STAGGER_CYCLE_S * i / total
    turns: int
    mode: str
    urls: tuple[str, ...]  # session i connects to urls[i % len(urls)]: the front ends, or the one server
    turn_timeout_s: float


class _TimedCollector(_Collector):
    """clients.talk's collector plus what the turn decision needs: when the commit arrived, and where in the
    audio the VAD put the end of speech."""

    def __init__(self) -> None:
        super().__init__()
        self.committed_at: float | None = None
        self.audio_end_ms: int | None = None

    def feed(self, event: dict[str, Any]) -> None:
        super().feed(event)
        kind = event.get("type")
        if kind == "input_audio_buffer.committed":
            self.committed_at = time.perf_counter()
        elif kind == "input_audio_buffer.speech_stopped":
            self.audio_end_ms = event.get("audio_end_ms")


def chunk_messages(audio: np.ndarray) -> list[str]:
    """The question's `input_audio_buffer.append` messages, encoded once per process: at 16+ sessions a process
    would otherwise spend its time in base64 and json instead of keeping the 20 ms schedule."""
    step = RATE * CHUNK_MS // 1000
    return [json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(audio[i:i + step])})
            for i in range(0, len(audio), step)]


async def timed_turn(chunks: list[str], silence: str, question_ms: float, url: str, mode: str, late: list[float],
                     timeout_s: float, tail_s: float = 1.5) -> dict[str, Any]:
    """One spoken question, as `clients.talk.talk` streams it (real-time 20 ms chunks, then silence for `tail_s`
    and again once the server has heard the end of speech, until the reply is done), plus timings: each chunk's
    lateness against its schedule goes to `late` (seconds), each chunk's send time is kept for the commit backlog."""
    async with connect(with_duet_events(url), max_size=None) as ws:
        await _expect(ws, "session.created")
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "duet": {"pacing": mode}}}))
        await _expect(ws, "session.updated")
        sink = _TimedCollector()
        receiver = asyncio.create_task(_receive(ws, sink))
        sent_at: list[float] = []  # chunk k (0-based) carries audio [20k, 20k+20) ms of the session's timeline

        async def send(message: str, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await ws.send(message)
            now = time.perf_counter()
            late.append(now - due)
            sent_at.append(now)

        try:
            t0 = time.perf_counter()
            n = 0
            for message in chunks:
                n += 1
                await send(message, t0 + n * CHUNK_MS / 1000)
            speech_end = time.perf_counter()
            while not sink.done.is_set() and time.perf_counter() - speech_end < timeout_s:
                n += 1
                due = t0 + n * CHUNK_MS / 1000
                if due - speech_end < tail_s or sink.speech_stopped_at is not None:
                    await send(silence, due)
                else:  # talk() pauses the microphone here too: wait for the schedule without sending
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
        finally:
            receiver.cancel()

    def after_end(at: float | None) -> float | None:
        return None if at is None else round((at - speech_end) * 1000, 1)

    decision = sink.metrics.get("turn_decision_ms")
    backlog = None
    if sink.committed_at is not None and sink.audio_end_ms is not None and isinstance(decision, int | float):
        k = math.ceil((sink.audio_end_ms + decision) / CHUNK_MS)  # the chunk whose audio completed the decision
        if 1 <= k <= len(sent_at):
            backlog = round((sink.committed_at - sent_at[k - 1]) * 1000, 1)
    return {
        "user_transcript": sink.user_transcript, "reply_transcript": sink.reply.strip(),
        "voice_to_voice_ms": after_end(sink.first_audio_at), "underruns": sink.playback.underruns,
        "speech_stopped_ms": after_end(sink.speech_stopped_at), "committed_ms": after_end(sink.committed_at),
        "commit_backlog_ms": backlog,
        # Trailing silence of the synthesized question as the VAD placed it: explains a client turn decision
        # shorter than the VAD's silence wait.
        "vad_end_before_audio_end_ms": None if sink.audio_end_ms is None else round(question_ms - sink.audio_end_ms),
        "server_metrics": sink.metrics, "errors": sink.errors,
    }


async def _tick(lags: list[float]) -> None:
    """The loop's lag: how late a 10 ms sleep wakes. Every await of every session in this process waits as long."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append(time.perf_counter() - t - TICK_S)


async def _client_share(conn: Connection, audio: list[np.ndarray], share: Share, start_wall: float) -> None:
    messages = [chunk_messages(a) for a in audio]
    silence = json.dumps({"type": "input_audio_buffer.append",
                          "audio": pcm16_b64(np.zeros(RATE * CHUNK_MS // 1000, np.float32))})
    loop_lag: list[float] = []
    late: list[float] = []
    ticker = asyncio.create_task(_tick(loop_lag))
    # time.time() is the clock the parent and every process share; perf_counter is this process's from here on.
    t0 = time.perf_counter() + (start_wall - time.time())
    cpu0 = time.process_time()

    async def one_session(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + STAGGER_CYCLE_S * i / share.total - time.perf_counter()))
        for t in range(share.turns):
            q = (i + t) % len(audio)
            try:
                result = await timed_turn(messages[q], silence, len(audio[q]) * 1000 / RATE,
                                          share.urls[i % len(share.urls)], share.mode, late, share.turn_timeout_s)
            except Exception as exc:  # a session that failed is counted, the level goes on
                result = {"voice_to_voice_ms": None, "server_metrics": {}, "underruns": 0, "errors": [repr(exc)],
                          "user_transcript": "", "reply_transcript": ""}
            result.update(question=QUESTIONS[q], session=i, turn=t)
            conn.send(("turn", result))  # as it finishes: a process killed later loses only its turns in flight

    await asyncio.gather(*(one_session(i) for i in share.sessions))
    ticker.cancel()
    conn.send(("done", {"proc": share.proc, "sessions": len(share.sessions),
                        "loop_lag_ms": np.asarray(loop_lag, np.float32) * 1000,
                        "send_late_ms": np.asarray(late, np.float32) * 1000,
                        "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - t0}))


def client_process(conn: Connection, audio: list[np.ndarray], share: Share) -> None:
    """A spawned client's entry point: say ready, wait for the common start time, run the share, report."""
    try:
        conn.send(("ready", os.getpid()))
        _, start_wall = conn.recv()
        asyncio.run(_client_share(conn, audio, share, start_wall))
    except BaseException:
        with contextlib.suppress(OSError, EOFError):
            conn.send(("failed", traceback.format_exc(limit=8)))
        sys.exit(1)


# ---- the level: the parent's side ------------------------------------------------------------------------

@dataclass
class _Child:
    share: Share
    proc: BaseProcess
    conn: Connection
    state: str = "starting"  # -> ready -> done, or failed at any point
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.state, self.error = "failed", why


def _read(child: _Child, turns: list[dict[str, Any]]) -> None:
    """Everything the child has sent so far. EOF before `done`: it died (its exit code says how)."""
    try:
        while child.conn.poll():
            kind, payload = child.conn.recv()
            if kind == "ready":
                child.state = "ready"
            elif kind == "turn":
                turns.append(payload)
            elif kind == "done":
                child.state, child.stats = "done", payload
            elif kind == "failed":
                child.fail(str(payload))
    except (EOFError, OSError):
        if child.state != "done" and child.state != "failed":
            child.proc.join(2)
            child.fail(f"exited with code {child.proc.exitcode} before finishing")


def _wait_for(children: list[_Child], state: str, deadline: float, turns: list[dict[str, Any]]) -> None:
    """Read the children until each has reached `state` (or failed), or until `deadline` (time.monotonic):
    a child still short of it then is failed, so a hung client never hangs the run."""
    while True:
        pending = [c for c in children if c.state not in (state, "failed")]
        if not pending:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            for c in pending:
                c.fail(f"no '{state}' within the deadline (was {c.state})")
            return
        ready = wait([c.conn for c in pending] + [c.proc.sentinel for c in pending], timeout=min(left, 1.0))
        for c in pending:
            if c.conn in ready or c.proc.sentinel in ready:
                _read(c, turns)


def client_procs_for(sessions: int, asked: int) -> int:
    """`--client-procs 0`: one process per 16 sessions, at most 8 and at most half the cores (the server needs
    them more). A session cost ~4 % of a core on our 2-core EPYC (1-2 sessions), so 16 should leave the loop
    idle enough to keep the 20 ms schedule; the client lag columns say whether it did."""
    auto = min(8, math.ceil(sessions / 16), max(1, (os.cpu_count() or 2) // 2))
    return max(1, min(sessions, asked or auto))


def run_level(servers: Servers, audio: list[np.ndarray], mode: str, sessions: int, turns: int, procs: int,
              turn_timeout_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # not fork: the parent holds onnxruntime's threads (Piper) and a server pipe
    urls = tuple(f"ws://127.0.0.1:{port}/v1/realtime" for port in servers.front_ports)
    children: list[_Child] = []
    results: list[dict[str, Any]] = []
    peaks: dict[str, float] = {}
    stop = threading.Event()
    poller = threading.Thread(target=poll_queues, args=(servers, peaks, stop), daemon=True)
    try:
        for k in range(procs):
            share = Share(k, tuple(range(k, sessions, procs)), sessions, turns, mode, urls, turn_timeout_s)
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(theirs, audio, share), name=f"duet-client-{k}",
                               daemon=True)
            proc.start()
            theirs.close()  # the child holds the only write end now: its death is EOF here
            children.append(_Child(share, proc, ours))
        _wait_for(children, "ready", time.monotonic() + READY_TIMEOUT_S, results)
        before = servers.scrape()
        poller.start()
        start_wall = time.time() + 0.2  # every process starts its stagger cycle from the same instant
        for c in children:
            if c.state == "ready":
                with contextlib.suppress(OSError):  # died since: its EOF is read and reported below
                    c.conn.send(("go", start_wall))
        question_s = max(len(a) for a in audio) / RATE
        level_s = STAGGER_CYCLE_S + turns * (question_s + turn_timeout_s + 15) + 30  # a turn that times out, twice
        _wait_for(children, "done", time.monotonic() + level_s, results)
        wall = time.time() - start_wall
    finally:
        stop.set()
        for c in children:
            c.proc.join(5 if c.state == "done" else 0)
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join(5)
    if poller.ident is not None:  # started
        poller.join(5)
    after = servers.scrape()
    results.sort(key=lambda r: (r.get("session", 0), r.get("turn", 0)))
    v2v = [r["voice_to_voice_ms"] for r in results if r["voice_to_voice_ms"] is not None]
    m = [r["server_metrics"] for r in results]
    stats = [c.stats for c in children if c.stats]
    lag = np.concatenate([s["loop_lag_ms"] for s in stats]) if stats else np.zeros(0)
    late = np.concatenate([s["send_late_ms"] for s in stats]) if stats else np.zeros(0)

    def spread(values: np.ndarray, name: str) -> dict[str, float | None]:
        return {f"{name}_p50_ms": pct(list(values), 50), f"{name}_p95_ms": pct(list(values), 95),
                f"{name}_max_ms": round(float(values.max()), 1) if len(values) else None}

    # Per process too: one overloaded process among idle ones would vanish in the pooled percentiles.
    per_proc = [{"proc": s["proc"], "sessions": s["sessions"], "cpu_share": round(s["cpu_s"] / s["wall_s"], 3),
                 "loop_lag_p95_ms": pct(list(s["loop_lag_ms"]), 95),
                 "chunk_late_p95_ms": pct(list(s["send_late_ms"]), 95)} for s in stats if s["wall_s"] > 0]

    def client_ms(key: str) -> list[float]:
        return [r[key] for r in results if r.get(key) is not None]

    return {
        "mode": mode, "sessions": sessions, "turns": sessions * turns, "answered": len(v2v),
        "lost_turns": sessions * turns - len(results), "wall_s": round(wall, 1),
        "voice_to_voice_p50_ms": pct(v2v, 50), "voice_to_voice_p95_ms": pct(v2v, 95),
        "client_speech_stopped_p50_ms": pct(client_ms("speech_stopped_ms"), 50),
        "client_committed_p50_ms": pct(client_ms("committed_ms"), 50),
        "client_committed_p95_ms": pct(client_ms("committed_ms"), 95),
        "commit_backlog_p50_ms": pct(client_ms("commit_backlog_ms"), 50),
        "commit_backlog_p95_ms": pct(client_ms("commit_backlog_ms"), 95),
        "vad_end_before_audio_end_p50_ms": pct(client_ms("vad_end_before_audio_end_ms"), 50),
        **{f"{stage[:-3]}_p50_ms": median([x.get(stage) for x in m]) for stage in STAGES},
        "underruns": sum(int(r.get("underruns") or 0) for r in results),
        "errors": sum(len(r.get("errors") or []) for r in results),
        # Turns whose reply the brains started in the silence window, and whose first audio was synthesized there.
        "prefetched": sum(1 for x in m if x.get("prefetched")),
        "first_audio_prefetched": sum(1 for x in m if x.get("first_audio_prefetched")),
        **level_deltas(before, after, wall),
        "asr_queue_peak": peaks.get("asr"), "tts_queue_peak": peaks.get("tts"),
        "event_loop_lag_peak_ms": round(1000 * peaks.get("loop_lag_s", 0.0), 1),
        "client_procs": procs,
        **spread(lag, "client_loop_lag"), **spread(late, "client_chunk_late"),
        # The busiest client process's CPU over its run: near 1.0 would mean the client, not the server, paces.
        "client_cpu_share_max": max((p["cpu_share"] for p in per_proc), default=None),
        # All client processes together, in cores: what the client took from the server on the same machine.
        "client_cpu_cores": round(sum(s["cpu_s"] for s in stats) / wall, 2) if stats and wall > 0 else None,
        "client_per_proc": per_proc,
        "client_failures": [f"client {c.share.proc} ({len(c.share.sessions)} sessions): {c.error.strip()}"
                            for c in children if c.state == "failed"],
        "samples": [{"session": r.get("session"), "turn": r.get("turn"), "question": r["question"],
                     "user_transcript": r.get("user_transcript"), "reply_transcript": r.get("reply_transcript"),
                     "voice_to_voice_ms": r["voice_to_voice_ms"],
                     **{k: r.get(k) for k in ("speech_stopped_ms", "committed_ms", "commit_backlog_ms",
                                              "vad_end_before_audio_end_ms", "underruns")},
                     **{k: r["server_metrics"].get(k) for k in (*STAGES, "prefetched", "first_audio_prefetched")},
                     "errors": [str(e)[:300] for e in r.get("errors") or []]} for r in results],
    }


# ---- output --------------------------------------------------------------------------------------------

def _cell(row: dict[str, Any], key: str) -> str:
    if key == "answered":
        return f"{row['answered']}/{row['turns']}"
    if key in ("client_loop_lag", "client_chunk_late"):  # p95/max in one cell: the tail is what would hurt
        p95, top = row.get(f"{key}_p95_ms"), row.get(f"{key}_max_ms")
        return "" if p95 is None else f"{p95}/{top}"
    value = row.get(key)
    if isinstance(value, float) and key.endswith("_ms"):
        return str(round(value))  # whole ms: 22 columns of tenths are noise
    return "" if value is None else str(value)


COLUMNS = [("mode", "mode"), ("sessions", "sessions"), ("front_ends", "front ends"), ("answered", "answered/turns"),
           ("voice_to_voice_p50_ms", "v2v p50"), ("voice_to_voice_p95_ms", "v2v p95"),
           ("client_committed_p50_ms", "commit (client)"), ("commit_backlog_p50_ms", "commit backlog"),
           ("turn_decision_p50_ms", "turn decision"), ("transcript_p50_ms", "transcript"),
           ("ab_first_token_p50_ms", "first token"), ("first_chunk_text_p50_ms", "first chunk text"),
           ("first_audio_synthesized_p50_ms", "audio synth."),
           ("first_audio_sent_p50_ms", "audio sent"), ("underruns", "underruns"),
           ("engine_busy_share", "engine busy"), ("engine_post_share", "engine posting"),
           ("event_loop_busy_share", "loop busy"),
           ("engine_step_mean_ms", "engine step ms"), ("engine_rows_per_step", "rows/step"),
           ("process_cpu_cores", "CPU cores"), ("asr_queue_peak", "ASR q peak"), ("tts_queue_peak", "TTS q peak"),
           ("event_loop_lag_peak_ms", "server lag peak"), ("gc_full_collections", "full GCs"),
           ("gc_full_pause_ms", "full GC ms"), ("asr_partial_passes", "ASR partials"),
           ("asr_speculative_passes", "ASR speculative"), ("prefetches_started", "replies on guesses"),
           ("tts_decoder_busy_share", "TTS decoder busy"), ("tts_chunks_per_decode", "chunks/decode"),
           ("client_procs", "client procs"),
           ("client_cpu_cores", "client CPU cores"),
           ("client_loop_lag", "client lag p95/max"), ("client_chunk_late", "chunk late p95/max")]


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = [f"{r['machine']}; overrides: {' '.join(r['overrides']) or 'none'}" for r in reports]
    lines += ["", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    failures = []
    for report in reports:
        for row in report["results"]:
            lines.append("| " + " | ".join(_cell(row, k) for k, _ in COLUMNS) + " |")
            failures += [f"- {row['mode']} x {row['sessions']}: {f}" for f in row.get("client_failures") or []]
            if row.get("lost_turns"):
                failures.append(f"- {row['mode']} x {row['sessions']}: {row['lost_turns']} turns never reported")
    lines += ["", " ".join([
        "All in ms. v2v: end of question audio sent -> first reply audio received (client clock).",
        "commit (client): end of question audio sent -> `input_audio_buffer.committed` received (median).",
        "commit backlog: the chunk that completed the turn decision sent -> commit received (median): the server's",
        "queueing before and in the VAD plus the loopback, ±20 ms (one chunk).",
        "turn decision .. audio sent: server-side medians of `duet.turn.metrics` (turn decision: end of speech ->",
        "commit in audio time; the rest after the commit). Busy shares over the level's wall time from /metrics",
        "counters. client CPU: all client processes, in cores (taken from the server's machine). client lag: the",
        "client processes' loop lag (a 10 ms ticker's overshoot); chunk late: audio chunks sent behind their",
        "real-time schedule."])]
    if failures:
        lines += ["", "Client failures:", *failures]
    return "\n".join(lines) + "\n"


def write_outputs(reports: list[dict[str, Any]], md: str | None, plot_path: str | None) -> None:
    if md:
        Path(md).write_text(markdown(reports))
    if plot_path:
        from bench.plot_system import plot

        plot(reports, Path(plot_path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="duet serve --config")
    ap.add_argument("--set", action="append", default=[], help="server config override, as duet serve --set")
    ap.add_argument("--modes", default="nothink,speak-first")
    ap.add_argument("--sessions", default="1,8")
    ap.add_argument("--turns", type=int, default=0, help="turns per session (default: 4 at 1 session, else 2)")
    ap.add_argument("--client-procs", type=int, default=0,
                    help="client processes per level (0: one per 16 sessions, at most 8 and half the cores)")
    ap.add_argument("--turn-timeout-s", type=float, default=90, help="a turn without a reply by then fails")
    ap.add_argument("--port", type=int, default=8791, help="the server's port (front ends: this and the next ones)")
    ap.add_argument("--front-ends", type=int, default=0, metavar="N",
                    help="N > 0: `duet engine` (on --port + 100) and N `duet serve` front ends whose brains are "
                         "remote on it; sessions are dealt round-robin over the front ends (0: one `duet serve`)")
    ap.add_argument("--out", default="bench/out/system.json")
    ap.add_argument("--md", default=None, help="also write the table as markdown here")
    ap.add_argument("--plot", default=None, help="also plot v2v p50/p95 vs sessions here (matplotlib)")
    ap.add_argument("--server-log", default=None, help="the server's stderr (its log) goes here")
    ap.add_argument("--deadline-s", type=float, default=0, help="skip levels that would start after this many "
                    "seconds from the start, the first level excepted (a time-boxed run still writes what it measured)")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                    help="no run: render --md/--plot from these reports (e.g. one GPU call per mode)")
    args = ap.parse_args()
    if args.from_json:
        reports = [json.loads(Path(p).read_text()) for p in args.from_json]
        write_outputs(reports, args.md, args.plot)
        print(markdown(reports))
        return
    # A SIGTERM (an outer `timeout`) unwinds through the finally blocks: the server and the clients are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    audio = synthesize_questions()
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL  # noqa: SIM115 (lives with the server)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": _cpu_name(), "gpu": _gpu_name(),
        "config": args.config, "overrides": args.set, "front_ends": args.front_ends, "server_start_s": None,
        "results": []}
    if args.front_ends:  # its own series on a plot beside a one-process report's
        report["label"] = f"engine + {args.front_ends} front ends"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    servers = Servers()
    try:  # from the launch on: a SIGTERM while the models load must stop the servers too
        servers.start(args.config, args.set, args.port, args.front_ends, log)
        report["server_start_s"] = round(time.perf_counter() - t_load, 1)
        for mode in args.modes.split(","):
            for n in (int(x) for x in args.sessions.split(",")):
                # Never the first level: a slow server start (66-88 s after a fresh install on the GPU machine) once
                # skipped every level of a call; an outer `timeout` still bounds the call.
                if args.deadline_s and report["results"] and time.perf_counter() - started > args.deadline_s:
                    print(f"skipped {mode} x {n}: past --deadline-s", flush=True)
                    continue
                turns = args.turns or (4 if n == 1 else 2)
                row = run_level(servers, audio, mode, n, turns, client_procs_for(n, args.client_procs),
                                args.turn_timeout_s)
                row["front_ends"] = args.front_ends  # 0: one process, engine inside
                report["results"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
                out.write_text(json.dumps(report, indent=2))  # after every level: a killed run keeps its rows
    finally:
        servers.stop()
        # Also on SIGTERM or an error: the table and plot of the levels that finished.
        out.write_text(json.dumps(report, indent=2))
        if report["results"]:
            write_outputs([report], args.md, args.plot)
            print(markdown([report]), flush=True)


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
