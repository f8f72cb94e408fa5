"""How `[[mqtt.tools]]` reach the model: offered with the client's tools (the client's win a shared name),
nameable in `tool_choice`, never reported to the client as its own, and not offered while MQTT is off."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import DuetConfig, MqttConfig, MqttToolConfig
from common.errors import SessionError
from realtime.core.options import ResponseOptions
from realtime.core.settings import SessionSettings

LIGHT = MqttToolConfig(name="set_light", description="Switch a light", request_topic="home/set",
                       reply_topic="home/reply", parameters='{"type": "object", "properties": {"room": {}}}')
CLIENT = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def settings(enabled: bool = True) -> SessionSettings:
    return SessionSettings.from_config(dataclasses.replace(DuetConfig(), mqtt=MqttConfig(enabled=enabled,
                                                                                         tools=(LIGHT,))))


def test_server_tools_are_offered_beside_the_clients_and_only_they_run_on_the_server() -> None:
    s = settings()
    s.apply({"tools": [CLIENT], "tool_choice": "set_light"})
    options = ResponseOptions.parse({}, s)
    assert [t["name"] for t in options.offered_tools] == ["get_weather", "set_light"]
    assert options.offered_tools[1]["parameters"] == {"type": "object", "properties": {"room": {}}}
    assert options.server_tools == frozenset({"set_light"}) and options.tool_choice == "set_light"
    assert [t["name"] for t in s.to_protocol("sess_1")["tools"]] == ["get_weather"]  # the client's own only


def test_a_client_tool_of_the_same_name_wins() -> None:
    s = settings()
    options = ResponseOptions.parse({"tools": [{**CLIENT, "name": "set_light"}]}, s)
    assert [t["name"] for t in options.offered_tools] == ["set_light"] and options.server_tools == frozenset()


def test_no_server_tools_while_mqtt_is_off() -> None:
    s = settings(enabled=False)
    assert ResponseOptions.parse({}, s).offered_tools == []
    with pytest.raises(SessionError):
        s.apply({"tool_choice": "set_light"})
