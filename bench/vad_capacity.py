"""How many sessions' input audio one VAD thread keeps up with: a job per chunk vs the batched VAD thread.

N sessions each push S seconds of audio (a Piper question between silences) in 20 ms chunks, as fast as the
VAD takes them, through (a) what the server did before: a `FairPool` over a one-thread executor, one job per
chunk, Silero one row at a time; (b) `VadBatcher`: one model call per round with a row per session. Wall time
per second of audio per session gives the real-time capacity: sessions x S / wall. Both paths produce the same
turn events (checked). JSON out.

    python bench/vad_capacity.py --sessions 1,16,64,128 --seconds 6 --out bench/out/vad_capacity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from common.config import TtsConfig, VadConfig
from realtime.runtime import FairPool
from realtime.speech_in.vad import SileroVad, TurnEvent, VadSegmenter
from realtime.speech_in.vad_batch import VadBatcher
from tts.synthesizer import Synthesizer

CHUNK = 320  # 20 ms at 16 kHz


def material(seconds: float) -> np.ndarray:
    import soxr

    synth = Synthesizer.load(TtsConfig())
    speech = soxr.resample(synth.synthesize("What is the capital of France, and how far is it from here?"),
                           synth.sample_rate, 16000).astype(np.float32)
    total = int(seconds * 16000)
    audio = np.zeros(total, dtype=np.float32)
    audio[8000:8000 + min(len(speech), total - 8000)] = speech[:total - 8000]
    return audio


async def per_chunk(vad: SileroVad, audio: np.ndarray, n: int) -> tuple[float, list[list[TurnEvent]]]:
    pool = FairPool(ThreadPoolExecutor(1), 1)

    async def one(i: int) -> list[TurnEvent]:
        seg = VadSegmenter(vad, VadConfig())
        events: list[TurnEvent] = []
        for k in range(0, len(audio), CHUNK):
            events += await pool.run(f"s{i}", seg.feed, audio[k:k + CHUNK])
        return events

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0, list(out)


async def batched(vad: SileroVad, audio: np.ndarray, n: int) -> tuple[float, list[list[TurnEvent]], float]:
    batcher = VadBatcher()

    async def one() -> list[TurnEvent]:
        seg = VadSegmenter(vad, VadConfig())
        events: list[TurnEvent] = []
        for k in range(0, len(audio), CHUNK):
            events += await batcher.feed(seg, audio[k:k + CHUNK], lambda ev: ev)
        return events

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - t0
    batcher.close()
    return wall, list(out), batcher.rows / max(1, batcher.rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,16,64,128")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", default="bench/out/vad_capacity.json")
    args = ap.parse_args()
    vad = SileroVad.load()
    audio = material(args.seconds)
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.sessions.split(",")):
        # Interleaved, each path twice, so a load change on the machine hits both alike; the faster run counts.
        old = min(asyncio.run(per_chunk(vad, audio, n))[0] for _ in range(2))
        runs = [asyncio.run(batched(vad, audio, n)) for _ in range(2)]
        new = min(r[0] for r in runs)
        ref = asyncio.run(per_chunk(vad, audio, 1))[1][0]
        same = all(e == ref for r in runs for e in r[1])
        row = {"sessions": n, "audio_s_per_session": args.seconds, "per_chunk_wall_s": round(old, 3),
               "batched_wall_s": round(new, 3), "speedup": round(old / new, 2),
               "per_chunk_realtime_sessions": round(n * args.seconds / old, 1),
               "batched_realtime_sessions": round(n * args.seconds / new, 1),
               "mean_rows_per_call": round(runs[0][2], 1), "same_events": same}
        print(json.dumps(row))
        rows.append(row)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_avg": os.getloadavg()}, "chunk_ms": CHUNK // 16, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
