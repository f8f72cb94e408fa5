"""Parameters that `session.update` and `response.create` share, validated in one place.

Each function takes the raw JSON value and returns the clean one, or raises `InvalidParam` naming the field;
the caller adds where the field sat (`session.…` or `response.…`). One validator per field, so the two
events can never again disagree on what is valid (they once did on `max_output_tokens: true`).
"""

from __future__ import annotations

import math
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


# The protocol's documented range for `temperature` (beta sessions; GA has none). Duet's brains decode with
# `llm.temperature`; the session's value is validated and reported, so a client sees what OpenAI would accept.
TEMPERATURE_RANGE = (0.6, 1.2)


def _number(value: Any, key: str) -> float:
    """A finite JSON number (not a bool: `true` is not 1 here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParam(key, f"{key} must be a finite number")
    return float(value)


def temperature(value: Any) -> float:
    low, high = TEMPERATURE_RANGE
    number = _number(value, "temperature")
    if not low <= number <= high:
        raise InvalidParam("temperature", f"temperature must be within [{low}, {high}]")
    return number


def threshold(value: Any, key: str = "turn_detection.threshold") -> float:
    number = _number(value, key)
    if not 0.0 < number < 1.0:
        raise InvalidParam(key, f"{key} must be between 0 and 1")
    return number


def duration_ms(value: Any, key: str, maximum: int) -> int:
    """A turn-detection timing: whole milliseconds within [0, maximum] (`[limits]`: the VAD holds
    prefix_padding_ms of audio while idle, and a long silence_duration_ms never ends a turn)."""
    number = _number(value, key)
    if not 0 <= number <= maximum:
        raise InvalidParam(key, f"{key} must be within [0, {maximum}] ms")
    return int(number)


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
