"""The torch backend: our slot-cache decoder on CPU or GPU behind the engine's `Backend` protocol."""

from __future__ import annotations

import torch

from brains.backends.decoder import DecoderLM, KVCache


class TorchBackend:
    def __init__(self, model: DecoderLM, slots: int) -> None:
        self.model = model
        self.cache: KVCache = model.new_cache(slots)
        self.slots = slots
        self.max_len = model.max_len
        self.device = model.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        dev = self.device
        logits = self.model.forward(self.cache, tokens.to(dev), positions.to(dev), slots.to(dev), kv_len=kv_len)
        return logits.cpu()

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.cache.copy_prefix(src, dst, n)
