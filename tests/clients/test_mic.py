"""`duet mic`: the pure conversation state, the playback buffer, the no-device paths, and the real client
against the real server through PortAudio and ALSA's null device (no sound card needed)."""

from __future__ import annotations

import asyncio
import base64
import importlib.abc
import importlib.machinery
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from clients import mic
from clients.mic import (
    BLOCK_FRAMES,
    RATE,
    MicOptions,
    MicState,
    PlaybackBuffer,
    WallClockPacer,
    render_turn,
    session_update,
)
from duet import cli

REPO = Path(__file__).resolve().parents[2]


def pcm(ms: float, value: int = 1000) -> bytes:
    return np.full(int(RATE * ms / 1000), value, dtype="<i2").tobytes()


def audio_delta(response_id: str, item_id: str, ms: float, beta: bool = False) -> dict[str, Any]:
    return {"type": "response.audio.delta" if beta else "response.output_audio.delta", "response_id": response_id,
            "item_id": item_id, "delta": base64.b64encode(pcm(ms)).decode()}


def duet_session(silence_ms: int = 300) -> dict[str, Any]:
    return {"type": "session.updated", "session": {
        "id": "sess_1", "type": "realtime", "duet": {"pacing": "speak-first"},
        "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}}}


def start_reply(state: MicState, now: float, response_id: str = "resp_1", item_id: str = "item_a") -> None:
    state.feed({"type": "response.created", "response": {"id": response_id}}, now)
    state.feed({"type": "response.output_item.added", "response_id": response_id,
                "item": {"id": item_id, "type": "message", "role": "assistant"}}, now)


def user_turn(state: MicState, item_id: str = "item_u", end_ms: int = 1000, now: float = 0.0) -> None:
    state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100, "item_id": item_id}, now)
    state.feed({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item_id}, now)
    state.feed({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                "transcript": "hello there"}, now)


# ---- the state machine ------------------------------------------------------------------------


def test_partial_transcripts_are_replaced_then_the_final_one_wins() -> None:
    state = MicState(PlaybackBuffer())
    state.feed(duet_session(), 0.0)
    assert state.session_id == "sess_1" and state.is_duet and state.silence_ms == 300
    assert state.snapshot().status == "listening"
    state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_u"}, 1.0)
    state.feed({"type": "duet.input_transcript.partial", "item_id": "item_u", "transcript": "what is"}, 1.5)
    state.feed({"type": "duet.input_transcript.partial", "item_id": "item_u", "transcript": "what is the time"}, 2.0)
    view = state.snapshot()
    assert view.status == "hearing you"
    assert view.turn is not None and view.turn.partial == "what is the time" and view.turn.user is None
    state.feed({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 2000, "item_id": "item_u"}, 2.4)
    assert state.snapshot().status == "transcribing"
    state.feed({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u",
                "transcript": "What is the time?"}, 2.5)
    view = state.snapshot()
    assert view.turn is not None and view.turn.user == "What is the time?"


def test_transcription_deltas_from_other_servers_accumulate() -> None:
    state = MicState(PlaybackBuffer())
    state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u"}, 0.0)
    for delta in ("good ", "morning"):
        state.feed({"type": "conversation.item.input_audio_transcription.delta", "item_id": "u", "delta": delta}, 0.1)
    view = state.snapshot()
    assert view.turn is not None and view.turn.partial == "good morning"


def test_thought_reply_and_metrics_accumulate_into_one_finished_turn() -> None:
    playback = PlaybackBuffer()
    state = MicState(playback)
    state.feed(duet_session(), 0.0)
    user_turn(state)
    start_reply(state, 1.0)
    assert state.snapshot().status == "thinking"
    for delta in ("The user ", "asks for a greeting."):
        state.feed({"type": "duet.thought.delta", "response_id": "resp_1", "item_id": "item_a", "delta": delta}, 1.1)
    # GA and beta transcript names, and text deltas, all feed the reply.
    state.feed({"type": "response.output_audio_transcript.delta", "response_id": "resp_1", "item_id": "item_a",
                "delta": "Hi, "}, 1.2)
    state.feed({"type": "response.audio_transcript.delta", "response_id": "resp_1", "item_id": "item_a",
                "delta": "nice "}, 1.2)
    state.feed({"type": "response.output_text.delta", "response_id": "resp_1", "item_id": "item_a",
                "delta": "to meet you."}, 1.2)
    state.feed(audio_delta("resp_1", "item_a", 200, beta=True), 1.3)
    view = state.snapshot()
    assert view.status == "speaking" and view.queued_ms == pytest.approx(200)
    assert view.turn is not None and view.turn.thought == "The user asks for a greeting."
    assert view.turn.reply == "Hi, nice to meet you."
    assert state.take_finished() == []
    state.feed({"type": "duet.turn.metrics", "response_id": "resp_1",
                "metrics": {"first_audio_sent_ms": 640.0, "transcript_ms": 12.0, "underruns": 0}}, 1.4)
    state.feed({"type": "response.output_audio_transcript.done", "response_id": "resp_1", "item_id": "item_a",
                "transcript": "Hi, nice to meet you!"}, 1.4)
    state.feed({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}}, 1.5)
    [turn] = state.take_finished()
    assert state.take_finished() == []
    assert (turn.user, turn.reply, turn.status, turn.audio_ms) == ("hello there", "Hi, nice to meet you!",
                                                                   "completed", pytest.approx(200))
    assert turn.metrics["first_audio_sent_ms"] == 640.0 and state.replies == 1
    console = Console(record=True, width=200)
    console.print(render_turn(turn))
    text = console.export_text()
    for expected in ("hello there", "The user asks for a greeting.", "Hi, nice to meet you!",
                     "first audio sent 640 ms", "underruns 0"):
        assert expected in text


def test_a_turn_that_got_no_reply_is_closed_when_the_user_speaks_again() -> None:
    state = MicState(PlaybackBuffer())
    user_turn(state, item_id="u1")
    assert state.take_finished() == []
    for kind in ("speech_started", "speech_stopped"):  # a noise: no transcript, no reply
        state.feed({"type": f"input_audio_buffer.{kind}", "audio_start_ms": 0, "audio_end_ms": 0, "item_id": "u2"},
                   1.0)
    state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u3"}, 2.0)
    assert [t.user for t in state.take_finished()] == ["hello there"]  # the noise is not printed
    view = state.snapshot()
    assert view.status == "hearing you" and view.turn is not None and view.turn.user_item == "u3"


def test_errors_are_reported_once() -> None:
    state = MicState(PlaybackBuffer())
    state.feed({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value",
                                           "message": "bad pacing"}}, 0.0)
    assert state.take_errors() == ["invalid_value: bad pacing"]
    assert state.take_errors() == []


# ---- barge-in ---------------------------------------------------------------------------------


def test_barge_in_truncates_at_the_played_ms_and_drops_the_queued_audio() -> None:
    playback = PlaybackBuffer()
    state = MicState(playback)
    state.feed(duet_session(), 0.0)
    user_turn(state)
    start_reply(state, 1.0)
    state.feed(audio_delta("resp_1", "item_a", 1000), 1.1)
    playback.read(RATE * 400 // 1000)  # the speaker has taken 400 ms
    playback.latency_frames = RATE * 100 // 1000  # of which the last 100 ms are still in the device
    sends = state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5000, "item_id": "u2"}, 1.5)
    assert sends == [{"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0,
                      "audio_end_ms": 300}]
    assert playback.queued_ms == 0
    assert playback.read(BLOCK_FRAMES) == bytes(2 * BLOCK_FRAMES)  # silence at once
    # What the server sends before it hears of the barge-in is not played, and not said twice.
    state.feed(audio_delta("resp_1", "item_a", 200), 1.6)
    assert playback.queued_ms == 0
    assert state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 6000, "item_id": "u3"},
                      1.7) == []
    state.feed({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled"}}, 1.8)
    [turn] = state.take_finished()
    assert turn.interrupted_at_ms == 300 and turn.status == "cancelled"


def test_no_truncate_once_the_reply_was_heard_in_full() -> None:
    playback = PlaybackBuffer()
    state = MicState(playback)
    user_turn(state)
    start_reply(state, 1.0)
    state.feed(audio_delta("resp_1", "item_a", 100), 1.1)
    state.feed({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}}, 1.2)
    playback.read(RATE * 150 // 1000)
    assert state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u2"}, 2.0) == []


def test_barge_in_while_the_response_is_still_running_truncates_even_with_nothing_queued() -> None:
    playback = PlaybackBuffer()
    state = MicState(playback)
    user_turn(state)
    start_reply(state, 1.0)
    state.feed(audio_delta("resp_1", "item_a", 100), 1.1)
    playback.read(RATE * 150 // 1000)  # underrun: all played, the server is still producing
    sends = state.feed({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u2"}, 2.0)
    assert [s["audio_end_ms"] for s in sends] == [100]


# ---- latency ----------------------------------------------------------------------------------


def sent_blocks(state: MicState, t0: float, seconds: float) -> None:
    for i in range(int(seconds * 1000 / 20)):
        state.audio_sent(BLOCK_FRAMES, t0 + i * 0.02)


def test_latency_is_first_reply_audio_minus_the_capture_time_of_the_speech_end() -> None:
    state = MicState(PlaybackBuffer())
    state.feed(duet_session(silence_ms=300), 0.0)
    sent_blocks(state, t0=100.0, seconds=3)
    assert state.capture_time(1010) == pytest.approx(101.01)
    # Duet's audio_end_ms is where speech ended; the event itself arrives after the silence window.
    user_turn(state, end_ms=1500, now=101.85)
    start_reply(state, 102.0)
    state.feed(audio_delta("resp_1", "item_a", 40), 102.3)
    state.feed(audio_delta("resp_1", "item_a", 40), 102.4)  # only the first audio counts
    view = state.snapshot()
    assert view.turn is not None and view.turn.latency_ms == pytest.approx(800.0)


def test_other_servers_count_the_silence_window_in_audio_end_ms() -> None:
    state = MicState(PlaybackBuffer())
    state.feed({"type": "session.updated", "session": {"id": "s", "type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}}, 0.0)
    assert not state.is_duet
    sent_blocks(state, t0=100.0, seconds=3)
    user_turn(state, end_ms=2000, now=102.1)
    start_reply(state, 102.2)
    state.feed(audio_delta("resp_1", "item_a", 40), 102.5)
    view = state.snapshot()
    assert view.turn is not None and view.turn.latency_ms == pytest.approx(1000.0)


def test_latency_falls_back_to_the_arrival_of_speech_stopped_minus_the_silence() -> None:
    state = MicState(PlaybackBuffer())
    state.feed(duet_session(silence_ms=300), 0.0)
    user_turn(state, end_ms=1500, now=50.0)  # no audio sent through this state: nothing to map
    start_reply(state, 50.1)
    state.feed(audio_delta("resp_1", "item_a", 40), 50.5)
    view = state.snapshot()
    assert view.turn is not None and view.turn.latency_ms == pytest.approx(800.0)


# ---- playback buffer and pacing ---------------------------------------------------------------


def test_playback_buffer_reads_exact_frames_across_chunks_then_silence() -> None:
    buf = PlaybackBuffer()
    buf.push("a", np.arange(300, dtype="<i2").tobytes())
    buf.push("b", np.arange(300, 600, dtype="<i2").tobytes())
    out = np.frombuffer(buf.read(480), dtype="<i2")
    assert np.array_equal(out, np.arange(480))
    out = np.frombuffer(buf.read(480), dtype="<i2")
    assert np.array_equal(out[:120], np.arange(480, 600)) and not out[120:].any()
    assert buf.queued_ms == 0
    assert (buf.played_ms("a"), buf.played_ms("b")) == (300 * 1000 // RATE, 300 * 1000 // RATE)


def test_played_ms_skips_underrun_gaps_and_waits_for_the_output_latency() -> None:
    buf = PlaybackBuffer()
    buf.latency_frames = 480
    buf.push("a", pcm(20))
    buf.read(960)  # 20 ms of audio, 20 ms of silence (underrun)
    buf.push("a", pcm(20))
    buf.read(480)
    # Position 1440, heard up to 960: the first 20 ms were heard, the second 20 ms not yet.
    assert buf.played_ms("a") == 20 and buf.unplayed("a")
    buf.read(480)
    assert buf.played_ms("a") == 40 and not buf.unplayed("a")


def test_playback_buffer_converts_to_the_device_rate() -> None:
    buf = PlaybackBuffer(rate=48000)
    for _ in range(10):
        buf.push("a", pcm(20))
    assert buf.queued_ms < 200  # the resampler holds the last few ms back until the item ends
    buf.end_item("a")
    assert buf.queued_ms == pytest.approx(200, abs=1)
    buf.read(48000)
    assert buf.played_ms("a") == 200
    buf.push("b", pcm(20))
    buf.clear()
    buf.end_item("b")  # what the resampler held belonged to the dropped audio
    assert buf.queued_ms == 0


def test_audio_done_releases_the_resampled_tail_of_the_reply() -> None:
    playback = PlaybackBuffer(rate=48000)
    state = MicState(playback)
    user_turn(state)
    start_reply(state, 1.0)
    state.feed(audio_delta("resp_1", "item_a", 100), 1.1)
    state.feed({"type": "response.output_audio.done", "response_id": "resp_1", "item_id": "item_a"}, 1.2)
    assert playback.queued_ms == pytest.approx(100, abs=1)


def test_pacer_never_holds_a_clocked_device_and_holds_an_unclocked_one_to_real_time() -> None:
    clocked = WallClockPacer(RATE, slack_s=0.2)
    assert all(clocked.delay(BLOCK_FRAMES, 10.0 + i * 0.02) == 0 for i in range(500))
    # A device that delivers 100 blocks (2 s of audio) at one instant is held back by 2 s minus the slack.
    unclocked = WallClockPacer(RATE, slack_s=0.2)
    waits = [unclocked.delay(BLOCK_FRAMES, 10.0) for _ in range(100)]
    assert waits[9] == 0 and waits[-1] == pytest.approx(2.0 - 0.2)


class _FakeStream:
    def __init__(self, samplerate: int, channels: int, dtype: str, blocksize: int, callback: Any) -> None:
        self.samplerate, self.blocksize, self.callback = samplerate, blocksize, callback
        self.latency = 0.01


def test_a_device_without_24_khz_is_converted_both_ways() -> None:
    def only_48k(samplerate: int, **kwargs: Any) -> None:
        if samplerate != 48000:
            raise _PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    sd = fake_sounddevice([{"name": "hw", "max_input_channels": 1, "max_output_channels": 2,
                            "default_samplerate": 48000.0}])
    sd.check_input_settings = sd.check_output_settings = only_48k  # type: ignore[attr-defined]
    sd.RawInputStream = sd.RawOutputStream = _FakeStream  # type: ignore[attr-defined]
    captured: list[tuple[bytes, float]] = []
    io = mic.AudioIO(sd, lambda data, at: captured.append((data, at)))
    assert (io.in_rate, io.out_rate, io.input.samplerate, io.input.blocksize) == (48000, 48000, 48000, 960)
    assert io.playback.rate == 48000 and io.playback.latency_frames == 480
    tone = (np.sin(np.arange(960) * 2 * np.pi * 440 / 48000) * 8000).astype("<i2").tobytes()
    for _ in range(10):  # 200 ms of microphone at 48 kHz
        io._on_input(tone, 960, None, None)
    assert len(captured) == 10
    wire = b"".join(io.to_wire(data) for data, _ in captured)
    assert abs(len(wire) // 2 - 200 * RATE // 1000) < 1000  # ~200 ms at 24 kHz, minus the resampler's delay
    io.playback.push("a", pcm(100))
    io.playback.end_item("a")
    out = bytearray(2 * 9600)
    io._on_output(out, 9600, None, None)  # 200 ms of speaker at 48 kHz: 100 ms of reply, then silence
    samples = np.frombuffer(bytes(out), dtype="<i2")
    assert abs(int(np.count_nonzero(samples)) - 4800) < 100


def test_session_update_is_ga_shaped_with_duet_keys_only_when_asked() -> None:
    plain = session_update(MicOptions())["session"]
    assert plain["type"] == "realtime" and "duet" not in plain
    duet = session_update(MicOptions(pacing="tbs", partials_ms=400))["session"]
    assert duet["duet"] == {"pacing": "tbs", "partial_transcripts_ms": 400}


# ---- no audio device --------------------------------------------------------------------------


class _NoPortAudio(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import sounddevice` fail the way it does when libportaudio is not installed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name == "sounddevice" else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        raise OSError("PortAudio library not found")


class _PortAudioError(Exception):
    pass


def fake_sounddevice(devices: list[dict[str, Any]], open_error: str | None = None) -> types.ModuleType:
    sd = types.ModuleType("sounddevice")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise _PortAudioError(open_error)

    sd.PortAudioError = _PortAudioError  # type: ignore[attr-defined]
    sd.query_devices = lambda kind=None: devices if kind is None else devices[0]  # type: ignore[attr-defined]
    sd.check_input_settings = sd.check_output_settings = lambda **kw: None  # type: ignore[attr-defined]
    sd.RawInputStream = sd.RawOutputStream = refuse  # type: ignore[attr-defined]
    return sd


def run_cli(capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(["mic", "--url", "ws://127.0.0.1:9/v1/realtime", "--seconds", "1"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, err


def test_missing_portaudio_exits_2_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    rc, err = run_cli(capsys)
    assert rc == 2
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert err.startswith("duet mic: cannot use audio devices: the PortAudio library is missing")
    assert "apt-get install libportaudio2" in err and "duet talk --wav FILE" in err


def test_no_devices_exits_2_with_a_clear_message(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([]))
    rc, err = run_cli(capsys)
    assert rc == 2
    assert err.startswith("duet mic: no audio input device found")
    assert "Connect a microphone, or use `duet talk --wav FILE`." in err


def test_no_output_device_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    mic_only = [{"name": "usb mic", "max_input_channels": 1, "max_output_channels": 0}]
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(mic_only))
    rc, err = run_cli(capsys)
    assert rc == 2 and err.startswith("duet mic: no audio output device found")


def test_a_device_that_cannot_be_opened_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    device = [{"name": "default", "max_input_channels": 2, "max_output_channels": 2, "default_samplerate": 48000.0}]
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(device, "Device unavailable [PaErrorCode -9985]"))
    rc, err = run_cli(capsys)
    assert rc == 2
    assert err.startswith("duet mic: could not open the audio device (Device unavailable [PaErrorCode -9985])")


# ---- the real thing, on ALSA's null device ----------------------------------------------------


def portaudio_missing() -> str | None:
    try:
        mic.load_sounddevice()
    except mic.NoAudioDevice as exc:
        return exc.reason
    return None


def alsa_home(tmp_path: Path, capture_file: Path | None = None) -> dict[str, str]:
    """An environment whose default ALSA device needs no sound card: playback to `null`; capture from
    `null` (silence) or, through the `file` plugin, from a raw pcm16 24 kHz file. Neither device has a
    clock; the client holds them to real time (WallClockPacer)."""
    if capture_file is None:
        conf = "pcm.!default {\n  type null\n}\n"
    else:
        conf = ("pcm.!default {\n  type asym\n  playback.pcm \"null\"\n  capture.pcm {\n    type file\n"
                f"    slave.pcm \"null\"\n    file \"/dev/null\"\n    infile \"{capture_file}\"\n"
                "    format \"raw\"\n  }\n}\n")
    (tmp_path / ".asoundrc").write_text(conf)
    env = {k: v for k, v in os.environ.items() if k not in ("ALSA_CONFIG_PATH", "AUDIODEV")}
    # COLUMNS: rich wraps at 80 columns when not on a terminal; keep each printed line whole.
    return {**env, "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "COLUMNS": "200"}


async def run_mic_process(env: dict[str, str], *args: str, timeout_s: float = 90.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "duet.cli", "mic", *args, cwd=REPO,
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(), err.decode()


@pytest.mark.integration
async def test_mic_runs_on_the_null_alsa_device(server: Any, tmp_path: Path) -> None:
    if (reason := portaudio_missing()) is not None:
        pytest.skip(f"needs PortAudio: {reason} (.ci/run installs libportaudio2)")
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    rc, out, err = await run_mic_process(alsa_home(tmp_path), "--url", url, "--seconds", "3")
    assert rc == 0, err
    assert f"connected to {url}: session sess_" in out
    assert "bye: 0 replies" in out


@pytest.mark.integration
async def test_mic_hears_a_question_and_plays_the_reply(server: Any, speak: Any, tmp_path: Path) -> None:
    """Full duplex end to end: the 'microphone' is a file of speech, the reply goes to the null speaker."""
    if (reason := portaudio_missing()) is not None:
        pytest.skip(f"needs PortAudio: {reason} (.ci/run installs libportaudio2)")
    question = speak("What is the capital of France?")
    silence = np.zeros(RATE * 60, np.float32)  # past its end the file plugin repeats stale audio
    audio = np.concatenate([np.zeros(RATE // 2, np.float32), question, silence])
    raw = tmp_path / "mic.raw"
    (np.clip(audio, -1, 1) * 32767).astype("<i2").tofile(raw)
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    rc, out, err = await run_mic_process(alsa_home(tmp_path, raw), "--url", url, "--seconds", "45", "--turns", "1")
    assert rc == 0, err
    assert "capital of france" in out.lower()
    assert "paris" in " ".join(line for line in out.splitlines() if line.startswith("duet ")).lower(), out
    latency = re.search(r"latency (\d+) ms \(your speech end → first reply audio\)", out)
    assert latency is not None, out
    # Server: silence window (300 ms) + its time to first audio; well under 10 s on any machine we run on.
    assert 300 < int(latency.group(1)) < 10000
    assert "bye: 1 reply" in out
