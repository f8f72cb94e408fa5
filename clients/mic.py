"""`duet mic`: talk to a realtime server with the microphone, full duplex, and watch the turn unfold.

Capture and playback run in PortAudio's threads (`sounddevice`); everything else runs on one asyncio loop:
a sender streams 20 ms blocks of 24 kHz mono pcm16 as `input_audio_buffer.append`, a receiver feeds server
events to `MicState`, and a renderer draws `MicState.snapshot()` with rich. `MicState` is pure (no audio,
no socket, no clock of its own): it is what the unit tests drive with scripted events.

Barge-in works as real clients do it: when the server reports `input_audio_buffer.speech_started`, the
queued reply audio is dropped at once and `conversation.item.truncate` tells the server how much of the
assistant item was actually played, so its history holds what the user heard.

Latency per turn = arrival of the first reply audio minus the client's estimate of when the user stopped
speaking. That estimate maps the `audio_end_ms` of `input_audio_buffer.speech_stopped` (a position in the
audio we sent) to the wall-clock time at which that sample was captured. Duet's `audio_end_ms` is the start
of the closing silence; OpenAI documents theirs as including `silence_duration_ms`, so for other servers we
subtract the session's silence duration. Input and output device latency (the PortAudio buffers, a few to
tens of ms, shown at start) are not included. If the position cannot be mapped, we fall back to the arrival
of `speech_stopped` minus the silence duration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from clients.mic_audio import NO_DEVICE_HINT, AudioIO, NoAudioDevice, WallClockPacer, load_sounddevice, probe_devices
from clients.mic_state import BLOCK_FRAMES, RATE, MicState, PlaybackBuffer, Turn
from clients.mic_view import level_db, render_live, render_turn
from clients.talk import with_duet_events

__all__ = ["BLOCK_FRAMES", "NO_DEVICE_HINT", "RATE", "AudioIO", "MicOptions", "MicState", "NoAudioDevice",
           "PlaybackBuffer", "Turn", "WallClockPacer", "load_sounddevice", "probe_devices", "render_turn",
           "run_mic", "session_update"]


@dataclass
class MicOptions:
    url: str = "ws://127.0.0.1:8765/v1/realtime"
    pacing: str | None = None
    partials_ms: int | None = None
    seconds: float | None = None  # stop after this long (None: until Ctrl-C)
    turns: int | None = None  # stop after this many replies


def session_update(options: MicOptions) -> dict[str, Any]:
    """GA session shape; Duet's keys only when asked for, since other servers reject unknown fields."""
    session: dict[str, Any] = {"type": "realtime",
                               # Without it OpenAI sends no user transcript; Duet always transcribes.
                               "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
    duet: dict[str, Any] = {}
    if options.pacing:
        duet["pacing"] = options.pacing
    if options.partials_ms is not None:
        duet["partial_transcripts_ms"] = options.partials_ms
    if duet:
        session["duet"] = duet
    return {"type": "session.update", "session": session}


async def _expect(ws: Any, kind: str, state: MicState, timeout_s: float = 15.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            event = json.loads(await ws.recv())
            state.feed(event, time.perf_counter())
            if event.get("type") == kind:
                return dict(event)
            if event.get("type") == "error":
                raise ConnectionError(f"server error: {event.get('error', {}).get('message')}")


async def _converse(options: MicOptions, audio: AudioIO, queue: asyncio.Queue[tuple[bytes, float]],
                    console: Any) -> int:
    from rich.live import Live
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

    state = MicState(audio.playback)
    try:
        # Ask for Duet's own events (thoughts, turn metrics, partial transcripts) that the view shows.
        ws = await connect(with_duet_events(options.url), max_size=None, open_timeout=10)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        print(f"duet mic: cannot connect to {options.url} ({exc})", file=sys.stderr)
        return 1
    try:
        try:
            await _expect(ws, "session.created", state)
            await ws.send(json.dumps(session_update(options)))
            updated = (await _expect(ws, "session.updated", state))["session"]
        except (ConnectionError, ConnectionClosed, TimeoutError) as exc:
            print(f"duet mic: session setup failed ({exc or 'timed out'})", file=sys.stderr)
            return 1
        pacing = (updated.get("duet") or {}).get("pacing")
        in_ms, out_ms = audio.latency_ms
        console.print(f"connected to {options.url}: session {state.session_id}"
                      + (f", pacing {pacing}" if pacing else "")
                      + f"; device latency in {in_ms:.0f} ms, out {out_ms:.0f} ms"
                      + (f" (device rates {audio.in_rate}/{audio.out_rate} Hz, converted)"
                         if (audio.in_rate, audio.out_rate) != (RATE, RATE) else ""), soft_wrap=True)
        console.print("speak; use headphones (without echo cancellation the reply can interrupt itself); "
                      "Ctrl-C quits", style="dim", soft_wrap=True)
        stop = asyncio.Event()
        closed: list[str] = []  # why the server ended the session, if it did

        async def send_audio() -> None:
            while True:
                pcm, captured_at = await queue.get()
                wire = audio.to_wire(pcm)
                if not wire:
                    continue
                samples = np.frombuffer(wire, dtype="<i2")
                state.audio_sent(len(samples), captured_at, level_db(samples))
                try:
                    await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(wire).decode("ascii")}))
                except ConnectionClosed:
                    return  # receive() reports why

        async def receive() -> None:
            try:
                async for message in ws:
                    for reply in state.feed(json.loads(message), time.perf_counter()):
                        await ws.send(json.dumps(reply))
                closed.append("closed normally")
            except ConnectionClosed as exc:
                closed.append(str(exc))
            stop.set()

        audio.start()
        tasks = [asyncio.create_task(send_audio()), asyncio.create_task(receive())]
        deadline = None if options.seconds is None else time.monotonic() + options.seconds
        try:
            # transient: the live area is redrawn in place and vanishes at exit; finished turns stay printed.
            with Live(render_live(state.snapshot()), console=console, auto_refresh=False, transient=True) as live:
                while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                    # --turns: stop once the last reply has also been heard to its end.
                    if options.turns is not None and state.replies >= options.turns and not audio.playback.queued_ms:
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.1):
                            await stop.wait()
                    _print_news(state, live.console)
                    live.update(render_live(state.snapshot()), refresh=True)
        finally:  # also on Ctrl-C, which cancels this coroutine
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        _print_news(state, console)
        summary = f"{state.replies} repl{'y' if state.replies == 1 else 'ies'}"
        if audio.xruns:
            summary += f", {audio.xruns} audio over/underruns reported by PortAudio"
        if closed:
            print(f"duet mic: the server ended the session ({closed[0]}); {summary}", file=sys.stderr)
            return 1
        console.print(f"bye: {summary}", style="dim")
        return 0
    finally:
        audio.close()
        await ws.close()


def _print_news(state: MicState, console: Any) -> None:
    for err in state.take_errors():
        console.print(f"server error {err}", style="red", soft_wrap=True)
    for turn in state.take_finished():
        console.print(render_turn(turn))


async def _main(options: MicOptions, sd: ModuleType, console: Any) -> int:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    def on_capture(pcm: bytes, captured_at: float) -> None:  # PortAudio's thread
        with contextlib.suppress(RuntimeError):  # the loop is closing: the block no longer matters
            loop.call_soon_threadsafe(queue.put_nowait, (pcm, captured_at))

    audio = AudioIO(sd, on_capture)  # before connecting: a missing device is reported without a server
    return await _converse(options, audio, queue, console)


def run_mic(options: MicOptions) -> int:
    """`duet mic`: exit status 0 when stopped (Ctrl-C, --seconds, --turns), 1 on connection trouble,
    2 when there is no usable audio device."""
    from rich.console import Console

    console = Console(highlight=False)
    try:
        sd = load_sounddevice()
        probe_devices(sd)
        return asyncio.run(_main(options, sd, console))
    except NoAudioDevice as exc:
        print(exc.message(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print("bye", style="dim")
        return 0
