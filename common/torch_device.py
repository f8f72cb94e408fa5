"""A `*.device` setting as a torch device, or EngineError saying why it cannot be used (ASR and TTS share it)."""

from __future__ import annotations

import torch

from common.errors import EngineError


def torch_device(setting: str, value: str, user: str) -> torch.device:
    """`value` of `setting` (e.g. "asr.device") as a "cpu" or "cuda[:N]" torch device for `user` (what runs there,
    e.g. 'asr.engine = "torch"'), or EngineError naming the setting, why, and the fix."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise EngineError(f"{setting} = {value!r} is not a torch device ({exc}); with {user} "
                          "use \"cpu\", \"cuda\" or \"cuda:N\"") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU")
            raise EngineError(f"{setting} = {value!r} cannot be used by {user}: {why}. Fix: set {setting} = \"cpu\" "
                              f"(e.g. --set {setting}=cpu), or run where torch.cuda.is_available() is true.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineError(f"{setting} = {value!r}: there are only {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise EngineError(f"{setting} = {value!r}: {user} runs on \"cpu\" or \"cuda\"")
    return device
