"""The oracle for what the server sends: the `openai` package's own models of the Realtime server events.

Strict clients (the Agents SDK among them) validate every server event against these models and report
an error for each one that does not fit, so each event of every conformance session passes through
`check`. GA sessions are checked against `openai.types.realtime`; beta sessions against
`openai.types.beta.realtime` while the installed SDK still ships it. Duet's own `duet.*` events are in
neither union: a client that did not opt in to them must never see one, and `check` fails on it.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import pydantic
from openai.types.realtime import RealtimeServerEvent as GaServerEvent

# Discriminated on `type` as the Agents SDK does it: one member is tried, so a failure names the real problem.
GA: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(Annotated[GaServerEvent, pydantic.Field(discriminator="type")])


def _beta_adapter() -> pydantic.TypeAdapter[Any] | None:
    try:
        module = importlib.import_module("openai.types.beta.realtime")
    except ImportError:  # newer SDKs drop the beta types; beta sessions are then checked for names only
        return None
    return pydantic.TypeAdapter(Annotated[module.RealtimeServerEvent, pydantic.Field(discriminator="type")])


BETA = _beta_adapter()


class SchemaError(AssertionError):
    pass


def check(event: dict[str, Any], beta: bool = False) -> dict[str, Any]:
    """Validate one server event as a strict client would; returns it so callers can chain."""
    adapter = BETA if beta else GA
    if adapter is None:
        return event
    try:
        adapter.validate_python(_as_the_wire_allows(event) if beta else event)
    except pydantic.ValidationError as exc:
        dialect = "beta" if beta else "GA"
        raise SchemaError(f"{event.get('type')!r} does not validate against the {dialect} schema: {exc}\n"
                          f"event: {_short(event)}") from None
    return event


def _as_the_wire_allows(event: dict[str, Any]) -> dict[str, Any]:
    """Where the beta schema is wrong on the wire. Its `session.model` is a closed list of OpenAI's model
    names (without even OpenAI's later ones, such as gpt-realtime-mini), so no other server's model passes;
    the GA schema takes any string. The model is checked to be a string, the rest as the schema says."""
    session = event.get("session")
    if event.get("type") in ("session.created", "session.updated") and isinstance(session, dict) \
            and "model" in session:
        assert isinstance(session["model"], str), f"session.model must be a string: {session['model']!r}"
        event = {**event, "session": {k: v for k, v in session.items() if k != "model"}}
    return event


def check_all(events: list[dict[str, Any]], beta: bool = False) -> None:
    for event in events:
        check(event, beta)


def _short(event: dict[str, Any]) -> str:
    """The event with long values (base64 audio) cut, for a readable failure."""
    text = repr({k: (v[:40] + "…" if isinstance(v, str) and len(v) > 60 else v) for k, v in event.items()})
    return text if len(text) < 2000 else text[:2000] + "…"
