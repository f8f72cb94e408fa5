"""Turn taking: how soon a turn is decided after the user stops, and how often a mid-sentence pause cuts them off.

Offline, no server: the real Silero VAD and TurnDetector (and Smart Turn for semantic_vad) run over
material synthesized with the bundled Piper voice, fed in 20 ms chunks as a session feeds them.

* complete: a whole question or request, then silence. Measured: when the turn is decided after the
  end of speech (from the waveform), p50/p95, in audio time: without the Smart Turn call's compute, which
  depends on the CPU and its load and is reported apart (the JSON also has p50 with it added).
* paused: the same 12 sentences with a 400-900 ms pause in the middle ("I'd like to book a table
  for... four people tonight."), two ways: unfilled (the speaker stops mid-phrase; cut out of the
  fluently spoken sentence) and filled ("I'd like to book a table for um... four people tonight.").
  Measured: the share of pauses that end the turn (the user is cut off).

Each clip is run clean and with white noise at a few SNRs (noise over the whole clip, silences too).

    .venv/bin/python bench/turn_taking.py                     # every mode, clean/20/10 dB
    .venv/bin/python bench/turn_taking.py --modes server_vad:300,semantic:auto --snr clean
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from common.audio import SPEECH_RATE
from common.config import TtsConfig, VadConfig
from realtime.speech_in.smart_turn import SmartTurn
from realtime.speech_in.vad import SileroVad, SpeechStopped, VadSegmenter

CHUNK = SPEECH_RATE // 50  # 20 ms, a typical client append
LEAD_S, TAIL_S = 1.0, 3.0  # silence before a clip, and after it (longer than any mode's longest wait)

COMPLETE = [
    "What is the capital of France?",
    "Can you tell me the weather in Paris tomorrow?",
    "How long does it take to boil an egg?",
    "What time does the pharmacy close tonight?",
    "Could you set a timer for ten minutes?",
    "Who wrote Pride and Prejudice?",
    "Is it going to rain this weekend?",
    "How many ounces are in a cup?",
    "Play some jazz music, please.",
    "What's the best way to learn Spanish?",
    "Remind me to call my mother at six.",
    "How far is the moon from the earth?",
]
# (before the pause, after it): the first part ends where a speaker would hesitate, mid-clause.
PAUSED = [
    ("I'd like to book a table for", "four people tonight."),
    ("Can you remind me to", "buy milk on the way home?"),
    ("What is the population of", "Canada right now?"),
    ("I need a flight from London to", "New York next Friday."),
    ("Could you tell me how to", "reset my password?"),
    ("My favorite kind of music is", "probably classical."),
    ("Set an alarm for", "seven in the morning."),
    ("I was wondering if you could", "recommend a good book."),
    ("The meeting has been moved to", "Thursday afternoon."),
    ("Send a message to", "my sister saying I'm late."),
    ("How do I get to the", "nearest train station?"),
    ("I want to order a large pizza with", "mushrooms and olives."),
]
PAUSES_MS = (400, 500, 600, 700, 800, 900)


@dataclass
class Clip:
    kind: str  # "complete" | "unfilled" | "filled" (the two kinds of mid-sentence pause)
    text: str
    audio: np.ndarray  # 16 kHz, clean
    speech_end_ms: float  # where the last word ends
    pause: tuple[float, float] | None = None  # (start, end) ms of the mid-sentence pause


def _trim(audio: np.ndarray) -> np.ndarray:
    """Speech without Piper's leading/trailing near-silence (2% of the peak, as tests/…/test_vad.py)."""
    loud = np.nonzero(np.abs(audio) > 0.02 * np.abs(audio).max())[0]
    return audio[loud[0]:loud[-1] + 1]


def _letters(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalpha())


def _cut_after(audio: np.ndarray, words_before: str, whisper: Any) -> tuple[np.ndarray, np.ndarray]:
    """`audio` (one fluently spoken sentence) cut after its first words, `words_before`.

    Why not synthesize the two halves apart: Piper speaks any text as a whole utterance, so "I'd like to
    book a table for" alone ends with the lengthening and falling pitch of a finished sentence, which a
    speaker who stops to think mid-phrase does not have. Cut out of the whole sentence, the words before
    the pause sound like a speaker who is going on. Whisper's word timestamps find the boundary; the cut
    goes at the quietest 5 ms within 60 ms of it.
    """
    segments, _ = whisper.transcribe(audio, word_timestamps=True, language="en", beam_size=1)
    words = [w for seg in segments for w in seg.words]
    # The boundary is after the k-th time Whisper hears the last word before it (Whisper may drop an
    # "a" elsewhere, so counting all words would drift).
    before = [_letters(w) for w in words_before.split()]
    k = before.count(before[-1])
    for i, word in enumerate(words[:-1]):
        k -= _letters(word.word) == before[-1]
        if k == 0:
            middle = round((word.end + words[i + 1].start) / 2 * SPEECH_RATE)
            hop, reach = SPEECH_RATE // 200, round(0.06 * SPEECH_RATE)
            lo = max(middle - reach, 0)
            window = audio[lo:middle + reach]
            rms = np.sqrt(np.mean(window[: len(window) // hop * hop].reshape(-1, hop) ** 2, axis=1))
            cut = lo + int(np.argmin(rms)) * hop + hop // 2
            return audio[:cut], audio[cut:]
    raise ValueError(f"no word boundary after {words_before!r}")


def material() -> list[Clip]:
    from faster_whisper import WhisperModel

    from common.config import AsrConfig
    from realtime.speech_in.asr import resolve_whisper_model
    from tts.synthesizer import Synthesizer

    # Noise off: the same audio every run.
    synth = Synthesizer.load(dataclasses.replace(TtsConfig(), noise_scale=0.0, noise_w=0.0))
    whisper = WhisperModel(str(resolve_whisper_model(AsrConfig(model="base"))), device="cpu",
                           compute_type="int8", cpu_threads=2)

    def say(text: str) -> np.ndarray:
        return _trim(soxr.resample(synth.synthesize(text), synth.sample_rate, SPEECH_RATE).astype(np.float32))

    lead = np.zeros(round(LEAD_S * SPEECH_RATE), dtype=np.float32)
    tail = np.zeros(round(TAIL_S * SPEECH_RATE), dtype=np.float32)
    ms = 1000 / SPEECH_RATE
    clips = []
    for text in COMPLETE:
        speech = say(text)
        clips.append(Clip("complete", text, np.concatenate([lead, speech, tail]),
                          speech_end_ms=(len(lead) + len(speech)) * ms))
    for i, (first, second) in enumerate(PAUSED):
        gap = np.zeros(round(PAUSES_MS[i % len(PAUSES_MS)] * SPEECH_RATE / 1000), dtype=np.float32)
        # Unfilled: the speaker stops mid-phrase. Filled: "..., um" then the pause (the usual hesitation).
        for kind, (a, b) in (("unfilled", _cut_after(say(f"{first} {second}"), first, whisper)),
                             ("filled", (say(f"{first} um"), say(second)))):
            audio = np.concatenate([lead, a, gap, b, tail])
            clips.append(Clip(kind, f"{first}{' um' if kind == 'filled' else ''}... {second}", audio,
                              speech_end_ms=(len(audio) - len(tail)) * ms,
                              pause=((len(lead) + len(a)) * ms, (len(lead) + len(a) + len(gap)) * ms)))
    return clips


def add_noise(clip: Clip, snr_db: float | None, seed: int) -> np.ndarray:
    if snr_db is None:
        return clip.audio
    voiced = clip.audio[np.abs(clip.audio) > 0.02 * np.abs(clip.audio).max()]
    power = float(np.mean(voiced ** 2)) / 10 ** (snr_db / 10)
    noise = np.random.default_rng(seed).standard_normal(len(clip.audio)) * np.sqrt(power)
    return (clip.audio + noise).astype(np.float32)


class TimedModel:
    """Smart Turn, with the wall time of each call kept (it adds to when the turn is really decided)."""

    def __init__(self, model: SmartTurn) -> None:
        self.model = model
        self.last_ms = 0.0
        self.calls_ms: list[float] = []

    def __call__(self, audio: np.ndarray) -> float:
        t0 = time.perf_counter()
        p = self.model(audio)
        self.last_ms = (time.perf_counter() - t0) * 1000
        self.calls_ms.append(self.last_ms)
        return p


@dataclass
class Stop:
    decided_ms: float  # audio fed when the turn was decided
    event: SpeechStopped
    compute_ms: float  # the Smart Turn call that decided it (0 when the silence did)
    probability: float | None  # Smart Turn's P(complete) at this pause, if it was asked


def run_clip(vad: SileroVad, cfg: VadConfig, model: TimedModel | None, audio: np.ndarray) -> list[Stop]:
    seg = VadSegmenter(vad, cfg, turn_model=model)
    threshold = seg.detector.semantic.complete_threshold if seg.detector.semantic else 2.0
    out = []
    for i in range(0, len(audio), CHUNK):
        if model is not None:
            model.last_ms = 0.0
        for event in seg.feed(audio[i:i + CHUNK]):
            if isinstance(event, SpeechStopped):
                p = seg.detector.last_turn_probability
                by_model = p is not None and p >= threshold
                out.append(Stop(min(i + CHUNK, len(audio)) * 1000 / SPEECH_RATE, event,
                                model.last_ms if model is not None and by_model else 0.0, p))
    return out


def mode_config(mode: str, pause_ms: int) -> VadConfig:
    kind, _, arg = mode.partition(":")
    if kind == "server_vad":
        return VadConfig(turn_detection="server_vad", silence_duration_ms=int(arg))
    if kind == "semantic":
        return VadConfig(turn_detection="semantic_vad", eagerness=arg or "auto",  # type: ignore[arg-type]
                         semantic_pause_ms=pause_ms)
    raise SystemExit(f"unknown mode {mode!r}: server_vad:MS or semantic:EAGERNESS")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(values, q)), 1)


def measure(vad: SileroVad, smart: SmartTurn, clips: list[Clip], mode: str, snr: float | None,
            pause_ms: int) -> dict[str, Any]:
    cfg = mode_config(mode, pause_ms)
    model = TimedModel(smart) if cfg.turn_detection == "semantic_vad" else None
    latencies: list[float] = []
    after_vad: list[float] = []  # after the end of speech as Silero heard it (SpeechStopped.audio_end_ms)
    audio_time: list[float] = []  # without the Smart Turn call's compute (add the call's time on your CPU)
    early = missed = cut = paused_n = at_pause = 0
    for n, clip in enumerate(clips):
        stops = run_clip(vad, cfg, model, add_noise(clip, snr, seed=n))
        if clip.pause is not None:
            paused_n += 1
            # A turn that ends before the words after the pause cuts the user off.
            if any(s.event.audio_end_ms < clip.pause[1] for s in stops):
                cut += 1
        final = [s for s in stops if s.event.audio_end_ms >= clip.speech_end_ms - 300]
        if not final:
            missed += 1
            continue
        latencies.append(final[0].decided_ms - clip.speech_end_ms + final[0].compute_ms)
        after_vad.append(final[0].decided_ms - final[0].event.audio_end_ms)
        audio_time.append(final[0].decided_ms - clip.speech_end_ms)
        if len(stops) > len(final) and clip.pause is None:
            early += 1  # a complete question split in two: Silero heard a pause inside it
        at_pause += final[0].compute_ms > 0
    return {
        "mode": mode, "snr_db": "clean" if snr is None else snr, "clips": len(clips),
        "decided_with_compute_p50_ms": pct(latencies, 50), "decided_with_compute_p95_ms": pct(latencies, 95),
        "decided_after_vad_end_p50_ms": pct(after_vad, 50),
        "decided_p50_ms": pct(audio_time, 50), "decided_p95_ms": pct(audio_time, 95),
        "mid_sentence_cut_off_pct": round(100 * cut / paused_n, 1) if paused_n else None,
        "complete_split_early": early, "no_turn_found": missed,
        "decided_at_pause_pct": round(100 * at_pause / len(latencies), 1) if model and latencies else None,
        "smart_turn_call_p50_ms": pct(model.calls_ms, 50) if model else None,
        "smart_turn_calls": len(model.calls_ms) if model else 0,
    }


def load_material(cache: Path) -> list[Clip]:
    """The clips, synthesized once and kept in `cache` (Piper with noise off gives the same audio anyway)."""
    if cache.exists():
        with cache.open("rb") as fh:
            return [Clip(**fields) for fields in pickle.load(fh)]
    clips = material()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as fh:  # plain dicts: loadable whether this file runs as a script or a module
        pickle.dump([dataclasses.asdict(c) for c in clips], fh)
    return clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="server_vad:300,server_vad:500,semantic:high,semantic:auto,semantic:low")
    ap.add_argument("--snr", default="clean,20,10", help="comma-separated: clean or dB")
    ap.add_argument("--pause-ms", type=int, default=VadConfig().semantic_pause_ms, help="semantic_pause_ms")
    ap.add_argument("--out", default="bench/out/turn_taking.json")
    ap.add_argument("--material", default="bench/out/turn_taking_material.pkl", help="cache of the clips")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    vad, smart = SileroVad.load(), SmartTurn.load()
    t0 = time.perf_counter()
    clips = load_material(Path(args.material))
    print(f"material: {len(clips)} clips in {time.perf_counter() - t0:.1f} s")
    results = []
    for snr_text in args.snr.split(","):
        snr = None if snr_text == "clean" else float(snr_text)
        for mode in args.modes.split(","):
            row: dict[str, Any] = {"mode": mode, "snr_db": snr_text}
            for kind in KINDS:
                m = measure(vad, smart, [c for c in clips if c.kind == kind], mode, snr, args.pause_ms)
                row[kind] = m
            results.append(row)
            print(json.dumps(flat(row)))
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_avg_1m": round(os.getloadavg()[0], 2)},
              "material": {kind: sum(c.kind == kind for c in clips) for kind in KINDS}
              | {"pauses_ms": PAUSES_MS, "semantic_pause_ms": args.pause_ms, "chunk_ms": 1000 * CHUNK // SPEECH_RATE},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table([flat(r) for r in results]))


KINDS = ("complete", "unfilled", "filled")


def flat(row: dict[str, Any]) -> dict[str, Any]:
    c, u, f = (row[k] for k in KINDS)
    cut = [m["mid_sentence_cut_off_pct"] for m in (u, f)]
    return {"mode": row["mode"], "snr_db": row["snr_db"],
            "decided_p50_ms": c["decided_p50_ms"], "decided_p95_ms": c["decided_p95_ms"],
            "after_vad_end_p50_ms": c["decided_after_vad_end_p50_ms"],
            "with_compute_p50_ms": c["decided_with_compute_p50_ms"],
            "at_pause_pct": c["decided_at_pause_pct"], "complete_split": c["complete_split_early"],
            "complete_missed": c["no_turn_found"], "cut_unfilled_pct": cut[0], "cut_filled_pct": cut[1],
            "cut_all_pct": round(sum(cut) / 2, 1), "smart_turn_ms": c["smart_turn_call_p50_ms"]}


COLUMNS = [("mode", "mode"), ("snr_db", "SNR dB"), ("decided_p50_ms", "decided p50 ms"),
           ("decided_p95_ms", "decided p95 ms"), ("after_vad_end_p50_ms", "after VAD's end p50 ms"),
           ("at_pause_pct", "decided by Smart Turn %"),
           ("cut_all_pct", "pauses cut off %"), ("cut_unfilled_pct", "unfilled cut %"),
           ("cut_filled_pct", "'um' cut %"), ("smart_turn_ms", "Smart Turn call ms (this CPU)"),
           ("complete_split", "questions split")]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("–" if row.get(k) is None else str(row[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
