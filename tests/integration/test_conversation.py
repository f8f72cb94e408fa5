"""End to end with the real bundled models: a spoken question in, a spoken answer out."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from clients import talk as talk_module
from clients.talk import talk
from tests.conftest import says
from tests.integration import schema

pytestmark = pytest.mark.integration

# Per `ask` call: the dialect it speaks and the schema failures of the events `duet talk` received.
_strict: contextvars.ContextVar[tuple[bool, list[str]]] = contextvars.ContextVar("strict")


@pytest.fixture(autouse=True)
def strict_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every standard event `duet talk` receives validates against the schema of its dialect (talk opts in
    to Duet's own events, which no schema has). Failures are collected: the receiving task swallows raises."""
    feed = talk_module._Collector.feed

    def checked(self: Any, event: dict[str, Any]) -> None:
        beta, invalid = _strict.get((False, []))
        if not str(event.get("type", "")).startswith("duet."):
            try:
                schema.check(event, beta=beta)
            except schema.SchemaError as exc:
                invalid.append(str(exc))
        feed(self, event)

    monkeypatch.setattr(talk_module._Collector, "feed", checked)
    yield


async def ask(url: str, audio: np.ndarray, tmp_path: Any, name: str, **kw: Any) -> tuple[dict[str, Any], np.ndarray]:
    from clients.talk import read_wav

    out = tmp_path / f"{name}.wav"
    invalid: list[str] = []
    _strict.set((bool(kw.get("beta")), invalid))
    result = await talk(audio, url, out=out, timeout_s=90, **kw)
    assert invalid == [], invalid[0]
    return result, read_wav(out)


async def test_spoken_question_gets_spoken_answer_about_paris(url, runtime, judge, speak, tmp_path) -> None:
    result, reply = await ask(url, speak("What is the capital of France?"), tmp_path, "paris")
    assert result["errors"] == []
    assert "capital" in result["user_transcript"].lower() and "france" in result["user_transcript"].lower()
    assert result["reply_audio_s"] > 0.5
    assert "paris" in result["reply_transcript"].lower(), result
    assert says(judge(reply), result["reply_transcript"]), result  # and the audio says those words
    # Every stage timestamp of the turn is reported, in order.
    m = result["server_metrics"]
    assert m["status"] == "completed"
    assert m["ab_first_token_ms"] <= m["first_chunk_text_ms"] <= m["first_audio_synthesized_ms"] \
        <= m["first_audio_sent_ms"]
    # A reply started in the silence window synthesized its first chunk there too.
    assert m.get("first_audio_prefetched") == m.get("prefetched"), m
    assert result["voice_to_voice_ms"] is not None and result["voice_to_voice_ms"] > 0
    # The turn decision is counted in audio time from the last voiced sample: at least the silence window
    # (server_vad, 300 ms by default), and well under a second more (one VAD chunk and Silero's lag).
    silence = runtime.config.vad.silence_duration_ms
    assert silence - 50 <= m["turn_decision_ms"] <= silence + 1000, m


async def test_a_long_silence_window_has_the_first_audio_ready_at_the_commit(url, speak, tmp_path) -> None:
    # 1.2 s of silence leave the speculative transcript time to finish before the commit, even on a busy CPU:
    # the brains and the first chunk's synthesis start in the window, and the response adopts both.
    td = {"type": "server_vad", "silence_duration_ms": 1200}
    result, _ = await ask(url, speak("What is the capital of France?"), tmp_path, "window", tail_s=3.0,
                          session={"audio": {"input": {"turn_detection": td}}})
    m = result["server_metrics"]
    assert result["errors"] == [] and m["status"] == "completed", result
    assert m.get("prefetched") and m.get("first_audio_prefetched"), m
    assert "paris" in result["reply_transcript"].lower(), result


async def test_two_concurrent_sessions_each_get_their_own_answer(url, judge, speak, tmp_path) -> None:
    (r1, a1), (r2, a2) = await asyncio.gather(
        ask(url, speak("What is the capital of France?"), tmp_path, "s1"),
        ask(url, speak("How many legs does a spider have?"), tmp_path, "s2"),
    )
    assert "france" in r1["user_transcript"].lower() and "spider" in r2["user_transcript"].lower()
    assert r1["errors"] == [] and r2["errors"] == []
    assert len(a1) > 12000 and len(a2) > 12000
    assert "paris" in r1["reply_transcript"].lower() and says(judge(a1), r1["reply_transcript"])
    assert "spider" not in r1["reply_transcript"].lower() and "paris" not in r2["reply_transcript"].lower()


@pytest.mark.parametrize("mode", ["nothink", "speak-first", "think-first", "tbs"])
async def test_every_pacing_mode_answers_end_to_end(url, runtime, speak, tmp_path, mode) -> None:
    result, _ = await ask(url, speak("What is the capital of France?"), tmp_path, mode, pacing=mode)
    m = result["server_metrics"]
    assert m["pacing"] == mode and m["status"] == "completed"
    assert result["reply_audio_s"] > 0.3 and result["reply_transcript"]
    if mode == "nothink":
        assert result["thought"] == "" and m["thought_tokens"] == 0
    else:
        assert result["thought"], "the formulation brain's reasoning is streamed to the client"
    if mode == "speak-first":
        # The AB speaks before the FB has finished its thought.
        assert m["fb_tokens_before_reply"] < m["thought_tokens"] or m.get("fb_finished_ms") is None
        assert m.get("fb_finished_ms") is None or m["ab_first_token_engine_ms"] < m["fb_finished_ms"]
    if mode == "tbs":
        # Think fully, then speak: nothing is said before the thought ends.
        assert m["fb_finished_ms"] <= m["ab_first_token_engine_ms"]
        assert m["fb_tokens_before_reply"] == m["thought_tokens"]
    if mode == "think-first":
        assert m["fb_tokens_before_reply"] >= min(m["thought_tokens"], runtime.config.mind.thought_segment_tokens)


async def test_think_while_listening_streams_partials_and_still_answers(url, speak, tmp_path) -> None:
    question = speak("Could you please tell me, in a few words, what the capital city of France is?")
    result, reply = await ask(url, question, tmp_path, "listening", pacing="think-first",
                              session={"duet": {"partial_transcripts_ms": 400, "think_while_listening": True}})
    assert result["partial_transcripts"], "partial transcripts arrive while the user is still speaking"
    final = set(result["user_transcript"].lower().replace(",", " ").replace("?", " ").split())
    assert any(final & set(p.lower().replace(",", " ").split()) for p in result["partial_transcripts"])
    assert result["errors"] == [] and result["server_metrics"]["status"] == "completed"
    assert len(reply) > 0 and result["reply_transcript"]


async def test_beta_clients_get_beta_event_names(url, speak, tmp_path) -> None:
    result, reply = await ask(url, speak("What is the capital of France?"), tmp_path, "beta", beta=True,
                              pacing="nothink")
    kinds = set(result["event_types"])
    assert {"response.audio.delta", "response.audio_transcript.delta", "response.audio.done"} <= kinds
    assert not {k for k in kinds if k.startswith("response.output_audio")}
    assert len(reply) > 0 and result["reply_transcript"]
