"""The barge-in guard's verdicts (pure)."""

from __future__ import annotations

from common.config import BargeInConfig
from realtime.speech_in.barge_in import decide, is_false_interruption

CFG = BargeInConfig(min_speech_ms=250, guard_window_ms=1500, guard_min_speech_ms=600, echo_margin_db=12.0)
LOUD, FAR = 0.1, 0.1


def test_short_speech_waits_and_long_enough_speech_interrupts() -> None:
    assert decide(CFG, 200, 5000, LOUD, FAR) == "wait"
    assert decide(CFG, 260, 5000, LOUD, FAR) == "interrupt"


def test_right_after_the_reply_starts_only_longer_speech_interrupts() -> None:
    assert decide(CFG, 400, 300, LOUD, FAR) == "wait"
    assert decide(CFG, 650, 300, LOUD, FAR) == "interrupt"
    assert decide(CFG, 400, 2000, LOUD, FAR) == "interrupt"  # past the window the normal minimum applies


def test_speech_20_db_under_the_reply_is_echo_and_never_interrupts() -> None:
    echo = FAR * 10 ** (-20 / 20)
    assert decide(CFG, 5000, 5000, echo, FAR) == "wait"
    assert decide(CFG, 5000, 5000, FAR * 10 ** (-6 / 20), FAR) == "interrupt"  # a person at -6 dB


def test_no_reply_audio_means_no_echo_test_and_no_window() -> None:
    assert decide(CFG, 300, None, 0.001, 0.0) == "interrupt"


def test_echo_test_can_be_disabled() -> None:
    off = BargeInConfig(echo_margin_db=0.0)
    assert decide(off, 5000, 5000, 0.0001, FAR) == "interrupt"


def test_no_words_or_only_backchannels_are_a_false_interruption() -> None:
    cfg = BargeInConfig()
    for heard in ["", "  ", "(coughs)", "[BLANK_AUDIO]", "Mm-hmm.", "MMM.", "Mhm", "Uh huh.", "Yeah, okay.",
                  "I see.", "Hmmm, right."]:
        assert is_false_interruption(cfg, heard), heard


def test_any_other_word_makes_a_real_turn() -> None:
    cfg = BargeInConfig()
    for heard in ["Stop.", "Yeah, stop.", "Okay, but what time is it?", "Wait", "see", "No."]:
        assert not is_false_interruption(cfg, heard), heard


def test_the_backchannel_list_is_configurable() -> None:
    cfg = BargeInConfig(backchannels=("d'accord", "go on"))
    assert is_false_interruption(cfg, "Go on.")
    assert is_false_interruption(cfg, "D'accord, go on")
    assert not is_false_interruption(cfg, "Yeah.")  # not on this list
    assert not is_false_interruption(cfg, "Go.")  # half a phrase is not the phrase
