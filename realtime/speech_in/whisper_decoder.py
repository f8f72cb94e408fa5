"""Batched greedy (and sampled) Whisper decoding over a transformers `WhisperForConditionalGeneration`'s weights.

The loop behind `whisper_torch.TorchListener` (its module docstring says why it is not `generate`): a preallocated
KV cache, cross-attention keys and values computed once per batch, prompts of different lengths left-padded with
their own positions, finished rows dropped. Shapes are few (rows a power of two, the cache a multiple of 64
slots) so that each can be run once at load.

On a GPU (`capture`), the state lives at fixed addresses (`_Fixed`: one set of buffers for the largest row bucket,
each bucket a view of its first rows) and one decode step per row bucket is captured as a CUDA graph: tiny.en's step
is ~80 small kernels launched from Python, a replay is one launch (32 turns on an H200, ASR alone: 0.25 s eager, 0.062
s with the graphs; docs/benchmarks.md 7c). The prefill stays eager (one call per batch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import torch
import torch.nn.functional as F

from realtime.speech_in.whisper_features import N_FRAMES

if TYPE_CHECKING:
    from faster_whisper.tokenizer import Tokenizer

    from realtime.speech_in.ct2_whisper import LoadedWhisper


MAX_LENGTH: Final = 448  # Whisper's text context; CTranslate2 decodes at most half of it


def bucket(n: int) -> int:
    """Batch rows are padded to a power of two: few distinct shapes, each warmed at load (see `TorchListener`)."""
    return 1 << max(0, n - 1).bit_length()


@dataclass
class Hypothesis:
    tokens: list[int]  # generated, without the end token
    sum_logprob: float  # including the end token's, as CTranslate2 scores it
    no_speech_prob: float

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)


@dataclass
class _Layer:
    ln1: tuple[torch.Tensor, torch.Tensor]
    qkv: tuple[torch.Tensor, torch.Tensor]  # fused q, k, v (k's bias is zeros)
    out: tuple[torch.Tensor, torch.Tensor | None]
    ln2: tuple[torch.Tensor, torch.Tensor]
    cross_q: tuple[torch.Tensor, torch.Tensor]
    cross_kv: tuple[torch.Tensor, torch.Tensor]  # fused k, v of the encoder output
    cross_out: tuple[torch.Tensor, torch.Tensor | None]
    ln3: tuple[torch.Tensor, torch.Tensor]
    fc1: tuple[torch.Tensor, torch.Tensor | None]
    fc2: tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class _Batch:
    """Decoder state. `rows[i]` is the caller's index of row i, -1 for a padding row (a copy of another)."""

    rows: list[int]
    self_k: list[torch.Tensor]  # per layer (B, H, slots, Dh), zeros where nothing is written yet
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]  # per layer (B, H, 1500, Dh)
    cross_v: list[torch.Tensor]
    pad: torch.Tensor  # (B,) left padding of each row's prompt
    width: int  # slots the prompts take (the first slot decoding writes)

    fixed: bool = False  # the tensors are views of `_Fixed`'s buffers (graphs read those addresses)

    def keep(self, keep: list[int], rows: list[int]) -> torch.Tensor:
        index = torch.tensor(keep, device=self.pad.device)
        self.rows = rows
        if self.fixed:  # the kept rows move to the front of the same buffers, where the smaller bucket's graph reads
            n = len(keep)
            for tensors in (self.self_k, self.self_v, self.cross_k, self.cross_v):
                for t in tensors:
                    t[:n].copy_(t.index_select(0, index))  # index_select copies first: no overlap
                tensors[:] = [t[:n] for t in tensors]
            self.pad[:n].copy_(self.pad.index_select(0, index))
            self.pad = self.pad[:n]
            return index
        for tensors in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            tensors[:] = [t.index_select(0, index) for t in tensors]
        self.pad = self.pad.index_select(0, index)
        return index


@dataclass
class _Fixed:
    """Decoder state at fixed addresses for up to `rows` rows (a bucket of b rows uses the first b of each buffer),
    the step's inputs, and per row bucket the step captured as a CUDA graph with its outputs."""

    rows: int
    self_k: list[torch.Tensor]  # per layer (rows, H, FIXED_SLOTS, Dh)
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]  # per layer (rows, H, 1500, Dh)
    cross_v: list[torch.Tensor]
    pad: torch.Tensor  # (rows,)
    tokens: torch.Tensor  # (rows, 1): the step's input tokens
    slot: torch.Tensor  # (1,): the cache slot the step writes
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]]
    # b -> (graph, logits after suppression (b, V), greedy tokens (b,), their log-probs (b,))

    def batch(self, b: int, rows: list[int], width: int) -> _Batch:
        return _Batch(rows=rows, self_k=[t[:b] for t in self.self_k], self_v=[t[:b] for t in self.self_v],
                      cross_k=[t[:b] for t in self.cross_k], cross_v=[t[:b] for t in self.cross_v],
                      pad=self.pad[:b], width=width, fixed=True)


def _pick(logits: torch.Tensor, temperature: float,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row (greedy at temperature 0, else sampled) and its log-prob (B,)."""
    if temperature > 0:
        probs = (logits / temperature).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        tokens = logits.argmax(-1)
    return tokens, logits.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


_SLOT_STEP: Final = 64  # the self-attention cache length is a multiple of this (static shapes)
_PROMPT_STEP: Final = 32  # prompts longer than 4 tokens are left-padded to a multiple of this
# The fixed state's cache: the longest prompt (half the context, padded) plus the most tokens a window decodes.
FIXED_SLOTS: Final = -(-(MAX_LENGTH + 2 * _PROMPT_STEP) // _SLOT_STEP) * _SLOT_STEP
_ENCODER_FRAMES: Final = N_FRAMES // 2  # the encoder halves the 3000 log-mel frames


class WhisperDecoder:
    """Batched Whisper decoding over a transformers `WhisperForConditionalGeneration`'s weights.

    Shapes are kept to a few: rows padded to a power of two (`bucket`), the self-attention always over the whole
    cache (a multiple of 64 slots, later ones masked). On a GPU every new shape costs once (kernels loaded and
    chosen on first use, we believe: a first batch of 32 took 3.8 s on an H200, later ones 0.08 s), so `warm` runs
    them all at load.
    """

    def __init__(self, loaded: LoadedWhisper, tokenizer: Tokenizer, suppress: Sequence[int],
                 suppress_begin: Sequence[int], seed: int = 0) -> None:
        model = loaded.model
        self.model = model
        self.dims = loaded.dims
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.heads = loaded.dims.decoder_heads
        self.head_dim = loaded.dims.d_model // self.heads
        dec = model.model.decoder
        self.embed_tokens = dec.embed_tokens.weight
        self.embed_positions = dec.embed_positions.weight
        self.final_ln = (dec.layer_norm.weight, dec.layer_norm.bias)
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in dec.layers:
                sa, ca = layer.self_attn, layer.encoder_attn
                zeros = torch.zeros_like(sa.q_proj.bias)
                self.layers.append(_Layer(
                    ln1=(layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias),
                    qkv=(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]),
                         torch.cat([sa.q_proj.bias, zeros, sa.v_proj.bias])),
                    out=(sa.out_proj.weight, sa.out_proj.bias),
                    ln2=(layer.encoder_attn_layer_norm.weight, layer.encoder_attn_layer_norm.bias),
                    cross_q=(ca.q_proj.weight, ca.q_proj.bias),
                    cross_kv=(torch.cat([ca.k_proj.weight, ca.v_proj.weight]),
                              torch.cat([torch.zeros_like(ca.v_proj.bias), ca.v_proj.bias])),
                    cross_out=(ca.out_proj.weight, ca.out_proj.bias),
                    ln3=(layer.final_layer_norm.weight, layer.final_layer_norm.bias),
                    fc1=(layer.fc1.weight, layer.fc1.bias),
                    fc2=(layer.fc2.weight, layer.fc2.bias),
                ))
        vocab = loaded.dims.vocab_size
        self.suppress = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.suppress[[t for t in suppress if 0 <= t < vocab]] = True
        self.suppress_begin = self.suppress.clone()
        self.suppress_begin[[t for t in suppress_begin if 0 <= t < vocab]] = True
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.fixed: _Fixed | None = None  # `use_fixed` / `capture`: the fixed-address state and its step graphs

    # -- encoder

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, 3000) log-mel features -> (B, 1500, d_model) encoder states."""
        return self.model.model.encoder(features.to(self.device, self.dtype)).last_hidden_state

    def cross_kv(self, encoded: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values (B, H, frames, Dh), once per batch."""
        b, t, _ = encoded.shape
        ks, vs = [], []
        for layer in self.layers:
            kv = F.linear(encoded, *layer.cross_kv).view(b, t, 2, self.heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            ks.append(k.contiguous())
            vs.append(v.contiguous())
        return ks, vs

    # -- decoder

    def _forward(self, batch: _Batch, ids: torch.Tensor, slots: torch.Tensor,
                 extra_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder over `ids` (B, T) written to the consecutive cache slots `slots` (T,); logits (B, V) of the last
        slot (and of slot `extra_rows` per row, for the no-speech probability). `slots` is a tensor, not ints, so
        that a captured step reads its slot from memory."""
        b, t = ids.shape
        d = self.dims.d_model
        # Clamped at both ends: a left-padding slot has no position, and a row that has finished (or a padding copy)
        # keeps stepping beside the longest one and may pass Whisper's last position (a 226-token prompt + 224).
        positions = (slots.unsqueeze(0) - batch.pad.unsqueeze(1)).clamp_(0, self.embed_positions.shape[0] - 1)
        x = F.embedding(ids, self.embed_tokens) + F.embedding(positions, self.embed_positions)
        keys = torch.arange(batch.self_k[0].shape[2], device=self.device).view(1, 1, -1)
        # A key is visible from a query if it is in the row's prompt (not left padding) and not after the query;
        # a padding query sees itself only (a row with no key at all would make NaNs).
        visible = (keys >= batch.pad.view(-1, 1, 1)) & (keys <= slots.view(1, -1, 1))
        visible |= keys == slots.view(1, -1, 1)
        mask = visible.unsqueeze(1)  # (B, 1, T, slots)
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (d,), *layer.ln1)
            qkv = F.linear(h, *layer.qkv).view(b, t, 3, self.heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            batch.self_k[i].index_copy_(2, slots, k)
            batch.self_v[i].index_copy_(2, slots, v)
            a = F.scaled_dot_product_attention(q, batch.self_k[i], batch.self_v[i], attn_mask=mask)
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, d), *layer.out)
            h = F.layer_norm(x, (d,), *layer.ln2)
            q = F.linear(h, *layer.cross_q).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, batch.cross_k[i], batch.cross_v[i])
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, d), *layer.cross_out)
            h = F.layer_norm(x, (d,), *layer.ln3)
            x = x + F.linear(F.gelu(F.linear(h, *layer.fc1)), *layer.fc2)
        last = F.layer_norm(x[:, -1], (d,), *self.final_ln)
        logits = F.linear(last, self.embed_tokens).float()
        extra = None
        if extra_rows is not None:
            picked = x[torch.arange(b, device=self.device), extra_rows]
            extra = F.linear(F.layer_norm(picked, (d,), *self.final_ln), self.embed_tokens).float()
        return logits, extra

    def prefill(self, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor], prompts: Sequence[Sequence[int]],
                room: int = 0) -> tuple[_Batch, torch.Tensor, torch.Tensor]:
        """Run the prompts (left-padded to one width, each at its own positions) into a KV cache with at least
        `room` free slots after them. One row per prompt; `cross_*` may have more rows (padding, ignored).
        Returns the state, the logits (B, V) after each prompt and those at its <|startoftranscript|> (for the
        no-speech probability), B = bucket(len(prompts)). The state is the fixed one (`use_fixed`) where it fits."""
        n, b = len(prompts), bucket(len(prompts))
        prompts = [*prompts, *[prompts[0]] * (b - n)]
        width = max(len(p) for p in prompts)
        if width > 4:
            width = -(-width // _PROMPT_STEP) * _PROMPT_STEP
        pad = [width - len(p) for p in prompts]
        ids = torch.tensor([[self.tokenizer.eot] * p + list(prompt) for p, prompt in zip(pad, prompts, strict=True)],
                           device=self.device)
        rows = [*range(n), *[-1] * (b - n)]
        copies = [min(i, n - 1) for i in range(b)]  # the cross rows: padding rows repeat the last prompt's
        fixed = self.fixed
        if fixed is not None and b <= fixed.rows and width + room <= FIXED_SLOTS:
            batch = fixed.batch(b, rows, width)
            index = torch.tensor(copies, device=self.device)
            for source, target in ((cross_k, batch.cross_k), (cross_v, batch.cross_v)):
                for s, t in zip(source, target, strict=True):
                    torch.index_select(s, 0, index, out=t)
            for t in (*batch.self_k, *batch.self_v):
                t.zero_()  # not needed (masked), but no stale values from the last batch can be read
            batch.pad.copy_(torch.tensor(pad))
        else:
            if cross_k[0].shape[0] != b:
                index = torch.tensor(copies, device=self.device)
                cross_k = [k.index_select(0, index) for k in cross_k]
                cross_v = [v.index_select(0, index) for v in cross_v]
            slots = -(-(width + room) // _SLOT_STEP) * _SLOT_STEP
            cache_shape = (b, self.heads, slots, self.head_dim)
            batch = _Batch(
                rows=rows,
                self_k=[torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in self.layers],
                self_v=[torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in self.layers],
                cross_k=list(cross_k), cross_v=list(cross_v),
                pad=torch.tensor(pad, device=self.device),
                width=width,
            )
        sot = self.tokenizer.sot
        sot_slots = torch.tensor([p + list(prompt).index(sot) for p, prompt in zip(pad, prompts, strict=True)],
                                 device=self.device)
        logits, at_sot = self._forward(batch, ids, torch.arange(width, device=self.device), extra_rows=sot_slots)
        assert at_sot is not None
        return batch, logits, at_sot

    def _step_logits(self, batch: _Batch, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One decode step's logits (B, V), the suppressed tokens masked: what a captured graph runs too."""
        logits, _ = self._forward(batch, ids, slots)
        return logits.masked_fill_(self.suppress, -math.inf)

    def _step(self, batch: _Batch, tokens: torch.Tensor, slot: int,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of every row at cache slot `slot`: each row's next token and its log-prob."""
        fixed = self.fixed
        if batch.fixed and fixed is not None:
            b = len(batch.rows)
            fixed.tokens[:b].copy_(tokens.view(b, 1))
            fixed.slot.fill_(slot)
            captured = fixed.graphs.get(b)
            if captured is not None:
                graph, logits, greedy, logprobs = captured
                graph.replay()
                if temperature == 0:
                    return greedy, logprobs  # read (tolist) before the next replay overwrites them
                return _pick(logits, temperature, self.generator)
            ids, slots = fixed.tokens[:b], fixed.slot  # fixed buffers without graphs: the CPU tests
        else:
            ids, slots = tokens.unsqueeze(1), torch.tensor([slot], device=self.device)
        return _pick(self._step_logits(batch, ids, slots), temperature, self.generator)

    def decode(self, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor], prompts: Sequence[Sequence[int]],
               max_new: Sequence[int], temperature: float = 0.0) -> list[Hypothesis]:
        """One hypothesis per prompt: greedy at temperature 0, else sampled. Row i of `cross_*` belongs to
        prompts[i] (rows past them are padding); it stops at the end token or after max_new[i] tokens."""
        batch, logits, at_sot = self.prefill(cross_k, cross_v, prompts, room=max(max_new))
        no_speech = at_sot.softmax(-1)[:, self.tokenizer.no_speech].tolist()
        hyps = [Hypothesis([], 0.0, p) for p in no_speech[:len(prompts)]]
        slot = batch.width
        tokens, chosen = _pick(logits.masked_fill_(self.suppress_begin, -math.inf), temperature, self.generator)
        while True:
            token_list, chosen_list = tokens.tolist(), chosen.tolist()
            alive: list[int] = []
            for i, row in enumerate(batch.rows):
                if row < 0:
                    continue
                hyp = hyps[row]
                hyp.sum_logprob += chosen_list[i]
                if token_list[i] == self.tokenizer.eot:
                    continue
                hyp.tokens.append(token_list[i])
                if len(hyp.tokens) < max_new[row]:
                    alive.append(i)
            if not alive:
                break
            size = bucket(len(alive))
            if size < len(batch.rows):  # fewer rows: the next bucket down, padded with copies
                keep = [*alive, *[alive[0]] * (size - len(alive))]
                rows = [*(batch.rows[i] for i in alive), *[-1] * (size - len(alive))]
                tokens = tokens.index_select(0, batch.keep(keep, rows))
            else:  # same bucket: a row that stopped stays as padding, its later tokens and scores not its own
                live = set(alive)
                batch.rows = [row if i in live else -1 for i, row in enumerate(batch.rows)]
            tokens, chosen = self._step(batch, tokens, slot, temperature)
            slot += 1
        return hyps

    def use_fixed(self, max_rows: int) -> None:
        """Decode batches of up to bucket(max_rows) rows in fixed buffers (the graphs' precondition; on the CPU it
        only makes the tests cover the same state handling)."""
        rows = bucket(max_rows)
        kw = {"device": self.device, "dtype": self.dtype}
        self.fixed = _Fixed(
            rows=rows,
            self_k=[torch.zeros((rows, self.heads, FIXED_SLOTS, self.head_dim), **kw) for _ in self.layers],
            self_v=[torch.zeros((rows, self.heads, FIXED_SLOTS, self.head_dim), **kw) for _ in self.layers],
            cross_k=[torch.zeros((rows, self.heads, _ENCODER_FRAMES, self.head_dim), **kw) for _ in self.layers],
            cross_v=[torch.zeros((rows, self.heads, _ENCODER_FRAMES, self.head_dim), **kw) for _ in self.layers],
            pad=torch.zeros(rows, dtype=torch.long, device=self.device),
            tokens=torch.full((rows, 1), self.tokenizer.eot, dtype=torch.long, device=self.device),
            slot=torch.zeros(1, dtype=torch.long, device=self.device),
            graphs={},
        )

    def capture(self, max_rows: int) -> None:
        """CUDA graphs of one greedy decode step per row bucket up to `max_rows`, over fixed buffers (memory: the
        largest bucket's caches once, ~0.4 GB for tiny.en at 32 rows, about what one eager batch of 32 allocates)."""
        self.use_fixed(max_rows)
        fixed = self.fixed
        assert fixed is not None
        b = 1
        while b <= fixed.rows:
            batch = fixed.batch(b, [-1] * b, 0)
            tokens = fixed.tokens[:b]

            def step(batch: _Batch = batch, tokens: torch.Tensor = tokens) -> tuple[torch.Tensor, ...]:
                logits = self._step_logits(batch, tokens, fixed.slot)
                return (logits, *_pick(logits, 0.0, None))

            # On the decoder's own device, also where asr.device names another GPU than the current one: torch's
            # default capture stream belongs to the GPU current at the process's first capture (the engine's).
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up runs off the capture (cuBLAS handles, autotuning)
                    step()
                    step()
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    logits, greedy, logprobs = step()
            fixed.graphs[b] = (graph, logits, greedy, logprobs)
            b *= 2

    def warm(self, max_rows: int, n_mels: int) -> None:
        """Run every shape decoding can meet with up to `max_rows` rows: each row bucket through the encoder,
        a prefill and one step at each cache length (and sampling once); with fixed buffers, a prefill at every
        prompt width and a few steps. The temperature fallback's decodes of more rows (best-of-5 of many rows at
        once, rare) pay for their first shape when they come."""
        prompt = [*self.tokenizer.sot_sequence, self.tokenizer.no_timestamps]
        fixed, self.fixed = self.fixed, None  # the eager shapes first (a batch the fixed state cannot hold)
        b = 1
        while b <= bucket(max_rows):
            features = torch.zeros((b, n_mels, N_FRAMES), device=self.device, dtype=self.dtype)
            cross_k, cross_v = self.cross_kv(self.encode(features))
            for length in range(_SLOT_STEP, FIXED_SLOTS + 1, _SLOT_STEP):  # every eager cache length
                batch, logits, _ = self.prefill(cross_k, cross_v, [prompt] * b, room=length - len(prompt))
                self._step(batch, logits.argmax(-1), len(prompt), 0.0)
            if fixed is not None and b <= fixed.rows:
                self.fixed = fixed
                # Up to 256: the longest conversation prompt (223 tokens + 3) pads to it.
                for width in (len(prompt), *range(_PROMPT_STEP, MAX_LENGTH // 2 + 2 * _PROMPT_STEP, _PROMPT_STEP)):
                    long = [*[self.tokenizer.eot] * (width - len(prompt)), *prompt]  # a prompt of that width
                    batch, logits, _ = self.prefill(cross_k, cross_v, [long] * b, room=4)
                    self._step(batch, logits.argmax(-1), width, 0.0)
                self.fixed = None
            b *= 2
        self.fixed = fixed
        self.decode(cross_k, cross_v, [prompt], [2], temperature=1.0)
