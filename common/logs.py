"""Log formats for `duet serve`: human-readable lines, or one JSON object per record for log pipelines.

A JSON record has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`, and where the code
knows them `session_id`, `response_id` (the turn) and `event`, taken from the record's attributes: a session's
logger (`SessionLog`) sets `session_id` on every record, and a call may add the others with `extra=`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("session_id", "response_id", "event")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        session_id = getattr(record, "session_id", None)
        # SessionLog also prefixes the message for text logs; in JSON the id is a field of its own.
        prefix = f"[{session_id}] "
        if session_id and message.startswith(prefix):
            message = message[len(prefix):]
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": message}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: int, fmt: Literal["text", "json"] = "text") -> None:
    """Route every logger to stderr in `fmt`, replacing handlers set before (the format is known only once the
    config is loaded)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
