"""Render bench/latency.py JSON as the markdown table in docs/benchmarks.md.

    .venv/bin/python bench/table.py bench/out/latency_modes.json
"""

from __future__ import annotations

import json
import sys

COLUMNS = [("mode", "mode"), ("sessions", "sessions"), ("turns", "turns"),
           ("voice_to_voice_p50_ms", "v2v p50 ms"), ("voice_to_voice_p95_ms", "v2v p95 ms"),
           ("vad_end_after_speech_p50_ms", "VAD end ms"), ("transcript_p50_ms", "transcript ms"),
           ("ab_first_token_p50_ms", "AB 1st token ms"), ("first_audio_sent_p50_ms", "1st audio sent ms"),
           ("tokens_before_first_reply_p50", "tokens before reply"), ("underruns", "underruns")]


def main(path: str) -> None:
    with open(path) as fh:
        report = json.load(fh)
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in report["results"]:
        print("| " + " | ".join("–" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
