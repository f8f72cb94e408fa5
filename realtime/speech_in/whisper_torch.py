"""Whisper in torch, batched across sessions: `TorchListener`, the `asr.engine = "torch"` listener.

The same interface as `asr.Listener` (faster-whisper / CTranslate2), for a GPU that CTranslate2 cannot use (CUDA
13: CTranslate2 4.x needs libcublas.so.12). The weights are the same CTranslate2 model directory, read into
transformers' Whisper by `ct2_whisper.load_whisper`.

Every `transcribe` call (from any number of ASR pool threads) prepares its audio (numpy padding, no BLAS), queues
it and blocks on a Future. One worker thread takes every request waiting (up to `max_batch` 30 s windows), and
runs on the device: one log-mel STFT over all of them, one encoder pass, one batched greedy decode; then resolves
the Futures. Concurrent turns of all sessions share one GPU pass instead of queueing for a CPU replica, and the
pool threads do no heavy work (numpy's multithreaded BLAS from 32 threads at once starved the worker in a test).

Decoding follows what `Listener` asks faster-whisper for (asr.py): English (or asr.language on a multilingual
model), no timestamps, beam 1, no conditioning on earlier windows, the caller's prompt before the first window,
faster-whisper's suppressed tokens and blank suppression at the first step, at most CTranslate2's token limit,
its no-speech rule (a window with no_speech_prob > 0.6 and average log-prob <= -1 says nothing) and its
temperature fallback (a window whose text compresses more than 2.4x or averages a log-prob below -1 is decoded
again by sampling best-of-5 at 0.2, 0.4, ... 1.0; seeded, so repeatable for the same batches). One addition: a
window may not decode more than `_MAX_TOKENS_PER_SECOND` tokens per second of its audio (plus a margin), so a
decode stuck repeating itself does not hold the whole batch for 224 steps; real speech stays far below it.

The decoder loop is our own (`whisper_decoder.py`; log-mel in `whisper_features.py`) over the model's weights: a
preallocated KV cache, cross-attention keys and values computed once per batch, prompts of different lengths left-
padded with their own positions, finished rows dropped from the batch. The encoder is transformers'
`WhisperEncoder`. Shapes are kept to a few (rows padded to a power of two, the cache a multiple of 64 slots) and
all run once at load on a GPU: there a new shape costs seconds the first time (a first batch of 32 took 3.8 s on
an H200, later ones 0.08 s). Why not transformers' `generate`: it is about as fast on the GPU (bench/asr_torch.py
--hf-generate) but gives no no-speech probability or per-row limits, cannot place left-padded prompts at their own
positions, and its Whisper entry point changes between transformers versions.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt
import torch

from common.audio import SPEECH_RATE, whisper_input
from common.config import AsrConfig
from common.errors import EngineError
from common.torch_device import torch_device
from realtime.speech_in.whisper_decoder import MAX_LENGTH, Hypothesis, WhisperDecoder, bucket
from realtime.speech_in.whisper_features import N_FFT, N_FRAMES, LogMel, prepare_signal

if TYPE_CHECKING:

    from realtime.speech_in.ct2_whisper import LoadedWhisper

logger = logging.getLogger(__name__)

MAX_BATCH: Final = 32  # 30 s windows in one pass (a turn longer than 30 s has several)
# faster-whisper's defaults, which asr.Listener uses.
_TEMPERATURES: Final = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_BEST_OF: Final = 5
_COMPRESSION_RATIO_THRESHOLD: Final = 2.4
_LOG_PROB_THRESHOLD: Final = -1.0
_NO_SPEECH_THRESHOLD: Final = 0.6
# Our cap on tokens per window: English speech runs ~3-5 tokens a second.
_MAX_TOKENS_PER_SECOND: Final = 16
_MIN_TOKEN_CAP: Final = 32
_FLOAT_TYPES: Final = ("float32", "float16", "bfloat16")
# CTranslate2 compute types that name no float type for torch: the device's default is used.
_DEVICE_DEFAULT_TYPES: Final = ("default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16")


# ---------------------------------------------------------------- requests


class _Request:
    """One `transcribe` call: its audio and windows, prepared on the caller's thread, and the Future it waits on."""

    def __init__(self, signal: np.ndarray, frames: int, windows: list[tuple[int, int, list[int], int]]) -> None:
        self.signal = signal  # reflect-padded for the STFT (see `prepare_signal`)
        self.frames = frames  # log-mel frames of the audio
        self.windows = windows  # (first frame, frame count, prompt tokens, max new tokens) per 30 s window
        self.future: Future[str] = Future()

    def done(self, texts: list[str]) -> None:
        if not self.future.done():
            self.future.set_result(" ".join(t for t in texts if t).strip())

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


# ---------------------------------------------------------------- the listener

_Decoded = tuple[Hypothesis, float, float, str]  # a window's hypothesis, avg log-prob, compression ratio, text


def resolve_device(cfg: AsrConfig) -> tuple[torch.device, torch.dtype]:
    """The torch device and float type for `cfg`, or EngineError saying why the device cannot be used."""
    device = torch_device("asr.device", cfg.device, 'asr.engine = "torch"')
    if cfg.compute_type in _FLOAT_TYPES:
        dtype = getattr(torch, cfg.compute_type)
    elif cfg.compute_type in _DEVICE_DEFAULT_TYPES:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        raise ValueError(f"asr.compute_type = {cfg.compute_type!r}: asr.engine = \"torch\" takes one of "
                         f"{_FLOAT_TYPES}, or a CTranslate2 type {_DEVICE_DEFAULT_TYPES} meaning the device's "
                         "default (float16 on cuda, float32 on cpu)")
    return device, dtype


class TorchListener:
    """Whisper on a torch device, one batched pass for all concurrent calls. `transcribe` is blocking and
    thread-safe: call it from as many threads as turns should be batched together (the ASR pool)."""

    def __init__(self, loaded: LoadedWhisper, cfg: AsrConfig, *, max_batch: int = MAX_BATCH, seed: int = 0) -> None:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self.cfg = cfg
        self.path = loaded.path
        self.max_batch = max(1, max_batch)
        multilingual = loaded.dims.multilingual
        if multilingual and not cfg.language:
            raise ValueError("asr.language is empty: asr.engine = \"torch\" does not detect the language; "
                             "name it (e.g. asr.language = \"en\")")
        # As asr.Listener: English-only models always decode English.
        self.language: str | None = cfg.language if multilingual else None
        self.tokenizer = Tokenizer(loaded.tokenizer, multilingual, task="transcribe", language=self.language)
        suppress = get_suppressed_tokens(self.tokenizer, [-1])
        begin = [int(t) for t in loaded.ct2_config.get("suppress_ids_begin") or []]  # type: ignore[attr-defined]
        self.decoder = WhisperDecoder(loaded, self.tokenizer, suppress or (), begin, seed=seed)
        self.device = self.decoder.device
        self.dtype = self.decoder.dtype
        self.n_mels = loaded.dims.n_mels
        self.log_mel = LogMel(self.n_mels, self.device)
        self.batches = 0  # worker passes run (stats for tests and benchmarks)
        self.windows = 0
        self.max_seen_batch = 0
        self.busy_s = 0.0  # worker time in batches
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="duet-asr-torch", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, cfg: AsrConfig, path: Path, *, max_batch: int = MAX_BATCH) -> TorchListener:
        """The CTranslate2 Whisper directory `path` (asr.resolve_whisper_model(cfg); asr.load_listener passes it)
        on cfg.device. EngineError if the device cannot be used."""
        from realtime.speech_in.ct2_whisper import load_whisper

        if cfg.beam_size != 1:
            raise ValueError(f"asr.beam_size = {cfg.beam_size}: asr.engine = \"torch\" decodes greedily (beam 1)")
        device, dtype = resolve_device(cfg)
        started = time.perf_counter()
        listener: TorchListener | None = None
        try:
            loaded = load_whisper(path, device=device, dtype=dtype)
            listener = cls(loaded, cfg, max_batch=max_batch)
            if device.type != "cpu":
                # Every shape once, now: a GPU that torch sees but cannot run on fails at start, not on a turn, and
                # no turn pays for loading kernels (seconds on a cold H200).
                with torch.inference_mode():
                    if cfg.cuda_graphs and device.type == "cuda":
                        listener.decoder.capture(listener.max_batch)
                    listener.decoder.warm(listener.max_batch, listener.n_mels)
                listener.transcribe(np.zeros(SPEECH_RATE, dtype=np.float32))
        except (RuntimeError, OSError) as exc:
            if listener is not None:
                listener.close()
            if device.type == "cpu":
                raise
            graphs = " (or, if the CUDA graphs are what failed, asr.cuda_graphs = false)" if cfg.cuda_graphs else ""
            raise EngineError(f"asr.device = {cfg.device!r} cannot be used by asr.engine = \"torch\": {exc}. "
                              f"Fix: set asr.device = \"cpu\"{graphs}.") from exc
        fixed = listener.decoder.fixed
        logger.info("loaded Whisper %s in torch (%s, %s, batches of up to %d windows, decode step in CUDA graphs: %s) "
                    "in %.1f s", path, device, str(dtype).removeprefix("torch."), listener.max_batch,
                    "yes" if fixed is not None and fixed.graphs else "no", time.perf_counter() - started)
        return listener

    # -- callers' side

    def transcribe(self, audio16k: npt.ArrayLike, prompt: str | None = None) -> str:
        """Text of mono 16 kHz float32 audio; `prompt` (earlier conversation) biases spelling."""
        audio = whisper_input(audio16k)
        if audio is None:
            return ""
        request = self._request(audio, prompt)
        with self._lock:  # with close(): a request is queued before the worker's stop sentinel, or refused
            if self._closed:
                raise EngineError("the torch Whisper listener is closed")
            self._queue.put(request)
        return request.future.result()

    def _request(self, audio: np.ndarray, prompt: str | None) -> _Request:
        """faster-whisper's windows: consecutive 30 s of log-mel frames (the last frame left out, as it does), each
        zero-padded to 30 s; the prompt goes before the first only (no conditioning on previous text)."""
        signal, frames = prepare_signal(audio)
        content = frames - 1
        tok = self.tokenizer
        windows = []
        for index, seek in enumerate(range(0, content, N_FRAMES)):
            size = min(N_FRAMES, content - seek)
            tokens: list[int] = []
            if index == 0 and prompt and prompt.strip():
                tokens = [tok.sot_prev, *tok.encode(" " + prompt.strip())[-(MAX_LENGTH // 2 - 1):]]
            tokens += [*tok.sot_sequence, tok.no_timestamps]
            # CTranslate2: at most half the text context, and no more than the context left after the prompt.
            ct2_cap = min(MAX_LENGTH // 2, MAX_LENGTH - (len(tokens) - 1))
            ours = _MIN_TOKEN_CAP + math.ceil(_MAX_TOKENS_PER_SECOND * size / 100)
            windows.append((seek, size, tokens, min(ct2_cap, ours)))
        return _Request(signal, frames, windows)

    def features(self, audio: npt.ArrayLike) -> torch.Tensor:
        """The log-mel windows (windows, n_mels, 3000) this listener decodes for `audio`, float32 on its device."""
        return self._features([self._request(np.ascontiguousarray(audio, dtype=np.float32), None)])[0]

    # -- the worker

    def close(self) -> None:
        """Stop the worker (calls waiting now get an EngineError); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._worker.join(timeout=30)

    def _run(self) -> None:
        pending: list[_Request] = []
        stop = False
        while True:
            if not pending:
                first = self._queue.get()
                if first is None:
                    break
                pending.append(first)
            windows = len(pending[0].windows)
            batch = [pending.pop(0)]
            while not stop:  # everything waiting, up to max_batch windows (a longer request goes alone)
                if not pending:
                    try:
                        request = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if request is None:
                        stop = True
                        break
                    pending.append(request)
                if windows + len(pending[0].windows) > self.max_batch:
                    break
                windows += len(pending[0].windows)
                batch.append(pending.pop(0))
            if stop:
                pending.extend(batch)
                break
            self._serve(batch)
        closed = EngineError("the torch Whisper listener is closed")
        for request in pending:
            request.fail(closed)
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                left.fail(closed)

    def _serve(self, batch: list[_Request]) -> None:
        """Transcribe `batch` and answer every request. A failing batch (out of memory on a long turn, a bug
        on odd audio) is retried one request at a time, so only the request that fails gets the error, not up
        to max_batch sessions' turns."""
        try:
            started = time.perf_counter()
            with torch.inference_mode():
                texts = self._transcribe_batch(batch)
            self.busy_s += time.perf_counter() - started
            for request, request_texts in zip(batch, texts, strict=True):
                request.done(request_texts)
            return
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) > 1:
                logger.warning("torch Whisper failed a batch of %d requests (%s); retrying them one by one",
                               len(batch), exc)
                for request in batch:
                    self._serve([request])
                return
            logger.exception("torch Whisper failed a request")
            batch[0].fail(EngineError(f"Whisper (torch) failed: {exc}"))

    def _features(self, requests: list[_Request]) -> list[torch.Tensor]:
        """Each request's windows of log-mel frames, (windows, n_mels, 3000) float32 on the device."""
        # Rows and length rounded up (to a power of two, to whole seconds): few STFT shapes.
        rows = bucket(len(requests))
        length = max(len(r.signal) for r in requests)
        length = -(-length // SPEECH_RATE) * SPEECH_RATE
        empty = np.zeros(N_FFT, dtype=np.float32)
        signals = [r.signal for r in requests] + [empty] * (rows - len(requests))
        mel = self.log_mel(signals, [r.frames for r in requests] + [1] * (rows - len(requests)), length)
        out = []
        for row, request in enumerate(requests):
            windows = torch.zeros((len(request.windows), self.n_mels, N_FRAMES), device=self.device)
            for i, (seek, size, _, _) in enumerate(request.windows):
                windows[i, :, :size] = mel[row, :, seek:seek + size]
            out.append(windows)
        return out

    def _transcribe_batch(self, requests: list[_Request]) -> list[list[str]]:
        """Every window of `requests` through one encoder pass and one decode; their texts, per request."""
        windows = [w for r in requests for w in r.windows]
        self.batches += 1
        self.windows += len(windows)
        self.max_seen_batch = max(self.max_seen_batch, len(windows))
        rows = bucket(len(windows))
        features = torch.zeros((rows, self.n_mels, N_FRAMES), device=self.device)
        torch.cat(self._features(requests), out=features[:len(windows)])
        cross_k, cross_v = self.decoder.cross_kv(self.decoder.encode(features))
        results = self._decode_with_fallback(cross_k, cross_v, [w[2] for w in windows], [w[3] for w in windows])
        texts = []
        for hyp, avg, _ratio, text in results:
            if hyp.no_speech_prob > _NO_SPEECH_THRESHOLD and not avg > _LOG_PROB_THRESHOLD:
                texts.append("")  # faster-whisper skips a window that sounds like no speech
            else:
                texts.append(text)
        out, at = [], 0
        for request in requests:
            out.append(texts[at:at + len(request.windows)])
            at += len(request.windows)
        return out

    def _decode_with_fallback(self, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor],
                              prompts: list[list[int]], max_new: list[int]) -> list[_Decoded]:
        """faster-whisper's `generate_with_fallback`, for a batch: rows that fail the thresholds at one
        temperature are decoded again, all together, at the next."""
        from faster_whisper.transcribe import get_compression_ratio

        n = len(prompts)
        tried: list[list[_Decoded]] = [[] for _ in range(n)]
        chosen: list[_Decoded | None] = [None] * n
        todo = list(range(n))
        for temperature in _TEMPERATURES:
            if temperature == 0:
                hyps = dict(enumerate(self.decoder.decode(cross_k, cross_v, prompts, max_new)))
            else:
                # best_of samples of every row left, each row keeping its best (by average log-prob); in groups of
                # at most max_batch decode rows, so a batch of hard windows cannot ask for best_of x the memory.
                hyps = {}
                group = max(1, self.max_batch // _BEST_OF)
                for at in range(0, len(todo), group):
                    rows = todo[at:at + group]
                    index = torch.tensor(rows, device=self.device).repeat_interleave(_BEST_OF)
                    samples = self.decoder.decode(
                        [k.index_select(0, index) for k in cross_k], [v.index_select(0, index) for v in cross_v],
                        [prompts[i] for i in rows for _ in range(_BEST_OF)],
                        [max_new[i] for i in rows for _ in range(_BEST_OF)], temperature)
                    hyps.update({i: max(samples[j * _BEST_OF:(j + 1) * _BEST_OF], key=lambda h: h.avg_logprob)
                                 for j, i in enumerate(rows)})
            still: list[int] = []
            for i in todo:
                hyp = hyps[i]
                text = self.tokenizer.decode(hyp.tokens).strip()
                ratio = get_compression_ratio(text)
                result = (hyp, hyp.avg_logprob, ratio, text)
                tried[i].append(result)
                needs_fallback = ratio > _COMPRESSION_RATIO_THRESHOLD or hyp.avg_logprob < _LOG_PROB_THRESHOLD
                if hyp.no_speech_prob > _NO_SPEECH_THRESHOLD and hyp.avg_logprob < _LOG_PROB_THRESHOLD:
                    needs_fallback = False  # silence: faster-whisper keeps it (and then skips the window)
                if needs_fallback:
                    still.append(i)
                else:
                    chosen[i] = result
            todo = still
            if not todo:
                break
        for i in todo:  # every temperature failed: the best average log-prob, preferring unrepetitive texts
            fine = [r for r in tried[i] if r[2] <= _COMPRESSION_RATIO_THRESHOLD]
            chosen[i] = max(fine or tried[i], key=lambda r: r[1])
        return [c for c in chosen if c is not None]
