"""Per-session JSONL transcripts: one line per finished turn, fsync'd on a thread of its own, in turn order."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from realtime import transcripts
from tests.realtime.fake_runtime import fake_runtime, report


async def test_each_finished_turn_is_a_durable_line_written_off_the_loop(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(transcripts.os, "fsync", fsync)
    rt = fake_runtime(transcripts_dir=str(tmp_path / "t"))
    log = transcripts.attach(rt)
    assert log is not None and transcripts.attach(rt) is log and rt.observers == [log]
    for i in range(3):
        rt.turn_finished(report(session_id="sess_a", response_id=f"resp_{i}", first_audio_sent_ms=10.0 * i))
    rt.turn_finished(report(session_id="sess_b", status="cancelled"))
    await log.flush()
    lines = transcripts.read(log.path("sess_a"))
    assert [t["response_id"] for t in lines] == ["resp_0", "resp_1", "resp_2"]
    first = lines[0]
    assert first["user_text"] == "What is the capital of France?" and first["assistant_text"] == "Paris is the capital."
    assert first["user_item_id"] == "item_u" and first["item_id"] == "item_a" and first["session_id"] == "sess_a"
    assert first["started_at"] == 1000.0 and first["finished_at"] == 1002.5
    assert lines[2]["metrics"] == {"first_audio_sent_ms": 20.0}
    assert [t["status"] for t in transcripts.read(log.path("sess_b"))] == ["cancelled"]
    # Every line fsync'd (plus the directory once per new file), never on the event loop's thread.
    assert len(synced) == 4 + 2
    assert all(name.startswith("duet-transcripts") for name in synced)
    log.close()


def test_off_unless_configured_and_names_are_safe(tmp_path: Path) -> None:
    assert transcripts.attach(fake_runtime()) is None
    log = transcripts.TranscriptLog(tmp_path)
    assert log.path("../../etc/passwd").parent == tmp_path
    log.close()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"response_id": "resp_1"}\n{"response_id": "re')
    assert transcripts.read(path) == [{"response_id": "resp_1"}]


async def test_close_writes_what_is_queued(tmp_path: Path) -> None:
    log = transcripts.TranscriptLog(tmp_path)
    for i in range(20):
        log.turn_finished(report(response_id=f"resp_{i}"))
    log.close()
    assert len(transcripts.read(log.path("sess_1"))) == 20
