"""Is a reply as intelligible when its first chunk is a few words rather than a clause or sentence?

Each reply text goes through `tts.chunker.SentenceChunker` streamed token-sized piece by piece, once as it
chunked before (`first_chunk_max_words=0`: the first chunk ends at a clause or sentence end) and once as it
chunks now (the configured `tts.first_chunk_max_words`); every chunk is synthesized on its own with the bundled
Piper voice and the chunks are concatenated, as the client hears them. The bundled Whisper base (the tests'
judge, more accurate than the server's tiny.en) transcribes both, and the word error rate against the reply
text is reported for each, over all replies and over those whose chunks differ. Piper samples noise on every
call, so each reply is synthesized `--repeats` times per variant.

    .venv/bin/python bench/intelligibility.py --out bench/out/intelligibility.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import soxr

# Plausible replies of a small voice assistant (several in SmolLM2-135M's own phrasing, "The answer is..."),
# short and long, with the openings the first-chunk rule cuts: subject phrases, "There are", lists, numbers.
REPLIES = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "A spider has eight legs.",
    "The answer is: Paris.",
    "The answer is 8. A spider has eight legs.",
    "The largest planet in our solar system is Jupiter.",
    "There are seven days in a week.",
    "William Shakespeare wrote Romeo and Juliet in the late sixteenth century.",
    "The sky on a clear day is blue because air scatters blue light more than red light.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The Pacific Ocean is the largest ocean on Earth. It covers about a third of the planet.",
    "Sure, I can help with that. What would you like to know?",
    "The speed of light is about three hundred thousand kilometers per second.",
    "Mount Everest is the highest mountain in the world, at almost nine thousand meters.",
    "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "The human heart has four chambers. It pumps blood through the whole body.",
    "A healthy adult should sleep seven to nine hours a night.",
    "The Great Wall of China is thousands of kilometers long and was built over many centuries.",
    "Tokyo is the capital of Japan and one of the largest cities in the world.",
    "The moon orbits the Earth about once every twenty seven days.",
    "To make a cup of tea, boil the water, add the tea bag and let it steep for three minutes.",
    "Honey never spoils if you keep it sealed in a dry place.",
    "The Amazon rainforest produces a large share of the world's oxygen.",
    "Dolphins are mammals, not fish. They breathe air through a blowhole.",
    "The first person to walk on the moon was Neil Armstrong in nineteen sixty nine.",
    "The Nile is often called the longest river in the world.",
    "Bananas are rich in potassium, which helps your muscles work.",
    "The Eiffel Tower was finished in eighteen eighty nine for the World's Fair.",
    "Cats sleep for most of the day, often more than twelve hours.",
    "The smallest prime number is two. It is also the only even prime.",
    "Good morning! The weather today is sunny with a light breeze.",
    "The Mona Lisa was painted by Leonardo da Vinci and hangs in the Louvre in Paris.",
    "Antarctica is the coldest continent on Earth and is covered by a thick sheet of ice.",
    "The brain uses about a fifth of the body's energy even though it is small.",
    "Penguins live mostly in the southern hemisphere and cannot fly.",
    "An octopus has three hearts and blue blood.",
    "The Sahara is the largest hot desert in the world.",
    "Regular exercise improves your mood and helps you sleep better at night.",
    "The train to the city leaves every twenty minutes from the main station.",
    "Your meeting with the design team is at three in the afternoon on Thursday.",
    "I think the best way to learn a language is to speak it every day with other people.",
]

_NUMBERS = {str(i): w for i, w in enumerate([
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"])}


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation; small digits spelt out (Whisper writes "8" for "eight")."""
    words = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()
    return [_NUMBERS.get(w, w) for w in (w.strip("'") for w in words) if w]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions, deletions, insertions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def token_pieces(text: str) -> list[str]:
    """The text in LLM-token-sized deltas (a word with its leading space, punctuation apart)."""
    return re.findall(r"\s*\w+|\s*[^\w\s]|\s+", text)


def chunks_of(text: str, first_chunk_min_words: int, first_chunk_max_words: int) -> list[str]:
    from tts.chunker import SentenceChunker

    chunker = SentenceChunker(first_chunk_min_words=first_chunk_min_words, first_chunk_max_words=first_chunk_max_words)
    out: list[str] = []
    for piece in token_pieces(text):
        out += chunker.push(piece)
    return out + chunker.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="syntheses per reply and variant (Piper samples noise)")
    ap.add_argument("--max-words", type=int, default=None, help="first_chunk_max_words after (default: config)")
    ap.add_argument("--out", default="bench/out/intelligibility.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from common.config import AsrConfig, TtsConfig
    from realtime.speech_in.asr import Listener
    from tts.synthesizer import Synthesizer

    tts = TtsConfig()
    after_max = tts.first_chunk_max_words if args.max_words is None else args.max_words
    variants = {"before": 0, "after": after_max}
    synth = Synthesizer.load(tts)
    listener = Listener.load(AsrConfig(model="base"))

    def hear(chunks: list[str]) -> tuple[str, float]:
        t0 = time.perf_counter()
        first = synth.synthesize(chunks[0])
        first_s = time.perf_counter() - t0
        audio = np.concatenate([first, *(synth.synthesize(c) for c in chunks[1:])])
        heard = str(listener.transcribe(soxr.resample(audio, synth.sample_rate, 16000).astype(np.float32)))
        return heard, first_s

    rows = []
    for text in REPLIES:
        ref = normalize(text)
        row: dict[str, Any] = {"text": text}
        for name, max_words in variants.items():
            chunks = chunks_of(text, tts.first_chunk_min_words, max_words)
            heard = [hear(chunks) for _ in range(args.repeats)]
            row[name] = {"chunks": chunks, "heard": [h for h, _ in heard],
                         "errors": [edit_distance(ref, normalize(h)) for h, _ in heard],
                         "first_chunk_words": len(chunks[0].split()),
                         "first_chunk_synth_ms": round(1000 * float(np.median([s for _, s in heard])), 1)}
        row["differs"] = row["before"]["chunks"] != row["after"]["chunks"]
        rows.append(row)
        print(json.dumps({k: row[k]["chunks"] if k in variants else row[k] for k in ("text", *variants)}), flush=True)

    def wer(subset: list[dict[str, Any]], name: str) -> float | None:
        words = sum(len(normalize(r["text"])) for r in subset) * args.repeats
        return round(sum(sum(r[name]["errors"]) for r in subset) / words, 4) if words else None

    def stat(subset: list[dict[str, Any]], name: str, key: str) -> float | None:
        return round(float(np.median([r[name][key] for r in subset])), 1) if subset else None

    differ = [r for r in rows if r["differs"]]
    summary = {
        "replies": len(rows), "replies_chunked_differently": len(differ), "repeats": args.repeats,
        **{f"wer_{n}": wer(rows, n) for n in variants},
        **{f"wer_{n}_where_chunks_differ": wer(differ, n) for n in variants},
        **{f"first_chunk_words_p50_{n}": stat(rows, n, "first_chunk_words") for n in variants},
        **{f"first_chunk_synth_ms_p50_{n}": stat(rows, n, "first_chunk_synth_ms") for n in variants},
    }
    print(json.dumps(summary))
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "voice": tts.voice, "judge": "whisper base",
              "first_chunk_max_words": variants, "summary": summary, "replies": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
