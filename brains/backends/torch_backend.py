"""The torch backend: our slot-cache decoder on CPU or GPU behind the engine's `Backend` protocol.

With `cuda_graphs=True` the engine's batched decode (one token per row) and its prefill chunks (one
sequence, several tokens) run through a `GraphedDecoder`: captured per batch / chunk-length bucket on
CUDA, or the same fixed-shape steps run eagerly on CPU (graphs off, so CI exercises the code path). Any
other shape runs the eager `DecoderLM.forward`. The cache then has one extra slot, the graphs' scratch
slot for padding rows. With graphs, the backend also offers `forward_ragged` (`ragged` is True): a whole
engine step, prefill chunks of several sequences and the decode rows, in one pass over the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from brains.backends.attention_kernels import Attention
from brains.backends.cuda_graphs import (
    DEFAULT_BUCKETS,
    DEFAULT_PREFILL_BUCKETS,
    DEFAULT_RAGGED_BUCKETS,
    GraphedDecoder,
)
from brains.backends.decoder import DecoderLM, KVCache


class TorchBackend:
    def __init__(self, model: DecoderLM, slots: int, cuda_graphs: bool = False, *,
                 graph_buckets: Sequence[int] = DEFAULT_BUCKETS,
                 prefill_buckets: Sequence[int] = DEFAULT_PREFILL_BUCKETS, attention: Attention = "auto",
                 compile: bool = False, logits_on_device: bool = False,
                 ragged_buckets: Sequence[int] = DEFAULT_RAGGED_BUCKETS) -> None:
        """`logits_on_device`: return logits where they were computed instead of copying them to the host
        (a [B, vocab] float32 copy per step; on GPU the engine's per-row sampling is cheaper there)."""
        self.model = model
        self.slots = slots
        self.max_len = model.max_len
        self.vocab = model.spec.vocab_size  # the engine refuses prompts with ids outside it
        self.device = model.device
        self.logits_on_device = logits_on_device
        self.graphs: GraphedDecoder | None = None
        if cuda_graphs:
            self.cache: KVCache = model.new_cache(slots + 1)  # slot `slots` is the padding rows' scratch
            self.graphs = GraphedDecoder(model, self.cache, scratch_slot=slots, buckets=graph_buckets,
                                         attention=attention, compile=compile, prefill_buckets=prefill_buckets,
                                         ragged_buckets=ragged_buckets)
            self.graphs.capture()
        else:
            self.cache = model.new_cache(slots)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        if self.graphs is not None and (tokens.shape[1] == 1 or tokens.shape[0] == 1):
            if tokens.shape[1] == 1:  # the batched decode
                logits = self.graphs.decode(tokens[:, 0], positions[:, 0], slots)
            else:  # a prefill chunk of one sequence
                logits = self.graphs.prefill(tokens[0], positions[0], int(slots[0]))
            # The graph's output buffer is reused by the next replay: hand out a copy.
            return logits.clone() if self.logits_on_device else logits.cpu()
        dev = self.device
        logits = self.model.forward(self.cache, tokens.to(dev), positions.to(dev), slots.to(dev), kv_len=kv_len)
        return logits if self.logits_on_device else logits.cpu()

    @property
    def ragged(self) -> bool:
        """Whether `forward_ragged` is offered (the engine feature-detects it)."""
        return self.graphs is not None and (bool(self.graphs.ragged_buckets) or not self.graphs.graphs)

    def forward_ragged(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       logit_rows: torch.Tensor) -> torch.Tensor:
        """N tokens of any mix of sequences in one pass (tokens, positions, slots: [N]; a slot's tokens in increasing
        position): each writes its key/value at (slot, position), then attends to its slot's keys 0..position.
        Returns float32 logits [R, V] of `logit_rows` only (none for the other tokens)."""
        if self.graphs is None:
            raise RuntimeError("forward_ragged needs cuda_graphs=True (the fixed-shape step)")
        logits = self.graphs.ragged(tokens, positions, slots, logit_rows)
        return logits.clone() if self.logits_on_device else logits.cpu()

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.cache.copy_prefix(src, dst, n)
