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


def serve(tmp_path: Path, *args: str, start_timeout_s: float = 300,
          lines: list[str] | None = None) -> tuple[subprocess.Popen[str], str, Path]:
    """Start `duet serve --port 0 ARGS`; (process, its ws:// URL, its stderr log)."""
    return start_duet(tmp_path, "serve", "listening on", *args, start_timeout_s=start_timeout_s, lines=lines)


def start_duet(tmp_path: Path, command: str, ready: str, *args: str, start_timeout_s: float = 300,
               lines: list[str] | None = None) -> tuple[subprocess.Popen[str], str, Path]:
    """Start `duet COMMAND --port 0 ARGS`; (process, the URL at the end of its stdout line starting with
    `ready`, its stderr log). Fails the test with the log's tail when no such line comes in time. With `lines`,
    every stdout line is appended there as long as the process runs (else reading stops at the ready line)."""
    stderr = tmp_path / f"{command}.log"
    cmd = [sys.executable, "-m", "duet.cli", command, "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    found: list[str] = []
    done = threading.Event()  # the ready line came, or stdout ended without it

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if lines is not None:
                lines.append(line.rstrip())
            if not found and line.startswith(ready):
                found.append(line.split()[-1])
                done.set()
                if lines is None:
                    break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout=start_timeout_s)
    if not found:
        proc.kill()
        pytest.fail(f"duet {command} did not start: {stderr.read_text()[-2000:]}")
    return proc, found[0], stderr
