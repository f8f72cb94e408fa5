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


async def test_a_vad_failure_is_an_error_event_and_the_input_loop_goes_on(silero: SileroVad,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The VAD model failing on some audio loses that audio (error `vad_failed`), not the session's input: the
    next audio still goes through the VAD."""
    rt = fake_runtime()
    rt.vad, rt.smart_turn = silero, turn_model  # type: ignore[assignment]
    emitted: list[Any] = []
    s = Session(rt, "sess_v", emitted.append)
    real, calls = SileroVad.probs, []

    def once_broken(self: SileroVad, streams: Any, frames: Any) -> Any:
        calls.append(len(frames))
        if len(calls) == 1:
            raise RuntimeError("onnxruntime hiccup")
        return real(self, streams, frames)

    monkeypatch.setattr(SileroVad, "probs", once_broken)
    chunk = np.zeros(480 * 4, dtype="<i2").tobytes()  # 80 ms at 24 kHz: more than one 32 ms VAD frame
    s.start()
    try:
        await s.handle(ev.InputAudioBufferAppend(audio=chunk))
        await s._audio_drained()
        errors = [e for e in emitted if isinstance(e, ev.Error)]
        assert [e.error.code for e in errors] == ["vad_failed"]
        await s.handle(ev.InputAudioBufferAppend(audio=chunk))
        await s._audio_drained()
        assert len(calls) > 1  # the next audio went through the VAD
        assert [e.error.code for e in emitted if isinstance(e, ev.Error)] == ["vad_failed"]
        assert s._input_task is not None and not s._input_task.done()
    finally:
        await s.close()
        rt.vad_batcher.close()
