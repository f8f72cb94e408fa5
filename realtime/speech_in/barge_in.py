"""When does user speech during a reply count as an interruption? (Pure: no clock, no audio I/O.)

Two false alarms to avoid: a short noise (a cough, a click) and the reply's own audio leaking back from
the speaker into the microphone. The first is handled by a minimum speech duration, longer right after a
reply starts (when echo and "mm-hm"s are most likely). The second by a level test in the spirit of the
Geigel double-talk detector: near-end speech must come within `echo_margin_db` of the level of the reply
audio being played; an echo path attenuates the reply, a person talking over it does not.
"""

from __future__ import annotations

import math
from typing import Literal

from common.config import BargeInConfig

Verdict = Literal["interrupt", "wait"]
__all__ = ["BargeInConfig", "decide", "rms_db"]


def rms_db(rms: float) -> float:
    return 20.0 * math.log10(max(rms, 1e-9))


def decide(cfg: BargeInConfig, speech_ms: float, since_reply_audio_ms: float | None, near_rms: float,
           far_rms: float) -> Verdict:
    """`speech_ms`: how long the user has spoken; `since_reply_audio_ms`: time since the reply's first audio
    was sent (None: none yet); `near_rms`: level of the user's speech; `far_rms`: level of the reply audio."""
    needed = cfg.min_speech_ms
    if since_reply_audio_ms is not None and since_reply_audio_ms < cfg.guard_window_ms:
        needed = max(needed, cfg.guard_min_speech_ms)
    if speech_ms < needed:
        return "wait"
    if cfg.echo_margin_db > 0 and far_rms > 0 and rms_db(near_rms) < rms_db(far_rms) - cfg.echo_margin_db:
        return "wait"
    return "interrupt"
