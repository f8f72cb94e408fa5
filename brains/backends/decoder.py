"""A decoder-only transformer forward over a slot-based static KV cache.

Why not call the transformers model directly: the dual brain needs every sequence of every session in
one batched decode step, each at its own position, plus copying a KV prefix from one sequence to another
(the AB reuses the FB's thought prefix). transformers' caches share one position across the batch. So we
take the weights from the transformers model definition (which also handles GGUF de-quantization) and
run a small, pure forward in the style of gpt-fast: fixed-shape caches preallocated per slot, fused
projections, and no Python state that would stop CUDA-graph capture.

Supported families: Llama (SmolLM2), Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm, explicit head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ArchSpec:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ArchSpec:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        model_type = getattr(cfg, "model_type", "llama")
        rope = getattr(cfg, "rope_theta", None)
        if rope is None:  # transformers 5 keeps it in rope_parameters
            params = getattr(cfg, "rope_parameters", None) or {}
            rope = params.get("rope_theta", 10000.0)
        return cls(
            n_layers=cfg.num_hidden_layers,
            d_model=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            ffn_dim=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_eps=cfg.rms_norm_eps,
            rope_theta=float(rope),
            qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    def weight_bytes(self, bytes_per_param: int) -> int:
        """Bytes read per decode step (the memory floor of one step): every weight once."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.ffn_dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return (self.n_layers * (attn + mlp) + self.vocab_size * self.d_model + head) * bytes_per_param


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    wqkv: torch.Tensor  # [(H + 2*KVH) * hd, D]
    bqkv: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    wo: torch.Tensor
    ln2: torch.Tensor
    w_gate_up: torch.Tensor  # [2 * F, D]
    w_down: torch.Tensor


class KVCache:
    """Keys and values for `slots` sequences of up to `max_len` tokens, preallocated once."""

    def __init__(self, spec: ArchSpec, slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (spec.n_layers, slots, spec.n_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = slots
        self.max_len = max_len

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Share a computed prefix: the AB's thought prefix is the FB's, so copy instead of prefilling."""
        self.k[:, dst, :, :n].copy_(self.k[:, src, :, :n])
        self.v[:, dst, :, :n].copy_(self.v[:, src, :, :n])


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """A projection: a float weight tensor, or a callable packed weight (see brains/backends/int8.py)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    return w(x)  # type: ignore[operator,no-any-return]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DecoderLM:
    """Weights plus a pure forward: (tokens, positions, slots) -> logits, writing K/V into the cache."""

    def __init__(self, spec: ArchSpec, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: torch.Tensor, max_len: int):
        self.spec = spec
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.device = embed.device
        self.dtype = embed.dtype
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.device, self.dtype)
        self.sin = emb.sin().to(self.device, self.dtype)
        self.max_len = max_len

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model: Any, max_len: int, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> DecoderLM:
        spec = ArchSpec.from_hf_config(model.config)
        sd = {k: v for k, v in model.state_dict().items()}

        def t(name: str) -> torch.Tensor:
            return sd[name].to(device=device, dtype=dtype).contiguous()

        def opt(name: str) -> torch.Tensor | None:
            return t(name) if name in sd else None

        layers = []
        for i in range(spec.n_layers):
            p = f"model.layers.{i}."
            biases = [opt(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            layers.append(LayerWeights(
                ln1=t(p + "input_layernorm.weight"),
                wqkv=torch.cat([t(p + f"self_attn.{n}_proj.weight") for n in "qkv"]).contiguous(),
                bqkv=torch.cat(biases).contiguous() if all(b is not None for b in biases) else None,  # type: ignore[misc]
                q_norm=opt(p + "self_attn.q_norm.weight"),
                k_norm=opt(p + "self_attn.k_norm.weight"),
                wo=t(p + "self_attn.o_proj.weight"),
                ln2=t(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")]).contiguous(),
                w_down=t(p + "mlp.down_proj.weight"),
            ))
        embed = t("model.embed_tokens.weight")
        head = t("lm_head.weight") if "lm_head.weight" in sd and not spec.tie_embeddings else embed
        return cls(spec, embed, layers, t("model.norm.weight"), head, max_len)

    @classmethod
    def random(cls, spec: ArchSpec, max_len: int, device: str | torch.device, dtype: torch.dtype,
               seed: int = 0) -> DecoderLM:
        """Random weights of a real architecture: step time does not depend on the values. Drawn on the target
        device (an 8B model drawn on the host takes minutes); the same seed gives the same weights there."""
        g = torch.Generator(device=device).manual_seed(seed)

        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(1 / math.sqrt(shape[-1]))

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, dtype=dtype)

        hd, H, KVH, D = spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.d_model
        qkv = (H + 2 * KVH) * hd
        layers = [LayerWeights(
            ln1=ones(D), wqkv=r(qkv, D), bqkv=r(qkv) if spec.qkv_bias else None,
            q_norm=ones(hd) if spec.qk_norm else None, k_norm=ones(hd) if spec.qk_norm else None,
            wo=r(D, H * hd), ln2=ones(D), w_gate_up=r(2 * spec.ffn_dim, D), w_down=r(D, spec.ffn_dim),
        ) for _ in range(spec.n_layers)]
        embed = r(spec.vocab_size, D)
        head = embed if spec.tie_embeddings else r(spec.vocab_size, D)
        return cls(spec, embed, layers, ones(D), head, max_len)

    def new_cache(self, slots: int) -> KVCache:
        return KVCache(self.spec, slots, self.max_len, self.device, self.dtype)

    # ---- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_len: int | None = None, last_only: bool = True) -> torch.Tensor:
        """tokens, positions: [B, T] (int64); slots: [B]. Returns logits [B, V] (last) or [B, T, V].

        Each row attends to its own slot's cache up to its own position. `kv_len` bounds how much of the
        cache is read (the batch's highest position + 1); None reads all of it, which keeps shapes fixed
        for CUDA-graph capture at the cost of reading unused cache.
        """
        s = self.spec
        B, T = tokens.shape
        L = kv_len if kv_len is not None else cache.max_len
        x = F.embedding(tokens, self.embed)
        cos = self.cos[positions].unsqueeze(1)  # [B, 1, T, hd]
        sin = self.sin[positions].unsqueeze(1)
        # Row b's query at position p sees keys 0..p of its own slot (causal, per-row offsets).
        mask = torch.arange(L, device=self.device)[None, None, :] <= positions[:, :, None]
        mask = mask.unsqueeze(1)  # [B, 1, T, L]
        slot_idx = slots[:, None].expand(B, T)
        q_size, kv_size = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        for li, w in enumerate(self.layers):
            h = _rms(x, w.ln1, s.rms_eps)
            qkv = _linear(h, w.wqkv, w.bqkv)
            q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
            q = q.view(B, T, s.n_heads, s.head_dim)
            k = k.view(B, T, s.n_kv_heads, s.head_dim)
            v = v.view(B, T, s.n_kv_heads, s.head_dim)
            if w.q_norm is not None and w.k_norm is not None:
                q = _rms(q, w.q_norm, s.rms_eps)
                k = _rms(k, w.k_norm, s.rms_eps)
            q = _rotate(q.transpose(1, 2), cos, sin)
            k = _rotate(k.transpose(1, 2), cos, sin)
            # Advanced indices split by a slice put [B, T] first: assign [B, T, KVH, hd].
            cache.k[li][slot_idx, :, positions] = k.transpose(1, 2)
            cache.v[li][slot_idx, :, positions] = v
            keys = cache.k[li][slots, :, :L]
            values = cache.v[li][slots, :, :L]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            x = x + _linear(attn.transpose(1, 2).reshape(B, T, q_size), w.wo)
            h = _rms(x, w.ln2, s.rms_eps)
            gate, up = _linear(h, w.w_gate_up).chunk(2, dim=-1)
            x = x + _linear(F.silu(gate) * up, w.w_down)
        if last_only:
            x = x[:, -1]
        return _linear(_rms(x, self.norm, s.rms_eps), self.lm_head).float()
