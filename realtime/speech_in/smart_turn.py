"""Smart Turn v3.2: does what the user said so far sound like a finished turn?

Silence alone cannot tell "What time is it?" from "I'd like to book a table for... four people": both
stop. Smart Turn (Daily, BSD-2, a small Whisper-encoder classifier on ONNX) hears the intonation and the
words of the last 8 s of the turn and gives the probability that the turn is complete. The turn detector
(`vad.py`) asks it once per pause, on the VAD thread.

The ONNX file ships inside the `pipecat-ai` wheel, which we install with --no-deps and never import (its
__init__ and dependencies are a whole voice framework); we only read the file by path, as `vad.py` does
for Silero's. Inputs follow pipecat's reference inference (`pipecat/audio/turn/smart_turn/`): the end of
the turn, left-padded with zeros to exactly 8 s, normalised to zero mean and unit variance, as Whisper
log-mel features (80 bins x 800 frames); the output is already a sigmoid probability.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from faster_whisper.feature_extractor import FeatureExtractor

from common.audio import SPEECH_RATE
from realtime.speech_in.onnx_models import one_thread_session, package_file

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

MODEL_FILE: Final = "smart-turn-v3.2-cpu.onnx"
WINDOW_SECONDS: Final = 8
WINDOW_SAMPLES: Final = WINDOW_SECONDS * SPEECH_RATE
N_MELS: Final = 80
N_FRAMES: Final = WINDOW_SAMPLES // 160  # Whisper's 10 ms hop
_INPUT: Final = "input_features"
_NORM_EPS: Final = 1e-7  # transformers' WhisperFeatureExtractor's, which the model was trained with


def bundled_model_path() -> Path:
    """The ONNX file inside the installed `pipecat-ai` package, found without importing pipecat."""
    path = package_file("pipecat", "audio", "turn", "smart_turn", "data", MODEL_FILE,
                        missing=" (scripts/setup.sh installs pipecat-ai with --no-deps for its Smart Turn model)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a pipecat-ai release without Smart Turn v3.2?")
    return path


class SmartTurn:
    """P(turn complete) for a turn's 16 kHz audio. Stateless and thread-safe: one per process."""

    def __init__(self, session: ort.InferenceSession) -> None:
        inputs = session.get_inputs()
        if [i.name for i in inputs] != [_INPUT] or list(inputs[0].shape[1:]) != [N_MELS, N_FRAMES]:
            raise ValueError(f"not a Smart Turn v3 model: inputs {[(i.name, i.shape) for i in inputs]}")
        self.session = session
        # chunk_length sizes nothing we use (we pass exactly 8 s, padding=0); it keeps the object consistent.
        self._features = FeatureExtractor(feature_size=N_MELS, sampling_rate=SPEECH_RATE, chunk_length=WINDOW_SECONDS)

    @classmethod
    def load(cls, path: str | Path | None = None) -> SmartTurn:
        # ~66 ms a call on one idle Xeon core, 54 ms on two (docs/benchmarks.md): a second thread gains little.
        model = Path(path) if path is not None else bundled_model_path()
        session = one_thread_session(model)
        logger.info("loaded Smart Turn from %s", model)
        turn = cls(session)
        turn(np.zeros(SPEECH_RATE, dtype=np.float32))  # onnxruntime picks kernels on the first run
        return turn

    def features(self, audio: npt.ArrayLike) -> FloatArray:
        """The model's input for a turn's audio: (80, 800) log-mel features of its last 8 s."""
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {x.shape}")
        x = x[-WINDOW_SAMPLES:]
        # Left padding: the model was trained on turns that end at the right edge of the window.
        x = np.pad(x, (WINDOW_SAMPLES - len(x), 0))
        # Normalised over the padded window, as the reference does (so a quiet or loud microphone
        # gives the same features).
        x = (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)
        # padding=0: faster-whisper's default pads 160 samples, which would add a 801st frame.
        return np.asarray(self._features(x, padding=0), dtype=np.float32)

    def __call__(self, audio: npt.ArrayLike) -> float:
        """Probability in [0, 1] that the turn ending with `audio` is complete."""
        out = self.session.run(None, {_INPUT: self.features(audio)[None]})
        return float(np.asarray(out[0]).reshape(-1)[0])
