"""Small ONNX models shipped inside PyPI packages (Silero VAD, Smart Turn), found and opened the same way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnxruntime as ort


def package_file(package: str, *parts: str, missing: str = "") -> Path:
    """A file inside an installed package, found without importing it: importing silero_vad sets torch to one
    thread process-wide, and pipecat pulls in a whole framework we do not use."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package} package is not installed{missing}")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def one_thread_session(path: Path) -> ort.InferenceSession:
    """These models cost milliseconds a call: more threads only add sync overhead and take cores from Whisper
    and the LLM."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
