"""`duet serve` (or another command that listens) as a real subprocess on a free loopback port, for tests of the
process as a whole."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def serve(tmp_path: Path, *args: str, start_timeout_s: float = 300) -> tuple[subprocess.Popen[str], str, Path]:
    """Start `duet serve --port 0 ARGS`; (process, its ws:// URL, its stderr log)."""
    return start_duet(tmp_path, "serve", "listening on", *args, start_timeout_s=start_timeout_s)


def start_duet(tmp_path: Path, command: str, ready: str, *args: str,
               start_timeout_s: float = 300) -> tuple[subprocess.Popen[str], str, Path]:
    """Start `duet COMMAND --port 0 ARGS`; (process, the URL at the end of its stdout line starting with
    `ready`, its stderr log). Fails the test with the log's tail when no such line comes in time."""
    stderr = tmp_path / f"{command}.log"
    cmd = [sys.executable, "-m", "duet.cli", command, "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(ready):
                found.append(line.split()[-1])
                break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=start_timeout_s)
    if not found:
        proc.kill()
        pytest.fail(f"duet {command} did not start: {stderr.read_text()[-2000:]}")
    return proc, found[0], stderr
