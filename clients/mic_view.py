"""Rendering `duet mic`'s state with rich."""

from __future__ import annotations

from typing import Any

import numpy as np

from clients.mic_state import MicView, Turn


def level_db(pcm: np.ndarray) -> float:
    """RMS level of int16 samples in dBFS (for the input meter)."""
    if not len(pcm):
        return -120.0
    rms = float(np.sqrt(np.mean((pcm.astype(np.float32) / 32768.0) ** 2)))
    return 20.0 * float(np.log10(max(rms, 1e-6)))


# ---------------------------------------------------------------------------------------------
# Rendering (rich)


def _meter(db: float, width: int = 20) -> str:
    filled = round(width * min(max((db + 60.0) / 60.0, 0.0), 1.0))
    return "▮" * filled + "▯" * (width - filled)


def _latency_line(turn: Turn) -> str:
    parts = []
    if turn.latency_ms is not None:
        parts.append(f"latency {turn.latency_ms:.0f} ms (your speech end → first reply audio)")
    m = turn.metrics
    server = [f"{label} {m[key]:.0f} ms" for key, label in (("transcript_ms", "transcript"),
                                                           ("ab_first_token_ms", "first reply token"),
                                                           ("first_audio_sent_ms", "first audio sent"))
              if isinstance(m.get(key), int | float)]
    if server:
        parts.append("server after commit: " + ", ".join(server))
    if isinstance(m.get("underruns"), int):
        parts.append(f"underruns {m['underruns']}")
    if turn.interrupted_at_ms is not None:
        parts.append(f"interrupted at {turn.interrupted_at_ms} ms")
    elif turn.status and turn.status != "completed":
        parts.append(turn.status)
    return " · ".join(parts)


def render_turn(turn: Turn) -> Any:
    """A finished turn, printed once above the live area."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    if turn.user is not None or turn.partial:
        grid.add_row(Text("you", style="cyan"), Text(turn.user if turn.user is not None else turn.partial))
    if turn.thought.strip():
        grid.add_row(Text("thought", style="dim"), Text(turn.thought.strip(), style="dim italic"))
    if turn.response_id is not None:
        grid.add_row(Text("duet", style="green"), Text(turn.reply.strip() or "(no words)"))
    line = _latency_line(turn)
    if line:
        grid.add_row("", Text(line, style="yellow"))
    return grid


def _tail(text: str, limit: int = 300) -> str:
    return "…" + text[-limit:] if len(text) > limit else text


def render_live(view: MicView) -> Any:
    """The turn in progress: status, input meter, what the user is saying, the reasoning, the reply."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    status = Text(f"● {view.status}", style="magenta")
    status.append(f"   mic {_meter(view.level_db)} {view.level_db:4.0f} dB", style="dim")
    if view.queued_ms > 0:
        status.append(f"   {view.queued_ms / 1000:.1f} s of reply queued", style="dim")
    grid.add_row("", status)
    turn = view.turn
    if turn is not None:
        if turn.user is not None:
            grid.add_row(Text("you", style="cyan"), Text(turn.user))
        elif turn.partial:
            grid.add_row(Text("you", style="cyan"), Text(turn.partial + " …", style="italic"))
        # The live area stays a few lines high: the tail of long texts; the whole turn is printed when done.
        if turn.thought.strip():
            grid.add_row(Text("thought", style="dim"), Text(_tail(turn.thought.strip()), style="dim italic"))
        if turn.reply:
            grid.add_row(Text("duet", style="green"), Text(_tail(turn.reply.strip())))
        if turn.latency_ms is not None:
            grid.add_row("", Text(f"latency {turn.latency_ms:.0f} ms", style="yellow"))
    return grid


# ---------------------------------------------------------------------------------------------
# Audio devices
