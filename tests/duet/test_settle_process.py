"""`duet serve`, once its models are loaded: the loaded heap is left out of garbage collection (server config)."""

from __future__ import annotations

import gc

from common.config import ServerConfig
from duet.cli import settle_process


def test_settle_process_freezes_the_heap() -> None:
    try:
        settle_process(ServerConfig(gc_freeze=True))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_server_can_keep_collecting_everything() -> None:
    settle_process(ServerConfig(gc_freeze=False))
    assert gc.get_freeze_count() == 0
