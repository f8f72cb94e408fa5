"""int8 weights for CPU decode (fbgemm dynamic quantization).

A CPU decode step of a small model is bound by reading its weights: SmolLM2-135M in float32 is ~540 MB a
token. Per-output-channel int8 weights read a quarter of that; activations are quantized per call. On
the 2-core dev machine this took the matmuls of one token from 27 ms to 10 ms, at ~1% relative error
per projection (the shipped SmolLM2 is itself a 4-bit GGUF). GPUs use bf16 instead.
"""

from __future__ import annotations

import warnings

import torch

from brains.backends.decoder import DecoderLM

# fbgemm multiplies u8 activations by s8 weights. Its AVX2 and AVX-512 kernels for CPUs without VNNI add
# each adjacent pair of products in int16 (vpmaddubsw), which saturates once |a1*w1 + a2*w2| > 32767; the
# VNNI kernels add in int32. With full-range activations (u8 0..255, zero near 128) and weights up to 127 a
# pair reaches 64770, so the same model gave different logits per CPU: KL to float32 0.040 with VNNI, 0.081
# without (tests/brains/test_decoder.py has the numbers). Weights capped at +-63 keep every pair within
# 255 * 63 * 2 = 32130, so every ISA computes the exact int32 sums. reduce_range=True (7-bit activations)
# would do the same but costs three times the KL: activations carry the larger share of the error.
_WEIGHT_QMAX = 63.0
# A decode step (a row or two) is bound by reading the weights: fbgemm takes the same time for up to ~4 rows.
# There each row goes in as its positive and its negative part (two rows, both >= 0), so zero maps to u8 0
# and each sign gets all 255 levels: a ninth bit of activation precision for free. Prefill chunks (many
# rows, compute-bound) would pay double for it and keep the single-row form.
_SPLIT_MAX_ROWS = 2


class Int8Linear:
    """Callable `x @ W.T + b` with W stored as packed per-channel int8 (7-bit range, see _WEIGHT_QMAX)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=1) / _WEIGHT_QMAX).clamp_min(1e-8).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor constructors are marked deprecated in torch 2.13
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.bias = None if bias is None else bias.detach().float()
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).float()
        # fbgemm quantizes activations with one scale per call. In a prefill, a few tokens carry huge
        # activations (attention sinks) and would crush every other row to zero, so give each row its own
        # scale: W(x) = s * W(x / s) for a linear map.
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
        unit = rows / scale
        m = unit.shape[0]
        if m <= _SPLIT_MAX_ROWS:  # W(x) = W(max(x, 0)) - W(max(-x, 0))
            halves = torch.cat((unit.clamp_min(0.0), (-unit).clamp_min(0.0)))
            both = torch.ops.quantized.linear_dynamic(halves, self.packed, reduce_range=False)
            y = (both[:m] - both[m:]) * scale
        else:
            y = torch.ops.quantized.linear_dynamic(unit.contiguous(), self.packed, reduce_range=False) * scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def quantize_int8(model: DecoderLM) -> DecoderLM:
    """Swap every projection and the LM head for int8 (in place); embeddings and norms stay float32."""
    if model.device.type != "cpu":
        raise ValueError("int8 dynamic quantization is a CPU path; use bfloat16 on GPUs")
    for layer in model.layers:
        layer.wqkv = Int8Linear(layer.wqkv, layer.bqkv)  # type: ignore[assignment]
        layer.bqkv = None
        layer.wo = Int8Linear(layer.wo)  # type: ignore[assignment]
        layer.w_gate_up = Int8Linear(layer.w_gate_up)  # type: ignore[assignment]
        layer.w_down = Int8Linear(layer.w_down)  # type: ignore[assignment]
    model.lm_head = Int8Linear(model.lm_head)  # type: ignore[assignment]
    return model
