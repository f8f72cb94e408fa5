"""When does user speech during a reply count as an interruption? (Pure: no clock, no audio I/O.)

Two false alarms to avoid: a short noise (a cough, a click) and the reply's own audio leaking back from
the speaker into the microphone. The first is handled by a minimum speech duration, longer right after a
reply starts (when echo and "mm-hm"s are most likely). The second by a level test in the spirit of the
Geigel double-talk detector: near-end speech must come within `echo_margin_db` of the level of the reply
audio being played; an echo path attenuates the reply, a person talking over it does not.

What gets past the guard can still prove false once its transcript is known: no words at all (a cough,
a door) or only a backchannel ("mm-hmm", "yeah, okay"). `is_false_interruption` judges that transcript;
the session then resumes the cut reply rather than answering (LiveKit's "resume false interruption").
"""

from __future__ import annotations

import math
import re
from functools import cache
from typing import Literal

from common.config import BargeInConfig

Verdict = Literal["interrupt", "wait"]
__all__ = ["BargeInConfig", "decide", "is_false_interruption", "rms_db"]


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


# Whisper writes non-speech as annotations: "(coughs)", "[BLANK_AUDIO]", "*clears throat*".
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*")
_LONG_RUN = re.compile(r"(\w)\1{2,}")  # "Mmmm", "hmmm": a drawn-out sound, written at any length


def _words(text: str) -> tuple[str, ...]:
    text = _LONG_RUN.sub(r"\1\1", _ANNOTATION.sub(" ", text.lower()))
    return tuple(re.findall(r"[a-z0-9']+", text))


@cache
def _phrases(backchannels: tuple[str, ...]) -> frozenset[tuple[str, ...]]:
    return frozenset(w for w in map(_words, backchannels) if w)


def is_false_interruption(cfg: BargeInConfig, transcript: str) -> bool:
    """Is an interrupting turn that said `transcript` noise or only backchannels, not a turn of its own?

    Every word must belong to a backchannel phrase ("mm-hmm yeah" is two); one other word ("yeah, stop")
    makes it a real turn. Case, punctuation and hyphens are ignored ("Mm-hmm." = "mm hmm")."""
    words = _words(transcript)
    phrases = _phrases(tuple(cfg.backchannels))
    longest = max((len(p) for p in phrases), default=0)
    # covered[i]: the first i words split into backchannel phrases
    covered = [True] + [False] * len(words)
    for i in range(1, len(words) + 1):
        covered[i] = any(covered[i - n] and words[i - n:i] in phrases for n in range(1, min(i, longest) + 1))
    return covered[-1]
