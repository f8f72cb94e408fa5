"""Audio formats of the OpenAI Realtime protocol, G.711 codecs and streaming resampling.

Pure numpy + soxr and no I/O, so every function here is cheap to unit test. Inside Duet audio is
mono float32 in [-1, 1]; bytes only exist at the protocol edge, in one of three formats:

* ``pcm16``     - 24 kHz, signed 16-bit little-endian (GA: ``{"type": "audio/pcm", "rate": 24000}``)
* ``g711_ulaw`` - 8 kHz, ITU-T G.711 mu-law             (GA: ``{"type": "audio/pcmu"}``)
* ``g711_alaw`` - 8 kHz, ITU-T G.711 A-law              (GA: ``{"type": "audio/pcma"}``)

The G.711 tables follow the ITU-T G.711 reference coder (the Sun ``g711.c`` that CPython's
``audioop`` also uses), so our bytes are bit-identical to what telephony peers produce.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

import numpy as np
import numpy.typing as npt
import soxr

logger = logging.getLogger(__name__)

Encoding = Literal["pcm16", "g711_ulaw", "g711_alaw"]
ENCODINGS: Final[tuple[str, ...]] = get_args(Encoding)

FloatArray = npt.NDArray[np.float32]

PCM16_RATE: Final = 24000
G711_RATE: Final = 8000
# The rate of everything that listens (VAD, turn audio, ASR): Silero VAD and Whisper both take 16 kHz input,
# so input audio is resampled to it once, at the protocol edge.
SPEECH_RATE: Final = 16000


# The shortest audio Whisper is asked to hear (100 ms): shorter input is answered with "" by either engine, a shorter
# manual commit is refused (the protocol's own minimum), and a speculative pass is not worth starting.
WHISPER_MIN_SAMPLES: Final = SPEECH_RATE // 10


def whisper_input(audio16k: npt.ArrayLike) -> npt.NDArray[np.float32] | None:
    """Mono 16 kHz audio as Whisper takes it (contiguous float32), or None when it is under 100 ms: Whisper needs a
    few frames to say anything, so shorter input is answered with "" (by either Whisper engine)."""
    audio = np.ascontiguousarray(audio16k, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
    return audio if len(audio) >= WHISPER_MIN_SAMPLES else None

# GA `type` <-> beta encoding name.
_GA_TYPES: Final[dict[str, Encoding]] = {
    "audio/pcm": "pcm16",
    "audio/pcmu": "g711_ulaw",
    "audio/pcma": "g711_alaw",
}
_BETA_TO_GA: Final[dict[Encoding, str]] = {enc: ga for ga, enc in _GA_TYPES.items()}
# The protocol fixes each encoding's rate; a client cannot choose another one.
_NATIVE_RATE: Final[dict[Encoding, int]] = {
    "pcm16": PCM16_RATE,
    "g711_ulaw": G711_RATE,
    "g711_alaw": G711_RATE,
}


@dataclass(frozen=True)
class AudioFormat:
    encoding: Encoding
    sample_rate: int

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown audio encoding {self.encoding!r}; expected one of {ENCODINGS}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, not {self.sample_rate}")

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == "pcm16" else 1

    def duration_ms(self, num_bytes: int) -> float:
        """Playback length of `num_bytes` of audio in this format."""
        return num_bytes / self.bytes_per_sample * 1000.0 / self.sample_rate


PCM16: Final = AudioFormat("pcm16", PCM16_RATE)
G711_ULAW: Final = AudioFormat("g711_ulaw", G711_RATE)
G711_ALAW: Final = AudioFormat("g711_alaw", G711_RATE)


def _native(encoding: Encoding) -> AudioFormat:
    return AudioFormat(encoding, _NATIVE_RATE[encoding])


def _parse_ga(value: Mapping[str, Any]) -> AudioFormat:
    kind = value.get("type")
    if kind not in _GA_TYPES:
        raise ValueError(f"unknown audio format type {kind!r}; expected one of {sorted(_GA_TYPES)}")
    fmt = _native(_GA_TYPES[kind])
    rate = value.get("rate", fmt.sample_rate)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate != fmt.sample_rate:
        raise ValueError(f"{kind} only supports rate {fmt.sample_rate}, not {rate!r}")
    return fmt


def parse_audio_format(value: str | Mapping[str, Any] | AudioFormat) -> AudioFormat:
    """Read a beta format name ("pcm16", "g711_ulaw", "g711_alaw") or a GA format object."""
    if isinstance(value, AudioFormat):
        return value
    if isinstance(value, str):
        if value not in ENCODINGS:
            raise ValueError(f"unknown audio format {value!r}; expected one of {ENCODINGS}")
        return _native(cast(Encoding, value))
    if isinstance(value, Mapping):
        return _parse_ga(value)
    raise ValueError(f"audio format must be a string or an object, not {type(value).__name__}")


def format_to_beta(fmt: AudioFormat) -> str:
    return fmt.encoding


def format_to_ga(fmt: AudioFormat) -> dict[str, Any]:
    # Only audio/pcm carries a rate in the GA schema; G.711 is always 8 kHz.
    if fmt.encoding == "pcm16":
        return {"type": "audio/pcm", "rate": fmt.sample_rate}
    return {"type": _BETA_TO_GA[fmt.encoding]}


# ---------------------------------------------------------------- G.711 (ITU-T reference coder)

_BIAS: Final = 0x84
_ULAW_CLIP: Final = 8159  # in 14-bit units (32635 >> 2)
# Upper bounds of the 8 segments, in the 14-bit (mu-law) and 13-bit (A-law) magnitude domains.
_SEG_ULAW_END: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_SEG_ALAW_END: Final = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _ulaw_decode_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _BIAS - t, t - _BIAS).astype(np.int16)


def _alaw_decode_table() -> npt.NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _all_int16() -> npt.NDArray[np.int32]:
    # Index i of an encode table is the int16 whose bit pattern, read as uint16, is i.
    return np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)


def _ulaw_encode_table() -> npt.NDArray[np.uint8]:
    pcm = _all_int16() >> 2  # mu-law codes 14-bit samples
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_BIAS >> 2)
    seg = np.searchsorted(_SEG_ULAW_END, mag, side="left")  # first segment whose end >= mag
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


def _alaw_encode_table() -> npt.NDArray[np.uint8]:
    pcm = _all_int16() >> 3  # A-law codes 13-bit samples
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_SEG_ALAW_END, mag, side="left")
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> shift) & 0x0F))
    return (code ^ mask).astype(np.uint8)


# Built once at import (~130 KB): encoding is then one fancy-index per buffer.
_ULAW_TO_LIN: Final = _ulaw_decode_table()
_ALAW_TO_LIN: Final = _alaw_decode_table()
_LIN_TO_ULAW: Final = _ulaw_encode_table()
_LIN_TO_ALAW: Final = _alaw_encode_table()


def int16_to_ulaw(pcm: npt.NDArray[np.int16]) -> bytes:
    return _LIN_TO_ULAW[pcm.astype(np.int16, copy=False).view(np.uint16)].tobytes()


def int16_to_alaw(pcm: npt.NDArray[np.int16]) -> bytes:
    return _LIN_TO_ALAW[pcm.astype(np.int16, copy=False).view(np.uint16)].tobytes()


# ---------------------------------------------------------------- float <-> bytes

# Dividing by 32768 (not 32767) maps every int16 onto an exactly representable float32 in [-1, 1),
# so pcm16 bytes -> float -> bytes is lossless.
_INT16_SCALE: Final = 32768.0


def float_to_int16(samples: npt.ArrayLike) -> npt.NDArray[np.int16]:
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * _INT16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def int16_to_float(pcm: npt.NDArray[np.int16]) -> FloatArray:
    return pcm.astype(np.float32) / np.float32(_INT16_SCALE)


def decode(data: bytes, fmt: AudioFormat) -> FloatArray:
    """Protocol bytes -> mono float32 in [-1, 1] at `fmt.sample_rate`."""
    if fmt.encoding == "pcm16":
        if len(data) % 2:
            # Callers must carry an odd trailing byte over to the next chunk; guessing here would
            # shift every later sample by one byte.
            raise ValueError(f"pcm16 audio must have an even number of bytes, got {len(data)}")
        return int16_to_float(np.frombuffer(data, dtype="<i2").astype(np.int16))
    table = _ULAW_TO_LIN if fmt.encoding == "g711_ulaw" else _ALAW_TO_LIN
    return int16_to_float(table[np.frombuffer(data, dtype=np.uint8)])


def encode(samples: npt.ArrayLike, fmt: AudioFormat) -> bytes:
    """Mono float samples at `fmt.sample_rate` -> protocol bytes (values outside [-1, 1] clip)."""
    pcm = float_to_int16(samples)
    if fmt.encoding == "pcm16":
        return pcm.astype("<i2", copy=False).tobytes()
    if fmt.encoding == "g711_ulaw":
        return int16_to_ulaw(pcm)
    return int16_to_alaw(pcm)


# ---------------------------------------------------------------- resampling

# Measured soxr latency (audio held back inside a stream fed 20 ms chunks): HQ 24k->16k 21 ms,
# 22.05k->24k 33 ms, but 8k->16k 66 ms; MQ 8k->16k 26 ms. Telephone audio carries nothing above
# 4 kHz, so HQ's steeper anti-imaging filter buys nothing there and MQ saves 40 ms per turn.
_TELEPHONE_RATE: Final = 8000


def default_quality(in_rate: int, out_rate: int) -> str:
    return "MQ" if in_rate <= _TELEPHONE_RATE < out_rate else "HQ"


def _as_float32(x: npt.ArrayLike) -> FloatArray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"expected mono 1-D audio, got shape {arr.shape}")
    return arr


class Resampler:
    """Streaming mono resampler: feed chunks of any length, get the resampled stream back.

    soxr keeps filter history between chunks, so chunk boundaries leave no clicks; it holds back a
    few ms of output (its filter delay) until more input or `flush()` arrives.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str | None = None) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.quality = quality or default_quality(in_rate, out_rate)
        self._stream: soxr.ResampleStream | None = None
        if in_rate != out_rate:
            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=self.quality)

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def process(self, x: npt.ArrayLike) -> FloatArray:
        samples = _as_float32(x)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=False)

    def flush(self) -> FloatArray:
        """Return the held-back tail and make the stream ready for a new, unrelated signal."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return tail

    def reset(self) -> None:
        """Drop held-back audio (e.g. the input buffer was cleared)."""
        if self._stream is not None:
            self._stream.clear()


def resample(x: npt.ArrayLike, in_rate: int, out_rate: int, quality: str = "HQ") -> FloatArray:
    """Resample a whole buffer (no streaming state)."""
    samples = _as_float32(x)
    if in_rate == out_rate:
        return samples
    return np.asarray(soxr.resample(samples, in_rate, out_rate, quality=quality), dtype=np.float32)
