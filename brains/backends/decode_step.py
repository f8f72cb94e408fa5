"""The fixed-shape step of `DecoderLM` that `cuda_graphs.GraphedDecoder` captures: the per-layer math (RMSNorm,
projections, q/k norm, RoPE, SiLU MLP, residuals) around an attention from `attention_kernels`, for three
shapes: decode (one token per row), a prefill chunk of one sequence, and a ragged batch (any mix of sequences'
tokens, one pass over the weights). Pure tensor code with no host synchronization, so it can run inside a CUDA
graph; it runs eagerly on CPU.

Optionally the per-layer elementwise work is fused by `torch.compile` (`_pre_attention`, `_post_attention`,
`_post_pre` are the compiled regions); the matrix products stay cuBLAS calls either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from brains.backends.attention_kernels import (
    Attention,
    attention_prefill,
    attention_ragged_triton,
    attention_torch,
    attention_triton,
    resolve_attention,
)
from brains.backends.decoder import DecoderLM, KVCache, _rms, _rotate


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
