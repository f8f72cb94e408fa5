"""A fixed-shape decode step for `DecoderLM`, captured in CUDA graphs (gpt-fast, vLLM's CUDA graph runner).

One decode step is ~15 small kernels per layer; launched one by one from Python, a 36-layer model spends
more time launching than reading weights. So the step is captured once per batch-size bucket and replayed:

- static input buffers per bucket (`tokens`, `positions`, `slots`); a batch of B rows runs in the
  smallest bucket >= B, and the padding rows point at a scratch KV slot that no sequence owns;
- attention reads each row's *own* prefix of its slot (0..position), not the whole `max_len` cache:
  a split-KV Triton kernel (flash-decoding) whose loop bounds come from the position buffer, so one
  graph serves every context length and no kv-length buckets are needed. It also writes the new
  key/value into the cache, saving two scatter kernels per layer. Without Triton (CPU, CI) the same
  step runs with a torch gather + SDPA attention;
- optionally the per-layer elementwise work (RMSNorm, q/k norm, RoPE, SiLU, residuals) is fused by
  `torch.compile`; the matrix products stay cuBLAS calls either way.

`GraphedDecoder.decode` returns the logits as a view of the bucket's static output buffer: it is valid
until the next `decode` call. With `graphs=False` (CPU) the same step runs eagerly, unpadded.

`GraphedDecoder.ragged` runs one engine step that mixes prefill chunks of several sequences and decode rows
as one flat batch of N tokens, each with its own (slot, position): one pass over the weights for the whole
step, captured per N bucket. The new keys/values are scattered into the cache first; then a grouped split-KV
kernel lets each run of up to `RAGGED_GROUP` tokens of one slot share its key tiles (causal per token). Only
the rows asked for get logits (a second, small graph per row-count bucket): prefill tokens get none.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from brains.backends.decoder import DecoderLM, KVCache, _rms, _rotate

try:  # Triton comes with CUDA builds of torch; CPU-only installs (CI) run the torch attention instead.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

log = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
DEFAULT_PREFILL_BUCKETS: tuple[int, ...] = (16, 32, 64, 128)
DEFAULT_RAGGED_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
RAGGED_GROUP = 16  # tokens of one slot that share one program of the ragged attention kernel
Attention = Literal["auto", "triton", "torch"]
BLOCK_N = 64  # keys per inner tile of the split-KV kernel
TARGET_PROGRAMS = 1024  # split the keys so that a full-length batch keeps ~8 programs per multiprocessor

# ---- attention ----------------------------------------------------------------------------------


def attention_torch(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kc: torch.Tensor,
                    vc: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                    kv_len: int | None = None) -> torch.Tensor:
    """Decode attention by gather + SDPA. q: [B, H, hd]; k_new, v_new: [B, KVH, hd]; kc, vc: one layer's
    cache [S, KVH, L, hd]. Writes the new key/value at (slot, position), then attends to 0..position.
    Reads `kv_len` (default: all) positions of every row's slot: fixed shapes, but wasteful at long L."""
    kc[slots, :, positions] = k_new
    vc[slots, :, positions] = v_new
    B, H, hd = q.shape
    L = kc.shape[2] if kv_len is None else kv_len
    keys, values = kc[slots, :, :L], vc[slots, :, :L]  # [B, KVH, L, hd]
    kvh = keys.shape[1]
    mask = (torch.arange(L, device=q.device)[None, :] <= positions[:, None])[:, None, None, :]
    # Group the query heads of each kv head into rows: no GQA expansion of the keys.
    out = F.scaled_dot_product_attention(q.view(B, kvh, H // kvh, hd), keys, values, attn_mask=mask)
    return out.reshape(B, H, hd)


def attention_prefill(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kc: torch.Tensor,
                      vc: torch.Tensor, write_slots: torch.Tensor, positions: torch.Tensor,
                      slot: torch.Tensor) -> torch.Tensor:
    """A chunk of T tokens of one sequence (slot: [1]). q: [T, H, hd]; k_new, v_new: [T, KVH, hd]. Each token
    is written at (write_slots[t], positions[t]) (padding tokens go to the scratch slot), then attends to its
    slot's keys 0..positions[t]. Reads the whole slot: fixed shapes; one slot is cheap to read."""
    kc[write_slots, :, positions] = k_new
    vc[write_slots, :, positions] = v_new
    T, H, hd = q.shape
    keys, values = kc[slot], vc[slot]  # [1, KVH, L, hd]
    kvh, L = keys.shape[1], keys.shape[2]
    G = H // kvh
    # Query heads of one kv head become rows (g-major): SDPA with a mask, no GQA expansion of the keys.
    qg = q.view(T, kvh, G, hd).permute(1, 2, 0, 3).reshape(1, kvh, G * T, hd)
    mask = (torch.arange(L, device=q.device)[None, :] <= positions[:, None]).repeat(G, 1)[None, None]
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
    return out.view(kvh, G, T, hd).permute(2, 0, 1, 3).reshape(T, H, hd)


if triton is not None:

    @triton.jit
    def _attn_split_kernel(Q, KN, VN, KC, VC, Slots, Pos, Part, LSE,
                           sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, sc_s, sc_h, sc_l,
                           so_b, so_h, so_s, sl_b, sl_h, qk_scale,
                           G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr,
                           SPLIT_N: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row b, kv head, split): the row's keys [split*SPLIT_N, ...) below its position, plus
        the new key (held in registers) in the split that owns the position, which also stores it."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        slot = tl.load(Slots + b).to(tl.int64)
        pos = tl.load(Pos + b).to(tl.int32)
        d = tl.arange(0, HD)
        g = tl.arange(0, G_PAD)
        gmask = g < G
        heads = kvh * G + g
        start = sp * SPLIT_N
        end = tl.minimum(start + SPLIT_N, pos)  # the cached keys this program reads: [start, end)
        base = slot * sc_s + kvh * sc_h
        own = (pos >= start) & (pos < start + SPLIT_N)
        kn = tl.load(KN + b * skn_b + kvh * skn_h + d)
        vn = tl.load(VN + b * svn_b + kvh * svn_h + d)
        tl.store(KC + base + pos.to(tl.int64) * sc_l + d, kn, mask=(d < HD) & own)
        tl.store(VC + base + pos.to(tl.int64) * sc_l + d, vn, mask=(d < HD) & own)
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HD], tl.float32)
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < end
            offs = base + n.to(tl.int64)[:, None] * sc_l + d[None, :]
            k = tl.load(KC + offs, mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VC + offs, mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # The new key: merged from registers (never re-read from the cache we just wrote).
        s_n = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale
        m_n = tl.maximum(m_i, s_n)
        a_n = tl.exp2(m_i - m_n)
        p_n = tl.exp2(s_n - m_n)
        m_i = tl.where(own, m_n, m_i)
        l_i = tl.where(own, l_i * a_n + p_n, l_i)
        acc = tl.where(own, acc * a_n[:, None] + p_n[:, None] * vn.to(tl.float32)[None, :], acc)
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        tl.store(Part + b * so_b + heads[:, None] * so_h + sp * so_s + d[None, :], acc / safe_l[:, None],
                 mask=gmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(LSE + b * sl_b + heads * sl_h + sp, lse, mask=gmask)

    @triton.jit
    def _attn_reduce_kernel(Part, LSE, Out, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h, NS,
                            NS_PAD: tl.constexpr, HD: tl.constexpr):
        """Program (row, head): combine the splits' partial outputs by their log-sum-exp weights."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, NS_PAD)
        d = tl.arange(0, HD)
        smask = s < NS
        lse = tl.load(LSE + b * sl_b + h * sl_h + s, mask=smask, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))
        o = tl.load(Part + b * so_b + h * so_h + s[:, None] * so_s + d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
        tl.store(Out + b * sout_b + h * sout_h + d, out.to(Out.dtype.element_ty))

    @triton.jit
    def _attn_ragged_kernel(Q, KC, VC, Slots, Pos, GStart, GLen, Part, LSE,
                            sq_n, sq_h, sc_s, sc_h, sc_l, so_n, so_h, so_s, sl_n, sl_h, qk_scale,
                            G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, HD: tl.constexpr,
                            SPLIT_N: tl.constexpr, BLOCK: tl.constexpr):
        """Program (group, kv head, split): a group is up to BM rows (tokens) of one slot, each with its own
        position; its BM x G query heads form one tile, so the group reads each key tile once. Every key,
        the step's own included, is read from the cache (the caller scattered the new ones there first);
        row r sees keys 0..pos[r] of the split's range. Empty groups (length 0) store nothing."""
        gi = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        glen = tl.load(GLen + gi).to(tl.int32)
        g0 = tl.load(GStart + gi).to(tl.int64)
        slot = tl.load(Slots + g0).to(tl.int64)
        m = tl.arange(0, BM * GP)
        i = m // GP
        j = m % GP
        rmask = i < glen
        valid = rmask & (j < G)
        row = g0 + i
        pos = tl.load(Pos + row, mask=rmask, other=-1).to(tl.int32)  # -1: a row that sees no key
        d = tl.arange(0, HD)
        heads = kvh * G + j
        q = tl.load(Q + row[:, None] * sq_n + heads[:, None] * sq_h + d[None, :], mask=valid[:, None], other=0.0)
        start = sp * SPLIT_N
        end = tl.minimum(start + SPLIT_N, tl.max(pos, 0) + 1)
        base = slot * sc_s + kvh * sc_h
        m_i = tl.full([BM * GP], float("-inf"), tl.float32)
        l_i = tl.zeros([BM * GP], tl.float32)
        acc = tl.zeros([BM * GP, HD], tl.float32)
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < end
            offs = base + n.to(tl.int64)[:, None] * sc_l + d[None, :]
            k = tl.load(KC + offs, mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(nmask[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VC + offs, mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        tl.store(Part + row[:, None] * so_n + heads[:, None] * so_h + sp * so_s + d[None, :], acc / safe_l[:, None],
                 mask=valid[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(LSE + row * sl_n + heads * sl_h + sp, lse, mask=valid)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def split_size(batch: int, kv_heads: int, max_len: int) -> int:
    """Keys per program: small batches split each row finely (parallelism), large ones coarsely (fewer partial
    outputs to write and combine). A power of two in [BLOCK_N, 512]."""
    return min(512, max(BLOCK_N, _pow2(max_len * batch * kv_heads // TARGET_PROGRAMS)))


def attention_triton(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kc: torch.Tensor,
                     vc: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     kv_len: int | None = None) -> torch.Tensor:
    """Same contract as `attention_torch`, reading only each row's own 0..position (kv_len is ignored)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    B, H, hd = q.shape
    _, kvh, L, _ = kc.shape
    assert kc.stride(3) == 1 and kc.stride() == vc.stride() and hd == _pow2(hd)
    assert q.stride(2) == 1 and k_new.stride(2) == 1 and v_new.stride(2) == 1
    G = H // kvh
    split = split_size(B, kvh, L)
    ns = triton.cdiv(L, split)
    o = torch.empty((B, H, ns, hd), device=q.device, dtype=torch.float32)
    lse = torch.empty((B, H, ns), device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(hd) * 1.4426950408889634  # log2(e): the kernel uses exp2
    _attn_split_kernel[(B, kvh, ns)](
        q, k_new, v_new, kc, vc, slots, positions, o, lse,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), scale,
        G=G, G_PAD=max(16, _pow2(G)), HD=hd, SPLIT_N=split, BLOCK=BLOCK_N, num_warps=4)
    out = torch.empty((B, H, hd), device=q.device, dtype=q.dtype)
    _attn_reduce_kernel[(B, H)](o, lse, out, o.stride(0), o.stride(1), o.stride(2), lse.stride(0),
                                lse.stride(1), out.stride(0), out.stride(1), ns, NS_PAD=max(2, _pow2(ns)), HD=hd,
                                num_warps=4)
    return out


def ragged_groups(slots: Sequence[int], group: int = RAGGED_GROUP) -> tuple[list[int], list[int]]:
    """Runs of consecutive rows with the same slot, cut into groups of at most `group` rows: (starts, lengths)."""
    starts, lens = [], []
    i, n = 0, len(slots)
    while i < n:
        j = i + 1
        while j < n and j - i < group and slots[j] == slots[i]:
            j += 1
        starts.append(i)
        lens.append(j - i)
        i = j
    return starts, lens


def attention_ragged_triton(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                            positions: torch.Tensor, gstart: torch.Tensor, glen: torch.Tensor) -> torch.Tensor:
    """Attention of N tokens (q: [N, H, hd]), each over keys 0..positions[t] of its slot, whose new keys and values
    are already in the cache. gstart, glen: [NG] groups of rows of one slot (see `ragged_groups`); groups of length
    0 are skipped, and every row must be in one group. Returns [N, H, hd]."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    N, H, hd = q.shape
    _, kvh, L, _ = kc.shape
    assert kc.stride(3) == 1 and kc.stride() == vc.stride() and hd == _pow2(hd) and q.stride(2) == 1
    G = H // kvh
    split = split_size(N, kvh, L)
    ns = triton.cdiv(L, split)
    o = torch.empty((N, H, ns, hd), device=q.device, dtype=torch.float32)
    lse = torch.empty((N, H, ns), device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(hd) * 1.4426950408889634
    _attn_ragged_kernel[(gstart.shape[0], kvh, ns)](
        q, kc, vc, slots, positions, gstart, glen, o, lse,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), scale,
        G=G, GP=_pow2(G), BM=RAGGED_GROUP, HD=hd, SPLIT_N=split, BLOCK=BLOCK_N, num_warps=4)
    out = torch.empty((N, H, hd), device=q.device, dtype=q.dtype)
    _attn_reduce_kernel[(N, H)](o, lse, out, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                                out.stride(0), out.stride(1), ns, NS_PAD=max(2, _pow2(ns)), HD=hd, num_warps=4)
    return out


def resolve_attention(attention: Attention, device: torch.device) -> Literal["triton", "torch"]:
    if attention == "auto":
        return "triton" if triton is not None and device.type == "cuda" else "torch"
    if attention == "triton" and triton is None:
        raise RuntimeError("attention='triton' needs Triton")
    return attention


# ---- the decode step ----------------------------------------------------------------------------


def _linear(x: torch.Tensor, w: Any, b: torch.Tensor | None = None) -> torch.Tensor:
    """A float weight, or a callable packed weight (the CPU int8 path) that holds its own bias."""
    return F.linear(x, w, b) if isinstance(w, torch.Tensor) else w(x)


def _pre_attention(x: torch.Tensor, ln1: torch.Tensor, wqkv: Any, bqkv: torch.Tensor | None,
                   q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor,
                   sin: torch.Tensor, n_heads: int, n_kv: int, hd: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, D] -> q [B, H, hd], k and v [B, KVH, hd], with q/k norm and RoPE applied (cos: [B, 1, hd])."""
    B = x.shape[0]
    qkv = _linear(_rms(x, ln1, eps), wqkv, bqkv)
    q, k, v = qkv.split((n_heads * hd, n_kv * hd, n_kv * hd), dim=-1)
    q, k, v = q.view(B, n_heads, hd), k.view(B, n_kv, hd), v.view(B, n_kv, hd)
    if q_norm is not None and k_norm is not None:
        q, k = _rms(q, q_norm, eps), _rms(k, k_norm, eps)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _post_attention(x: torch.Tensor, attn: torch.Tensor, wo: Any, ln2: torch.Tensor, w_gate_up: Any,
                    w_down: Any, eps: float) -> torch.Tensor:
    x = x + _linear(attn.reshape(x.shape[0], -1), wo)
    gate, up = _linear(_rms(x, ln2, eps), w_gate_up).chunk(2, dim=-1)
    return x + _linear(F.silu(gate) * up, w_down)


def _post_pre(x: torch.Tensor, attn: torch.Tensor, wo: Any, ln2: torch.Tensor, w_gate_up: Any, w_down: Any,
              ln1: torch.Tensor, wqkv: Any, bqkv: torch.Tensor | None, q_norm: torch.Tensor | None,
              k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int, hd: int,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer i's output half and layer i+1's input half in one compiled region: the residual add and the
    next RMSNorm fuse into one kernel."""
    x = _post_attention(x, attn, wo, ln2, w_gate_up, w_down, eps)
    return (x, *_pre_attention(x, ln1, wqkv, bqkv, q_norm, k_norm, cos, sin, n_heads, n_kv, hd, eps))


class DecodeStep:
    """One token for each of B rows: (tokens [B], positions [B], slots [B]) -> float32 logits [B, V].

    Pure tensor code with no host synchronization, so it can be captured in a CUDA graph."""

    def __init__(self, model: DecoderLM, cache: KVCache, attention: Attention = "auto",
                 compile: bool = False) -> None:
        self.model = model
        self.cache = cache
        self.attention = resolve_attention(attention, model.device)
        self.attn_fn: Callable[..., torch.Tensor] = (
            attention_triton if self.attention == "triton" else attention_torch)
        self.compiled = compile
        self.pre: Callable[..., Any] = _pre_attention
        self.post: Callable[..., Any] = _post_attention
        self.post_pre: Callable[..., Any] = _post_pre
        if compile:
            self.pre = torch.compile(_pre_attention, fullgraph=True)
            self.post = torch.compile(_post_attention, fullgraph=True)
            self.post_pre = torch.compile(_post_pre, fullgraph=True)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 kv_len: int | None = None) -> torch.Tensor:
        """One token per row. Returns float32 logits [B, V]."""
        cache = self.cache

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.attn_fn(q, k, v, cache.k[li], cache.v[li], slots, positions, kv_len)

        return self._logits(self._layers(tokens, positions, attend))

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
                slot: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A chunk of one sequence: tokens, positions, write_slots [T]; slot, last [1] (the row whose logits
        are returned, i.e. the last real token). Returns float32 logits [1, V]."""
        cache = self.cache

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention_prefill(q, k, v, cache.k[li], cache.v[li], write_slots, positions, slot)

        return self._logits(self._layers(tokens, positions, attend).index_select(0, last))

    @torch.inference_mode()
    def ragged(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, gstart: torch.Tensor,
               glen: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """N tokens, each with its own slot and position (tokens, positions, slots: [N]), e.g. prefill chunks of
        several sequences and decode rows in one pass. Every token's key/value is written at (slot, position)
        before any token attends, so a token sees the keys of this call's tokens of its slot at lower positions.
        (slot, position) pairs must be distinct, except on a scratch slot nobody reads. gstart, glen: the row
        groups of the Triton kernel (`ragged_groups`). Returns the final hidden states [N, D], no logits."""
        cache = self.cache

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = cache.k[li], cache.v[li]
            if self.attention == "torch":  # writes, then attends over the gathered slots (CPU, CI)
                return attention_torch(q, k, v, kc, vc, slots, positions, kv_len)
            kc[slots, :, positions] = k
            vc[slots, :, positions] = v
            return attention_ragged_triton(q, kc, vc, slots, positions, gstart, glen)

        return self._layers(tokens, positions, attend)

    def head(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits [R, V] of hidden[rows]."""
        return self._logits(hidden.index_select(0, rows))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return _linear(_rms(x, m.norm, m.spec.rms_eps), m.lm_head).float()

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Callable[..., torch.Tensor]
                ) -> torch.Tensor:
        """Token-wise work (norms, projections, RoPE, MLP) on [N, D] rows; `attend` does the mixing."""
        m, s = self.model, self.model.spec
        x = F.embedding(tokens, m.embed)
        cos, sin = m.cos[positions].unsqueeze(1), m.sin[positions].unsqueeze(1)
        heads = (s.n_heads, s.n_kv_heads, s.head_dim, s.rms_eps)
        w = m.layers[0]
        q, k, v = self.pre(x, w.ln1, w.wqkv, w.bqkv, w.q_norm, w.k_norm, cos, sin, *heads)
        for li, w in enumerate(m.layers):
            attn = attend(li, q, k, v)
            if li + 1 == len(m.layers):
                x = self.post(x, attn, w.wo, w.ln2, w.w_gate_up, w.w_down, s.rms_eps)
            else:
                nw = m.layers[li + 1]
                x, q, k, v = self.post_pre(x, attn, w.wo, w.ln2, w.w_gate_up, w.w_down, nw.ln1, nw.wqkv, nw.bqkv,
                                           nw.q_norm, nw.k_norm, cos, sin, *heads)
        return x


class GraphedDecoder:
    """The decode step captured once per batch bucket, a one-sequence prefill step once per chunk-length
    bucket, and the ragged step (mixed prefill chunks and decode rows) once per token-count bucket, with its
    logits head once per batch bucket. `decode` / `prefill` / `ragged` pad the inputs, replay and return
    logits."""

    def __init__(self, model: DecoderLM, cache: KVCache, scratch_slot: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, attention: Attention = "auto",
                 compile: bool = False, graphs: bool | None = None,
                 prefill_buckets: Sequence[int] = DEFAULT_PREFILL_BUCKETS,
                 ragged_buckets: Sequence[int] = DEFAULT_RAGGED_BUCKETS) -> None:
        if not 0 <= scratch_slot < cache.slots:
            raise ValueError("the scratch slot must be a slot of the cache that no sequence uses")
        self.step = DecodeStep(model, cache, attention, compile)
        self.model = model
        self.device = model.device
        self.scratch_slot = scratch_slot
        self.buckets = tuple(sorted(set(buckets)))
        self.prefill_buckets = tuple(sorted(set(prefill_buckets)))
        self.ragged_buckets = tuple(sorted(set(ragged_buckets)))
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        # bucket -> (graph, device inputs, pinned host inputs, output); prefill keyed by chunk length.
        self._decode: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._prefill: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._ragged: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._head: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # The ragged graphs' final hidden states, read by the head graphs (one buffer: any pair can follow).
        self._hidden: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self.capture_seconds = 0.0

    @property
    def max_bucket(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # Static inputs, one flat long tensor per graph (one host-to-device copy per step):
    # decode [tokens | positions | slots] (3*Bb); prefill [tokens | positions | write_slots | slot, last].
    def _decode_views(self, flat: torch.Tensor, bb: int) -> tuple[torch.Tensor, ...]:
        return flat[:bb], flat[bb:2 * bb], flat[2 * bb:]

    def _prefill_views(self, flat: torch.Tensor, tb: int) -> tuple[torch.Tensor, ...]:
        return flat[:tb], flat[tb:2 * tb], flat[2 * tb:3 * tb], flat[3 * tb:3 * tb + 1], flat[3 * tb + 1:]

    # ragged [tokens | positions | slots | group starts | group lengths] (5*Nb); head [rows] (Bb).
    def _ragged_views(self, flat: torch.Tensor, nb: int) -> tuple[torch.Tensor, ...]:
        return tuple(flat[i * nb:(i + 1) * nb] for i in range(5))

    def _head_views(self, flat: torch.Tensor, bb: int) -> tuple[torch.Tensor, ...]:
        return (flat,)

    def _fill_ragged(self, flat: torch.Tensor, nb: int, tokens: Any, positions: Any, slots: Any) -> None:
        n = len(tokens)
        flat.zero_()
        tok, pos, slot, gstart, glen = self._ragged_views(flat, nb)
        tok[:n], pos[:n], slot[:n] = (torch.as_tensor(t, dtype=torch.long) for t in (tokens, positions, slots))
        slot[n:] = self.scratch_slot  # padding tokens: the scratch slot, position 0
        starts, lens = ragged_groups(slot.tolist())
        gstart[:len(starts)], glen[:len(lens)] = torch.tensor(starts), torch.tensor(lens)

    def _fill_head(self, flat: torch.Tensor, bb: int, rows: Any) -> None:
        flat.zero_()
        flat[:len(rows)] = torch.as_tensor(rows, dtype=torch.long)

    def _fill_decode(self, flat: torch.Tensor, bb: int, tokens: Any, positions: Any, slots: Any) -> None:
        n = len(tokens)
        flat.zero_()
        tok, pos, slot = self._decode_views(flat, bb)
        tok[:n], pos[:n], slot[:n] = (torch.as_tensor(t, dtype=torch.long) for t in (tokens, positions, slots))
        slot[n:] = self.scratch_slot  # padding rows: the scratch slot, position 0

    def _fill_prefill(self, flat: torch.Tensor, tb: int, tokens: Any, positions: Any, slot: int) -> None:
        n = len(tokens)
        flat.zero_()
        tok, pos, write, slot_t, last = self._prefill_views(flat, tb)
        tok[:n], pos[:n] = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(positions, dtype=torch.long)
        write[:n], write[n:] = slot, self.scratch_slot
        slot_t[0], last[0] = slot, n - 1

    def _capture_one(self, pool: Any, size: int, fn: Callable[..., torch.Tensor],
                     views: Callable[..., tuple[torch.Tensor, ...]], flat: torch.Tensor) -> tuple:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles Triton/Inductor kernels, picks cuBLAS algorithms
                fn(*views(flat, size))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn(*views(flat, size))
        return graph, flat, torch.zeros(flat.shape[0], dtype=torch.long).pin_memory(), out

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm up and capture every decode bucket (largest first) and every prefill bucket."""
        if not self.graphs:
            return 0.0
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        scratch = self.scratch_slot
        for bb in sorted(self.buckets, reverse=True):
            flat = torch.zeros(3 * bb, dtype=torch.long)
            self._fill_decode(flat, bb, [0], [0], [scratch])
            self._decode[bb] = self._capture_one(pool, bb, self.step, self._decode_views, flat.to(self.device))
        for tb in sorted(self.prefill_buckets, reverse=True):
            flat = torch.zeros(3 * tb + 2, dtype=torch.long)
            self._fill_prefill(flat, tb, [0], [0], scratch)
            self._prefill[tb] = self._capture_one(pool, tb, self.step.prefill, self._prefill_views,
                                                  flat.to(self.device))
        if self.ragged_buckets:
            m = self.model
            self._hidden = torch.zeros((self.ragged_buckets[-1], m.spec.d_model), device=self.device, dtype=m.dtype)
            for nb in sorted(self.ragged_buckets, reverse=True):
                flat = torch.zeros(5 * nb, dtype=torch.long)
                self._fill_ragged(flat, nb, [0], [0], [scratch])
                self._ragged[nb] = self._capture_one(pool, nb, self._ragged_body, self._ragged_views,
                                                     flat.to(self.device))
            for bb in sorted(self.buckets, reverse=True):
                self._head[bb] = self._capture_one(pool, bb, self._ragged_head, self._head_views,
                                                   torch.zeros(bb, dtype=torch.long, device=self.device))
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode, %d prefill and %d ragged graphs in %.1f s (attention=%s, compiled=%s)",
                 len(self._decode), len(self._prefill), len(self._ragged), self.capture_seconds, self.step.attention,
                 self.step.compiled)
        return self.capture_seconds

    def _load(self, entry: tuple, fill: Callable[..., None], size: int, *args: Any) -> torch.Tensor:
        graph, flat, host, out = entry
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of a pinned buffer has finished
        fill(host, size, *args)
        flat.copy_(host, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        graph.replay()
        return out

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots: [B]. Returns float32 logits [B, V] on the device, valid until the next call."""
        n = tokens.shape[0]
        if not self.graphs:
            dev = self.device
            kv_len = int(positions.max()) + 1
            return self.step(tokens.to(dev), positions.to(dev), slots.to(dev), kv_len)
        if not self._decode:
            self.capture()
        if n > self.max_bucket:  # more rows than the largest graph: replay it on chunks
            m = self.max_bucket
            return torch.cat([self.decode(tokens[i:i + m], positions[i:i + m], slots[i:i + m]).clone()
                              for i in range(0, n, m)])
        bb = self.bucket(n)
        tokens, positions, slots = tokens.cpu(), positions.cpu(), slots.cpu()
        return self._load(self._decode[bb], self._fill_decode, bb, tokens, positions, slots)[:n]

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """A chunk of one sequence in `slot`: tokens, positions [T]. Returns the last token's logits [1, V]."""
        n = tokens.shape[0]
        m = self.prefill_buckets[-1] if self.prefill_buckets else n
        if n > m:  # longer than the largest bucket: run it in pieces, in order; the last one's logits
            starts = range(0, n, m)
            for i in starts[:-1]:
                self.prefill(tokens[i:i + m], positions[i:i + m], slot)
            return self.prefill(tokens[starts[-1]:], positions[starts[-1]:], slot)
        if not self.graphs:
            dev = self.device
            write = torch.full((n,), slot, dtype=torch.long, device=dev)
            return self.step.prefill(tokens.to(dev), positions.to(dev), write,
                                     torch.tensor([slot], device=dev), torch.tensor([n - 1], device=dev))
        if not self._prefill:
            self.capture()
        tb = next(b for b in self.prefill_buckets if b >= n)
        return self._load(self._prefill[tb], self._fill_prefill, tb, tokens.cpu(), positions.cpu(), slot)

    def _ragged_body(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, gstart: torch.Tensor,
                     glen: torch.Tensor) -> torch.Tensor:
        assert self._hidden is not None
        x = self.step.ragged(tokens, positions, slots, gstart, glen)
        return self._hidden[:x.shape[0]].copy_(x)

    def _ragged_head(self, rows: torch.Tensor) -> torch.Tensor:
        assert self._hidden is not None
        return self.step.head(self._hidden, rows)

    @property
    def max_ragged(self) -> int:
        return self.ragged_buckets[-1] if self.ragged_buckets else 1 << 62

    @torch.inference_mode()
    def ragged(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               logit_rows: torch.Tensor) -> torch.Tensor:
        """One pass over N tokens (tokens, positions, slots: [N]) of any mix of sequences: each token's key/value
        is written at (slots[t], positions[t]) and the token attends to its slot's keys 0..positions[t], this
        call's included. A slot's tokens must come in increasing position. Returns float32 logits [R, V] of the
        rows `logit_rows` ([R]; on the device, valid until the next call); R = 0 computes no logits."""
        n, r = tokens.shape[0], logit_rows.shape[0]
        if n > self.max_ragged:  # more tokens than the largest graph: run consecutive pieces, in order
            m = self.max_ragged
            out = torch.empty((r, self.model.spec.vocab_size), device=self.device, dtype=torch.float32)
            for i in range(0, n, m):
                sel = ((logit_rows >= i) & (logit_rows < i + m)).nonzero().flatten()
                part = self.ragged(tokens[i:i + m], positions[i:i + m], slots[i:i + m], logit_rows[sel] - i)
                out[sel.to(self.device)] = part
            return out
        if not self.graphs:
            dev = self.device
            starts, lens = ragged_groups(slots.tolist())
            x = self.step.ragged(tokens.to(dev), positions.to(dev), slots.to(dev), torch.tensor(starts, device=dev),
                                 torch.tensor(lens, device=dev), kv_len=int(positions.max()) + 1)
            return self.step.head(x, logit_rows.to(dev))
        if not self.ragged_buckets:
            raise RuntimeError("this decoder was built without ragged buckets")
        if not self._ragged:
            self.capture()
        nb = next(b for b in self.ragged_buckets if b >= n)
        self._load(self._ragged[nb], self._fill_ragged, nb, tokens.cpu(), positions.cpu(), slots.cpu())
        if r == 0:
            return torch.empty((0, self.model.spec.vocab_size), device=self.device, dtype=torch.float32)
        if r > self.max_bucket:
            m = self.max_bucket
            return torch.cat([self._load(self._head[m], self._fill_head, m, logit_rows[i:i + m].cpu())
                              [:min(m, r - i)].clone() for i in range(0, r, m)])
        bb = self.bucket(r)
        return self._load(self._head[bb], self._fill_head, bb, logit_rows.cpu())[:r]

    def replay(self, bb: int) -> None:
        """Replay one decode bucket's graph on whatever its static inputs hold (for timing)."""
        self._decode[bb][0].replay()

    def replay_prefill(self, tb: int) -> None:
        self._prefill[tb][0].replay()

    def replay_ragged(self, nb: int, bb: int) -> None:
        """Replay a ragged step: the body graph for `nb` tokens, then the logits head for `bb` rows."""
        self._ragged[nb][0].replay()
        self._head[bb][0].replay()

    def output(self, bb: int) -> torch.Tensor:
        return self._decode[bb][3]
