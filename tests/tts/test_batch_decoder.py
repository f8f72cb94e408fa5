"""BatchDecoder with a fake decoder: what queues while a batch runs goes into the next, within the frame cap."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tts.batch_decoder import BatchDecoder  # noqa: E402


class _FakeDecoder:
    """Waveform sample t of item b = the item's first latent value (its tag); records every batch's shape."""

    hop = 4
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.release = threading.Event()  # the first batch waits for it, so later chunks queue meanwhile
        self.started = threading.Event()
        self.fail_next = False

    def __call__(self, latents: Any, frames: Any) -> Any:
        self.shapes.append(tuple(latents.shape))
        self.started.set()
        self.release.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA out of memory (fake)")
        tags = latents[:, 0, 0]
        return tags[:, None].repeat(1, latents.shape[-1] * self.hop)


def _latent(tag: float, frames: int) -> np.ndarray:
    return np.full((2, frames), tag, dtype=np.float32)


def _submit_while_busy(decoder: _FakeDecoder, batcher: BatchDecoder, frames: list[int]) -> list[np.ndarray]:
    """One chunk holds the decoder; the others queue behind it; then all finish."""
    with ThreadPoolExecutor(len(frames)) as pool:
        first = pool.submit(batcher.decode, _latent(0.0, frames[0]))
        assert decoder.started.wait(10)
        rest = [pool.submit(batcher.decode, _latent(float(k), n)) for k, n in enumerate(frames[1:], start=1)]
        while len(batcher._pending) < len(rest):  # every later chunk is queued before the first batch ends
            threading.Event().wait(0.01)
        decoder.release.set()
        return [first.result(10)] + [f.result(10) for f in rest]


def test_chunks_that_queue_during_a_batch_are_decoded_together_and_trimmed() -> None:
    decoder = _FakeDecoder()
    batcher = BatchDecoder(decoder)  # type: ignore[arg-type]
    try:
        out = _submit_while_busy(decoder, batcher, [5, 3, 7, 2])
    finally:
        batcher.close()
    assert decoder.shapes == [(1, 2, 5), (3, 2, 7)]  # the three waiting chunks in one batch, padded to 7 frames
    assert (batcher.batches, batcher.items) == (2, 4)
    for k, (wav, n) in enumerate(zip(out, [5, 3, 7, 2], strict=True)):
        assert wav.shape == (n * decoder.hop,)  # each trimmed to its own frames
        assert np.all(wav == float(k))  # and its own row of the batch


def test_a_batch_stops_at_the_frame_cap_in_arrival_order() -> None:
    decoder = _FakeDecoder()
    batcher = BatchDecoder(decoder, max_batch_frames=12)  # type: ignore[arg-type]
    try:
        _submit_while_busy(decoder, batcher, [1, 4, 4, 4, 20])
    finally:
        batcher.close()
    # 3 x 4 = 12 frames fit; a chunk longer than the cap still goes, alone.
    assert decoder.shapes == [(1, 2, 1), (3, 2, 4), (1, 2, 20)]


def test_a_failed_batch_fails_its_chunks_and_the_next_batch_runs() -> None:
    decoder = _FakeDecoder()
    decoder.fail_next = True
    decoder.release.set()
    batcher = BatchDecoder(decoder)  # type: ignore[arg-type]
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.decode(_latent(1.0, 3))
        assert np.all(batcher.decode(_latent(2.0, 3)) == 2.0)
    finally:
        batcher.close()


def test_a_closed_decoder_refuses_new_chunks() -> None:
    decoder = _FakeDecoder()
    decoder.release.set()
    batcher = BatchDecoder(decoder)  # type: ignore[arg-type]
    batcher.close()
    assert not batcher._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.decode(_latent(1.0, 3))
