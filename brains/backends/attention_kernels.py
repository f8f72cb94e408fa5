"""Attention over the slot KV cache for the fixed-shape step (`decode_step.DecodeStep`): Triton kernels and
their torch fallbacks.

- Decode (one token per row): a split-KV Triton kernel (flash-decoding) reads each row's *own* prefix of its
  slot (0..position), not the whole `max_len` cache; its loop bounds come from the position buffer, so one CUDA
  graph serves every context length and no kv-length buckets are needed. It also writes the new key/value into
  the cache, saving two scatter kernels per layer. A second kernel combines the splits by log-sum-exp.
- Ragged (N tokens of any mix of slots and positions): the new keys/values are scattered into the cache first;
  then a grouped split-KV kernel lets each run of up to `RAGGED_GROUP` tokens of one slot share its key tiles
  (causal per token). Both kernels run the same online-softmax loop over key tiles (`_online_softmax`).
- Without Triton (CPU, CI) the same contracts run as torch gather + SDPA (`attention_torch`,
  `attention_prefill`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

try:  # Triton comes with CUDA builds of torch; CPU-only installs (CI) run the torch attention instead.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

RAGGED_GROUP = 16  # tokens of one slot that share one program of the ragged attention kernel
Attention = Literal["auto", "triton", "torch"]
BLOCK_N = 64  # keys per inner tile of the split-KV kernel
TARGET_PROGRAMS = 1024  # split the keys so that a full-length batch keeps ~8 programs per multiprocessor


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
    def _online_softmax(q, KC, VC, base, sc_l, d, pos, start, end, qk_scale, m_i, l_i, acc,
                        BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
        """Flash attention's inner loop: the query tile q [R, HD] against the cached keys [start, end) of one
        (slot, kv head) at `base`, BLOCK keys a tile, folded into the running max m_i [R] (log2 units),
        sum l_i [R] and output acc [R, HD]; returns the three. CAUSAL: row r sees only keys <= pos[r] (pos:
        [R]), and a row with no visible key yet keeps zero weight; otherwise every key below `end` counts."""
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < end
            offs = base + n.to(tl.int64)[:, None] * sc_l + d[None, :]
            k = tl.load(KC + offs, mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if CAUSAL:
                s = tl.where(nmask[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
            else:
                s = tl.where(nmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VC + offs, mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return m_i, l_i, acc

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
        m_i, l_i, acc = _online_softmax(q, KC, VC, base, sc_l, d, pos, start, end, qk_scale, m_i, l_i, acc,
                                        BLOCK=BLOCK, CAUSAL=False)
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
        m_i, l_i, acc = _online_softmax(q, KC, VC, base, sc_l, d, pos, start, end, qk_scale, m_i, l_i, acc,
                                        BLOCK=BLOCK, CAUSAL=True)
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
