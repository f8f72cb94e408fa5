"""Frozen dataclass configuration loaded from TOML, with dotted overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from common.config import (
    DEFAULT_CONFIG_PATH,
    PACING_MODES,
    ConfigError,
    DuetConfig,
    load_config,
    merge,
    parse_override,
)


def test_default_toml_loads_every_value_it_names() -> None:
    assert DEFAULT_CONFIG_PATH.is_file()
    cfg = load_config(DEFAULT_CONFIG_PATH)
    with DEFAULT_CONFIG_PATH.open("rb") as fh:
        data = tomllib.load(fh)
    assert data, "default.toml is empty"
    for section, values in data.items():
        for key, value in values.items():
            expected = tuple(value) if isinstance(value, list) else value  # TOML lists load as tuples
            assert getattr(getattr(cfg, section), key) == expected, f"{section}.{key}"
    # ...and keeps the built-in default of everything it does not name.
    for section in dataclasses.fields(DuetConfig):
        named = data.get(section.name, {})
        for f in dataclasses.fields(getattr(cfg, section.name)):
            if f.name not in named:
                assert getattr(getattr(cfg, section.name), f.name) == getattr(getattr(DuetConfig(), section.name),
                                                                              f.name), f"{section.name}.{f.name}"
    assert cfg.mind.mode in PACING_MODES


def test_no_file_gives_defaults() -> None:
    assert load_config() == DuetConfig()


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.llm.max_slots = 3  # type: ignore[misc]


def test_overrides() -> None:
    cfg = load_config(DEFAULT_CONFIG_PATH, ["llm.max_slots=4", "mind.mode=tbs", "server.host=0.0.0.0",
                                            "llm.temperature=1", "asr.model_dir=/models/w", "vad.threshold=0.25"])
    assert cfg.llm.max_slots == 4
    assert cfg.mind.mode == "tbs"
    assert cfg.server.host == "0.0.0.0"
    assert cfg.llm.temperature == 1.0 and isinstance(cfg.llm.temperature, float)
    assert cfg.asr.model_dir == "/models/w"
    assert cfg.vad.threshold == 0.25
    # Everything else stays as the file set it.
    base = load_config(DEFAULT_CONFIG_PATH)
    assert dataclasses.replace(cfg.llm, max_slots=base.llm.max_slots, temperature=base.llm.temperature) == base.llm
    assert cfg.tts == base.tts


def test_later_overrides_win() -> None:
    assert load_config(None, ["llm.max_slots=4", "llm.max_slots=8"]).llm.max_slots == 8


def test_override_quoted_string_and_spaces() -> None:
    cfg = load_config(None, ['llm.system_prompt = "Be brief. Really."'])
    assert cfg.llm.system_prompt == "Be brief. Really."


def test_parse_override() -> None:
    assert parse_override("llm.max_slots=8") == {"llm": {"max_slots": 8}}
    assert parse_override("mind.mode=nothink") == {"mind": {"mode": "nothink"}}
    assert parse_override("mind.think_while_listening=false") == {"mind": {"think_while_listening": False}}


@pytest.mark.parametrize("text", ["llm.max_slots", "max_slots=4", "=4", ""])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_override(text)


@pytest.mark.parametrize("override", [
    "nosuch.key=1",  # unknown section
    "llm.nosuch=1",  # unknown key
    "llm.max_slots=abc",  # int field, string value
    "llm.max_slots=2.5",  # int field, float value
    "llm.max_slots=true",  # bool is not an int here
    "llm.temperature=hot",  # float field
    "llm.temperature=true",  # a bool is not a number here either
    "asr.model=5",  # str field, int value
    "mind.think_while_listening=1",  # bool field, int value
    "mind.mode=fast",  # not one of the pacing modes
    "llm.backend=sglang",  # not one of the backends
])
def test_bad_overrides_raise(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_every_pacing_mode_is_accepted() -> None:
    assert set(PACING_MODES) == {"nothink", "speak-first", "think-first", "tbs"}
    for mode in PACING_MODES:
        assert load_config(None, [f"mind.mode={mode}"]).mind.mode == mode


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "duet.toml"
    path.write_text(text)
    return path


def test_file_only_names_what_differs(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[llm]\nmax_slots = 2\n[mind]\nmode = \"think-first\"\n"))
    assert cfg.llm.max_slots == 2
    assert cfg.mind.mode == "think-first"
    assert cfg.vad == DuetConfig().vad


@pytest.mark.parametrize("text", [
    "[nosuch]\nx = 1\n",
    "[llm]\nnosuch = 1\n",
    "[llm]\nmax_slots = \"many\"\n",
    "[mind]\nmode = \"sometimes\"\n",
    "[server]\nport = 87.65\n",
    "llm = 5\n",  # a section must be a table
])
def test_bad_files_raise(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text))


def test_merge_returns_a_new_config() -> None:
    base = DuetConfig()
    merged = merge(base, {"server": {"port": 9000}})
    assert merged.server.port == 9000
    assert base.server.port == 8765


def test_a_list_of_strings_loads_as_a_tuple_and_anything_else_raises() -> None:
    cfg = merge(DuetConfig(), {"barge_in": {"backchannels": ["yeah", "go on"]}})
    assert cfg.barge_in.backchannels == ("yeah", "go on")
    for bad in ("yeah", ["yeah", 1]):
        with pytest.raises(ConfigError, match="backchannels"):
            merge(DuetConfig(), {"barge_in": {"backchannels": bad}})


@pytest.mark.parametrize("name", ["default", "gpu", "vllm", "remote"])
def test_every_shipped_config_loads(name: str) -> None:
    # A typo'd key or a wrong type in a shipped file would otherwise surface only on the machine it is for.
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.toml")
    assert isinstance(cfg, DuetConfig)


def test_the_gil_switch_interval_must_be_positive() -> None:
    assert merge(DuetConfig(), {"server": {"gil_switch_interval_ms": 1}}).server.gil_switch_interval_ms == 1
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="gil_switch_interval_ms"):
            merge(DuetConfig(), {"server": {"gil_switch_interval_ms": bad}})
