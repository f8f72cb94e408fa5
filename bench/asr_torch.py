"""Whisper ASR of many concurrent turns: CTranslate2 on the CPU (asr.engine = "ctranslate2", what runs today) against
the torch engine batched on a device (asr.engine = "torch", realtime/speech_in/whisper_torch.py). Prints JSON.

For each concurrency level C, C threads each transcribe one turn, all released at once (as C sessions' turns
ending together reach the ASR pool); we time each call and the whole wave, median over --reps waves. The turns
are Piper-spoken sentences (noise off, so every run hears the same audio), 1.5-7 s long.

    .venv/bin/python bench/asr_torch.py --device cpu --concurrency 1,4 --reps 2       # runs anywhere
    python3 bench/asr_torch.py --device cuda --dtype float16 --concurrency 1,8,32,64 \\
        --ct2-workers 4 --ct2-threads 2 --hf-generate --out bench/out/asr_torch.json   # the GPU machine

--hf-generate also times transformers' own `generate` on the same converted model and batch (the alternative
to our decoder loop), at the largest concurrency level. --eager-too also times the torch engine with
asr.cuda_graphs = false (each decode step launched from Python), level by level beside the graphed one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.config import AsrConfig, TtsConfig
from realtime.speech_in.asr import Listener, load_listener
from realtime.speech_in.whisper_torch import TorchListener

SENTENCES = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you set a timer for ten minutes, please?",
    "Tell me a short story about a dragon who was afraid of the dark.",
    "I would like to book a table for four people tomorrow evening at seven.",
    "What's the weather going to be like this weekend in Seattle?",
    "Remind me to call my sister when I get home from work tonight.",
    "Explain, in simple words, why the sky looks blue during the day but red at sunset.",
]


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def speech(n: int) -> list[np.ndarray]:
    from tts.synthesizer import Synthesizer

    synth = Synthesizer.load(dataclasses.replace(TtsConfig(), noise_scale=0.0, noise_w=0.0))
    voiced = [soxr.resample(synth.synthesize(s), synth.sample_rate, 16000).astype(np.float32) for s in SENTENCES]
    return [voiced[i % len(voiced)] for i in range(n)]


def wave(fn: Callable[[np.ndarray], str], audio: list[np.ndarray], pool: ThreadPoolExecutor) -> dict[str, Any]:
    """All of `audio` submitted at once. A turn's latency counts from the release to its text, its wait for a
    pool thread included (as a session waits for its transcript)."""
    start = threading.Event()
    released = [0.0]

    def call(x: np.ndarray) -> tuple[float, str]:
        start.wait()
        text = fn(x)
        return time.perf_counter() - released[0], text

    futures = [pool.submit(call, x) for x in audio]
    time.sleep(0.05)  # let the pool's threads reach the start line
    released[0] = time.perf_counter()
    start.set()
    results = [f.result() for f in futures]
    return {"wall_s": time.perf_counter() - released[0], "latencies": [r[0] for r in results],
            "texts": [r[1] for r in results]}


def measure(fn: Callable[[np.ndarray], str], audio: list[np.ndarray], threads: int, reps: int) -> dict[str, Any]:
    with ThreadPoolExecutor(threads) as pool:
        wave(fn, audio[: min(len(audio), threads)], pool)  # warm
        waves = [wave(fn, audio, pool) for _ in range(reps)]
    latencies = [x for w in waves for x in w["latencies"]]
    return {
        "wave_median_s": round(statistics.median(w["wall_s"] for w in waves), 4),
        "turn_p50_s": round(statistics.median(latencies), 4),
        "turn_max_s": round(max(latencies), 4),
        "texts": waves[-1]["texts"],
    }


def hf_generate(listener: TorchListener, audio: list[np.ndarray], reps: int) -> dict[str, Any]:
    """transformers' `generate` over the same converted model, greedy, one batch (no fallback, no no-speech rule)."""
    import torch
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    tok = listener.tokenizer
    model = listener.decoder.model
    feats = torch.stack([listener.features(x)[0] for x in audio])
    prompt = torch.tensor([[*tok.sot_sequence, tok.no_timestamps]] * len(audio))
    config = GenerationConfig(decoder_start_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot,
                              max_new_tokens=96, do_sample=False, num_beams=1,
                              suppress_tokens=list(listener.decoder.suppress.nonzero().flatten().tolist()),
                              begin_suppress_tokens=[220, tok.eot])

    def run() -> list[str]:
        with torch.inference_mode():
            out = super(WhisperForConditionalGeneration, model).generate(  # the plain GenerationMixin loop
                input_features=feats.to(listener.device, listener.dtype),
                decoder_input_ids=prompt.to(listener.device), generation_config=config)
        return [tok.decode(o.tolist()).strip() for o in out]

    run()
    times, texts = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        texts = run()
        times.append(time.perf_counter() - t0)
    return {"batch": len(audio), "wave_median_s": round(statistics.median(times), 4), "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", help="torch engine's asr.compute_type")
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--concurrency", default="1,8,32", help="turns transcribed at once, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ct2-workers", type=int, default=1, help="CTranslate2 replicas on the CPU (asr.workers)")
    ap.add_argument("--ct2-threads", type=int, default=2, help="threads per replica (asr.cpu_threads)")
    ap.add_argument("--no-ct2", action="store_true", help="skip CTranslate2")
    ap.add_argument("--hf-generate", action="store_true", help="also time transformers' generate")
    ap.add_argument("--eager-too", action="store_true", help="also the torch engine without CUDA graphs")
    ap.add_argument("--out", default="bench/out/asr_torch.json")
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    audio = speech(max(levels))
    import torch
    import transformers

    res: dict[str, Any] = {
        "model": a.model, "device": a.device, "dtype": a.dtype, "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
        "audio_s_median": round(statistics.median(len(x) / 16000 for x in audio), 2),
        "ct2": {}, "torch_engine": {}, "torch_eager": {},
    }
    t0 = time.perf_counter()
    listener = load_listener(AsrConfig(model=a.model, engine="torch", device=a.device, compute_type=a.dtype,
                                       workers=max(levels)))
    assert isinstance(listener, TorchListener)
    res["torch_load_s"] = round(time.perf_counter() - t0, 2)
    eager = None
    if a.eager_too:
        eager = load_listener(AsrConfig(model=a.model, engine="torch", device=a.device, compute_type=a.dtype,
                                        workers=max(levels), cuda_graphs=False))
    ct2 = None
    if not a.no_ct2:
        ct2 = Listener.load(AsrConfig(model=a.model, device="cpu", compute_type="int8", cpu_threads=a.ct2_threads,
                                      workers=a.ct2_workers))
    for c in levels:
        turns = audio[:c]
        got = measure(listener.transcribe, turns, c, a.reps)
        res["torch_engine"][str(c)] = got
        line = (f"C={c:3d} torch {a.device} {a.dtype}: wave {got['wave_median_s']:.3f} s, "
                f"turn p50 {got['turn_p50_s']:.3f} s")
        if eager is not None:
            plain = measure(eager.transcribe, turns, c, a.reps)
            res["torch_eager"][str(c)] = plain
            same = sum(norm(x) == norm(y) for x, y in zip(got["texts"], plain["texts"], strict=True))
            plain["same_text_as_graphed"] = f"{same}/{c}"
            line += f" | no graphs: wave {plain['wave_median_s']:.3f} s, same text {same}/{c}"
        if ct2 is not None:
            ref = measure(ct2.transcribe, turns, a.ct2_workers, a.reps)
            res["ct2"][str(c)] = ref
            same = sum(norm(x) == norm(y) for x, y in zip(got["texts"], ref["texts"], strict=True))
            got["same_text_as_ct2"] = f"{same}/{c}"
            line += (f" | ct2 cpu int8 {a.ct2_workers}x{a.ct2_threads}: wave {ref['wave_median_s']:.3f} s, turn p50 "
                     f"{ref['turn_p50_s']:.3f} s | same text {same}/{c}")
        print(line, flush=True)
    res["torch_batches"] = {"passes": listener.batches, "windows": listener.windows,
                            "largest": listener.max_seen_batch,
                            "mean_pass_s": round(listener.busy_s / max(1, listener.batches), 4)}
    print("torch passes:", res["torch_batches"], flush=True)
    if a.hf_generate:
        res["hf_generate"] = hf_generate(listener, audio[: max(levels)], a.reps)
        print(f"transformers generate, batch {max(levels)}: {res['hf_generate']['wave_median_s']:.3f} s", flush=True)
    listener.close()
    if eager is not None:
        eager.close()  # type: ignore[attr-defined]
    summary = {k: {c: v["wave_median_s"] for c, v in res[k].items()} for k in ("torch_engine", "torch_eager", "ct2")}
    print(json.dumps({"wave_median_s": summary, "torch_load_s": res["torch_load_s"]}))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
