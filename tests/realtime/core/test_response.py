"""A response cancelled before its task first ran (response.cancel right after response.create) ends
cancelled: it used to run to completion, the cancel silently lost."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from brains.history import Conversation
from realtime.core import events as ev
from realtime.core.options import ResponseOptions
from realtime.core.response import Response
from realtime.core.settings import SessionSettings


class _Runtime(SimpleNamespace):
    """No models: any runtime hook a finishing response calls (metrics, reports) does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class StandIn:
    """The few SessionContext services a response uses before it thinks."""

    def __init__(self) -> None:
        self.id = "sess_test"
        self.settings = SessionSettings()
        self.history = Conversation()
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})
        self.events: list[ev.ServerEvent] = []
        self.rt = _Runtime()
        self.pacers = 0

    def emit(self, event: ev.ServerEvent) -> None:
        self.events.append(event)

    def rate_limits(self) -> ev.RateLimitsUpdated:
        return ev.RateLimitsUpdated(rate_limits=[])

    def new_pacer(self, *args: Any) -> Any:
        self.pacers += 1
        raise AssertionError("a cancelled response must not start the brains")


async def test_cancel_before_the_response_task_runs() -> None:
    session = StandIn()
    options = ResponseOptions.parse({"output_modalities": ["text"]}, session.settings)
    response = Response(session, options)  # type: ignore[arg-type]
    response.cancel("client_cancelled")  # as Session._on_ResponseCancel does, before run() was scheduled
    assert not response.done
    await response.run()
    assert response.done and response.status == "cancelled" and session.pacers == 0
    kinds = [type(e) for e in session.events]
    assert kinds[0] is ev.ResponseCreated and kinds[-1] is ev.ResponseDone
    created = session.events[0]
    done = session.events[-1]
    assert created.response["status"] == "in_progress"  # type: ignore[attr-defined]
    assert done.response["status"] == "cancelled"  # type: ignore[attr-defined]
    assert done.response["status_details"]["reason"] == "client_cancelled"  # type: ignore[attr-defined]
