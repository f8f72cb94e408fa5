"""The server side of bench/system.py: the processes it starts (one `duet serve`, or `duet engine` and N front ends
with remote brains) and what their /metrics say over a level (busy shares, GCs, engine steps, peak queues)."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from bench.latency import wait_ready

# Metrics that are levels, not counts: over several processes the largest is kept, not the sum.
GAUGES = ("duet_worker_queue_depth", "duet_event_loop_lag_seconds", "duet_event_loop_busy_ratio",
          "duet_engine_requests_waiting", "duet_engine_sequences_live", "process_",
          "duet_gc_pause_longest_seconds", "duet_asyncio_tasks", "duet_worker_threads")


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics as {name{labels}: value} (the Prometheus text format, one sample a line)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def scrape_all(ports: list[int], engine_port: int | None = None) -> dict[str, float]:
    """Every server process's /metrics as one (`--front-ends`: the front ends and `duet engine`): counters add up
    (CPU seconds, loop busy seconds: the rates become cores; sessions), gauges keep their largest value (a queue
    depth or a loop lag is per process: the worst one bounds). With an engine port, the `duet_engine_*` families
    are that process's alone: a front end's are its remote client's, which would count every token twice."""
    out: dict[str, float] = {}
    for port in ports:
        for name, value in scrape(port).items():
            if engine_port is not None and port != engine_port and name.startswith("duet_engine_"):
                continue
            gauge = name.startswith(GAUGES) and name != "process_cpu_seconds_total"
            out[name] = max(out.get(name, value), value) if gauge else out.get(name, 0.0) + value
    return out


def level_deltas(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float | None]:
    """What the server's counters say of one level: busy shares, full GCs, optional ASR and brain work, engine steps."""
    def rate(name: str) -> float | None:
        if name not in after or name not in before or wall_s <= 0:
            return None
        return round((after[name] - before[name]) / wall_s, 3)

    def delta(name: str) -> float | None:
        return None if name not in after or name not in before else after[name] - before[name]

    def mean(name: str, scale: float = 1.0) -> float | None:  # a histogram's mean over the level
        total, n = delta(f"{name}_sum"), delta(f"{name}_count")
        return None if total is None or not n else round(scale * total / n, 2)

    full = '{generation="2"}'
    pause_s = delta(f"duet_gc_pause_seconds_total{full}")
    return {"engine_busy_share": rate("duet_engine_busy_seconds_total"),  # the GPU's thread, steps in flight
            "event_loop_busy_share": rate("duet_event_loop_busy_seconds_total"),
            "engine_post_share": rate("duet_engine_post_seconds_total"),  # handing tokens to the loop
            "process_cpu_cores": rate("process_cpu_seconds_total"),
            "engine_step_mean_ms": mean("duet_engine_step_seconds", 1000),  # the brain's pace: one token per row
            "engine_rows_per_step": mean("duet_engine_batch_size"),
            # Full garbage collections during the level and their total time: every thread waits them out.
            "gc_full_collections": delta(f"duet_gc_collections_total{full}"),
            "gc_full_pause_ms": None if pause_s is None else round(1000 * pause_s, 1),
            # The optional work the sessions added: Whisper passes by why, and replies started on guesses.
            **{f"asr_{kind}_passes": delta(f'duet_asr_passes_total{{kind="{kind}"}}')
               for kind in ("final", "speculative", "partial")},
            "prefetches_started": delta("duet_prefetches_started_total"),
            # tts.decoder = "torch": the decoder threads' busy share (summed over front ends) and chunks per batch.
            "tts_decoder_busy_share": rate("duet_tts_decoder_busy_seconds_total"),
            "tts_chunks_per_decode": _ratio(delta("duet_tts_decoder_chunks_total"),
                                            delta("duet_tts_decoder_batches_total"))}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else round(num / den, 2)


def poll_queues(servers: Servers, peaks: dict[str, float], stop: threading.Event) -> None:
    """Peak queue depths and loop lag of the server while a level runs (a thread: the parent has no loop)."""
    while not stop.is_set():
        try:
            m = servers.scrape()
            for pool in ("asr", "tts"):
                key = f'duet_worker_queue_depth{{pool="{pool}"}}'
                peaks[pool] = max(peaks.get(pool, 0.0), m.get(key, 0.0))
            peaks["loop_lag_s"] = max(peaks.get("loop_lag_s", 0.0), m.get("duet_event_loop_lag_seconds", 0.0))
        except OSError:
            pass
        stop.wait(0.5)


@dataclass
class Servers:
    """The server processes of a run: one `duet serve` with its own engine, or (`--front-ends N`) `duet engine`
    and N `duet serve` front ends whose brains are remote on it (the process split; docs/gpu.md)."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    front_ports: list[int] = field(default_factory=list)  # where the clients connect
    metrics_ports: list[int] = field(default_factory=list)  # every process's /metrics
    engine_port: int | None = None  # `duet engine`'s, with front ends

    def scrape(self) -> dict[str, float]:
        return scrape_all(self.metrics_ports, self.engine_port)

    def start(self, config: str | None, sets: list[str], port: int, front_ends: int, log: Any) -> None:
        # server.front_ends=0: this bench starts and deals over the processes itself, and reads each one's /metrics
        # (a config's own split, e.g. configs/gpu.toml's, would put them all behind one port).
        common = [*(["--config", config] if config else []), *[x for s in [*sets, "server.front_ends=0"]
                                                               for x in ("--set", s)]]
        if not front_ends:
            self._launch(["serve", "--port", str(port), *common], log, "listening on")
            self.front_ports = self.metrics_ports = [port]
            return
        engine_port = port + 100
        self._launch(["engine", "--port", str(engine_port), *common], log, "serving engine")
        remote = ["--set", 'llm.backend="remote"', "--set", f'llm.remote_url="http://127.0.0.1:{engine_port}/v1"']
        self.front_ports = [port + k for k in range(front_ends)]
        # Started together, then waited for: one after another, 8 front ends took 6 minutes to load on the GPU
        # machine (~45 s each, mostly single-threaded imports and CUDA set-up), over half a 10-minute run call.
        starting = [self._launch(["serve", "--port", str(p), *common, *remote], log, "listening on", wait=False)
                    for p in self.front_ports]
        for proc in starting:
            wait_ready(proc, "listening on")
        self.metrics_ports = [*self.front_ports, engine_port]
        self.engine_port = engine_port

    def _launch(self, argv: list[str], log: Any, ready: str, wait: bool = True) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "duet.cli", *argv], stdout=subprocess.PIPE, stderr=log,
                                text=True)
        self.procs.append(proc)  # before the wait: stop() reaps it if the wait fails
        return wait_ready(proc, ready) if wait else proc

    def stop(self) -> None:
        """The front ends first (they drain), then the engine they used; each killed if it takes over 30 s."""
        fronts, engine = (self.procs[1:], self.procs[:1]) if self.engine_port is not None else (self.procs, [])
        for group in (fronts, engine):
            for proc in group:
                proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
