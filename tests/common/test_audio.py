from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from common.audio import (
    G711_ALAW,
    G711_ULAW,
    PCM16,
    AudioFormat,
    Resampler,
    decode,
    encode,
    format_to_beta,
    format_to_ga,
    parse_audio_format,
    resample,
)


@pytest.fixture(scope="module")
def audioop() -> ModuleType:
    # The reference G.711 coder; deprecated (gone in 3.13), so only the tests use it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop as module
    return module


ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = bytes(range(256))


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(("value", "expected"), [
    ("pcm16", PCM16),
    ("g711_ulaw", G711_ULAW),
    ("g711_alaw", G711_ALAW),
    ({"type": "audio/pcm", "rate": 24000}, PCM16),
    ({"type": "audio/pcm"}, PCM16),
    ({"type": "audio/pcmu"}, G711_ULAW),
    ({"type": "audio/pcma"}, G711_ALAW),
    (G711_ULAW, G711_ULAW),
])
def test_parse_audio_format(value: Any, expected: AudioFormat) -> None:
    assert parse_audio_format(value) == expected


def test_native_rates() -> None:
    assert (PCM16.sample_rate, PCM16.bytes_per_sample) == (24000, 2)
    assert (G711_ULAW.sample_rate, G711_ULAW.bytes_per_sample) == (8000, 1)
    assert (G711_ALAW.sample_rate, G711_ALAW.bytes_per_sample) == (8000, 1)
    assert PCM16.duration_ms(4800) == 100.0
    assert G711_ULAW.duration_ms(800) == 100.0


@pytest.mark.parametrize(("value", "message"), [
    ("pcm24", "unknown audio format"),
    ("", "unknown audio format"),
    ({"type": "audio/opus"}, "unknown audio format type"),
    ({"rate": 24000}, "unknown audio format type"),
    ({"type": "audio/pcm", "rate": 16000}, "only supports rate 24000"),
    ({"type": "audio/pcm", "rate": "24000"}, "only supports rate 24000"),
    ({"type": "audio/pcmu", "rate": 16000}, "only supports rate 8000"),
    (24000, "must be a string or an object"),
    (None, "must be a string or an object"),
])
def test_parse_audio_format_errors(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_audio_format(value)


def test_audio_format_validates() -> None:
    with pytest.raises(ValueError, match="unknown audio encoding"):
        AudioFormat("mp3", 44100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        AudioFormat("pcm16", 0)


@pytest.mark.parametrize("fmt", [PCM16, G711_ULAW, G711_ALAW])
def test_format_round_trips_through_beta_and_ga(fmt: AudioFormat) -> None:
    assert parse_audio_format(format_to_beta(fmt)) == fmt
    assert parse_audio_format(format_to_ga(fmt)) == fmt


def test_format_to_ga() -> None:
    assert format_to_ga(PCM16) == {"type": "audio/pcm", "rate": 24000}
    assert format_to_ga(G711_ULAW) == {"type": "audio/pcmu"}
    assert format_to_ga(G711_ALAW) == {"type": "audio/pcma"}
    assert format_to_beta(G711_ALAW) == "g711_alaw"


# ---------------------------------------------------------------- pcm16


def test_pcm16_round_trip_is_exact_for_every_sample() -> None:
    data = ALL_INT16.astype("<i2").tobytes()
    samples = decode(data, PCM16)
    assert samples.dtype == np.float32
    assert samples.min() == -1.0 and samples.max() < 1.0
    assert encode(samples, PCM16) == data


def test_pcm16_is_little_endian() -> None:
    assert encode(np.array([0.5, -1.0], dtype=np.float32), PCM16) == b"\x00\x40\x00\x80"
    np.testing.assert_array_equal(decode(b"\x00\x40\x00\x80", PCM16), [0.5, -1.0])


def test_pcm16_encode_clips() -> None:
    assert encode(np.array([1.0, 3.0, -3.0]), PCM16) == np.array([32767, 32767, -32768], "<i2").tobytes()


def test_pcm16_odd_length_rejected() -> None:
    with pytest.raises(ValueError, match="even number of bytes"):
        decode(b"\x00\x01\x02", PCM16)


def test_empty_audio() -> None:
    for fmt in (PCM16, G711_ULAW, G711_ALAW):
        assert decode(b"", fmt).shape == (0,)
        assert encode(np.zeros(0, dtype=np.float32), fmt) == b""


# ---------------------------------------------------------------- G.711 against audioop


def test_ulaw_decode_matches_audioop(audioop: ModuleType) -> None:
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype="<i2") / 32768.0
    np.testing.assert_array_equal(decode(ALL_CODES, G711_ULAW), expected.astype(np.float32))


def test_alaw_decode_matches_audioop(audioop: ModuleType) -> None:
    expected = np.frombuffer(audioop.alaw2lin(ALL_CODES, 2), dtype="<i2") / 32768.0
    np.testing.assert_array_equal(decode(ALL_CODES, G711_ALAW), expected.astype(np.float32))


def test_ulaw_encode_matches_audioop_for_every_int16(audioop: ModuleType) -> None:
    assert encode(ALL_INT16 / 32768.0, G711_ULAW) == audioop.lin2ulaw(ALL_INT16.astype("<i2").tobytes(), 2)


def test_alaw_encode_matches_audioop_for_every_int16(audioop: ModuleType) -> None:
    assert encode(ALL_INT16 / 32768.0, G711_ALAW) == audioop.lin2alaw(ALL_INT16.astype("<i2").tobytes(), 2)


@pytest.mark.parametrize("fmt", [G711_ULAW, G711_ALAW])
def test_g711_random_float_samples_match_audioop(audioop: ModuleType, fmt: AudioFormat) -> None:
    rng = np.random.default_rng(0)
    samples = np.clip(rng.normal(0, 0.3, 8000), -1, 1).astype(np.float32)
    pcm = np.clip(np.rint(samples * 32768), -32768, 32767).astype("<i2").tobytes()
    expected = audioop.lin2ulaw(pcm, 2) if fmt is G711_ULAW else audioop.lin2alaw(pcm, 2)
    assert encode(samples, fmt) == expected


@pytest.mark.parametrize("fmt", [G711_ULAW, G711_ALAW])
def test_g711_codes_survive_decode_encode(fmt: AudioFormat) -> None:
    # Every code decodes to the centre of its interval, which encodes back to the same code, except
    # mu-law's two zeros (0x7F "-0" and 0xFF "+0") which both decode to 0 and re-encode as +0.
    again = np.frombuffer(encode(decode(ALL_CODES, fmt), fmt), dtype=np.uint8)
    mismatched = np.nonzero(again != np.frombuffer(ALL_CODES, dtype=np.uint8))[0].tolist()
    assert mismatched == ([0x7F] if fmt is G711_ULAW else [])


# ---------------------------------------------------------------- resampling


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def test_streaming_resampler_keeps_440_hz_and_length_ratio() -> None:
    tone = _tone(440.0, 24000, 1.0)
    rs = Resampler(24000, 16000)
    # 20 ms chunks, as a client would stream them.
    out = np.concatenate([rs.process(tone[i:i + 480]) for i in range(0, len(tone), 480)] + [rs.flush()])
    assert out.dtype == np.float32
    assert abs(len(out) - 16000) <= 2
    assert abs(_peak_hz(out, 16000) - 440.0) < 2.0
    # Chunked streaming and whole-buffer resampling agree away from the edges.
    whole = resample(tone, 24000, 16000)
    np.testing.assert_allclose(out[1000:15000], whole[1000:15000], atol=1e-3)


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24000, 16000), (8000, 16000), (16000, 24000),
                                                    (22050, 24000), (24000, 8000)])
def test_resampler_length_ratio(in_rate: int, out_rate: int) -> None:
    x = _tone(300.0, in_rate, 2.0)
    rs = Resampler(in_rate, out_rate)
    chunk = in_rate // 50
    out = np.concatenate([rs.process(x[i:i + chunk]) for i in range(0, len(x), chunk)] + [rs.flush()])
    assert abs(len(out) - 2 * out_rate) <= 2
    assert abs(_peak_hz(out, out_rate) - 300.0) < 2.0
    assert len(resample(x, in_rate, out_rate)) == pytest.approx(2 * out_rate, abs=2)


def test_resampler_identity_passthrough() -> None:
    rs = Resampler(16000, 16000)
    x = _tone(440.0, 16000, 0.1)
    assert rs.passthrough
    np.testing.assert_array_equal(rs.process(x), x)
    assert rs.flush().shape == (0,)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)


def test_resampler_is_reusable_after_flush() -> None:
    rs = Resampler(24000, 16000)
    x = _tone(440.0, 24000, 0.5)
    first = np.concatenate([rs.process(x), rs.flush()])
    second = np.concatenate([rs.process(x), rs.flush()])
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_resampler_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        Resampler(0, 16000)
    with pytest.raises(ValueError, match="mono"):
        Resampler(24000, 16000).process(np.zeros((10, 2), dtype=np.float32))


def test_telephone_upsampling_uses_lower_latency_quality() -> None:
    assert Resampler(8000, 16000).quality == "MQ"
    assert Resampler(24000, 16000).quality == "HQ"
    assert Resampler(8000, 16000, quality="VHQ").quality == "VHQ"
