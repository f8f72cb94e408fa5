"""Function calling in the model's text: the Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}` form."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_ARGS = re.compile(r'"arguments"\s*:\s*')
_NAME = re.compile(r'"name"\s*:\s*"([^"]*)"')
_decoder = json.JSONDecoder()


def _arguments(text: str) -> Any:
    """The first complete JSON value after `"arguments":`, or None while it is still being written."""
    match = _ARGS.search(text)
    if match is None:
        return None
    try:
        value, _ = _decoder.raw_decode(text[match.end():].lstrip())
    except json.JSONDecodeError:
        return None
    return value


def call_complete(text: str) -> bool:
    """Has the model finished writing the call? Its arguments are closed (what follows is ignored)."""
    return "</tool_call>" in text or (_NAME.search(text) is not None and _arguments(text) is not None)


def parse_tool_call(text: str) -> tuple[str, str]:
    """Call text -> (name, arguments as a JSON string). Small models trail extra text or drop a closing
    brace: the first complete JSON value after "arguments" is taken; what never closes is passed on as written."""
    text = text.split("</tool_call>")[0].strip()
    name = _NAME.search(text)
    args = _arguments(text)
    if args is None:
        rest = _ARGS.search(text)
        raw = text[rest.end():].strip() if rest else "{}"
        return (name.group(1) if name else ""), raw
    return (name.group(1) if name else ""), args if isinstance(args, str) else json.dumps(args)


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """How to call, the functions, and one concrete example (small models copy the schema otherwise)."""
    specs = "\n".join(json.dumps({k: t[k] for k in ("name", "description", "parameters") if k in t}) for t in tools)
    first = tools[0]
    props = ((first.get("parameters") or {}).get("properties") or {})
    example = json.dumps({"name": first["name"], "arguments": {p: f"<{p}>" for p in props}})
    return ("You can call these functions. To call one, answer with only "
            '<tool_call>{"name": <function name>, "arguments": <arguments as JSON>}</tool_call>, for example '
            f"<tool_call>{example}</tool_call>\nFunctions:\n{specs}")
