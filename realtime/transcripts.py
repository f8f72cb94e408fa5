"""Per-session JSONL transcripts of finished turns, durable as each turn ends (`server.transcripts_dir`).

One file per session, `<dir>/<session id>.jsonl`, one JSON object per finished response: the user's words,
the assistant's words as heard (a cut reply keeps only what was played), ids, wall-clock times and the
turn's metrics. Each line is written, flushed and fsync'd before the next, so a crash (or a kill -9) loses no
finished turn. The writes run on a one-thread executor of their own: an fsync can take tens of milliseconds
and must never stall the event loop, nor queue behind Whisper or Piper in the runtime's pools; one thread
keeps each session's lines in turn order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from realtime.runtime import Runtime, TurnReport

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class TranscriptLog:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="duet-transcripts")
        self._known: set[Path] = set()

    def path(self, session_id: str) -> Path:
        return self.dir / f"{_UNSAFE.sub('_', session_id) or 'session'}.jsonl"

    def turn_finished(self, report: TurnReport) -> None:
        record = {"session_id": report.session_id, "response_id": report.response_id, "status": report.status,
                  "user_item_id": report.user_item_id, "user_text": report.user_text, "item_id": report.item_id,
                  "assistant_text": report.assistant_text, "started_at": round(report.started_at, 3),
                  "finished_at": round(report.finished_at, 3), "metrics": report.metrics}
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        self._pool.submit(self._append, self.path(report.session_id), line)

    def _append(self, path: Path, line: str) -> None:
        try:
            new = path not in self._known and not path.exists()
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            if new:  # the file's directory entry must be durable too, or a crash can lose the whole file
                fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._known.add(path)
        except OSError:
            log.exception("could not write the transcript %s", path)

    async def flush(self) -> None:
        """Wait until every turn handed over so far is on disk."""
        await asyncio.wrap_future(self._pool.submit(lambda: None))

    def close(self) -> None:
        """Write what is queued, then stop the thread (at shutdown)."""
        self._pool.shutdown(wait=True)


def attach(runtime: Runtime) -> TranscriptLog | None:
    """The process's transcript log where `server.transcripts_dir` is set, hooked to `runtime` once."""
    for observer in runtime.observers:
        if isinstance(observer, TranscriptLog):
            return observer
    directory = runtime.config.server.transcripts_dir
    if not directory:
        return None
    transcripts = TranscriptLog(directory)
    runtime.observers.append(transcripts)
    log.info("transcripts of finished turns go to %s", transcripts.dir)
    return transcripts


def read(path: str | Path) -> list[dict[str, Any]]:
    """The turns of one transcript file (a torn last line, from a crash mid-write, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
