"""The fixed-shape decode step (CUDA graphs on GPU, eager on CPU) against the reference forward."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from brains.backends import attention_kernels
from brains.backends.attention_kernels import attention_torch
from brains.backends.cuda_graphs import GraphedDecoder
from brains.backends.decode_step import DecodeStep
from brains.backends.decoder import ArchSpec, DecoderLM
from brains.backends.torch_backend import TorchBackend
from brains.engine import Engine, GenerationRequest
from brains.scheduler import SchedulerConfig

QWEN3ISH = ArchSpec(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, vocab_size=300,
                    rms_eps=1e-6, rope_theta=1e6, qk_norm=True)
# Qwen2-like: q/k/v bias, tied embeddings, 3 query heads per kv head (not a power of two).
QWEN2ISH = ArchSpec(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=80, vocab_size=300,
                    rms_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=True)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs, Triton attention)")


def _prefilled(model: DecoderLM, lengths: list[int], slots: int, seed: int = 0) -> tuple:
    """Two identical caches with one prompt of each length prefilled through the reference forward."""
    g = torch.Generator().manual_seed(seed)
    caches = model.new_cache(slots), model.new_cache(slots)
    dev = model.device
    for row, n in enumerate(lengths):
        toks = torch.randint(0, model.spec.vocab_size, (1, n), generator=g).to(dev)
        for c in caches:
            model.forward(c, toks, torch.arange(n, device=dev)[None], torch.tensor([row], device=dev), kv_len=n)
    return caches


@pytest.mark.parametrize("spec", [QWEN3ISH, QWEN2ISH], ids=["qwen3ish", "qwen2ish"])
def test_static_step_matches_forward_on_cpu(spec: ArchSpec) -> None:
    model = DecoderLM.random(spec, 96, "cpu", torch.float32, seed=3)
    lengths = [1, 17, 60]
    ref_cache, cache = _prefilled(model, lengths, slots=len(lengths) + 1)
    gd = GraphedDecoder(model, cache, scratch_slot=len(lengths))
    assert not gd.graphs  # CPU: the same step, run eagerly
    slots = torch.arange(len(lengths))
    pos = torch.tensor(lengths)
    for _ in range(3):  # several steps: each must also have written its key/value correctly
        tok = torch.randint(0, spec.vocab_size, (len(lengths),))
        want = model.forward(ref_cache, tok[:, None], pos[:, None], slots, kv_len=int(pos.max()) + 1)
        got = gd.decode(tok, pos, slots)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        pos = pos + 1
    torch.testing.assert_close(cache.k, ref_cache.k)
    torch.testing.assert_close(cache.v, ref_cache.v)


def test_chunked_prefill_matches_forward_on_cpu() -> None:
    model = DecoderLM.random(QWEN3ISH, 96, "cpu", torch.float32, seed=4)
    ref_cache, cache = model.new_cache(3), model.new_cache(3)
    gd = GraphedDecoder(model, cache, scratch_slot=2, prefill_buckets=(4, 8))
    toks = torch.randint(0, QWEN3ISH.vocab_size, (21,))
    got = gd.prefill(toks, torch.arange(21), 1)  # pieces of 8, 8 and 5 tokens
    want = model.forward(ref_cache, toks[None], torch.arange(21)[None], torch.tensor([1]), kv_len=21)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.k[:, 1, :, :21], ref_cache.k[:, 1, :, :21])
    torch.testing.assert_close(cache.v[:, 1, :, :21], ref_cache.v[:, 1, :, :21])


def test_attention_torch_reads_only_up_to_each_rows_position() -> None:
    torch.manual_seed(0)
    kc, vc = torch.randn(4, 2, 32, 8), torch.randn(4, 2, 32, 8)
    q, kn, vn = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    slots, pos = torch.tensor([3, 1]), torch.tensor([5, 20])
    out = attention_torch(q, kn, vn, kc.clone(), vc.clone(), slots, pos)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, :, 21:] = 1e3  # garbage past every row's position must not matter
    vc2[:, :, 21:] = 1e3
    kc2[3, :, 6:] = 1e3
    vc2[3, :, 6:] = 1e3
    torch.testing.assert_close(attention_torch(q, kn, vn, kc2, vc2, slots, pos), out)


def test_compiled_step_matches_plain_on_cpu() -> None:
    pytest.importorskip("torch._inductor")
    model = DecoderLM.random(QWEN3ISH, 32, "cpu", torch.float32, seed=5)
    cache = model.new_cache(3)
    tok, pos, slots = torch.tensor([5, 9]), torch.tensor([0, 3]), torch.tensor([0, 1])
    try:
        got = DecodeStep(model, cache, "torch", compile=True)(tok, pos, slots)
    except Exception as exc:  # no C++ compiler for Inductor's CPU backend, etc.
        pytest.skip(f"torch.compile unavailable here: {exc}")
    want = DecodeStep(model, cache, "torch")(tok, pos, slots)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_backend_keeps_its_old_constructor() -> None:
    model = DecoderLM.random(QWEN3ISH, 32, "cpu", torch.float32)
    backend = TorchBackend(model, 3)
    assert backend.graphs is None and backend.cache.slots == 3 and backend.slots == 3
    graphed = TorchBackend(model, 3, cuda_graphs=True)
    assert graphed.graphs is not None and graphed.cache.slots == 4 and graphed.slots == 3


async def _generate(backend: TorchBackend, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(backend, SchedulerConfig(prefill_chunk=8))
    engine.start()
    try:
        streams = [engine.submit(GenerationRequest(prompt=p, max_new_tokens=6)) for p in prompts]
        outs = []
        for s in streams:
            outs.append([t async for batch in s for t in batch])
        return outs
    finally:
        engine.close()


async def test_engine_generates_the_same_tokens_with_the_graphed_backend() -> None:
    model = DecoderLM.random(QWEN2ISH, 64, "cpu", torch.float32, seed=11)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 40], [7]]
    plain = await _generate(TorchBackend(model, 4), prompts)
    graphed = await _generate(TorchBackend(model, 4, cuda_graphs=True), prompts)
    assert plain == graphed and all(len(o) == 6 for o in plain)


@needs_cuda
@pytest.mark.parametrize("attention", ["triton", "torch"])
def test_graph_replay_matches_eager_on_cuda(attention: str) -> None:
    if attention == "triton" and attention_kernels.triton is None:
        pytest.skip("Triton is not installed")
    model = DecoderLM.random(QWEN3ISH, 640, "cuda", torch.bfloat16, seed=2)
    lengths = [1, 255, 256, 300, 600]  # crossing the split-KV boundaries
    ref_cache, cache = _prefilled(model, lengths, slots=len(lengths) + 1)
    gd = GraphedDecoder(model, cache, scratch_slot=len(lengths), buckets=(1, 8), attention=attention,  # type: ignore[arg-type]
                        prefill_buckets=(16, 64))
    gd.capture()
    toks = torch.randint(0, QWEN3ISH.vocab_size, (150,))
    got = gd.prefill(toks, torch.arange(150), 0)  # rewrites slot 0 through the prefill graphs (64, 64, 22)
    want = model.forward(ref_cache, toks[None].cuda(), torch.arange(150, device="cuda")[None],
                         torch.tensor([0], device="cuda"), kv_len=150)
    assert float((got - want).norm() / want.norm()) < 3e-2
    lengths[0] = 150
    slots, pos = torch.arange(len(lengths)), torch.tensor(lengths)
    for _ in range(2):
        tok = torch.randint(0, QWEN3ISH.vocab_size, (len(lengths),))
        want = model.forward(ref_cache, tok[:, None].cuda(), pos[:, None].cuda(), slots.cuda(),
                             kv_len=int(pos.max()) + 1)
        got = gd.decode(tok, pos, slots)
        assert float((got - want).norm() / want.norm()) < 3e-2
        pos = pos + 1


@needs_cuda
def test_triton_attention_matches_torch_on_cuda() -> None:
    if attention_kernels.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    for heads, kvh, hd in ((32, 8, 128), (14, 2, 64)):
        kc = torch.randn(5, kvh, 700, hd, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(4, heads, hd, device="cuda", dtype=torch.bfloat16)
        kn, vn = torch.randn(4, kvh, hd, device="cuda", dtype=torch.bfloat16), torch.randn(4, kvh, hd, device="cuda",
                                                                                          dtype=torch.bfloat16)
        slots, pos = torch.tensor([4, 0, 2, 1], device="cuda"), torch.tensor([0, 255, 256, 699], device="cuda")
        want = attention_torch(q.float(), kn.float(), vn.float(), kc.float(), vc.float(), slots, pos)
        kc2, vc2 = kc.clone(), vc.clone()
        got = attention_kernels.attention_triton(q, kn, vn, kc2, vc2, slots, pos)
        assert float((got.float() - want).norm() / want.norm()) < 1e-2
        kc[slots, :, pos] = kn
        assert torch.equal(kc2, kc)


def _ragged_attention_case(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One ragged batch through `attention_ragged_triton` and the torch reference: decode rows at positions 0
    (only its own key), 256 (a split boundary) and 699 (the last), a 20-token chunk at 250..269 (two row groups,
    across a split boundary), a padding row on the scratch slot, and padding groups of length 0."""
    g = torch.Generator().manual_seed(1)
    kvh, heads, hd = 2, 8, 64
    kc = torch.randn(5, kvh, 700, hd, generator=g).to(device, dtype)
    vc = torch.randn(5, kvh, 700, hd, generator=g).to(device, dtype)
    slots = torch.tensor([4, *[0] * 20, 2, 1, 3], device=device)
    pos = torch.tensor([0, *range(250, 270), 256, 699, 0], device=device)
    q = torch.randn(len(slots), heads, hd, generator=g).to(device, dtype)
    kn = torch.randn(len(slots), kvh, hd, generator=g).to(device, dtype)
    vn = torch.randn(len(slots), kvh, hd, generator=g).to(device, dtype)
    want = attention_torch(q.float(), kn.float(), vn.float(), kc.float(), vc.float(), slots, pos)
    kc[slots, :, pos], vc[slots, :, pos] = kn, vn  # the ragged kernel reads the new keys from the cache
    starts, lens = attention_kernels.ragged_groups(slots.tolist())
    assert lens == [1, 16, 4, 1, 1, 1]
    pad = [0] * 3  # groups past the real ones have length 0 (as in the captured graphs) and store nothing
    gstart, glen = torch.tensor(starts + pad, device=device), torch.tensor(lens + pad, device=device)
    got = attention_kernels.attention_ragged_triton(q, kc, vc, slots, pos, gstart, glen)
    return got.float(), want


@needs_cuda
def test_ragged_triton_attention_matches_torch_on_cuda() -> None:
    if attention_kernels.triton is None:
        pytest.skip("Triton is not installed")
    got, want = _ragged_attention_case("cuda", torch.bfloat16)
    assert float((got - want).norm() / want.norm()) < 1e-2


def test_quick_benchmark_writes_json(tmp_path: Path) -> None:
    path = Path(__file__).parents[2] / "bench" / "gpu_engine.py"
    spec = importlib.util.spec_from_file_location("gpu_engine_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    out = tmp_path / "quick.json"
    parts = "abcd" if importlib.util.find_spec("transformers") else "abc"
    assert bench.main(["--quick", "--device", "cpu", "--parts", parts, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"meta", "bandwidth", "decode", "sessions"} <= result.keys()
    assert result["bandwidth"]["hbm_gbs"] > 0
    rows = result["decode"]["tiny"]["rows"]
    assert {r["variant"] for r in rows} >= {"eager", "graph"} and all(r["ms_median"] > 0 for r in rows)
    assert all(c["rel_err"][0] < 1e-4 for c in result["decode"]["tiny"]["checks"])
    sessions = result["sessions"]["rows"]
    assert sessions and {"first_token_ms_p50", "first_token_ms_p95", "underruns", "turns"} <= sessions[0].keys()
    assert sessions[0]["replies"] > 0
    if "d" in parts:
        assert result["baseline"]["rows"][0]["replies"] > 0
    assert not asyncio.iscoroutinefunction(bench.main)
