"""JSON log records carry the session, the turn and the event as fields of their own."""

from __future__ import annotations

import json
import logging

from common.logs import JsonFormatter
from realtime.core.session import SessionLog


def test_session_records_as_json() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("tests.logs")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    slog = SessionLog(logger, {"session_id": "sess_42"})
    slog.info("response %s done", "resp_7", extra={"response_id": "resp_7", "event": "response.done"})
    slog.warning("plain")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("tests.logs").exception("outside a session")

    out = [json.loads(JsonFormatter().format(r)) for r in records]
    assert out[0]["message"] == "response resp_7 done"  # no "[sess_42]" prefix: the id is a field
    assert out[0]["session_id"] == "sess_42" and out[0]["response_id"] == "resp_7"
    assert out[0]["event"] == "response.done" and out[0]["level"] == "INFO" and out[0]["logger"] == "tests.logs"
    assert out[0]["time"].endswith("+00:00") and "T" in out[0]["time"]
    assert out[1]["session_id"] == "sess_42" and "response_id" not in out[1]
    assert "session_id" not in out[2] and "ValueError: boom" in out[2]["exc_info"]
    # Text logs keep the id in the message.
    assert records[0].getMessage() == "[sess_42] response resp_7 done"
