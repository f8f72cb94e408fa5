"""GPU engine benchmark (issue 5): is the torch engine fast enough for 64 speak-first sessions on one card?

In one run, with random weights of real architectures (step time does not depend on the values):
  (a) HBM bandwidth (copy, read, GEMV) and bf16 matmul rate; the decode-step floor = bytes / bandwidth;
  (b) decode step time at each batch size for: eager `DecoderLM.forward`, the CUDA-graph step (Triton
      split-KV attention), the same with torch.compile-fused elementwise work, and the graph step with
      gather+SDPA attention over the whole cache; plus correctness checks of graph replay vs eager; and a
      mixed step (64 decode rows + k prefill chunks of 128 tokens) as one ragged pass against the
      per-sequence way (k prefill graphs + the decode graph);
  (c) simulated speak-first sessions on the real `Engine` + `MindPacer`, each with a real-time playback
      clock (one reply token = --ms-per-token of audio): turn end -> first reply token p50/p95, underruns;
  (d) the same sessions served naively: one HF `generate()` per brain per turn, in threads.

  PYTHONPATH=. python3 bench/gpu_engine.py --out gpu.json --plot gpu.png    # on an H100 / H200
  python bench/gpu_engine.py --quick --out /tmp/quick.json                  # CPU smoke run, seconds
"""

# The parts live beside this script: gpu_kernels.py (a, b), gpu_sessions.py (c, d), gpu_common.py (shared).

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

# This script's sibling modules: found when it runs as a script, and when it is loaded by path (the tests).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import ARCHS, VARIANTS, Args, random_model
from gpu_kernels import decode_table, measure_bandwidth
from gpu_sessions import baseline_sessions, engine_sessions


def plot(result: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arch, tab in result.get("decode", {}).items():
        for variant in VARIANTS:
            rows = [r for r in tab["rows"] if r.get("variant") == variant and "ms_median" in r]
            if rows:
                ax1.plot([r["batch"] for r in rows], [r["ms_median"] for r in rows], "o-", label=f"{arch} {variant}")
        rows = [r for r in tab["rows"] if r.get("variant") == "graph" and "floor_ms" in r]
        if rows:
            ax1.plot([r["batch"] for r in rows], [r["floor_ms"] for r in rows], "k--", label=f"{arch} floor")
    ax1.set(xscale="log", yscale="log", xlabel="batch (rows per decode step)", ylabel="step ms (median)",
            title="decode step")
    ax1.legend(fontsize=7)
    for key, label in (("sessions", "engine"), ("baseline", "HF generate")):
        rows = [r for r in result.get(key, {}).get("rows", []) if r.get("first_token_ms_p95") is not None]
        if rows:
            ax2.plot([r["sessions"] for r in rows], [r["first_token_ms_p95"] for r in rows], "o-",
                     label=f"{label} p95")
            ax2.plot([r["sessions"] for r in rows], [r["first_token_ms_p50"] for r in rows], "o:",
                     label=f"{label} p50")
    ax2.axhline(150, color="r", lw=0.8, label="target 150 ms")
    ax2.set(xscale="log", yscale="log", xlabel="speak-first sessions", ylabel="turn end -> first reply token (ms)",
            title="sessions")
    ax2.legend(fontsize=7)
    fig.suptitle(result["meta"].get("device_name", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def print_summary(result: dict[str, Any]) -> None:
    print("\n== summary:", result["meta"].get("device_name", result["meta"]["device"]), result["meta"]["torch"])
    print("bandwidth", {k: round(v, 1) for k, v in result.get("bandwidth", {}).items()})
    for arch, tab in result.get("decode", {}).items():
        for c in tab["checks"]:
            print(arch, "check", c)
        for r in tab["rows"]:
            if "per_sequence_ms_median" in r:
                print(f"{arch:13s} {r['variant']:14s} B={r['batch']:4d} + {r['prefill_chunks']}x128 "
                      f"{r['ms_median']:8.3f} ms  per-sequence {r['per_sequence_ms_median']:8.3f} ms")
            elif "ms_median" in r:
                print(f"{arch:13s} {r['variant']:14s} B={r['batch']:4d} {r['ms_median']:8.3f} ms "
                      f"floor {r['floor_ms']:7.3f} x{r['ratio']:.2f}")
            else:
                print(arch, r)
    for key in ("sessions", "baseline"):
        for r in result.get(key, {}).get("rows", []):
            print(f"{key:9s} N={r['sessions']:4d} p50 {r['first_token_ms_p50']} p95 {r['first_token_ms_p95']} "
                  f"max {r['first_token_ms_max']} underruns {r['underruns']} ({r['underrun_ms']:.0f} ms) "
                  f"turns {r['turns']} missed {r['missed']} step {r.get('step_ms_mean')} "
                  f"p95 {r.get('step_ms_p95')} max {r.get('step_ms_max')} prefill-step p95 "
                  f"{r.get('prefill_step_ms_p95')} batch {r.get('max_batch')} busy {r.get('busy_frac')}")


def meta(device: torch.device, a: Args) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "quick": a.quick,
                            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, memory_gib=p.total_memory / 2**30, sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
    for mod in ("transformers", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def parse(argv: list[str] | None) -> Args:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_engine.json")
    p.add_argument("--plot", default="")
    p.add_argument("--quick", action="store_true", help="tiny architecture on the CPU, a few seconds")
    p.add_argument("--parts", default="abcd", help="which of a, b, c, d to run")
    p.add_argument("--archs", default="qwen2.5-0.5b,qwen3-8b")
    p.add_argument("--sim-arch", default="qwen3-8b")
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--sessions", default="1,8,32,64,128")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile-archs", default="qwen2.5-0.5b,qwen3-8b", help="archs that also time graph+compile")
    p.add_argument("--sim-variant", default="best", help="graph variant for (c); best = fastest at batch 1")
    p.add_argument("--ctx", type=int, default=512, help="context length of every row in (b)")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of new turns per session count")
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--ms-per-token", type=float, default=70.0, help="audio per reply token (~3 words/s)")
    p.add_argument("--reply-tokens", type=int, default=60)
    p.add_argument("--thought-tokens", type=int, default=160)
    p.add_argument("--thought-segment", type=int, default=80)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--switch-interval-ms", type=float, default=1.0,
                   help="sys.setswitchinterval: every torch op releases the GIL, and with the event loop busy the "
                        "engine thread waits up to this long to get it back (Python's default is 5 ms)")
    ns = p.parse_args(argv)
    sys.setswitchinterval(ns.switch_interval_ms / 1e3)
    a = Args(out=ns.out, plot=ns.plot, quick=ns.quick, parts=ns.parts, archs=ns.archs.split(","),
             sim_arch=ns.sim_arch, batches=[int(x) for x in ns.batches.split(",")],
             sessions=[int(x) for x in ns.sessions.split(",")], variants=ns.variants.split(","), ctx=ns.ctx,
             max_len=ns.max_len, duration=ns.duration, grace=ns.grace, ms_per_token=ns.ms_per_token,
             reply_tokens=ns.reply_tokens, thought_tokens=ns.thought_tokens, thought_segment=ns.thought_segment,
             device=ns.device, sim_variant=ns.sim_variant, compile_archs=tuple(ns.compile_archs.split(",")))
    if a.quick:  # CPU smoke run: the same code paths at toy sizes
        a = replace(a, archs=["tiny"], sim_arch="tiny", batches=[1, 4], sessions=[2], ctx=40, max_len=256,
                    duration=1.5, grace=3.0, reply_tokens=8, speech_s=(0.1, 0.3), thought_tokens=16, thought_segment=8,
                    variants=[v for v in a.variants if v != "graph+compile"], dtype=torch.float32)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    device = torch.device(a.device)
    result: dict[str, Any] = {"meta": meta(device, a), "args": {k: str(v) for k, v in asdict(a).items()}}
    result["meta"]["switch_interval_ms"] = sys.getswitchinterval() * 1e3
    out = Path(a.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    if device.type != "cuda" and not a.quick:
        result["skipped"] = "no CUDA device: the GPU benchmark needs one (--quick runs the CPU smoke version)"
        print(result["skipped"])
        save()
        return 0
    print(json.dumps(result["meta"]), flush=True)
    bw = measure_bandwidth(device, a.quick)
    result["bandwidth"] = bw
    print(f"(a) bandwidth {bw}", flush=True)
    save()
    if "b" in a.parts:
        result["decode"] = {}
        for name in a.archs:
            result["decode"][name] = decode_table(name, a, device, bw)
            save()
    variant = a.sim_variant
    if variant == "best":
        rows = [r for r in result.get("decode", {}).get(a.sim_arch, {}).get("rows", [])
                if r.get("batch") == 1 and r.get("variant", "").startswith("graph") and "ms_median" in r]
        variant = min(rows, key=lambda r: r["ms_median"])["variant"] if rows else "graph"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "c" in a.parts:
        print(f"(c) sessions on the engine, {a.sim_arch}, {variant}", flush=True)
        model = random_model(ARCHS[a.sim_arch], a.max_len, device, a.dtype)
        try:
            result["sessions"] = {"arch": a.sim_arch, **engine_sessions(model, a, variant)}
        except Exception as exc:  # keep what the other parts measured
            traceback.print_exc()
            result["sessions"] = {"arch": a.sim_arch, "variant": variant, "error": f"{type(exc).__name__}: {exc}"}
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if "d" in a.parts:
        print(f"(d) baseline, {a.sim_arch}", flush=True)
        try:
            result["baseline"] = {"arch": a.sim_arch, **baseline_sessions(ARCHS[a.sim_arch], a, device)}
        except ImportError as exc:
            result["baseline"] = {"skipped": f"transformers is not available: {exc}"}
        except Exception as exc:
            traceback.print_exc()
            result["baseline"] = {"arch": a.sim_arch, "error": f"{type(exc).__name__}: {exc}"}
        save()
    print_summary(result)
    if a.plot:
        result["plot"] = a.plot if plot(result, a.plot) else None
        save()
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
