"""configs/gpu.toml as shipped, on a machine with a CUDA GPU: `duet serve` starts with it, and two spoken
sessions at once each get a spoken answer to their own question. Skipped where torch sees no CUDA device (CI,
the CPU dev machines); run on the GPU machine through scripts/gpu-run.sh (docs/gpu.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soxr

from clients.talk import read_wav, talk
from common.config import load_config
from tests.conftest import says
from tests.duet.serve_process import REPO, serve

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="configs/gpu.toml needs a CUDA GPU")]

CONFIG = REPO / "configs" / "gpu.toml"


@pytest.fixture(scope="module")
def tiny_judge() -> Any:
    """Whisper tiny.en on the CPU hears the reply audio (base is not staged on the GPU machine)."""
    from common.config import AsrConfig
    from realtime.speech_in.asr import Listener

    listener = Listener.load(AsrConfig())
    return lambda audio_24k: listener.transcribe(soxr.resample(audio_24k, 24000, 16000)).lower()


async def test_gpu_toml_serves_spoken_turns_on_the_gpu(tmp_path: Path, speak: Any, tiny_judge: Any) -> None:
    cfg = load_config(CONFIG)
    assert cfg.llm.device == "cuda"
    proc, url, stderr = serve(tmp_path, "--config", str(CONFIG))
    base = url.replace("ws://", "http://").rsplit("/v1/realtime", 1)[0]
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(120):  # /readyz turns 200 once every model ran once (`Runtime.warm`)
                async with http.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(1)
            else:
                pytest.fail(f"never ready: {stderr.read_text()[-2000:]}")
        questions = {"france": "What is the capital of France?", "spider": "How many legs does a spider have?"}
        results = await asyncio.gather(*(talk(speak(q), url, out=tmp_path / f"{k}.wav", timeout_s=60)
                                         for k, q in questions.items()))
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
    log = stderr.read_text()
    for (key, _), result in zip(questions.items(), results, strict=True):
        assert result["errors"] == [], result
        assert key in result["user_transcript"].lower(), result
        assert result["server_metrics"]["status"] == "completed", result
        assert result["reply_audio_s"] > 0.5 and result["reply_transcript"], result
        reply = read_wav(tmp_path / f"{key}.wav")
        assert says(tiny_judge(np.asarray(reply, dtype=np.float32)), result["reply_transcript"], 0.7), result
    # The brains ran on the GPU, as the config says (the runtime logs its device at start).
    assert "on cuda/" in log, log[-2000:]
