"""Whisper's log-mel features in torch, on the device, for a batch: faster-whisper's FeatureExtractor, batched.

Run by the torch Whisper's worker (`whisper_torch.py`): computed on the device in one STFT for every waiting
request, because 32 caller threads computing numpy log-mels at once starved the worker of CPU."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import torch

N_FRAMES: Final = 3000  # one 30 s window of 10 ms log-mel frames
N_FFT: Final = 400
_HOP: Final = 160


def prepare_signal(audio: np.ndarray) -> tuple[np.ndarray, int]:
    """faster-whisper's STFT input (FeatureExtractor: 160 zeros appended, then reflect-padded by n_fft/2 on each
    side) and the number of log-mel frames it gives. Plain numpy, no BLAS: cheap on any caller thread."""
    padded = np.pad(np.pad(audio, (0, _HOP)), (N_FFT // 2, N_FFT // 2), mode="reflect")
    return padded.astype(np.float32, copy=False), (len(audio) + _HOP) // _HOP


class LogMel:
    """faster-whisper's log-mel spectrogram (feature_extractor.FeatureExtractor), for a batch of signals at once
    in torch on the model's device: one STFT over zero-padded rows, each row normalized by its own maximum."""

    def __init__(self, n_mels: int, device: torch.device) -> None:
        from faster_whisper.feature_extractor import FeatureExtractor

        self.filters = torch.from_numpy(FeatureExtractor(feature_size=n_mels).mel_filters).to(device)
        self.window = torch.hann_window(N_FFT, periodic=True, device=device)
        self.device = device

    def __call__(self, signals: Sequence[np.ndarray], frames: Sequence[int], length: int = 0) -> torch.Tensor:
        """(rows, n_mels, max frames) float32; frames past a row's own count are garbage (never read). The rows are
        zero-padded to `length` samples or the longest signal."""
        rows = np.zeros((len(signals), max(length, *(len(s) for s in signals))), dtype=np.float32)
        for row, signal in zip(rows, signals, strict=True):
            row[:len(signal)] = signal
        x = torch.from_numpy(rows).to(self.device, non_blocking=True)
        spec = torch.stft(x, N_FFT, _HOP, window=self.window, center=False, return_complex=True)
        width = max(frames)
        power = spec[..., :width].abs() ** 2
        log = torch.clamp(self.filters @ power, min=1e-10).log10()
        valid = torch.arange(width, device=self.device) < torch.tensor(frames, device=self.device).unsqueeze(1)
        peak = log.masked_fill(~valid.unsqueeze(1), -math.inf).amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log, peak - 8.0) + 4.0) / 4.0
