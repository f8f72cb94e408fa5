"""Phoneme ids -> waveform: a Piper (VITS) ONNX model run directly through onnxruntime.

No `piper` import here (see tts/phonemes.py for why): the model only needs the phoneme ids plus three
scales, and the voice's JSON config says the sample rate and speaker count. With tts.decoder = "torch",
onnxruntime runs the graph only up to the HiFi-GAN decoder, and tts/batch_decoder.py decodes every
session's chunks together in torch (on a GPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from common.config import TtsConfig
from common.errors import EngineError

if TYPE_CHECKING:
    from tts.batch_decoder import BatchDecoder

logger = logging.getLogger(__name__)

# Piper voices come out quiet (speech RMS around -26 dBFS, peaks 0.4-0.6). One fixed gain for the whole
# voice, rather than Piper's per-sentence peak normalisation, keeps separately synthesised chunks of
# one reply at the same loudness.
_OUTPUT_GAIN = 1.6
_PEAK_LIMIT = 0.99


class PiperVocoder:
    """Callable: phoneme ids of one sentence -> float32 mono waveform in [-1, 1] at `sample_rate`.

    Thread-safe: onnxruntime's InferenceSession.run may be called from several threads at once.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        sample_rate: int,
        num_speakers: int = 1,
        speaker_id: int = 0,
        length_scale: float = 1.0,
        noise_scale: float = 0.667,
        noise_w: float = 0.8,
        threads: int = 1,
        device: str = "cpu",
        decoder: str = "onnx",
    ) -> None:
        self.sample_rate = sample_rate
        self._scales = np.array([noise_scale, length_scale, noise_w], dtype=np.float32)
        started = time.perf_counter()
        self._batch: BatchDecoder | None = None
        if decoder == "torch":
            # Imported here: only this path needs onnx (to cut the graph) and torch.
            from tts.batch_decoder import BatchDecoder
            from tts.hifigan import split_piper

            parts = split_piper(model_path, device)
            self._session = ort.InferenceSession(
                parts.front, sess_options=_session_options(threads), providers=["CPUExecutionProvider"])
            self._batch = BatchDecoder(parts.decoder)
        elif decoder == "onnx":
            self._session = ort.InferenceSession(
                str(model_path), sess_options=_session_options(threads), providers=_providers(device))
        else:
            raise EngineError(f'tts.decoder = {decoder!r}: "onnx" or "torch"')
        if decoder == "onnx" and device != "cpu" and self._session.get_providers()[0] != "CUDAExecutionProvider":
            # onnxruntime falls back to the CPU when the CUDA libraries fail to load (it logs why, above).
            raise EngineError(f"tts.device = {device!r}: onnxruntime could not start its CUDA provider (see its "
                              "error above: CUDA 13 and cuDNN 9 libraries, e.g. torch's nvidia-* wheels)")
        inputs = {i.name for i in self._session.get_inputs()}
        missing = {"input", "input_lengths", "scales"} - inputs
        if missing:
            raise ValueError(f"{model_path} is not a Piper VITS model: no input(s) {sorted(missing)}")
        # Multi-speaker exports take `sid`; single-speaker ones reject it.
        self._sid = np.array([speaker_id], dtype=np.int64) if num_speakers > 1 and "sid" in inputs else None
        logger.info("loaded vocoder %s in %.2fs (%d Hz, %d thread(s), decoder %s on %s)",
                    Path(model_path).name, time.perf_counter() - started, sample_rate, threads, decoder, device)

    @classmethod
    def from_voice_config(
        cls, model_path: str | Path, config: Mapping[str, Any], cfg: TtsConfig
    ) -> PiperVocoder:
        """Build from a Piper voice's parsed `.onnx.json`; the synthesis scales come from `cfg`."""
        return cls(
            model_path,
            sample_rate=int(config["audio"]["sample_rate"]),
            num_speakers=int(config.get("num_speakers", 1)),
            speaker_id=int(config.get("default_speaker_id", 0)),
            length_scale=cfg.length_scale,
            noise_scale=cfg.noise_scale,
            noise_w=cfg.noise_w,
            threads=cfg.threads,
            device=cfg.device,
            decoder=cfg.decoder,
        )

    def __call__(self, phoneme_ids: Sequence[int]) -> np.ndarray:
        if not phoneme_ids:
            return np.zeros(0, dtype=np.float32)
        feed: dict[str, np.ndarray] = {
            "input": np.asarray([phoneme_ids], dtype=np.int64),
            "input_lengths": np.array([len(phoneme_ids)], dtype=np.int64),
            "scales": self._scales,
        }
        if self._sid is not None:
            feed["sid"] = self._sid
        out = self._session.run(None, feed)[0]
        if self._batch is not None:  # out: the decoder's input, latent frames [1, channels, frames]
            out = self._batch.decode(np.asarray(out[0], dtype=np.float32))
        return _level(np.asarray(out, dtype=np.float32).reshape(-1))

    @property
    def batch_decoder(self) -> BatchDecoder | None:
        """The decoder every session's chunks share (tts.decoder = "torch"), else None; /metrics reads it."""
        return self._batch

    def close(self) -> None:
        """Stop the batch decoder's thread, if any (the onnxruntime session needs nothing)."""
        if self._batch is not None:
            self._batch.close()


def _providers(device: str) -> list[Any]:
    """onnxruntime's providers for `tts.device`, or EngineError saying why the device cannot be used."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise EngineError(f'tts.device = {device!r}: Piper runs on "cpu" or "cuda[:N]"')
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(f"tts.device = {device!r} needs onnxruntime-gpu (a CUDA 13 build, 1.31 or newer) in place "
                          f"of onnxruntime {ort.__version__}, which has {available} (docs/gpu.md)")
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()  # CUDA and cuDNN from the nvidia-* wheels (torch's), where the loader would not look
    # Every chunk is a new input length: cuDNN's exhaustive search would time each new shape's convolutions
    # on a listener's turn, so take its heuristic choice.
    options = {"device_id": int(index or 0), "cudnn_conv_algo_search": "HEURISTIC"}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def _session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # Each call is one sequential graph; parallelism comes from the server's thread pool, so every
    # session stays within its configured share of the cores.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def _level(audio: np.ndarray) -> np.ndarray:
    """Apply the voice gain; scale down (not clip) the rare sentence that would exceed full scale."""
    audio = audio * _OUTPUT_GAIN
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if not np.isfinite(peak):
        logger.warning("vocoder produced non-finite samples; zeroing them")
        audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > _PEAK_LIMIT:
        audio = audio * (_PEAK_LIMIT / peak)
    return audio.astype(np.float32, copy=False)
