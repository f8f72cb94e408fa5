"""OpenAI Realtime protocol events: one typed union per direction, and the JSON codec (sans I/O).

Field names follow the published protocol exactly, so clients written for it work unchanged. The
session core works with these structs; only `decode_client_event` / `encode_server_event` see JSON.
Server events are named with the GA names; `BETA_NAMES` maps them for sessions that speak the beta.
Every standard event validates against the `openai` package's models of the protocol (tests/integration/
schema.py), since strict clients reject anything else. Duet's own events use the `duet.` namespace and are
opt-in (`DUET_EVENTS`, `visible`): strict clients reject unknown event types, so only a client that asked
for them gets them.
"""

from __future__ import annotations

import binascii
import collections
import itertools
import secrets
from typing import Any, Literal

import msgspec
import numpy as np

from common import audio as audio_codec
from common.audio import PCM16, AudioFormat
from common.errors import SessionError

# ---------------------------------------------------------------------------------------------
# Client -> server


class ClientEvent(msgspec.Struct, kw_only=True, tag_field="type"):
    event_id: str | None = None


class SessionUpdate(ClientEvent, kw_only=True, tag="session.update"):
    session: dict[str, Any]


class InputAudioBufferAppend(ClientEvent, kw_only=True, tag="input_audio_buffer.append"):
    # The client's samples in the session's input format. Base64 is the wire's business: the JSON decoder
    # undoes it (`decode_client_event`); a transport that has raw bytes (telephony) passes them as they are.
    audio: bytes


class InputAudioBufferCommit(ClientEvent, kw_only=True, tag="input_audio_buffer.commit"):
    pass


class InputAudioBufferClear(ClientEvent, kw_only=True, tag="input_audio_buffer.clear"):
    pass


class ConversationItemCreate(ClientEvent, kw_only=True, tag="conversation.item.create"):
    item: dict[str, Any]
    previous_item_id: str | None = None


class ConversationItemTruncate(ClientEvent, kw_only=True, tag="conversation.item.truncate"):
    item_id: str
    content_index: int = 0
    audio_end_ms: int = 0


class ConversationItemDelete(ClientEvent, kw_only=True, tag="conversation.item.delete"):
    item_id: str


class ConversationItemRetrieve(ClientEvent, kw_only=True, tag="conversation.item.retrieve"):
    item_id: str


class ResponseCreate(ClientEvent, kw_only=True, tag="response.create"):
    response: dict[str, Any] | None = None


class ResponseCancel(ClientEvent, kw_only=True, tag="response.cancel"):
    response_id: str | None = None


class OutputAudioBufferClear(ClientEvent, kw_only=True, tag="output_audio_buffer.clear"):
    pass


CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear,
                ConversationItemCreate, ConversationItemTruncate, ConversationItemDelete,
                ConversationItemRetrieve, ResponseCreate, ResponseCancel, OutputAudioBufferClear)
}

_json_decoder = msgspec.json.Decoder()


def decode_client_event(data: str | bytes) -> ClientEvent:
    """Parse one client message; raise SessionError with a protocol error code on bad input."""
    try:
        raw = _json_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SessionError(f"message is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        # msgspec parses nested values recursively, so JSON nested past the interpreter's stack depth (`[` 10,000
        # times, well under the size limit) ends here: the client's fault, not an internal error.
        raise SessionError("message is not valid JSON: nested too deeply", code="invalid_json") from None
    except UnicodeError:
        # A str holding a lone surrogate cannot be read as UTF-8 (a transport that hands over text it did not
        # validate itself; aiohttp's WebSocket closes such frames with 1007 before they get here).
        raise SessionError("message is not valid JSON: not valid Unicode text", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise SessionError("message must be a JSON object", code="invalid_json")
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise SessionError("message has no string 'type' field", code="missing_type", event_id=event_id)
    cls = CLIENT_EVENTS.get(kind)
    if cls is None:
        raise SessionError(f"unknown event type {kind!r}", code="unknown_event_type", param="type",
                           event_id=event_id)
    if cls is InputAudioBufferAppend and isinstance(raw.get("audio"), str):
        raw["audio"] = decode_audio(raw["audio"], event_id)  # strict, with its own error code
    try:
        return msgspec.convert(raw, cls)
    except msgspec.ValidationError as exc:
        raise SessionError(f"invalid {kind}: {exc}", code="invalid_value", event_id=event_id) from None


def decode_audio(b64: str, event_id: str | None = None) -> bytes:
    try:
        return binascii.a2b_base64(b64, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise SessionError(f"audio is not valid base64: {exc}", code="invalid_base64", param="audio",
                           event_id=event_id) from None


def encode_audio(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Server -> client


class ServerEvent(msgspec.Struct, kw_only=True, tag_field="type"):
    event_id: str = ""


class ErrorDetail(msgspec.Struct, kw_only=True):
    type: str
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None


class Error(ServerEvent, kw_only=True, tag="error"):
    error: ErrorDetail


class SessionCreated(ServerEvent, kw_only=True, tag="session.created"):
    session: dict[str, Any]


class SessionUpdated(ServerEvent, kw_only=True, tag="session.updated"):
    session: dict[str, Any]


class SpeechStarted(ServerEvent, kw_only=True, tag="input_audio_buffer.speech_started"):
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent, kw_only=True, tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int
    item_id: str


class Committed(ServerEvent, kw_only=True, tag="input_audio_buffer.committed"):
    previous_item_id: str | None
    item_id: str


class Cleared(ServerEvent, kw_only=True, tag="input_audio_buffer.cleared"):
    pass


class ItemCreated(ServerEvent, kw_only=True, tag="conversation.item.created"):
    previous_item_id: str | None
    item: dict[str, Any]


class ItemTruncated(ServerEvent, kw_only=True, tag="conversation.item.truncated"):
    item_id: str
    content_index: int = 0
    audio_end_ms: int


class ItemDeleted(ServerEvent, kw_only=True, tag="conversation.item.deleted"):
    item_id: str


class ItemRetrieved(ServerEvent, kw_only=True, tag="conversation.item.retrieved"):
    item: dict[str, Any]


class TranscriptionDelta(ServerEvent, kw_only=True, tag="conversation.item.input_audio_transcription.delta"):
    item_id: str
    content_index: int = 0
    delta: str


class TranscriptionUsage(msgspec.Struct, kw_only=True):
    """Billing-style usage of a transcription; the schema requires it. Whisper runs locally on the audio,
    so the honest measure is the duration transcribed (the schema's other shape counts tokens)."""

    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionCompleted(ServerEvent, kw_only=True, tag="conversation.item.input_audio_transcription.completed"):
    item_id: str
    content_index: int = 0
    transcript: str
    usage: TranscriptionUsage


class PartialTranscript(ServerEvent, kw_only=True, tag="duet.input_transcript.partial"):
    """The user's words so far, while they are still speaking (a Duet extension; revised, not appended)."""

    item_id: str
    transcript: str


class ResponseCreated(ServerEvent, kw_only=True, tag="response.created"):
    response: dict[str, Any]


class OutputItemAdded(ServerEvent, kw_only=True, tag="response.output_item.added"):
    response_id: str
    output_index: int = 0
    item: dict[str, Any]


class OutputItemDone(ServerEvent, kw_only=True, tag="response.output_item.done"):
    response_id: str
    output_index: int = 0
    item: dict[str, Any]


class ContentPartAdded(ServerEvent, kw_only=True, tag="response.content_part.added"):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: dict[str, Any]


class ContentPartDone(ServerEvent, kw_only=True, tag="response.content_part.done"):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: dict[str, Any]


class _Delta(ServerEvent, kw_only=True):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    delta: str


class AudioDelta(ServerEvent, kw_only=True, tag="response.output_audio.delta"):
    """Reply audio as float32 PCM at the session's output rate. It is encoded (pcm16 or G.711) and base64'd
    only at the wire (`encode_server_event`); the telephony bridge encodes it for the phone itself."""

    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    delta: Any  # np.ndarray (msgspec has no array type; `_audio_hook` encodes it)


class AudioTranscriptDelta(_Delta, kw_only=True, tag="response.output_audio_transcript.delta"):
    pass


class TextDelta(_Delta, kw_only=True, tag="response.output_text.delta"):
    pass


class AudioDone(ServerEvent, kw_only=True, tag="response.output_audio.done"):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class AudioTranscriptDone(ServerEvent, kw_only=True, tag="response.output_audio_transcript.done"):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    transcript: str


class TextDone(ServerEvent, kw_only=True, tag="response.output_text.done"):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    text: str


class FunctionCallArgumentsDelta(ServerEvent, kw_only=True, tag="response.function_call_arguments.delta"):
    response_id: str
    item_id: str
    output_index: int = 0
    call_id: str
    delta: str


class FunctionCallArgumentsDone(ServerEvent, kw_only=True, tag="response.function_call_arguments.done"):
    response_id: str
    item_id: str
    output_index: int = 0
    call_id: str
    name: str
    arguments: str


class RateLimit(msgspec.Struct, kw_only=True):
    name: Literal["requests", "tokens"]  # the only names the protocol has
    limit: int
    remaining: int
    reset_seconds: float


class Capacity(msgspec.Struct, kw_only=True):
    limit: int
    remaining: int


class RateLimitsUpdated(ServerEvent, kw_only=True, tag="rate_limits.updated"):
    rate_limits: list[RateLimit]
    # Duet's own view of its capacity (session slots, KV-cache slots), which has no protocol name; a
    # namespaced field like `session.duet`, which the schema's models accept as an extra field.
    duet: dict[str, Capacity] | None = None


class ResponseDone(ServerEvent, kw_only=True, tag="response.done"):
    response: dict[str, Any]


class OutputAudioBufferCleared(ServerEvent, kw_only=True, tag="output_audio_buffer.cleared"):
    response_id: str = ""  # the schema requires a string, even when no response had audio to clear


class ThoughtDelta(ServerEvent, kw_only=True, tag="duet.thought.delta"):
    """Visible reasoning: the formulation brain's text as it is written (a Duet extension)."""

    response_id: str
    item_id: str
    delta: str


class TurnMetrics(ServerEvent, kw_only=True, tag="duet.turn.metrics"):
    """Per-turn timestamps (ms, server monotonic clock relative to the user's speech end)."""

    response_id: str
    metrics: dict[str, float | int | str | None]


class ResponseResumed(ServerEvent, kw_only=True, tag="duet.response.resumed"):
    """A barge-in proved false (noise or only a backchannel): the user item of that turn is deleted and
    the cut reply goes on in the new response `response_id`, whose item `item_id` speaks the words of
    `cut_item_id` the user did not hear (a Duet extension; comes just before that response.created)."""

    response_id: str
    item_id: str
    cut_response_id: str
    cut_item_id: str
    interruption_item_id: str
    transcript: str  # what the interruption was heard as: "" (noise) or the backchannel


# Duet's own events, by the short name a client opts in with: `session.update {session: {duet: {events:
# [...]}}}` or `?duet_events=...` on the WebSocket URL ("all" for every one).
DUET_EVENTS = {
    "thought": "duet.thought.delta",
    "turn_metrics": "duet.turn.metrics",
    "input_transcript": "duet.input_transcript.partial",
    "resumed": "duet.response.resumed",
}


def parse_duet_events(value: Any) -> frozenset[str]:
    """Opt-in names (a list, or one comma-separated string; "all" for every one) -> event types."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError("duet.events must be a list of event names or a comma-separated string")
    names = [n.strip() for n in names if n.strip()]
    if "all" in names:
        return frozenset(DUET_EVENTS.values())
    types = {n: DUET_EVENTS.get(n, n if n in DUET_EVENTS.values() else None) for n in names}  # full type too
    unknown = [n for n, t in types.items() if t is None]
    if unknown:
        raise ValueError(f"unknown duet events {unknown}; choose from {[*DUET_EVENTS, 'all']}")
    return frozenset(t for t in types.values() if t is not None)


def visible(event: ServerEvent, opted_in: frozenset[str]) -> bool:
    """Does this event go to a client that opted in to `opted_in` (event types)? Standard events always do."""
    tag = event.__struct_config__.tag
    return not (isinstance(tag, str) and tag.startswith("duet.")) or tag in opted_in


BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}

_json_encoder = msgspec.json.Encoder()


def encode_server_event(event: ServerEvent, beta: bool = False, audio_format: AudioFormat = PCM16) -> str:
    """One event as JSON text: audio deltas are encoded in `audio_format` (the session's output format)."""
    if not event.event_id:
        event.event_id = new_id("event")
    if isinstance(event, AudioDelta) and isinstance(event.delta, np.ndarray):
        # Only here does reply audio become bytes and base64: the core and the other transports see PCM.
        event = msgspec.structs.replace(event, delta=encode_audio(audio_codec.encode(event.delta, audio_format)))
    if beta:
        name = event.__struct_config__.tag
        if isinstance(name, str) and name in BETA_NAMES:
            raw = msgspec.to_builtins(event)
            raw["type"] = BETA_NAMES[name]
            return _json_encoder.encode(raw).decode()
    return _json_encoder.encode(event).decode()


# The protocol's reasons for a response that did not complete. Duet stops responses for finer reasons
# (the client truncated, cleared or deleted the reply, or went away); those are the client cancelling it,
# and the finer reason stays in `status_details.duet`.
_PROTOCOL_REASONS = {"turn_detected": "turn_detected", "client_cancelled": "client_cancelled",
                     "max_output_tokens": "max_output_tokens", "content_filter": "content_filter"}


def status_details(status: str, reason: str | None) -> dict[str, Any] | None:
    """A response's `status_details` in the protocol's shape; None while nothing needs explaining."""
    if reason is None:
        return None
    if status == "failed":  # the protocol explains a failure with an error object, not a reason
        return {"type": "failed", "error": {"type": "server_error", "code": "response_failed", "message": reason}}
    details: dict[str, Any] = {"type": status, "reason": _PROTOCOL_REASONS.get(reason, "client_cancelled")}
    if details["reason"] != reason:
        details["duet"] = {"reason": reason}
    return details


# Every error event of the process by code: each one is built here just before it is emitted, so this is the one
# place to count them (exported as duet_errors_total by realtime/metrics.py). Updated on the event loop only.
ERROR_COUNTS: collections.Counter[str] = collections.Counter()


def error_event(err: SessionError) -> Error:
    ERROR_COUNTS[err.code or "unknown"] += 1
    return Error(error=ErrorDetail(type=err.type, code=err.code, message=err.message, param=err.param,
                                   event_id=err.event_id))


_counter = itertools.count(1)


def new_id(prefix: str) -> str:
    """Protocol-style ids (`item_…`, `resp_…`): unique per process, short, not guessable."""
    return f"{prefix}_{next(_counter):06d}{secrets.token_hex(5)}"
