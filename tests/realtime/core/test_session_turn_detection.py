"""The session hands the runtime's turn model to its segmenter and applies turn_detection updates to it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from common.config import DuetConfig, VadConfig
from realtime.core import events as ev
from realtime.core.session import Session
from realtime.speech_in.vad import SEMANTIC_EAGERNESS, SileroVad
from tests.realtime.fake_runtime import fake_runtime


def turn_model(audio: np.ndarray) -> float:
    return 1.0


@pytest.fixture(scope="module")
def silero() -> SileroVad:
    return SileroVad.load()


def session(silero: SileroVad, vad: VadConfig | None = None) -> Session:
    rt = fake_runtime()
    if vad is not None:
        rt.config = dataclasses.replace(rt.config, vad=vad)
    rt.vad, rt.smart_turn = silero, turn_model  # type: ignore[assignment]
    emitted: list[Any] = []
    return Session(rt, "sess_t", emitted.append)


async def test_semantic_vad_update_reaches_the_detector(silero: SileroVad) -> None:
    s = session(silero)
    detector = s.segmenter.detector
    assert detector.turn_model is turn_model and detector.semantic is None
    await s.handle(ev.SessionUpdate(session={"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}))
    assert detector.semantic == SEMANTIC_EAGERNESS["high"]
    await s.handle(ev.SessionUpdate(session={"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 450}}}}))
    assert detector.semantic is None and detector.cfg.silence_duration_ms == 450
    # The server's own [vad] knobs are kept through updates.
    assert detector.cfg.min_speech_ms == DuetConfig().vad.min_speech_ms


async def test_semantic_server_default_applies_from_the_start(silero: SileroVad) -> None:
    s = session(silero, VadConfig(turn_detection="semantic_vad", eagerness="low"))
    assert s.segmenter.detector.semantic == SEMANTIC_EAGERNESS["low"]
    assert s.settings.to_protocol(s.id)["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
