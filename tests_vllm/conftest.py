"""Shared by the vLLM tests: the bundled SmolLM2 exported once to a Hugging Face folder (vLLM can't read GGUF)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from brains.backends.export import export_hf

    out = export_hf(tmp_path_factory.mktemp("smollm2-hf"))
    yield out
    shutil.rmtree(out, ignore_errors=True)  # half a GB of float32 weights
