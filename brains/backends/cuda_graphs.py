"""`DecoderLM`'s fixed-shape step captured in CUDA graphs and replayed (gpt-fast, vLLM's CUDA graph runner).

One decode step is ~15 small kernels per layer; launched one by one from Python, a 36-layer model spends
more time launching than reading weights. So the step (`decode_step.DecodeStep`) is captured once per
batch-size bucket and replayed:

- static input buffers per bucket (`tokens`, `positions`, `slots`); a batch of B rows runs in the
  smallest bucket >= B, and the padding rows point at a scratch KV slot that no sequence owns;
- attention reads each row's *own* prefix of its slot (`attention_kernels`: a split-KV Triton kernel whose
  loop bounds come from the position buffer), so one graph serves every context length and no kv-length
  buckets are needed. Without Triton (CPU, CI) the same step runs with a torch gather + SDPA attention.

`GraphedDecoder.decode` returns the logits as a view of the bucket's static output buffer: it is valid
until the next `decode` call. With `graphs=False` (CPU) the same step runs eagerly, unpadded.

`GraphedDecoder.ragged` runs one engine step that mixes prefill chunks of several sequences and decode rows
as one flat batch of N tokens, each with its own (slot, position): one pass over the weights for the whole
step, captured per N bucket. Only the rows asked for get logits (a second, small graph per row-count bucket):
prefill tokens get none.

Layers: `attention_kernels` (Triton kernels, torch fallbacks) < `decode_step` (per-layer math, `DecodeStep`)
< this module (buckets, capture, replay).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from brains.backends.attention_kernels import Attention, ragged_groups
from brains.backends.decode_step import DecodeStep
from brains.backends.decoder import DecoderLM, KVCache

log = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
DEFAULT_PREFILL_BUCKETS: tuple[int, ...] = (16, 32, 64, 128)
DEFAULT_RAGGED_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512)


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
