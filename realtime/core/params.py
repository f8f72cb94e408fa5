"""Parameters that `session.update` and `response.create` share, validated in one place.

Each function takes the raw JSON value and returns the clean one, or raises `InvalidParam` naming the field;
the caller adds where the field sat (`session.…` or `response.…`). One validator per field, so the two
events can never again disagree on what is valid (they once did on `max_output_tokens: true`).
"""

from __future__ import annotations

from typing import Any, cast

from common.config import PACING_MODES, PacingMode

MODALITIES = ("audio", "text")
TOOL_CHOICES = ("auto", "none", "required")


class InvalidParam(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def modalities(value: Any, key: str = "modalities") -> list[str]:
    if not isinstance(value, list) or not value or any(m not in MODALITIES for m in value):
        raise InvalidParam(key, f"{key} must be a non-empty list of 'audio' and 'text'")
    return [str(m) for m in value]


def max_output_tokens(value: Any, key: str = "max_output_tokens") -> int | str:
    # bool is an int subclass: `true` is not a token count.
    if value != "inf" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidParam(key, f"{key} must be a positive integer or 'inf'")
    return cast("int | str", value)


def instructions(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidParam("instructions", "instructions must be a string")
    return cast("str | None", value)


def tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or any(not isinstance(t, dict) or not t.get("name") for t in value):
        raise InvalidParam("tools", "tools must be a list of function objects with a name")
    return list(value)


def tool_choice(value: Any, offered: list[dict[str, Any]]) -> str:
    """`auto`, `none`, `required`, or one offered function (by name, or as `{type: function, name}`)."""
    if isinstance(value, dict):
        value = (value.get("function") or {}).get("name") or value.get("name")
    names = [t["name"] for t in offered]
    if not isinstance(value, str) or value not in (*TOOL_CHOICES, *names):
        raise InvalidParam("tool_choice", f"tool_choice must be auto, none, required or one of the tools {names}")
    return value


def pacing(value: Any) -> PacingMode:
    if value not in PACING_MODES:
        raise InvalidParam("duet.pacing", f"duet.pacing must be one of {PACING_MODES}")
    return cast(PacingMode, value)
