"""Shared by the GPU engine benchmark's parts (`gpu_engine.py` runs them): the architectures, the parsed
command line (`Args`), and timing helpers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brains.backends.decoder import ArchSpec, DecoderLM

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

