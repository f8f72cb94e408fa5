"""Several turns transcribed at once on the CPU: one Whisper worker in turn, N workers in parallel (CTranslate2
replicas, `asr.workers`), or one batched CTranslate2 `generate` over all turns' features. Prints JSON.

    .venv/bin/python bench/asr_parallel.py --turns 4 --threads 8 --out bench/out/asr_parallel.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.latency import QUESTIONS
from common.config import AsrConfig, TtsConfig
from realtime.speech_in.asr import Listener
from tts.synthesizer import Synthesizer


def timed(fn: Callable[[], list[str]], reps: int) -> dict[str, Any]:
    fn()  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        texts = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3), "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all, split among the workers")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/out/asr_parallel.json")
    a = ap.parse_args()
    synth = Synthesizer.load(dataclasses.replace(TtsConfig(), noise_scale=0.0, noise_w=0.0))
    audio = [soxr.resample(synth.synthesize(q), synth.sample_rate, 16000).astype(np.float32)
             for q in (QUESTIONS * a.turns)[:a.turns]]
    res: dict[str, Any] = {"turns": a.turns, "threads": a.threads, "cores": os.cpu_count()}
    one = Listener.load(AsrConfig(cpu_threads=a.threads, workers=1))
    res["one_worker_in_turn"] = timed(lambda: [one.transcribe(x) for x in audio], a.reps)
    n = min(a.turns, a.threads)
    par = Listener.load(AsrConfig(cpu_threads=max(1, a.threads // n), workers=n))
    with ThreadPoolExecutor(n) as ex:
        res[f"{n}_workers_in_parallel"] = timed(lambda: list(ex.map(par.transcribe, audio)), a.reps)
    res["one_batched_generate"] = timed(lambda: batched(one, audio), a.reps)
    print(json.dumps({k: (v["median_s"] if isinstance(v, dict) else v) for k, v in res.items()}))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


def batched(listener: Listener, audio: list[np.ndarray]) -> list[str]:
    """All turns in one CTranslate2 call: each turn's log-mel features padded to Whisper's 30 s window, greedy."""
    import ctranslate2
    from faster_whisper.tokenizer import Tokenizer

    m = listener.model
    tok = Tokenizer(m.hf_tokenizer, m.model.is_multilingual, task="transcribe", language="en")
    n_frames = m.feature_extractor.nb_max_frames
    feats = [m.feature_extractor(x)[:, :n_frames] for x in audio]
    feats = [np.pad(f, ((0, 0), (0, n_frames - f.shape[1]))) for f in feats]
    x = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(feats).astype(np.float32)))
    prompt = [*tok.sot_sequence, tok.no_timestamps]
    out = m.model.generate(x, [prompt] * len(audio), beam_size=1, max_length=128)
    return [tok.decode([t for t in r.sequences_ids[0] if t < tok.eot]).strip() for r in out]


if __name__ == "__main__":
    main()
