"""A response that resumes a reply cut by a false interruption (no models: a stand-in session)."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

from brains.history import Conversation, Item
from realtime.core import events as ev
from realtime.core.options import ResponseOptions
from realtime.core.response import Response
from realtime.core.settings import SessionSettings


class _Runtime(SimpleNamespace):
    def __getattr__(self, name: str) -> Any:  # metrics and report hooks: nothing to do here
        return lambda *args, **kwargs: None


class StandIn:
    def __init__(self) -> None:
        self.id = "sess_test"
        self.settings = SessionSettings()
        self.history = Conversation()
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})
        self.events: list[ev.ServerEvent] = []
        self.rt = _Runtime(config=SimpleNamespace(llm=SimpleNamespace(max_reply_tokens=100)))

    def emit(self, event: ev.ServerEvent) -> None:
        self.events.append(event)

    def rate_limits(self) -> ev.RateLimitsUpdated:
        return ev.RateLimitsUpdated(rate_limits=[])

    def new_pacer(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a reply written in full resumes without the brains")


async def test_a_written_reply_resumes_with_its_unheard_words_and_no_brain() -> None:
    session = StandIn()
    session.history.add(Item(id="item_q", role="user", text="Tell me a story."))
    session.history.add(Item(id="item_cut", role="assistant", text="Once upon a time,", status="incomplete"))
    options = ResponseOptions.parse({"output_modalities": ["text"]}, session.settings)
    options = dataclasses.replace(options, resume_text="a dragon slept.", continues="item_cut")
    response = Response(session, options)  # type: ignore[arg-type]
    await response.run()
    assert response.status == "completed" and response.written
    deltas = [e.delta for e in session.events if isinstance(e, ev.TextDelta)]
    assert deltas == ["a dragon slept."]
    done = session.events[-1]
    assert isinstance(done, ev.ResponseDone)
    assert done.response["output"][0]["content"][0]["text"] == "a dragon slept."
    # The model sees one reply: what was heard before the cut, then the rest.
    assert [m.content for m in session.history.messages()] == ["Tell me a story.", "Once upon a time, a dragon slept."]
