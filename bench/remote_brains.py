"""What the network hop of the remote backend costs, against the in-process vLLM backend (issue 12 part 3).

Both run vLLM with the same engine arguments (`engine_args`, `vllm_serve_args`) on the same weights, side by side
on the same machine: `VllmEngine` (AsyncLLM in this process, EngineCore in a child) and `RemoteEngine` talking
HTTP/SSE over loopback to a `vllm serve` child (API server + EngineCore). Both engines stay up for the whole
run and take turns request by request (the order alternates every round), so a load that changes during the
run changes both alike. Each request is a new question after the (cached) system prompt, greedy, up to
`--tokens` tokens; `--concurrency 2` runs two such streams at once (an FB and an AB of one session).

Per request, at the reader (the caller's event loop, where the pacer reads tokens): first token = submit to
first token; per token = the gaps between later tokens. Every question runs on both engines back to back (the
same prompt, and the outputs are checked to be the same tokens), and the hop's cost is the median of those
twins' differences, remote minus in-process. CPU time per token is counted for Duet's process and for vLLM's API
server process (the EngineCores, one per side, do the same work and are left out).

  .venv-vllm/bin/python bench/remote_brains.py --out bench/out/remote_brains.json      # ~6 min on 2 cores
  .venv-vllm/bin/python bench/remote_brains.py --rounds 1 --tokens 16                  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests_vllm"):  # the Duet packages, and the `vllm serve` launcher of the tests
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from vllm_server import VllmServer  # noqa: E402

from brains.backends.loader import load_tokenizer  # noqa: E402
from brains.backends.remote import RemoteEngine, vllm_serve_args  # noqa: E402
from brains.backends.vllm_engine import VllmEngine  # noqa: E402
from brains.engine import GenerationEngine, GenerationRequest  # noqa: E402
from brains.prompts import ChatMessage, PromptBuilder  # noqa: E402
from common.config import LlmConfig, MindConfig  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "How do plants make their food?",
    "What should I cook for dinner tonight?",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children: each side's EngineCore is a child)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_request(engine: GenerationEngine, prompt: list[int], tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    arrivals: list[float] = []
    ids: list[int] = []
    async for batch in engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=tokens, brain="fb")):
        now = time.perf_counter()
        # A batch of k tokens (one engine step's) arrives at once: its first token waited for the step, the
        # others did not; spread so every token counts once in the per-token gaps.
        arrivals.extend([now] * len(batch))
        ids.extend(batch)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {"first_token_s": arrivals[0] - t0 if arrivals else float("nan"), "gaps_s": gaps, "ids": ids,
            "tokens": len(arrivals), "total_s": time.perf_counter() - t0}


async def measure(engines: dict[str, GenerationEngine], prompts: PromptBuilder, rounds: int, tokens: int,
                  concurrency: list[int], server_pid: int) -> dict[str, Any]:
    """Runs every request on both engines back to back (same prompt, same tokens: checked), so each remote
    request has an in-process twin measured seconds apart; the hop is summarized from those pairs."""
    results: dict[str, Any] = {}
    for conc in concurrency:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
        cpu = {name: {"client_s": 0.0, "api_server_s": 0.0} for name in engines}
        for r in range(rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for q in range(len(QUESTIONS)):
                # A new user turn each time (the system prompt stays cached, as in a session).
                batch = [prompts.conversation([ChatMessage(
                    "user", f"{QUESTIONS[(q + i) % len(QUESTIONS)]} (take {r}.{i})")]) for i in range(conc)]
                for name in order:
                    c0, s0 = time.process_time(), cpu_seconds(server_pid)
                    runs[name].extend(await asyncio.gather(*(one_request(engines[name], p, tokens) for p in batch)))
                    cpu[name]["client_s"] += time.process_time() - c0
                    cpu[name]["api_server_s"] += cpu_seconds(server_pid) - s0
        local, remote = runs["in-process"], runs["remote"]
        same = sum(a["ids"] == b["ids"] for a, b in zip(local, remote, strict=True))
        out = {name: summarize(rs, cpu[name]) for name, rs in runs.items()}
        out["hop"] = hop(local, remote)
        out["identical_outputs"] = f"{same}/{len(local)}"
        results[f"concurrency_{conc}"] = out
    return results


def summarize(runs: list[dict[str, Any]], cpu: dict[str, float]) -> dict[str, Any]:
    first = [r["first_token_s"] * 1000 for r in runs]
    gaps = [g * 1000 for r in runs for g in r["gaps_s"]]
    tokens = sum(r["tokens"] for r in runs)
    return {
        "requests": len(runs), "tokens": tokens,
        "first_token_ms_p50": round(statistics.median(first), 2), "first_token_ms_p90": round(pct(first, 0.9), 2),
        "per_token_ms_p50": round(statistics.median(gaps), 2), "per_token_ms_p90": round(pct(gaps, 0.9), 2),
        "per_token_ms_mean": round(statistics.fmean(gaps), 2),
        # Duet's process (its client thread or AsyncLLM's output handling) and vLLM's API server, per token.
        "client_cpu_ms_per_token": round(cpu["client_s"] * 1000 / max(1, tokens), 3),
        "api_server_cpu_ms_per_token": round(cpu["api_server_s"] * 1000 / max(1, tokens), 3),
    }


def hop(local: list[dict[str, Any]], remote: list[dict[str, Any]]) -> dict[str, Any]:
    """Remote minus in-process, twin by twin: the median of the paired differences (a load that changes over
    the run moves both twins alike), with the spread of those differences."""
    first = [(b["first_token_s"] - a["first_token_s"]) * 1000 for a, b in zip(local, remote, strict=True)]
    per_token = [(statistics.fmean(b["gaps_s"]) - statistics.fmean(a["gaps_s"])) * 1000
                 for a, b in zip(local, remote, strict=True) if a["gaps_s"] and b["gaps_s"]]
    return {"first_token_ms_p50": round(statistics.median(first), 2),
            "first_token_ms_p25_p75": [round(pct(first, 0.25), 2), round(pct(first, 0.75), 2)],
            "per_token_ms_p50": round(statistics.median(per_token), 2),
            "per_token_ms_p25_p75": [round(pct(per_token, 0.25), 2), round(pct(per_token, 0.75), 2)]}


def table(results: dict[str, Any]) -> str:
    lines = ["| streams | backend | first token p50 ms | p90 | per token p50 ms | p90 | mean | client CPU ms/token "
             "| API server CPU ms/token |", "|---|---|---|---|---|---|---|---|---|"]
    for conc, by_name in results.items():
        n = conc.split("_")[1]
        for name in ("in-process", "remote"):
            s = by_name[name]
            lines.append(f"| {n} | {name} | {s['first_token_ms_p50']} | {s['first_token_ms_p90']} "
                         f"| {s['per_token_ms_p50']} | {s['per_token_ms_p90']} | {s['per_token_ms_mean']} "
                         f"| {s['client_cpu_ms_per_token']} | {s['api_server_cpu_ms_per_token']} |")
        h = by_name["hop"]
        lines.append(f"| {n} | **hop, paired p50 [p25, p75]** | **{h['first_token_ms_p50']:+.1f}** "
                     f"{h['first_token_ms_p25_p75']} | | **{h['per_token_ms_p50']:+.2f}** {h['per_token_ms_p25_p75']} "
                     f"| | | | |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a Hugging Face folder (default: the bundled SmolLM2, exported)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vllm

    tmp = None
    model = args.model
    if not model:
        from brains.backends.export import export_hf

        tmp = tempfile.TemporaryDirectory(prefix="smollm2-hf-")
        model = str(export_hf(tmp.name))
    llm = LlmConfig(model=model, backend="vllm", max_slots=8, max_seq_len=1024, vllm_kv_cache_gib=0.25)
    prompts = PromptBuilder(load_tokenizer(llm), llm, MindConfig())
    before = machine()
    # No stop ids beyond the model's own EOS (which both servers stop at): every request is the same work.
    local = VllmEngine(llm)
    local.start()
    try:
        with VllmServer(vllm_serve_args(llm, model, "bench")) as server:
            remote = RemoteEngine(dataclasses.replace(llm, backend="remote", remote_url=server.url))
            remote.start()
            try:
                engines: dict[str, GenerationEngine] = {"in-process": local, "remote": remote}
                pid = server.proc.pid if server.proc is not None else os.getpid()
                asyncio.run(measure(engines, prompts, 1, 4, [1], pid))  # warm both (first requests allocate)
                t0 = time.perf_counter()
                results = asyncio.run(measure(engines, prompts, args.rounds, args.tokens, args.concurrency, pid))
                wall = time.perf_counter() - t0
            finally:
                remote.close()
    finally:
        local.close()
        if tmp is not None:
            tmp.cleanup()
    report = {"machine": {**before, "load_avg_after": machine()["load_avg"]}, "vllm": vllm.__version__,
              "model": "SmolLM2-135M-Instruct float32" if not args.model else args.model, "rounds": args.rounds,
              "tokens": args.tokens, "questions": len(QUESTIONS), "wall_s": round(wall, 1), "results": results}
    print(json.dumps(report, indent=2))
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
