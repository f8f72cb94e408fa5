"""A session's effective configuration: what `session.update` changes and `session.updated` reports.

Clients speak either the beta shape (`input_audio_format: "pcm16"`, `modalities`, top-level
`turn_detection`) or the GA shape (`type: "realtime"`, `output_modalities`, `audio.input.format`,
`audio.input.turn_detection`). We accept both and answer in the shape the client used. Duet's own
options live under the `duet` key, which standard clients never send.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from common.audio import AudioFormat, format_to_beta, format_to_ga, parse_audio_format
from common.config import (
    EAGERNESS_LEVELS,
    DuetConfig,
    Eagerness,
    LimitsConfig,
    PacingMode,
    TurnDetectionType,
    VadConfig,
)
from common.errors import SessionError
from realtime.core import events as ev
from realtime.core import params

PCM16 = AudioFormat("pcm16", 24000)
BETA_ONLY_KEYS = ("input_audio_format", "output_audio_format", "modalities", "input_audio_transcription",
                  "turn_detection", "max_response_output_tokens")
_VAD_DEFAULTS = VadConfig()


@dataclass(frozen=True)
class TurnDetection:
    type: TurnDetectionType = _VAD_DEFAULTS.turn_detection
    # The timings are the [vad] config's, never numbers of their own: `from_vad` takes a server's configured
    # ones, and these defaults are VadConfig's, so the two cannot drift apart. semantic_vad keeps them too:
    # Silero still needs a threshold and prefix padding, and a later switch back to server_vad finds them.
    threshold: float = _VAD_DEFAULTS.threshold
    prefix_padding_ms: int = _VAD_DEFAULTS.prefix_padding_ms
    silence_duration_ms: int = _VAD_DEFAULTS.silence_duration_ms
    # semantic_vad only: how soon to answer (realtime/speech_in/vad.py SEMANTIC_EAGERNESS maps it).
    eagerness: Eagerness = _VAD_DEFAULTS.eagerness
    create_response: bool = True
    interrupt_response: bool = True

    @classmethod
    def from_vad(cls, v: VadConfig) -> TurnDetection:
        return cls(type=v.turn_detection, threshold=v.threshold, prefix_padding_ms=v.prefix_padding_ms,
                   silence_duration_ms=v.silence_duration_ms, eagerness=v.eagerness)

    def to_vad(self, base: VadConfig) -> VadConfig:
        """The segmenter's settings: this session's choices over the server's [vad] section."""
        return dataclasses.replace(base, turn_detection=self.type, threshold=self.threshold,
                                   prefix_padding_ms=self.prefix_padding_ms,
                                   silence_duration_ms=self.silence_duration_ms, eagerness=self.eagerness)

    def to_protocol(self) -> dict[str, Any]:
        # Each type reports the fields the protocol gives it (openai's ServerVad / SemanticVad models).
        flags = {"create_response": self.create_response, "interrupt_response": self.interrupt_response}
        if self.type == "semantic_vad":
            return {"type": self.type, "eagerness": self.eagerness, **flags}
        return {"type": self.type, "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, **flags}


@dataclass
class SessionSettings:
    model: str = "duet"
    instructions: str | None = None
    voice: str = "joe"
    modalities: list[str] = field(default_factory=lambda: ["audio", "text"])
    input_format: AudioFormat = PCM16
    output_format: AudioFormat = PCM16
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    # What a client that turned detection off (null) gets back when it turns it on without giving timings.
    server_turn_detection: TurnDetection = field(default_factory=TurnDetection)
    transcription_model: str = "whisper-1"
    temperature: float = 0.8
    max_output_tokens: int | str = "inf"
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"
    # Functions the server runs itself (`[[mqtt.tools]]`): offered to the model with the client's `tools`,
    # never reported to the client as its own.
    server_tools: list[dict[str, Any]] = field(default_factory=list)
    pacing: PacingMode = "speak-first"
    # Partial transcripts while the user speaks (0 = off), and brains started on them (think while listening).
    partial_transcripts_ms: int = 0
    think_while_listening: bool = False
    # The `duet.*` event types this client opted in to (`duet.events`, or `?duet_events=` on the URL): strict
    # clients reject event types they do not know, so a client gets none unless it asks.
    duet_events: frozenset[str] = frozenset()
    beta: bool = False  # answer with the beta shape and event names
    updated: bool = False  # has the client sent session.update yet
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # the server's bounds of the timings above

    @classmethod
    def from_config(cls, cfg: DuetConfig, beta: bool = False) -> SessionSettings:
        td = TurnDetection.from_vad(cfg.vad)
        return cls(pacing=cfg.mind.mode, beta=beta, partial_transcripts_ms=cfg.asr.partial_interval_ms,
                   think_while_listening=cfg.mind.think_while_listening, turn_detection=td,
                   server_turn_detection=td, limits=cfg.limits,
                   server_tools=[{"type": "function", "name": t.name, "description": t.description,
                                  "parameters": json.loads(t.parameters)} for t in cfg.mqtt.tools]
                   if cfg.mqtt.enabled else [])

    # ---- applying an update -------------------------------------------------------------------
    def apply(self, update: dict[str, Any], event_id: str | None = None) -> None:
        """Validate everything first, then change: a bad update leaves the session as it was."""
        staged = dataclasses.replace(self, modalities=list(self.modalities), tools=list(self.tools))
        try:
            staged._apply(update)
        except (ValueError, TypeError, KeyError) as exc:
            param = f"session.{exc.param}" if isinstance(exc, params.InvalidParam) else "session"
            raise SessionError(f"invalid session.update: {exc}", code="invalid_value", param=param,
                               event_id=event_id) from None
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(staged, f.name))
        self.updated = True

    def _apply(self, u: dict[str, Any]) -> None:
        # The shape of the update tells which protocol version the client speaks.
        if u.get("type") == "realtime" or "audio" in u or "output_modalities" in u:
            self.beta = False
        elif any(k in u for k in BETA_ONLY_KEYS):
            self.beta = True
        for key in ("model", "voice"):
            if key in u:
                setattr(self, key, str(u[key]))
        if "instructions" in u:
            self.instructions = params.instructions(u["instructions"])
        for key in ("modalities", "output_modalities"):
            if key in u:
                self.modalities = params.modalities(u[key], key)
        if "input_audio_format" in u:
            self.input_format = parse_audio_format(u["input_audio_format"])
        if "output_audio_format" in u:
            self.output_format = parse_audio_format(u["output_audio_format"])
        if "turn_detection" in u:
            self.turn_detection = self._turn_detection(u["turn_detection"])
        if "input_audio_transcription" in u and isinstance(u["input_audio_transcription"], dict):
            self.transcription_model = str(u["input_audio_transcription"].get("model", self.transcription_model))
        audio = u.get("audio") or {}
        if not isinstance(audio, dict):
            raise TypeError("audio must be an object")
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        if "format" in inp:
            self.input_format = parse_audio_format(inp["format"])
        if "turn_detection" in inp:
            self.turn_detection = self._turn_detection(inp["turn_detection"])
        if isinstance(inp.get("transcription"), dict):
            self.transcription_model = str(inp["transcription"].get("model", self.transcription_model))
        if "format" in out:
            self.output_format = parse_audio_format(out["format"])
        if "voice" in out:
            self.voice = str(out["voice"])
        if "temperature" in u:
            self.temperature = params.temperature(u["temperature"])
        for key in ("max_response_output_tokens", "max_output_tokens"):
            if key in u:
                self.max_output_tokens = params.max_output_tokens(u[key], key)
        if "tools" in u:
            self.tools = params.tools(u["tools"])
        if "tool_choice" in u:
            self.tool_choice = params.tool_choice(u["tool_choice"], [*self.tools, *self.server_tools])
        duet = u.get("duet") or {}
        if "pacing" in duet:
            self.pacing = params.pacing(duet["pacing"])
        if "partial_transcripts_ms" in duet:
            value = duet["partial_transcripts_ms"]
            if not isinstance(value, int) or isinstance(value, bool) or not (value == 0 or 200 <= value <= 10000):
                raise ValueError("duet.partial_transcripts_ms must be 0 (off) or 200..10000")
            self.partial_transcripts_ms = value
        if "events" in duet:
            self.duet_events = ev.parse_duet_events(duet["events"])
        if duet.get("partial_transcripts_ms"):
            # Asking for partial transcripts is asking for the event that carries them.
            self.duet_events |= {ev.DUET_EVENTS["input_transcript"]}
        if "think_while_listening" in duet:
            if not isinstance(duet["think_while_listening"], bool):
                raise ValueError("duet.think_while_listening must be true or false")
            self.think_while_listening = duet["think_while_listening"]

    def _turn_detection(self, value: Any) -> TurnDetection | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise TypeError("turn_detection must be an object or null")
        # The protocol's default type is server_vad, whatever the server's default: a client that names no
        # type but sends silence_duration_ms means server_vad.
        kind = value.get("type", "server_vad")
        if kind not in ("server_vad", "semantic_vad"):
            raise ValueError(f"turn_detection.type {kind!r} is not supported")
        base = self.turn_detection or self.server_turn_detection
        eagerness = value.get("eagerness", base.eagerness)
        if eagerness not in EAGERNESS_LEVELS:
            raise params.InvalidParam("turn_detection.eagerness",
                                      f"turn_detection.eagerness must be one of {', '.join(EAGERNESS_LEVELS)}")
        threshold = params.threshold(value.get("threshold", base.threshold))
        padding = params.duration_ms(value.get("prefix_padding_ms", base.prefix_padding_ms),
                                     "turn_detection.prefix_padding_ms", self.limits.max_prefix_padding_ms)
        silence = params.duration_ms(value.get("silence_duration_ms", base.silence_duration_ms),
                                     "turn_detection.silence_duration_ms", self.limits.max_silence_duration_ms)
        return TurnDetection(
            type=kind, threshold=threshold, prefix_padding_ms=padding, silence_duration_ms=silence,
            eagerness=eagerness,
            create_response=bool(value.get("create_response", base.create_response)),
            interrupt_response=bool(value.get("interrupt_response", base.interrupt_response)),
        )

    # ---- reporting ----------------------------------------------------------------------------
    def to_protocol(self, session_id: str) -> dict[str, Any]:
        td = self.turn_detection.to_protocol() if self.turn_detection else None
        events = [name for name, kind in ev.DUET_EVENTS.items() if kind in self.duet_events]
        common = {"id": session_id, "object": "realtime.session", "model": self.model,
                  "instructions": self.instructions or "", "tools": self.tools, "tool_choice": self.tool_choice,
                  "duet": {"pacing": self.pacing, "partial_transcripts_ms": self.partial_transcripts_ms,
                           "think_while_listening": self.think_while_listening, "events": events}}
        if self.beta:  # the beta schema's tool_choice is a string: the function's name when one is forced
            return {**common, "modalities": self.modalities, "voice": self.voice,
                    "input_audio_format": format_to_beta(self.input_format),
                    "output_audio_format": format_to_beta(self.output_format),
                    "input_audio_transcription": {"model": self.transcription_model},
                    "turn_detection": td, "temperature": self.temperature,
                    "max_response_output_tokens": self.max_output_tokens}
        if self.tool_choice not in ("auto", "none", "required"):  # GA names a forced function with an object
            common["tool_choice"] = {"type": "function", "name": self.tool_choice}
        return {**common, "type": "realtime", "output_modalities": self.modalities,
                "audio": {"input": {"format": format_to_ga(self.input_format), "turn_detection": td,
                                    "transcription": {"model": self.transcription_model}},
                          "output": {"format": format_to_ga(self.output_format), "voice": self.voice}},
                "max_output_tokens": self.max_output_tokens}
