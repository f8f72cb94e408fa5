"""One thread decodes every session's latent frames together (tts.decoder = "torch").

The TTS pool's threads each run Piper's front (onnxruntime, CPU) for their chunk and hand its latent frames here;
whatever has arrived while the last batch ran goes into the next one, so the batch grows with the load and a
lone chunk waits for nothing. On a GPU the decoder runs on its own CUDA stream, so in a process that also holds the
LLM engine its kernels neither wait behind the engine's steps nor hold them up.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext

import numpy as np
import torch

from tts.hifigan import HifiGan

logger = logging.getLogger(__name__)

# Latent frames in one batch, all items padded to the longest: ~44 s of speech at 22050 Hz and hop 256. It bounds
# the decoder's activations (a few hundred MB at the last layer) when many sessions speak long chunks at once.
MAX_BATCH_FRAMES = 3800


class BatchDecoder:
    def __init__(self, decoder: HifiGan, *, max_batch_frames: int = MAX_BATCH_FRAMES) -> None:
        self.decoder = decoder
        self.batches = 0  # decoder calls and items decoded: how well the load batched (/metrics)
        self.items = 0
        self.busy_seconds = 0.0  # wall time in decoder calls, host copies included: its rate is the thread's load
        self._max_frames = max_batch_frames
        self._pending: list[tuple[np.ndarray, Future[np.ndarray]]] = []
        self._ready = threading.Condition()
        self._closed = False
        cuda = decoder.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=decoder.device) if cuda else None
        self._thread = threading.Thread(target=self._run, name="duet-tts-decoder", daemon=True)
        self._thread.start()

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """One chunk's latent frames [channels, frames] -> its waveform [frames * hop]; blocks until decoded."""
        done: Future[np.ndarray] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the TTS decoder is closed")
            self._pending.append((latent, done))
            self._ready.notify()
        return done.result()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if self._closed and not self._pending:
                    return
                batch = self._take()
            started = time.perf_counter()
            try:
                audio = self._decode(batch)
            except Exception as exc:  # e.g. CUDA out of memory: these chunks fail, the next batch is tried anew
                logger.exception("TTS decoder failed on a batch of %d", len(batch))
                for _, done in batch:
                    done.set_exception(exc)
                continue
            finally:
                self.busy_seconds += time.perf_counter() - started
            for (_, done), wav in zip(batch, audio, strict=True):
                done.set_result(wav)

    def _take(self) -> list[tuple[np.ndarray, Future[np.ndarray]]]:
        """The oldest pending chunks whose padded batch fits the frame cap (at least one). Caller holds the lock."""
        count, longest = 0, 0
        for latent, _ in self._pending:
            longest = max(longest, latent.shape[-1])
            if count and longest * (count + 1) > self._max_frames:
                break
            count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch

    def _decode(self, batch: list[tuple[np.ndarray, Future[np.ndarray]]]) -> list[np.ndarray]:
        frames = [latent.shape[-1] for latent, _ in batch]
        host = np.zeros((len(batch), batch[0][0].shape[0], max(frames)), dtype=np.float32)
        for row, (latent, _) in enumerate(batch):
            host[row, :, : latent.shape[-1]] = latent
        device = self.decoder.device
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            wav = self.decoder(torch.from_numpy(host).to(device), torch.tensor(frames, device=device)).cpu().numpy()
        self.batches += 1
        self.items += len(batch)
        hop = self.decoder.hop
        return [wav[row, : n * hop] for row, n in enumerate(frames)]

