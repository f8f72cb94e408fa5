"""A session's effective settings: beta and GA shapes of session.update, atomic validation, reporting."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from common.audio import G711_ALAW, G711_ULAW, PCM16
from common.config import DuetConfig, MindConfig, VadConfig
from common.errors import SessionError
from realtime.core.settings import SessionSettings, TurnDetection

SID = "sess_test"


def snapshot(s: SessionSettings) -> dict[str, Any]:
    return copy.deepcopy(dataclasses.asdict(s))


# ---------------------------------------------------------------- defaults


def test_defaults_report_ga_shape() -> None:
    s = SessionSettings()
    out = s.to_protocol(SID)
    assert out["id"] == SID and out["object"] == "realtime.session"
    assert out["type"] == "realtime"
    assert out["output_modalities"] == ["audio", "text"]
    assert out["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert out["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert out["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert out["duet"]["pacing"] == "speak-first"
    for beta_key in ("modalities", "input_audio_format", "output_audio_format", "turn_detection"):
        assert beta_key not in out


def test_from_config_takes_vad_and_pacing() -> None:
    cfg = DuetConfig(vad=VadConfig(threshold=0.7, prefix_padding_ms=200, silence_duration_ms=450),
                     mind=MindConfig(mode="tbs"))
    s = SessionSettings.from_config(cfg, beta=True)
    assert s.beta
    assert s.pacing == "tbs"
    assert s.turn_detection == TurnDetection(threshold=0.7, prefix_padding_ms=200, silence_duration_ms=450)
    assert not s.updated


# ---------------------------------------------------------------- beta and GA shapes


def test_beta_shaped_update() -> None:
    s = SessionSettings()
    s.apply({
        "input_audio_format": "g711_ulaw",
        "output_audio_format": "g711_alaw",
        "modalities": ["text"],
        "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 500},
        "input_audio_transcription": {"model": "gpt-4o-transcribe"},
        "max_response_output_tokens": 200,
        "temperature": 0.6,
        "voice": "alloy",
    })
    assert s.beta and s.updated
    assert s.input_format == G711_ULAW
    assert s.output_format == G711_ALAW
    assert s.modalities == ["text"]
    out = s.to_protocol(SID)
    assert out["input_audio_format"] == "g711_ulaw"
    assert out["output_audio_format"] == "g711_alaw"
    assert out["modalities"] == ["text"]
    assert out["turn_detection"]["threshold"] == 0.6
    assert out["turn_detection"]["silence_duration_ms"] == 500
    assert out["turn_detection"]["prefix_padding_ms"] == 300  # unchanged knobs keep their values
    assert out["input_audio_transcription"] == {"model": "gpt-4o-transcribe"}
    assert out["max_response_output_tokens"] == 200
    assert out["temperature"] == 0.6
    assert out["voice"] == "alloy"
    for ga_key in ("type", "audio", "output_modalities", "max_output_tokens"):
        assert ga_key not in out


def test_ga_shaped_update() -> None:
    s = SessionSettings(beta=True)
    s.apply({
        "type": "realtime",
        "output_modalities": ["audio"],
        "audio": {
            "input": {"format": {"type": "audio/pcmu"},
                      "turn_detection": {"type": "semantic_vad", "create_response": False}},
            "output": {"format": {"type": "audio/pcma"}, "voice": "marin"},
        },
        "max_output_tokens": 64,
    })
    assert not s.beta
    assert s.input_format == G711_ULAW and s.output_format == G711_ALAW
    out = s.to_protocol(SID)
    assert out["type"] == "realtime"
    assert out["output_modalities"] == ["audio"]
    assert out["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert out["audio"]["output"]["format"] == {"type": "audio/pcma"}
    assert out["audio"]["output"]["voice"] == "marin"
    td = out["audio"]["input"]["turn_detection"]
    assert td["type"] == "semantic_vad" and td["create_response"] is False and td["interrupt_response"] is True
    assert out["max_output_tokens"] == 64
    assert "modalities" not in out and "turn_detection" not in out


def test_ga_shape_detected_from_audio_key_alone() -> None:
    s = SessionSettings(beta=True)
    s.apply({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}})
    assert not s.beta


def test_neutral_update_keeps_the_shape() -> None:
    for beta in (True, False):
        s = SessionSettings(beta=beta)
        s.apply({"instructions": "Be terse.", "tools": []})
        assert s.beta is beta
        assert s.instructions == "Be terse."


@pytest.mark.parametrize("update", [{"turn_detection": None}, {"audio": {"input": {"turn_detection": None}}}])
def test_turn_detection_null_means_manual_turns(update: dict[str, Any]) -> None:
    s = SessionSettings()
    s.apply(update)
    assert s.turn_detection is None
    out = s.to_protocol(SID)
    td = out["turn_detection"] if s.beta else out["audio"]["input"]["turn_detection"]
    assert td is None
    # And back on again, with defaults for what is not given.
    s.apply({"turn_detection": {"type": "server_vad"}})
    assert s.turn_detection == TurnDetection()


def test_ga_transcription_model_is_applied() -> None:
    """The GA shape reports audio.input.transcription; setting it the same way must take effect."""
    s = SessionSettings()
    s.apply({"type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}})
    assert s.to_protocol(SID)["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}


def test_instructions_null_clears() -> None:
    s = SessionSettings()
    s.apply({"instructions": "x"})
    s.apply({"instructions": None})
    assert s.instructions is None
    assert s.to_protocol(SID)["instructions"] == ""


# ---------------------------------------------------------------- duet extension


@pytest.mark.parametrize("mode", ["nothink", "speak-first", "think-first", "tbs"])
def test_duet_pacing(mode: str) -> None:
    s = SessionSettings()
    s.apply({"duet": {"pacing": mode}})
    assert s.pacing == mode
    assert s.to_protocol(SID)["duet"]["pacing"] == mode


def test_duet_key_alone_keeps_the_shape() -> None:
    s = SessionSettings(beta=True)
    s.apply({"duet": {"pacing": "tbs"}})
    assert s.beta
    assert "duet" in s.to_protocol(SID)


@pytest.mark.parametrize("ms", [0, 200, 700, 10000])
def test_duet_partial_transcripts(ms: int) -> None:
    s = SessionSettings()
    s.apply({"duet": {"partial_transcripts_ms": ms, "think_while_listening": True}})
    assert s.partial_transcripts_ms == ms
    assert s.think_while_listening is True
    duet = s.to_protocol(SID)["duet"]
    assert duet["partial_transcripts_ms"] == ms and duet["think_while_listening"] is True


@pytest.mark.parametrize("ms", [-1, 1, 199, 10001, True, 500.0, "700"])
def test_duet_partial_transcripts_out_of_range(ms: object) -> None:
    s = SessionSettings()
    with pytest.raises(SessionError) as info:
        s.apply({"duet": {"partial_transcripts_ms": ms}})
    assert info.value.code == "invalid_value"
    assert s.partial_transcripts_ms == 0


# ---------------------------------------------------------------- validation is atomic


INVALID_UPDATES: list[dict[str, Any]] = [
    {"input_audio_format": "mp3"},
    {"output_audio_format": 16000},
    {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
    {"audio": {"output": {"format": {"type": "audio/opus"}}}},
    {"audio": "pcm16"},
    {"modalities": ["video"]},
    {"modalities": []},
    {"output_modalities": ["audio", "smell"]},
    {"turn_detection": {"type": "push_to_talk"}},
    {"turn_detection": {"threshold": 1.5}},
    {"turn_detection": {"threshold": 0}},
    {"turn_detection": "server_vad"},
    {"turn_detection": {"silence_duration_ms": "long"}},
    {"temperature": "hot"},
    {"max_response_output_tokens": 0},
    {"max_output_tokens": "lots"},
    {"max_output_tokens": 2.5},
    {"tools": {"name": "x"}},
    {"duet": {"pacing": "fast"}},
    {"duet": {"partial_transcripts_ms": 50}},
]


@pytest.mark.parametrize("bad", INVALID_UPDATES, ids=[str(u) for u in INVALID_UPDATES])
def test_invalid_update_raises_and_changes_nothing(bad: dict[str, Any]) -> None:
    s = SessionSettings()
    s.apply({"voice": "joe", "instructions": "keep me", "duet": {"pacing": "tbs"}})
    before = snapshot(s)
    # Valid changes in the same update must not be applied either, nor the shape switched.
    update = {"voice": "changed", "instructions": "changed", "modalities": ["text"], "type": "realtime", **bad}
    with pytest.raises(SessionError) as info:
        s.apply(update, event_id="evt_upd")
    assert info.value.code == "invalid_value"
    assert info.value.event_id == "evt_upd"
    assert snapshot(s) == before


@pytest.mark.parametrize("bad", [
    {"max_response_output_tokens": True},
    {"max_output_tokens": True},
    {"turn_detection": {"silence_duration_ms": -300}},
    {"turn_detection": {"prefix_padding_ms": -1}},
    {"duet": {"think_while_listening": "false"}},  # a string is not a boolean (bool("false") is True)
])
def test_more_invalid_values_are_rejected(bad: dict[str, Any]) -> None:
    s = SessionSettings()
    with pytest.raises(SessionError):
        s.apply(bad)


def test_invalid_update_does_not_switch_protocol_shape() -> None:
    s = SessionSettings(beta=False)
    with pytest.raises(SessionError):
        s.apply({"input_audio_format": "g711_ulaw", "modalities": ["nope"]})
    assert not s.beta
    assert s.input_format == PCM16


def test_failed_update_does_not_share_lists_with_the_live_settings() -> None:
    s = SessionSettings()
    s.apply({"tools": [{"type": "function", "name": "a"}]})
    tools = s.tools
    with pytest.raises(SessionError):
        s.apply({"tools": [{"type": "function", "name": "b"}], "duet": {"pacing": "bad"}})
    assert s.tools == [{"type": "function", "name": "a"}]
    assert s.tools is tools


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("beta", [True, False])
def test_reported_config_applied_again_changes_nothing(beta: bool) -> None:
    s = SessionSettings(beta=beta)
    s.apply({"instructions": "Be kind.", "voice": "joe", "duet": {"pacing": "think-first"},
             "turn_detection": {"type": "server_vad", "threshold": 0.4, "prefix_padding_ms": 100,
                                "silence_duration_ms": 700, "interrupt_response": False}} if beta else
            {"type": "realtime", "instructions": "Be kind.", "duet": {"pacing": "think-first"},
             "output_modalities": ["text"],
             "audio": {"input": {"format": {"type": "audio/pcmu"},
                                 "turn_detection": {"threshold": 0.4, "silence_duration_ms": 700}},
                       "output": {"format": {"type": "audio/pcma"}, "voice": "joe"}}})
    assert s.beta is beta
    reported = s.to_protocol(SID)
    before = snapshot(s)
    s.apply(copy.deepcopy(reported))
    assert s.to_protocol(SID) == reported
    assert snapshot(s) == before


@pytest.mark.parametrize("beta", [True, False])
def test_default_settings_round_trip(beta: bool) -> None:
    s = SessionSettings(beta=beta)
    reported = s.to_protocol(SID)
    s.apply(copy.deepcopy(reported))
    assert s.to_protocol(SID) == reported
    assert s.beta is beta


def test_turn_detection_defaults_are_the_vad_configs() -> None:
    """TurnDetection has no timings of its own: the defaults are VadConfig's, and a session that turns
    detection off and on again without timings gets the server's configured ones back."""
    vad = VadConfig()
    assert TurnDetection() == TurnDetection(threshold=vad.threshold, prefix_padding_ms=vad.prefix_padding_ms,
                                            silence_duration_ms=vad.silence_duration_ms)
    configured = VadConfig(threshold=0.6, prefix_padding_ms=250, silence_duration_ms=700)
    s = SessionSettings.from_config(DuetConfig(vad=configured))
    s.apply({"turn_detection": None})
    s.apply({"turn_detection": {"type": "server_vad"}})
    assert s.turn_detection == TurnDetection.from_vad(configured)


# ---------------------------------------------------------------- limits (issue 11)


@pytest.mark.parametrize("bad", [
    {"temperature": float("nan")},
    {"temperature": float("inf")},
    {"temperature": -1.0},
    {"temperature": 5.0},
    {"temperature": True},
    {"turn_detection": {"threshold": float("nan")}},
    {"turn_detection": {"prefix_padding_ms": 1e9}},  # kept ten minutes of idle audio per session
    {"turn_detection": {"prefix_padding_ms": float("nan")}},
    {"turn_detection": {"silence_duration_ms": 1e300}},
    {"turn_detection": {"silence_duration_ms": float("inf")}},  # was an OverflowError: internal_error
    {"turn_detection": {"silence_duration_ms": True}},
])
def test_numeric_fields_are_finite_and_bounded(bad: dict[str, Any]) -> None:
    s = SessionSettings()
    before = snapshot(s)
    with pytest.raises(SessionError) as info:
        s.apply(bad)
    assert info.value.code == "invalid_value"
    assert snapshot(s) == before


def test_timing_bounds_come_from_the_limits_config() -> None:
    cfg = DuetConfig()
    s = SessionSettings.from_config(cfg)
    top = cfg.limits.max_prefix_padding_ms
    s.apply({"turn_detection": {"prefix_padding_ms": top, "silence_duration_ms": cfg.limits.max_silence_duration_ms}})
    assert s.turn_detection is not None and s.turn_detection.prefix_padding_ms == top
    with pytest.raises(SessionError, match="prefix_padding_ms"):
        s.apply({"turn_detection": {"prefix_padding_ms": top + 1}})
    s.apply({"temperature": 1.2})
    assert s.temperature == 1.2


# ---------------------------------------------------------------- semantic_vad


def test_semantic_vad_reports_its_own_fields_and_eagerness() -> None:
    s = SessionSettings()
    s.apply({"type": "realtime", "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "low"}}}})
    td = s.to_protocol(SID)["audio"]["input"]["turn_detection"]
    # The protocol's SemanticVad has no threshold/padding/silence fields: they are server_vad's.
    assert td == {"type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True}
    s.apply({"turn_detection": {"type": "semantic_vad"}})
    assert s.turn_detection is not None and s.turn_detection.eagerness == "low"  # kept when not given


@pytest.mark.parametrize("eagerness", ["low", "medium", "high", "auto"])
def test_semantic_vad_eagerness_maps_onto_the_detector(eagerness: str) -> None:
    from realtime.speech_in.vad import SEMANTIC_EAGERNESS, TurnDetector

    s = SessionSettings()
    s.apply({"turn_detection": {"type": "semantic_vad", "eagerness": eagerness}})
    assert s.turn_detection is not None
    vad = s.turn_detection.to_vad(VadConfig(min_speech_ms=90, semantic_pause_ms=64))
    assert (vad.turn_detection, vad.eagerness) == ("semantic_vad", eagerness)
    assert (vad.min_speech_ms, vad.semantic_pause_ms) == (90, 64)  # the server's own knobs stay
    detector = TurnDetector(vad, turn_model=lambda audio: 0.5)
    assert detector.semantic == SEMANTIC_EAGERNESS[eagerness]  # type: ignore[index]


@pytest.mark.parametrize("eagerness", ["eager", 1, None, "HIGH"])
def test_semantic_vad_rejects_unknown_eagerness(eagerness: Any) -> None:
    s = SessionSettings()
    before = snapshot(s)
    with pytest.raises(SessionError) as err:
        s.apply({"turn_detection": {"type": "semantic_vad", "eagerness": eagerness}})
    assert err.value.param == "session.turn_detection.eagerness"
    assert snapshot(s) == before


def test_server_vad_stays_plain_server_vad_when_the_server_default_is_semantic() -> None:
    from realtime.speech_in.vad import TurnDetector

    cfg = DuetConfig(vad=VadConfig(turn_detection="semantic_vad", eagerness="high", silence_duration_ms=400))
    s = SessionSettings.from_config(cfg)
    assert s.turn_detection == TurnDetection(type="semantic_vad", eagerness="high", silence_duration_ms=400)
    assert s.to_protocol(SID)["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    s.apply({"audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
    td = s.turn_detection
    assert td is not None and td.type == "server_vad"
    assert s.to_protocol(SID)["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 400,
        "create_response": True, "interrupt_response": True}
    detector = TurnDetector(td.to_vad(cfg.vad), turn_model=lambda audio: 1.0)
    assert detector.semantic is None  # the turn model is never asked
    # A client that switches detection off and on without a type gets the protocol's default, server_vad.
    s.apply({"turn_detection": None})
    s.apply({"turn_detection": {"create_response": False}})
    assert s.turn_detection is not None and s.turn_detection.type == "server_vad"


@pytest.mark.parametrize("beta", [True, False])
def test_semantic_settings_round_trip(beta: bool) -> None:
    s = SessionSettings(beta=beta)
    s.apply({"instructions": "Be kind.",
             "turn_detection": {"type": "semantic_vad", "eagerness": "high", "interrupt_response": False}}
            if beta else {"type": "realtime", "instructions": "Be kind.",
                          "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}})
    reported = s.to_protocol(SID)
    before = snapshot(s)
    s.apply(copy.deepcopy(reported))
    assert s.to_protocol(SID) == reported
    assert snapshot(s) == before
