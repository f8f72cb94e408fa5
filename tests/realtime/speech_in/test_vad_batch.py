"""The batched VAD thread: same probabilities and turn events as one stream at a time, in order per session."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from common.audio import resample
from common.config import VadConfig
from realtime.speech_in.vad import FRAME_SAMPLES, SileroVad, SpeechStarted, SpeechStopped, TurnEvent, VadSegmenter
from realtime.speech_in.vad_batch import VadBatcher


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad.load()


@pytest.fixture(scope="module")
def sentences(speak: object) -> list[np.ndarray]:
    """Three different questions at 16 kHz, each with silence around it, so the streams' states differ."""
    out = []
    for i, text in enumerate(["What is the capital of France?", "Tell me a joke.", "How far away is the moon?"]):
        speech = resample(speak(text), 24000, 16000)  # type: ignore[operator]
        pad = np.zeros(8000 + 3000 * i, dtype=np.float32)
        out.append(np.concatenate([pad, speech, np.zeros(16000, dtype=np.float32)]))
    return out


def alone(vad: SileroVad, audio: np.ndarray, chunk: int) -> list[TurnEvent]:
    seg = VadSegmenter(vad, VadConfig())
    events: list[TurnEvent] = []
    for i in range(0, len(audio), chunk):
        events.extend(seg.feed(audio[i:i + chunk]))
    return events


def test_batched_probabilities_equal_one_stream_at_a_time(vad: SileroVad) -> None:
    rng = np.random.default_rng(7)
    frames = [rng.standard_normal((5, FRAME_SAMPLES)).astype(np.float32) * s for s in (0.01, 0.3, 1.0)]
    single = [vad.new_stream() for _ in frames]
    batched = [vad.new_stream() for _ in frames]
    for t in range(5):
        want = [stream.prob(f[t]) for stream, f in zip(single, frames, strict=True)]
        got = vad.probs(batched, [f[t] for f in frames])
        # The state carries over per stream, row by row. (Equal to the bit on two CPUs; the margin is for GEMM
        # kernels that sum a batch in another order.)
        np.testing.assert_allclose(got, want, atol=1e-4)
    for a, b in zip(single, batched, strict=True):
        np.testing.assert_allclose(a.state, b.state, atol=1e-4)


def test_probs_refuses_a_wrong_frame_size(vad: SileroVad) -> None:
    with pytest.raises(ValueError, match="512 samples"):
        vad.probs([vad.new_stream()], [np.zeros(100, dtype=np.float32)])


@pytest.mark.integration
async def test_many_sessions_at_once_get_the_events_each_gets_alone(vad: SileroVad,
                                                                    sentences: list[np.ndarray]) -> None:
    chunk = 320  # 20 ms, as clients send: not a multiple of the 512-sample frame
    want = [alone(vad, audio, chunk) for audio in sentences]
    batcher = VadBatcher()
    segs = [VadSegmenter(vad, VadConfig()) for _ in range(6)]  # two sessions per sentence

    async def stream(seg: VadSegmenter, audio: np.ndarray) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        for i in range(0, len(audio), chunk):
            events.extend(await batcher.feed(seg, audio[i:i + chunk], lambda ev: ev))
        return events

    try:
        got = await asyncio.gather(*(stream(seg, sentences[i % 3]) for i, seg in enumerate(segs)))
    finally:
        batcher.close()
    for i, events in enumerate(got):
        assert [type(e) for e in events] == [type(e) for e in want[i % 3]]
        assert any(isinstance(e, SpeechStarted) for e in events) and any(isinstance(e, SpeechStopped) for e in events)
        for mine, theirs in zip(events, want[i % 3], strict=True):
            assert mine == theirs  # same timestamps (the audio arrays are not compared by ==)
            if isinstance(mine, SpeechStopped):
                np.testing.assert_allclose(mine.audio, theirs.audio)  # type: ignore[union-attr]
    # Frames of several sessions shared model calls.
    assert batcher.rows / batcher.rounds > 1.5


async def test_a_call_sees_every_chunk_submitted_before_it(vad: SileroVad) -> None:
    batcher = VadBatcher()
    seg = VadSegmenter(vad, VadConfig(threshold=0.0, min_speech_ms=0))  # every frame counts as speech
    chunk = np.full(700, 0.1, dtype=np.float32)
    try:
        # Three feeds submitted (each task runs up to its await) before the call, none of them done yet.
        feeds = [asyncio.ensure_future(batcher.feed(seg, chunk, lambda ev: ev)) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(f.done() for f in feeds)
        heard = await batcher.call(seg, lambda: len(seg.current_turn_audio()) + len(seg._pending))
        await asyncio.gather(*feeds)
    finally:
        batcher.close()
    assert heard == 3 * 700


async def test_a_failing_job_fails_alone(vad: SileroVad) -> None:
    batcher = VadBatcher()
    good, bad = VadSegmenter(vad, VadConfig()), VadSegmenter(vad, VadConfig())
    audio = np.zeros(4096, dtype=np.float32)

    def boom(events: list[TurnEvent]) -> None:
        raise RuntimeError("boom")

    try:
        results = await asyncio.gather(batcher.feed(bad, audio, boom), batcher.feed(good, audio, len),
                                       return_exceptions=True)
        assert isinstance(results[0], RuntimeError) and results[1] == 0
        assert await batcher.feed(bad, audio, lambda ev: "still served") == "still served"
        with pytest.raises(ValueError, match="mono"):
            await batcher.feed(bad, np.zeros((2, 512), dtype=np.float32), len)
        assert await batcher.call(good, lambda: "alive") == "alive"
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.call(good, lambda: None)


async def test_a_failing_model_call_fails_that_round_only(vad: SileroVad, monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = VadBatcher()
    a, b = VadSegmenter(vad, VadConfig()), VadSegmenter(vad, VadConfig())
    real = SileroVad.probs
    calls = 0

    def once_broken(self: SileroVad, streams: Any, frames: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("onnxruntime hiccup")
        return real(self, streams, frames)

    monkeypatch.setattr(SileroVad, "probs", once_broken)
    audio = np.zeros(2048, dtype=np.float32)
    try:
        with pytest.raises(RuntimeError, match="hiccup"):
            await batcher.feed(a, audio, len)
        # Both sessions' next audio is served: nothing stuck, nothing left half-fed.
        assert await asyncio.gather(batcher.feed(a, audio, lambda ev: "a"), batcher.feed(b, audio, lambda ev: "b")) \
            == ["a", "b"]
    finally:
        batcher.close()


async def test_a_failing_model_call_fails_a_feed_of_exactly_one_frame(vad: SileroVad,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A feed whose only frame went into the failed call fails too: its frame is gone, so it must not be
    answered as if it had been run (it once was: the frame was taken before the call raised)."""
    batcher = VadBatcher()
    seg = VadSegmenter(vad, VadConfig())

    def broken(self: SileroVad, streams: Any, frames: Any) -> Any:
        raise RuntimeError("onnxruntime hiccup")

    monkeypatch.setattr(SileroVad, "probs", broken)
    try:
        with pytest.raises(RuntimeError, match="hiccup"):
            await batcher.feed(seg, np.zeros(512, dtype=np.float32), len)
        assert (batcher.rounds, batcher.rows) == (0, 0), "/metrics counts frames run, not a failed call's"
    finally:
        batcher.close()
