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


class Int8Linear:
    """Callable `x @ W.T + b` with W stored as packed per-channel int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-8).double()
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
        y = torch.ops.quantized.linear_dynamic((rows / scale).contiguous(), self.packed) * scale
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
