"""Parts (a) and (b) of the GPU engine benchmark (`gpu_engine.py`): HBM bandwidth and matmul rate; decode,
prefill and mixed (ragged) step times per variant and batch size against the bandwidth floor, and correctness
checks of graph replay against the eager forward."""

from __future__ import annotations

import gc
import traceback
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from gpu_common import ARCHS, Args, pct, random_model, time_ms

from brains.backends.cuda_graphs import GraphedDecoder
from brains.backends.decoder import ArchSpec, DecoderLM, LayerWeights


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
