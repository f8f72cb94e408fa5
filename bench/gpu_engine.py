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

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brains.backends.cuda_graphs import DEFAULT_BUCKETS, GraphedDecoder
from brains.backends.decoder import ArchSpec, DecoderLM, LayerWeights
from brains.backends.torch_backend import TorchBackend
from brains.engine import Engine
from brains.pacer import MindPacer, ReplyDelta
from brains.prompts import PromptBuilder
from brains.scheduler import SchedulerConfig
from common.config import LlmConfig, MindConfig

ARCHS = {
    "qwen3-8b": ArchSpec(36, 4096, 32, 8, 128, 12288, 151936, 1e-6, 1e6, qk_norm=True),
    "qwen2.5-0.5b": ArchSpec(24, 896, 14, 2, 64, 4864, 151936, 1e-6, 1e6, qkv_bias=True, tie_embeddings=True),
    "tiny": ArchSpec(2, 64, 4, 2, 16, 128, 32000, 1e-6, 1e6, qk_norm=True),
}
VARIANTS = ("eager", "graph", "graph+compile", "graph+sdpa")


@dataclass
class Args:
    out: str
    plot: str
    quick: bool
    parts: str
    archs: list[str]
    sim_arch: str
    batches: list[int]
    sessions: list[int]
    variants: list[str]
    ctx: int
    max_len: int
    duration: float
    grace: float
    ms_per_token: float
    reply_tokens: int
    thought_tokens: int
    thought_segment: int
    device: str
    speech_s: tuple[float, float] = (1.0, 3.0)  # how long a user speaks (and pauses before speaking)
    dtype: torch.dtype = torch.bfloat16
    sim_variant: str = "best"
    compile_archs: tuple[str, ...] = ("qwen2.5-0.5b", "qwen3-8b")


# ---- helpers ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Any, device: torch.device, iters: int, warmup: int = 3) -> list[float]:
    """Per-call times in ms: CUDA events on a GPU, the host clock (after a sync) elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in events]


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def random_model(spec: ArchSpec, max_len: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DecoderLM:
    return DecoderLM.random(spec, max_len, device, dtype, seed)


def step_bytes(spec: ArchSpec, batch: int, ctx: int, nbytes: int) -> int:
    """Bytes one decode step must read: every layer weight and the LM head once, the batch's embedding rows
    (not the whole table, which ArchSpec.weight_bytes counts), and each row's keys/values."""
    attn = spec.d_model * spec.head_dim * (2 * spec.n_heads + 2 * spec.n_kv_heads)
    layer = attn + 3 * spec.d_model * spec.ffn_dim + 2 * spec.d_model
    weights = spec.n_layers * layer + spec.vocab_size * spec.d_model + (batch + 1) * spec.d_model
    kv = batch * (ctx + 1) * spec.n_layers * 2 * spec.n_kv_heads * spec.head_dim
    return (weights + kv) * nbytes


def step_flops(spec: ArchSpec, batch: int, ctx: int) -> float:
    attn = spec.d_model * spec.head_dim * (2 * spec.n_heads + 2 * spec.n_kv_heads)
    params = spec.n_layers * (attn + 3 * spec.d_model * spec.ffn_dim) + spec.vocab_size * spec.d_model
    return 2.0 * batch * (params + spec.n_layers * 2 * spec.n_heads * spec.head_dim * (ctx + 1))


# ---- (a) bandwidth ------------------------------------------------------------------------------


def measure_bandwidth(device: torch.device, quick: bool) -> dict[str, float]:
    n = (16 if quick else 2048) * 2**20 // 2  # bf16 elements: 16 MiB quick, 2 GiB on the GPU
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    nb = x.numel() * 2
    copy = float(np.median(time_ms(lambda: y.copy_(x), device, 10 if quick else 20)))
    read = float(np.median(time_ms(lambda: x.sum(), device, 10 if quick else 20)))
    w = x.view(-1, 8192)
    v = torch.randn(8192, device=device, dtype=torch.bfloat16)
    gemv = float(np.median(time_ms(lambda: w @ v, device, 10 if quick else 20)))
    x = y = w = torch.empty(0)  # free 4 GiB before the matmul
    k = 512 if quick else 8192
    a = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    mm = float(np.median(time_ms(lambda: a @ b, device, 5 if quick else 20)))
    res = {"copy_gbs": 2 * nb / copy / 1e6, "read_gbs": nb / read / 1e6, "gemv_gbs": nb / gemv / 1e6,
           "matmul_tflops": 2 * k**3 / mm / 1e9}
    res["hbm_gbs"] = max(res["copy_gbs"], res["read_gbs"], res["gemv_gbs"])
    return res


# ---- (b) decode steps and correctness -----------------------------------------------------------


def make_decoder(variant: str, model: DecoderLM, cache: Any, scratch: int, buckets: list[int],
                 ragged_buckets: tuple[int, ...] = ()) -> GraphedDecoder:
    attention = "torch" if variant == "graph+sdpa" or model.device.type != "cuda" else "triton"
    gd = GraphedDecoder(model, cache, scratch_slot=scratch, buckets=buckets, attention=attention,  # type: ignore[arg-type]
                        compile=variant == "graph+compile", ragged_buckets=ragged_buckets)
    gd.capture()
    return gd


def check_variant(variant: str, model: DecoderLM, ref: DecoderLM, seed: int = 1) -> dict[str, Any]:
    """Prefill rows of different lengths (crossing split boundaries) through the variant's prefill graphs and
    through eager `ref.forward`, then two decode steps each: relative error of the logits, argmax agreement."""
    dev = model.device
    ctxs = [c for c in (2, 37, 255, 256, 300, 511) if c < model.max_len - 2]
    n = len(ctxs)
    g = torch.Generator().manual_seed(seed)
    cache, ref_cache = model.new_cache(n + 1), ref.new_cache(n)
    gd = make_decoder(variant, model, cache, n, [8])
    errs, agree, pre_errs = [], [], []

    def compare(out: torch.Tensor, want: torch.Tensor, errs: list[float]) -> None:
        out, want = out.float(), want.float()
        errs.append(float((out - want).norm() / want.norm()) if bool(torch.isfinite(out).all()) else float("nan"))
        agree.append(float((out.argmax(-1) == want.argmax(-1)).float().mean()))

    for row, c in enumerate(ctxs):  # chunks of up to 100 tokens: several prefill buckets and offsets
        toks = torch.randint(0, model.spec.vocab_size, (c,), generator=g)
        for i in range(0, c, 100):
            t, p = toks[i:i + 100], torch.arange(i, min(i + 100, c))
            out = gd.prefill(t, p, row)
            want = ref.forward(ref_cache, t[None].to(dev), p[None].to(dev), torch.tensor([row], device=dev),
                               kv_len=int(p[-1]) + 1)
        compare(out, want, pre_errs)
    slots = torch.arange(n)
    for step in range(2):
        tok = torch.randint(0, model.spec.vocab_size, (n,), generator=g)
        pos = torch.tensor(ctxs) + step
        if gd.graphs:
            with torch.inference_mode():
                gd.output(8).fill_(float("nan"))  # poison: every row must be written by the replay
        out = gd.decode(tok, pos, slots)
        want = ref.forward(ref_cache, tok[:, None].to(dev), pos[:, None].to(dev), slots.to(dev),
                           kv_len=int(pos.max()) + 1)
        compare(out, want, errs)
    del gd, cache, ref_cache
    return {"variant": variant, "ref_dtype": str(ref.dtype), "ctxs": ctxs, "prefill_rel_err": pre_errs,
            "rel_err": errs, "argmax_agree": agree}


def check_ragged(variant: str, model: DecoderLM, ref: DecoderLM, seed: int = 2) -> dict[str, Any]:
    """One mixed step through the ragged graphs (decode rows at contexts crossing split boundaries; a 100-token
    chunk; a 37-token chunk that completes its prompt and decodes in the same step) against eager `ref.forward`
    run per sequence. Logits: relative error and argmax agreement of the decode rows."""
    dev = model.device
    ctxs = [c for c in (37, 255, 256, 511) if c < model.max_len - 2]
    n = len(ctxs) + 2
    g = torch.Generator().manual_seed(seed)
    cache, ref_cache = model.new_cache(n + 1), ref.new_cache(n)
    gd = make_decoder(variant, model, cache, n, [8], ragged_buckets=(256,))
    vocab = model.spec.vocab_size
    for row, c in enumerate(ctxs):
        toks = torch.randint(0, vocab, (1, c), generator=g).to(dev)
        pos, slot = torch.arange(c, device=dev)[None], torch.tensor([row], device=dev)
        model.forward(cache, toks, pos, slot, kv_len=c)
        ref.forward(ref_cache, toks, pos, slot, kv_len=c)
    dec = torch.randint(0, vocab, (len(ctxs),), generator=g)
    p_tok, q_tok = torch.randint(0, vocab, (100,), generator=g), torch.randint(0, vocab, (38,), generator=g)
    tokens = torch.cat([dec, p_tok, q_tok])
    positions = torch.cat([torch.tensor(ctxs), torch.arange(100), torch.arange(38)])
    slots = torch.cat([torch.arange(len(ctxs)), torch.full((100,), n - 2), torch.full((38,), n - 1)])
    rows = torch.tensor([*range(len(ctxs)), len(tokens) - 1])
    if gd.graphs:
        with torch.inference_mode():
            gd._head[8][3].fill_(float("nan"))  # poison: every row must be written by the replay
    out = gd.ragged(tokens, positions, slots, rows).float()
    want = []
    for row, c in enumerate(ctxs):
        want.append(ref.forward(ref_cache, dec[row].view(1, 1).to(dev), torch.tensor([[c]], device=dev),
                                torch.tensor([row], device=dev), kv_len=c + 1)[0])
    ref.forward(ref_cache, p_tok[None].to(dev), torch.arange(100, device=dev)[None], torch.tensor([n - 2], device=dev),
                kv_len=100)
    want.append(ref.forward(ref_cache, q_tok[None].to(dev), torch.arange(38, device=dev)[None],
                            torch.tensor([n - 1], device=dev), kv_len=38)[0])
    w = torch.stack(want).float()
    err = float((out - w).norm() / w.norm()) if bool(torch.isfinite(out).all()) else float("nan")
    agree = float((out.argmax(-1) == w.argmax(-1)).float().mean())
    del gd, cache, ref_cache
    return {"variant": f"{variant}:ragged", "ctxs": ctxs, "rel_err": [err], "argmax_agree": [agree]}


def decode_table(name: str, a: Args, device: torch.device, bw: dict[str, float]) -> dict[str, Any]:
    spec = ARCHS[name]
    model = random_model(spec, a.max_len, device, a.dtype)
    nbytes = torch.tensor([], dtype=a.dtype).element_size()
    res: dict[str, Any] = {"arch": name, "spec": asdict(spec), "ctx": a.ctx, "checks": [], "rows": [],
                           "bytes_b1": step_bytes(spec, 1, a.ctx, nbytes)}
    ref = model
    if name != "qwen3-8b":  # small enough for a float32 reference with the same weights
        ref = DecoderLM(spec, model.embed.float(), [LayerWeights(**{k: (v.float() if v is not None else None)
                        for k, v in vars(w).items()}) for w in model.layers], model.norm.float(),
                        model.lm_head.float(), a.max_len)
    variants = [v for v in a.variants if v != "graph+compile" or name in a.compile_archs]
    for variant in variants:
        if variant == "eager":
            continue
        checks = [check_variant] + ([check_ragged] if variant != "graph+sdpa" else [])
        for check in checks:
            try:
                res["checks"].append(check(variant, model, ref))
            except Exception as exc:  # record and go on: one broken variant must not lose the rest
                traceback.print_exc()
                res["checks"].append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
            print(f"[{name}] check {res['checks'][-1]}", flush=True)
    del ref
    gc.collect()
    maxb = max(a.batches)
    cache = model.new_cache(maxb + 1)
    cache.k.normal_()
    cache.v.normal_()
    for variant in variants:
        try:
            res["rows"] += time_variant(variant, model, cache, a, device, bw, nbytes)
        except Exception as exc:
            res["rows"].append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
            print(f"[{name}] {variant} failed: {exc}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del cache, model
    return res


def time_variant(variant: str, model: DecoderLM, cache: Any, a: Args, device: torch.device, bw: dict[str, float],
                 nbytes: int) -> list[dict[str, Any]]:
    spec, maxb = model.spec, max(a.batches)
    batches = [b for b in a.batches if variant not in ("eager", "graph+sdpa") or b in (1, 8, 64) or a.quick]
    mixed = variant in ("graph", "graph+compile") and device.type == "cuda" and maxb >= 64 and a.ctx + 129 < a.max_len
    gd = None if variant == "eager" else make_decoder(variant, model, cache, maxb, batches,
                                                      ragged_buckets=(192, 320, 448) if mixed else ())
    rows = []
    for b in batches:
        tok = torch.randint(0, spec.vocab_size, (b,), device=device)
        pos = torch.full((b,), a.ctx, dtype=torch.long, device=device)
        slots = torch.arange(b, device=device)
        if gd is None:
            def fn(tok: torch.Tensor = tok, pos: torch.Tensor = pos, slots: torch.Tensor = slots) -> None:
                model.forward(cache, tok[:, None], pos[:, None], slots, kv_len=a.ctx + 1)
        elif gd.graphs:
            gd.decode(tok, pos, slots)  # loads the bucket's static inputs
            fn = lambda gd=gd, b=b: gd.replay(gd.bucket(b))  # noqa: E731
        else:
            fn = lambda gd=gd, tok=tok, pos=pos, slots=slots: gd.decode(tok, pos, slots)  # noqa: E731
        ts = time_ms(fn, device, 5 if a.quick else (10 if variant == "eager" else 30))
        floor = max(step_bytes(spec, b, a.ctx, nbytes) / (bw["hbm_gbs"] * 1e6),
                    step_flops(spec, b, a.ctx) / (bw["matmul_tflops"] * 1e9))
        med = float(np.median(ts))
        rows.append({"variant": variant, "batch": b, "ms_median": med, "ms_p10": pct(ts, 10), "ms_p90": pct(ts, 90),
                     "floor_ms": floor, "ratio": med / floor, "tokens_per_s": b / med * 1e3,
                     "capture_s": gd.capture_seconds if gd else 0.0})
        print(f"  {variant:14s} B={b:4d} {med:8.3f} ms  floor {floor:7.3f} ms  x{med / floor:5.2f}", flush=True)
    for tb in (16, 128) if gd is not None and gd.graphs else ():  # one prefill chunk of one sequence
        gd.prefill(torch.randint(0, spec.vocab_size, (tb,)), torch.arange(a.ctx, a.ctx + tb), 0)
        ts = time_ms(lambda gd=gd, tb=tb: gd.replay_prefill(tb), device, 20)
        floor = max(step_bytes(spec, 1, a.ctx + tb, nbytes) / (bw["hbm_gbs"] * 1e6),
                    step_flops(spec, tb, a.ctx) / (bw["matmul_tflops"] * 1e9))
        med = float(np.median(ts))
        rows.append({"variant": f"{variant}:prefill", "batch": tb, "ms_median": med, "ms_p10": pct(ts, 10),
                     "ms_p90": pct(ts, 90), "floor_ms": floor, "ratio": med / floor, "tokens_per_s": tb / med * 1e3,
                     "capture_s": gd.capture_seconds})
        print(f"  {variant}:prefill T={tb:4d} {med:8.3f} ms  floor {floor:7.3f} ms", flush=True)
    for k in (1, 2, 3) if mixed and gd is not None else ():
        # 64 decode rows at ctx, then k chunks of 128 tokens (slots 0..k-1 at ctx+1..ctx+128): one ragged pass
        # against k one-sequence prefill graphs + the 64-row decode graph (the engine's way before).
        b = 64
        tokens = torch.randint(0, spec.vocab_size, (b + 128 * k,))
        positions = torch.cat([torch.full((b,), a.ctx)] + [torch.arange(a.ctx + 1, a.ctx + 129)] * k)
        slots = torch.cat([torch.arange(b)] + [torch.full((128,), i) for i in range(k)])
        gd.ragged(tokens, positions, slots, torch.arange(b))
        nb, bb = next(x for x in gd.ragged_buckets if x >= len(tokens)), gd.bucket(b)
        ts = time_ms(lambda gd=gd, nb=nb, bb=bb: gd.replay_ragged(nb, bb), device, 20)
        gd.decode(tokens[:b], positions[:b], slots[:b])
        gd.prefill(tokens[b:b + 128], positions[b:b + 128], 0)

        def old(gd: GraphedDecoder = gd, k: int = k) -> None:
            for _ in range(k):
                gd.replay_prefill(128)
            gd.replay(gd.bucket(64))

        ts_old = time_ms(old, device, 20)
        med, med_old = float(np.median(ts)), float(np.median(ts_old))
        rows.append({"variant": f"{variant}:mixed", "batch": b, "prefill_chunks": k, "tokens": len(tokens),
                     "bucket": nb, "ms_median": med, "ms_p10": pct(ts, 10), "ms_p90": pct(ts, 90),
                     "per_sequence_ms_median": med_old, "capture_s": gd.capture_seconds})
        print(f"  {variant}:mixed B=64 + {k}x128 ({nb}) {med:8.3f} ms   per-sequence {med_old:8.3f} ms", flush=True)
    del gd
    return rows


# ---- (c), (d) simulated sessions ----------------------------------------------------------------


class SimTokenizer:
    """Enough of a tokenizer for PromptBuilder: every token reads as one word ending a sentence."""

    eos_token_id = None
    unk_token_id = -1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [(ord(c) * 31 + i) % 1000 + 10 for i, c in enumerate(text)]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return " w." * len(ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id


class PlaybackClock:
    """The client's audio queue: reply tokens add audio, playback drains it in real time."""

    def __init__(self, ms_per_token: float) -> None:
        self.ms = ms_per_token
        self.end: float | None = None
        self.underruns = 0
        self.gap_ms = 0.0

    def ahead_ms(self) -> float:
        return 0.0 if self.end is None else max(0.0, (self.end - time.perf_counter()) * 1e3)

    def push(self, n: int, now: float) -> None:
        if self.end is None:
            self.end = now
        elif now > self.end:  # the queue ran dry before this audio arrived: an audible gap
            self.underruns += 1
            self.gap_ms += (now - self.end) * 1e3
            self.end = now
        self.end += n * self.ms / 1e3


@dataclass
class SimResult:
    latencies_ms: list[float] = field(default_factory=list)
    underruns: int = 0
    gap_ms: float = 0.0
    turns: int = 0
    missed: int = 0  # turns whose first reply token never came before the run was stopped
    reply_tokens: int = 0


def _user_turn(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 30000) for _ in range(n)]


async def _session(i: int, a: Args, deadline: float, res: SimResult, reply: Any) -> None:
    """One simulated caller: speaks, waits for the reply to play out, speaks again, until the deadline."""
    rng = random.Random(1000 + i)
    system = _user_turn(random.Random(7), 96)  # one system prompt shared by all sessions
    conv = system + _user_turn(rng, rng.randrange(20, 60))
    await asyncio.sleep(rng.uniform(0.0, a.speech_s[1]) + rng.uniform(*a.speech_s))
    while time.perf_counter() < deadline:
        clock = PlaybackClock(a.ms_per_token)
        t_end = time.perf_counter()
        res.turns += 1
        res.missed += 1  # until the first token arrives
        first, n = await reply(i, conv, clock, t_end)
        if first is not None:
            res.missed -= 1
            res.latencies_ms.append((first - t_end) * 1e3)
        res.underruns += clock.underruns
        res.gap_ms += clock.gap_ms
        res.reply_tokens += n
        if time.perf_counter() >= deadline:
            break
        await asyncio.sleep(max(0.0, (clock.end or 0.0) - time.perf_counter()) + rng.uniform(*a.speech_s))
        conv = conv + _user_turn(rng, n) + _user_turn(rng, rng.randrange(20, 60))
        if len(conv) > a.max_len // 2:  # keep the system prompt and the recent history
            conv = system + conv[-(a.max_len // 2 - len(system)):]


async def _run_sessions(n: int, a: Args, reply: Any) -> SimResult:
    res = SimResult()
    deadline = time.perf_counter() + a.duration
    tasks = [asyncio.create_task(_session(i, a, deadline, res, reply)) for i in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=a.duration + a.grace)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return res


def _summary(n: int, res: SimResult, wall: float, extra: dict[str, Any]) -> dict[str, Any]:
    lat = res.latencies_ms
    return {"sessions": n, "turns": res.turns, "replies": len(lat), "missed": res.missed,
            "first_token_ms_p50": pct(lat, 50), "first_token_ms_p95": pct(lat, 95),
            "first_token_ms_max": max(lat) if lat else None, "underruns": res.underruns,
            "underrun_ms": res.gap_ms, "reply_tokens": res.reply_tokens, "wall_s": wall, **extra}


class TimedEngine(Engine):
    """The engine, recording each step's host time (including the decode's sync) and whether it prefilled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_times: list[tuple[float, bool]] = []

    def _execute(self, plan: Any) -> None:
        t0 = time.perf_counter()
        super()._execute(plan)
        self.step_times.append(((time.perf_counter() - t0) * 1e3, bool(plan.prefill)))


def _step_stats(times: list[tuple[float, bool]]) -> dict[str, Any]:
    all_ms = [t for t, _ in times]
    pre = [t for t, p in times if p]
    return {"step_ms_p50": pct(all_ms, 50), "step_ms_p95": pct(all_ms, 95), "step_ms_max": max(all_ms, default=None),
            "prefill_steps": len(pre), "prefill_step_ms_p50": pct(pre, 50), "prefill_step_ms_p95": pct(pre, 95),
            "prefill_step_ms_max": max(pre, default=None)}


def engine_sessions(model: DecoderLM, a: Args, variant: str) -> dict[str, Any]:
    cuda = model.device.type == "cuda"
    slots = int(2.5 * max(a.sessions)) + 8
    max_batch = 2 * max(a.sessions)
    buckets = sorted({b for b in (*DEFAULT_BUCKETS, 192, 256) if b < max_batch} | {max_batch})
    t0 = time.perf_counter()
    backend = TorchBackend(model, slots, cuda_graphs=True, graph_buckets=buckets, logits_on_device=cuda,
                           attention="torch" if variant == "graph+sdpa" or not cuda else "triton",
                           compile=variant == "graph+compile")
    setup = time.perf_counter() - t0
    llm = LlmConfig(max_reply_tokens=a.reply_tokens, temperature=0.0, max_seq_len=a.max_len)
    mind = MindConfig(mode="speak-first", thought_segment_tokens=a.thought_segment,
                      reply_segment_tokens=100, max_thought_tokens=a.thought_tokens)
    prompts = PromptBuilder(SimTokenizer(), llm, mind)
    sched = SchedulerConfig(token_budget=max_batch + 128, max_batch=max_batch, prefill_chunk=128)
    rows = []
    for run, n in enumerate([1, *a.sessions]):  # run 0 warms up the eager prefill path and is dropped
        warmup = run == 0 and not a.quick
        engine = TimedEngine(backend, sched)
        engine.start()

        async def reply(i: int, conv: list[int], clock: PlaybackClock, t_end: float,
                        engine: Engine = engine) -> tuple[float | None, int]:
            pacer = MindPacer(engine, prompts, mind, llm, "speak-first", session_id=f"s{i}",
                              audio_ahead_ms=clock.ahead_ms)
            first, count = None, 0
            async for ev in pacer.run(conv):
                if isinstance(ev, ReplyDelta):
                    now = time.perf_counter()
                    first = first or now
                    k = ev.text.count("w")
                    clock.push(k, now)
                    count += k
            return first, count

        t0 = time.perf_counter()
        res = asyncio.run(_run_sessions(n, replace(a, duration=3.0, speech_s=(0.2, 0.5)) if warmup else a, reply))
        wall = time.perf_counter() - t0
        engine.close()
        st = engine.stats
        extra = {"engine_steps": st.steps, "step_ms_mean": st.busy_seconds / max(1, st.steps) * 1e3,
                 "decode_tok_s": st.decode_tokens / wall, "max_batch": st.max_batch,
                 "prefill_tokens": st.prefill_tokens, "prefill_saved": st.prefill_tokens_saved,
                 "busy_frac": st.busy_seconds / wall, **_step_stats(engine.step_times)}
        if not warmup:
            rows.append(_summary(n, res, wall, extra))
            print(f"  engine  {n:4d} sessions: {rows[-1]}", flush=True)
    del backend
    return {"variant": variant, "slots": slots, "buckets": buckets, "setup_s": setup,
            "scheduler": asdict(sched), "rows": rows}


def hf_model(spec: ArchSpec, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    cls = Qwen3Config if spec.qk_norm else Qwen2Config
    kw = dict(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.ffn_dim,
              num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
              num_key_value_heads=spec.n_kv_heads, rms_norm_eps=spec.rms_eps, max_position_embeddings=32768,
              tie_word_embeddings=spec.tie_embeddings)
    if spec.qk_norm:
        kw["head_dim"] = spec.head_dim
    try:
        cfg = cls(rope_theta=spec.rope_theta, **kw)
    except TypeError:
        cfg = cls(**kw)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def baseline_sessions(spec: ArchSpec, a: Args, device: torch.device) -> dict[str, Any]:
    """A naive server: per turn, one generate() per brain (FB thought, AB reply), each in its own thread."""
    hf = hf_model(spec, device, a.dtype if device.type == "cuda" else torch.float32)
    rows = []
    for run, n in enumerate([1, *a.sessions]):  # run 0 warms up and is dropped
        warmup = run == 0 and not a.quick
        t0 = time.perf_counter()
        res = _baseline_run(hf, n, replace(a, duration=3.0, speech_s=(0.2, 0.5)) if warmup else a, device)
        if not warmup:
            rows.append(_summary(n, res, time.perf_counter() - t0, {}))
            print(f"  hf      {n:4d} sessions: {rows[-1]}", flush=True)
    return {"kind": "hf-generate", "cache": "dynamic (generate's default)", "threads": "2 per session",
            "rows": rows}


class _HFStreamer:
    """transformers' streamer protocol: the first put() is the prompt, then one per new token."""

    def __init__(self, on_token: Any) -> None:
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.on_token(int(value.numel()))
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _baseline_run(hf: Any, n: int, a: Args, device: torch.device) -> SimResult:
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    stop = threading.Event()
    prompts = PromptBuilder(SimTokenizer(), LlmConfig(), MindConfig())

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def generate(prompt: list[int], max_new: int, on_token: Any) -> None:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
                        do_sample=False, streamer=_HFStreamer(on_token), pad_token_id=0,
                        stopping_criteria=StoppingCriteriaList([Stop()]))

    pool = ThreadPoolExecutor(max_workers=2 * n)

    async def reply(i: int, conv: list[int], clock: PlaybackClock, t_end: float) -> tuple[float | None, int]:
        state: dict[str, Any] = {"first": None, "n": 0}

        def on_ab(k: int) -> None:
            now = time.perf_counter()
            state["first"] = state["first"] or now
            clock.push(k, now)
            state["n"] += k

        loop = asyncio.get_running_loop()
        fb = loop.run_in_executor(pool, generate, prompts.fb_prompt(conv), a.thought_tokens, lambda k: None)
        ab = loop.run_in_executor(pool, generate, prompts.ab_prompt(conv, [], []), a.reply_tokens, on_ab)
        await asyncio.gather(fb, ab)
        return state["first"], state["n"]

    try:
        return asyncio.run(_run_sessions(n, a, reply))
    finally:
        stop.set()  # generate() calls still running end at their next token
        pool.shutdown(wait=True)


# ---- driver -------------------------------------------------------------------------------------


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
