"""A `Runtime` without models, for the ops layer's unit tests: real pools and a real engine over the fake
backend (so its stats are real), no VAD, Whisper or Piper."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from brains.engine import Engine
from brains.scheduler import SchedulerConfig
from common.config import DuetConfig, ServerConfig
from realtime.runtime import Runtime, TurnReport
from tests.brains.fakes import FakeBackend


def fake_runtime(**server: Any) -> Runtime:
    config = dataclasses.replace(DuetConfig(), server=dataclasses.replace(ServerConfig(), **server))
    engine = Engine(FakeBackend(slots=4), SchedulerConfig(token_budget=64, max_batch=8, prefill_chunk=32))
    pools = {name: ThreadPoolExecutor(1, thread_name_prefix=f"test-{name}") for name in ("asr", "tts")}
    return Runtime(config=config, vad=None, listener=None, synthesizer=None, engine=engine,  # type: ignore[arg-type]
                   prompts=None, asr_pool=pools["asr"], tts_pool=pools["tts"])  # type: ignore[arg-type]


def report(session_id: str = "sess_1", response_id: str = "resp_1", status: str = "completed",
           **metrics: Any) -> TurnReport:
    return TurnReport(session_id=session_id, response_id=response_id, status=status, user_item_id="item_u",
                      user_text="What is the capital of France?", item_id="item_a",
                      assistant_text="Paris is the capital.", started_at=1000.0, finished_at=1002.5,
                      metrics=dict(metrics))
