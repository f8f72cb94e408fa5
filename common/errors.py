"""One exception hierarchy: recoverable errors end a request or a session, fatal ones the engine."""

from __future__ import annotations


class DuetError(Exception):
    """Base of every error Duet raises on purpose."""


class SessionError(DuetError):
    """Recoverable: reported to the client as an `error` event; the session goes on."""

    def __init__(self, message: str, *, code: str, type: str = "invalid_request_error",
                 param: str | None = None, event_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        self.event_id = event_id


class EngineError(DuetError):
    """A generation request failed: by its own fault (its callback, its sampling) or in a failed engine step it
    ran in. It ends that request's response; the engine goes on serving the others."""
