"""What one response is asked to do: `response.create`'s options over the session's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.config import PacingMode
from common.errors import SessionError
from realtime.core import params
from realtime.core.settings import SessionSettings


@dataclass(frozen=True)
class ResponseOptions:
    instructions: str | None
    modalities: tuple[str, ...]
    pacing: PacingMode
    max_output_tokens: int | None
    conversation: str = "auto"  # "none": out-of-band, not added to the history
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str = "auto"  # auto | none | required | the name of one function
    turn_committed_at: float | None = None
    transcribed_at: float | None = None
    speech_end_ms: int | None = None
    turn_decision_ms: int | None = None  # end of the user's speech -> turn committed (audio time)
    # Set when the response resumes a reply cut by a false interruption: it speaks this text (the words the
    # user did not hear) as it was written, and no brain runs. `continues` is the cut item's id.
    resume_text: str | None = None
    continues: str = ""
    resume_writing: bool = False  # the cut reply was still being written: the brain goes on after resume_text
    # The offered functions the server runs itself (`Runtime.server_tools`), and how many rounds of their
    # results led to this response (Session._run_server_tools bounds the chain).
    server_tools: frozenset[str] = frozenset()
    server_tool_round: int = 0

    @classmethod
    def parse(cls, raw: dict[str, Any], settings: SessionSettings, event_id: str | None = None) -> ResponseOptions:
        """Each field the response names overrides the session's; both are checked by `realtime.core.params`."""
        try:
            mods = params.modalities(raw.get("output_modalities", raw.get("modalities", settings.modalities)))
            pacing = params.pacing((raw.get("duet") or {}).get("pacing", settings.pacing))
            limit = params.max_output_tokens(
                raw.get("max_output_tokens", raw.get("max_response_output_tokens", settings.max_output_tokens)))
            instructions = params.instructions(raw.get("instructions", settings.instructions))
            tools = params.tools(raw.get("tools", settings.tools))
            # The server's own functions join the client's, which win a name both offer.
            server = [t for t in settings.server_tools if t["name"] not in {c["name"] for c in tools}]
            tools += server
            choice = params.tool_choice(raw.get("tool_choice", settings.tool_choice), tools)
        except params.InvalidParam as exc:
            raise SessionError(str(exc), code="invalid_value", param=f"response.{exc.param}",
                               event_id=event_id) from None
        return cls(instructions=instructions, modalities=tuple(mods), pacing=pacing,
                   max_output_tokens=None if limit == "inf" else int(limit),
                   conversation="none" if raw.get("conversation", "auto") == "none" else "auto",
                   tools=tuple(tools), tool_choice=choice, server_tools=frozenset(t["name"] for t in server))

    @property
    def offered_tools(self) -> list[dict[str, Any]]:
        return list(self.tools) if self.tool_choice != "none" else []

    @property
    def tool_prefix(self) -> str | None:
        """How the AB's reply starts: None = no tools; a forced choice pre-writes the start of the call."""
        if not self.offered_tools:
            return None
        if self.tool_choice == "required":
            return '<tool_call>\n{"name": "'
        if self.tool_choice != "auto":
            return f'<tool_call>\n{{"name": "{self.tool_choice}", "arguments": '
        return ""


