"""session.update and response.create share one validator per field: they accept and refuse the same values."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import SessionError
from realtime.core.options import ResponseOptions
from realtime.core.settings import SessionSettings

TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
BAD: list[tuple[str, Any]] = [
    ("max_output_tokens", True),  # bool is an int in Python, not a token count (response.create once took it)
    ("max_output_tokens", 0),
    ("max_output_tokens", "lots"),
    ("output_modalities", []),
    ("output_modalities", ["video"]),
    ("instructions", 42),
    ("tools", [{"type": "function"}]),
    ("tool_choice", "some_other_tool"),
]
GOOD: list[tuple[str, Any]] = [
    ("max_output_tokens", 7), ("max_output_tokens", "inf"), ("output_modalities", ["text"]),
    ("instructions", "Be brief."), ("tools", [TOOL]), ("tool_choice", "none"),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_both_events_refuse_the_same_bad_value(key: str, value: Any) -> None:
    with pytest.raises(SessionError) as in_session:
        SessionSettings().apply({key: value})
    with pytest.raises(SessionError) as in_response:
        ResponseOptions.parse({key: value}, SessionSettings())
    assert in_session.value.param == f"session.{key}"
    assert in_response.value.param is not None and in_response.value.param.startswith("response.")


@pytest.mark.parametrize(("key", "value"), GOOD)
def test_both_events_accept_the_same_good_value(key: str, value: Any) -> None:
    settings = SessionSettings()
    settings.apply({key: value, "tools": [TOOL]} if key == "tool_choice" else {key: value})
    ResponseOptions.parse({key: value}, settings)


def test_a_response_overrides_the_session_only_for_itself() -> None:
    settings = SessionSettings()
    settings.apply({"max_output_tokens": 50})
    assert ResponseOptions.parse({"max_output_tokens": 5}, settings).max_output_tokens == 5
    assert ResponseOptions.parse({}, settings).max_output_tokens == 50
    assert settings.max_output_tokens == 50
