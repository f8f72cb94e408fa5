"""Smart Turn v3.2 (the real ONNX model from the pipecat-ai wheel) and semantic_vad on real speech."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import soxr

from common.config import VadConfig
from realtime.speech_in.smart_turn import N_FRAMES, N_MELS, WINDOW_SAMPLES, SmartTurn, bundled_model_path
from realtime.speech_in.vad import SileroVad, SpeechStopped, TurnEvent, VadSegmenter

pytestmark = pytest.mark.integration

Speak16k = Callable[[str], np.ndarray]


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurn:
    return SmartTurn.load()


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad.load()


@pytest.fixture(scope="module")
def speak16k(speak: Callable[[str], np.ndarray]) -> Speak16k:
    """Piper (noise off, so the same audio every run), at 16 kHz, without its leading/trailing quiet."""

    def _speak(text: str) -> np.ndarray:
        audio = soxr.resample(speak(text), 24000, 16000).astype(np.float32)
        loud = np.nonzero(np.abs(audio) > 0.02 * np.abs(audio).max())[0]
        return audio[loud[0]:loud[-1] + 1]

    return _speak


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * 16, dtype=np.float32)


def run(vad: SileroVad, cfg: VadConfig, audio: np.ndarray, model: SmartTurn | None) -> list[tuple[int, TurnEvent]]:
    """(ms of audio fed when the event came, event), in 20 ms chunks as a client appends them."""
    seg = VadSegmenter(vad, cfg, turn_model=model)
    out = []
    for i in range(0, len(audio), 320):
        out.extend((min(i + 320, len(audio)) // 16, ev) for ev in seg.feed(audio[i:i + 320]))
    return out


def stops(events: list[tuple[int, TurnEvent]]) -> list[tuple[int, SpeechStopped]]:
    return [(t, ev) for t, ev in events if isinstance(ev, SpeechStopped)]


SEMANTIC = VadConfig(turn_detection="semantic_vad", eagerness="auto")


def test_model_is_read_by_path_without_importing_pipecat() -> None:
    assert bundled_model_path().name == "smart-turn-v3.2-cpu.onnx"
    code = ("import sys; from realtime.speech_in.smart_turn import SmartTurn; SmartTurn.load(); "
            "print(any(m == 'pipecat' or m.startswith('pipecat.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False"


def test_features_are_the_left_padded_8_second_window(smart_turn: SmartTurn) -> None:
    rng = np.random.default_rng(0)
    short = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    feats = smart_turn.features(short)
    assert feats.shape == (N_MELS, N_FRAMES) and feats.dtype == np.float32
    padded = np.concatenate([np.zeros(WINDOW_SAMPLES - len(short), dtype=np.float32), short])
    np.testing.assert_allclose(feats, smart_turn.features(padded), atol=1e-6)
    long = (0.1 * rng.standard_normal(16000 * 10)).astype(np.float32)
    np.testing.assert_allclose(smart_turn.features(long), smart_turn.features(long[-WINDOW_SAMPLES:]), atol=1e-6)
    # Loudness does not matter: the window is normalised first.
    np.testing.assert_allclose(smart_turn.features(short), smart_turn.features(short * 8), atol=1e-4)


def test_complete_question_and_hesitation_are_told_apart(smart_turn: SmartTurn, speak16k: Speak16k) -> None:
    done = smart_turn(np.concatenate([silence(300), speak16k("What is the capital of France?"), silence(200)]))
    hesitating = smart_turn(np.concatenate([silence(300), speak16k("I was wondering if you could, um"),
                                            silence(200)]))
    assert 0.0 <= hesitating < 0.2 < 0.8 < done <= 1.0


def test_semantic_ends_a_complete_question_well_before_server_vad(vad: SileroVad, smart_turn: SmartTurn,
                                                                  speak16k: Speak16k) -> None:
    audio = np.concatenate([silence(1000), speak16k("What is the capital of France?"), silence(2500)])
    (semantic_at, semantic_stop), = stops(run(vad, SEMANTIC, audio, smart_turn))
    (server_at, server_stop), = stops(run(vad, VadConfig(turn_detection="server_vad"), audio, smart_turn))
    assert semantic_stop.audio_end_ms == server_stop.audio_end_ms  # the same end of speech...
    # ...decided at the ~100 ms pause, not after the 300 ms silence window.
    assert semantic_at - semantic_stop.audio_end_ms <= 200
    assert server_at - semantic_at >= 150


def test_semantic_does_not_end_the_turn_at_a_pause_mid_sentence(vad: SileroVad, smart_turn: SmartTurn,
                                                                speak16k: Speak16k) -> None:
    first, second = speak16k("I was wondering if you could, um"), speak16k("recommend a good book.")
    audio = np.concatenate([silence(1000), first, silence(700), second, silence(2500)])
    resumed_ms = 1000 + (len(first) + 700 * 16) // 16
    semantic = stops(run(vad, SEMANTIC, audio, smart_turn))
    assert len(semantic) == 1 and semantic[0][1].audio_end_ms > resumed_ms  # one turn, the whole sentence
    server = stops(run(vad, VadConfig(turn_detection="server_vad"), audio, smart_turn))
    assert server[0][1].audio_end_ms < resumed_ms  # where server_vad cuts the user off
