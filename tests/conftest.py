"""Shared fixtures: one real runtime (all bundled models) and one real server on loopback per test run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import soxr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A hung test ends the run within minutes with every thread's and task's stack (tests/hang_watch.py).
pytest_plugins = ["tests.hang_watch"]


@pytest.fixture(scope="session")
def runtime() -> Iterator[object]:
    from common.config import DEFAULT_CONFIG_PATH, load_config
    from realtime.runtime import Runtime

    rt = Runtime.load(load_config(DEFAULT_CONFIG_PATH))
    yield rt
    rt.close()


@pytest.fixture(scope="session")
async def server(runtime: object) -> AsyncIterator[object]:
    from realtime.transports.websocket import DuetServer

    srv = DuetServer(runtime)  # type: ignore[arg-type]
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()


@pytest.fixture(scope="session")
def url(server: object) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime"  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def speak() -> object:
    """Text -> 24 kHz speech with the bundled Piper voice, noise off so the audio is repeatable."""
    from common.config import TtsConfig
    from tts.synthesizer import Synthesizer

    synth = Synthesizer.load(dataclasses.replace(TtsConfig(), noise_scale=0.0, noise_w=0.0))

    def _speak(text: str) -> np.ndarray:
        return soxr.resample(synth.synthesize(text), synth.sample_rate, 24000).astype(np.float32)

    return _speak


@pytest.fixture(scope="session")
def judge() -> object:
    """The bundled Whisper base (more accurate than the server's tiny.en) to check what a reply says."""
    from common.config import AsrConfig
    from realtime.speech_in.asr import Listener

    listener = Listener.load(AsrConfig(model="base"))

    def _heard(reply_audio_24k: np.ndarray) -> str:
        return str(listener.transcribe(soxr.resample(reply_audio_24k, 24000, 16000))).lower()

    return _heard


def says(heard: str, said: str, threshold: float = 0.85) -> bool:
    """Does reply audio (Whisper's transcript `heard`) say the words the server spoke (`said`)?

    Piper samples noise on every call, so one word in ~15 syntheses comes out misheard ("Paris" as
    "parrot" on 8 kHz phone audio, measured): a character-level match tolerates one such word, while
    silence, other words or garble fail ("the capital of Germany is Berlin" scores 0.77 against the
    capital-of-France sentence). Callers also check that `said` itself carries the answer.
    """
    import difflib
    import re

    def norm(text: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())

    return difflib.SequenceMatcher(None, norm(heard), norm(said)).ratio() >= threshold
