"""Audio devices for `duet mic`: PortAudio through sounddevice, paced to the wall clock."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import soxr

from clients.mic_state import BLOCK_MS, RATE, PlaybackBuffer

NO_DEVICE_HINT = "Connect a microphone, or use `duet talk --wav FILE`."


class NoAudioDevice(Exception):
    """No usable microphone or speaker: reported as one line, exit status 2."""

    def __init__(self, reason: str, hint: str = NO_DEVICE_HINT) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def message(self) -> str:
        return f"duet mic: {self.reason}. {self.hint}"


# ---------------------------------------------------------------------------------------------
# Pure parts: pacing, the playback buffer, the conversation state


class WallClockPacer:
    """Holds a device callback to real time.

    A device without a clock (ALSA's `null` plugin, some virtual devices) calls back as fast as the CPU
    allows: the capture side would flood the server with hours of audio a minute and both sides would burn
    a core. A real device never runs ahead of the wall clock by more than its own buffer, which `slack_s`
    covers, so there `delay` is always 0.
    """

    def __init__(self, rate: int, slack_s: float) -> None:
        self.rate = rate
        self.slack_s = slack_s
        self._t0: float | None = None
        self._frames = 0

    def delay(self, frames: int, now: float) -> float:
        """Count `frames` handed over at `now`; return how long the callback should wait (seconds)."""
        if self._t0 is None:
            self._t0 = now
        self._frames += frames
        return max(0.0, self._frames / self.rate - (now - self._t0) - self.slack_s)


def load_sounddevice() -> ModuleType:
    """Import sounddevice, turning a missing PortAudio or package into a NoAudioDevice with a fix."""
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError("PortAudio library not found") at import
        raise NoAudioDevice(f"cannot use audio devices: the PortAudio library is missing ({exc})",
                            "Install it (Debian/Ubuntu: apt-get install libportaudio2), or use "
                            "`duet talk --wav FILE`.") from None
    except ImportError:
        raise NoAudioDevice("cannot use audio devices: the sounddevice package is not installed",
                            "Install it with pip install 'duet-voice[mic]', or use `duet talk --wav FILE`.") from None
    return sounddevice


def probe_devices(sd: ModuleType) -> None:
    """Fail early, with a clear reason, when PortAudio sees no microphone or no speaker at all."""
    try:
        devices = list(sd.query_devices())
    except Exception as exc:  # PortAudioError, or a broken host API: the reason is in the message
        raise NoAudioDevice(f"cannot list audio devices ({exc})") from None
    if not any(d.get("max_input_channels", 0) > 0 for d in devices):
        raise NoAudioDevice(f"no audio input device found (PortAudio sees {len(devices)} device(s), none "
                            "with a microphone input)")
    if not any(d.get("max_output_channels", 0) > 0 for d in devices):
        raise NoAudioDevice(f"no audio output device found (PortAudio sees {len(devices)} device(s), none "
                            "with an output)", "Connect speakers or headphones, or use `duet talk --wav FILE`.")


class AudioIO:
    """Microphone and speaker streams (opened, not started), at 24 kHz or the device's own rate."""

    def __init__(self, sd: ModuleType, on_capture: Callable[[bytes, float], None]) -> None:
        self.sd = sd
        self.on_capture = on_capture
        self.xruns = 0  # input overflows and output underflows PortAudio reported
        try:
            self.in_rate = self._rate(sd.check_input_settings, "input")
            self.out_rate = self._rate(sd.check_output_settings, "output")
            self.playback = PlaybackBuffer(rate=self.out_rate)
            self._in_resampler = None if self.in_rate == RATE else \
                soxr.ResampleStream(self.in_rate, RATE, 1, dtype="int16")
            # Slack: a clocked device may run ahead of the wall clock by its buffer (output is primed
            # ahead at start), never by more; see WallClockPacer.
            self._in_pacer = WallClockPacer(self.in_rate, slack_s=0.2)
            self._out_pacer = WallClockPacer(self.out_rate, slack_s=0.5)
            self.input = sd.RawInputStream(samplerate=self.in_rate, channels=1, dtype="int16",
                                           blocksize=self.in_rate * BLOCK_MS // 1000, callback=self._on_input)
            try:
                self.output = sd.RawOutputStream(samplerate=self.out_rate, channels=1, dtype="int16",
                                                 blocksize=self.out_rate * BLOCK_MS // 1000,
                                                 callback=self._on_output)
            except BaseException:
                self.input.close()
                raise
        except (sd.PortAudioError, ValueError) as exc:
            raise NoAudioDevice(f"could not open the audio device ({exc})") from None
        self.playback.latency_frames = int(self.output.latency * self.out_rate)

    def _rate(self, check: Callable[..., None], kind: str) -> int:
        """24 kHz when the device takes it (no conversion), else the device's default rate."""
        try:
            check(samplerate=RATE, channels=1, dtype="int16")
            return RATE
        except (self.sd.PortAudioError, ValueError):
            return int(self.sd.query_devices(kind=kind)["default_samplerate"])

    @property
    def latency_ms(self) -> tuple[float, float]:
        return self.input.latency * 1000, self.output.latency * 1000

    def start(self) -> None:
        self.input.start()
        self.output.start()

    def close(self) -> None:
        for stream in (self.input, self.output):
            with contextlib.suppress(Exception):  # closing a stream whose device vanished may raise
                stream.abort()
                stream.close()

    def to_wire(self, pcm: bytes) -> bytes:
        """Captured device-rate pcm16 -> 24 kHz pcm16 (may be empty while the resampler fills)."""
        if self._in_resampler is None:
            return pcm
        return self._in_resampler.resample_chunk(np.frombuffer(pcm, dtype="<i2")).astype("<i2").tobytes()

    # PortAudio threads: no allocation-heavy work, never touch the event loop's objects directly.
    def _on_input(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.xruns += 1
        now = time.perf_counter()
        wait = self._in_pacer.delay(frames, now)
        if wait > 0:  # unclocked device: hold it to real time instead of dropping its audio
            time.sleep(wait)
            now += wait
        self.on_capture(bytes(indata), now - frames / self.in_rate)

    def _on_output(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.xruns += 1
        wait = self._out_pacer.delay(frames, time.perf_counter())
        if wait > 0:
            time.sleep(wait)
        outdata[:] = self.playback.read(frames)


# ---------------------------------------------------------------------------------------------
# The client
