"""Prometheus metrics of one server process, in its own `CollectorRegistry` (never the global one, so two
servers in one test process do not collide and nothing a library registers globally leaks in).

Two kinds:
- observed per turn, on the event loop, through the runtime's turn hook (`Runtime.turn_finished`, called by
  `Response` with its `duet.turn.metrics` dict): stage latencies, voice-to-voice, underruns, turns by status;
- read at scrape time by a collector, from counters the owners keep anyway: open sessions, the engine's
  `EngineStats` (written lock-free by the engine thread), worker queue depths, error events by code
  (`events.ERROR_COUNTS`) and refused connections by reason (the transport's counter, `watch_refusals`).

Names (all prefixed `duet_`): see README "Operations".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from brains.engine import EngineStats, GenerationEngine, StepHistogram
from realtime.core import events as ev
from realtime.gc_pauses import GC_PAUSES, GENERATIONS
from realtime.runtime import Runtime, TurnReport

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Stage name -> key of the response's metrics dict (milliseconds after the turn was committed). Stages a
# response did not reach (a cancelled reply's first audio) or that its source does not measure are skipped.
TURN_STAGES: dict[str, str] = {
    "turn_decision": "turn_decision_ms",  # end of speech -> turn committed, where the turn detector reports it
    "transcript": "transcript_ms",
    "first_thought_token": "fb_first_token_ms",
    "first_token": "ab_first_token_ms",
    "first_chunk_text": "first_chunk_text_ms",  # the first chunk's words written: what the first audio speaks
    "first_audio_synthesized": "first_audio_synthesized_ms",
    "first_audio_sent": "first_audio_sent_ms",
}
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0)


class Metrics:
    """One per server process: `attach(runtime)` makes it and hooks it to the runtime's turns."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.registry = CollectorRegistry()
        r = self.registry
        self.turn_stage = Histogram("duet_turn_stage_seconds", "Time from the turn's commit to each stage of its "
                                    "reply", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.voice_to_voice = Histogram("duet_voice_to_voice_seconds", "End of the user's speech to the first "
                                        "reply audio sent, where the turn detector reports its decision time",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.turns = Counter("duet_turns", "Finished responses by status", ["status"], registry=r)
        self.underruns = Counter("duet_playback_underruns", "Reply audio that ran dry before the next audio "
                                 "was sent (the client's playback would stall)", registry=r)
        self.reply_tokens = Counter("duet_reply_tokens", "Tokens of replies (articulation brain)", registry=r)
        self.thought_tokens = Counter("duet_thought_tokens", "Tokens of thought (formulation brain)", registry=r)
        # Refusals the ops layer makes itself (draining); the transport's own counter joins via watch_refusals.
        self.own_refusals: dict[str, int] = {}
        self._refusal_sources: list[Callable[[], Mapping[str, int]]] = [lambda: self.own_refusals]
        GC_PAUSES.install()
        r.register(_RuntimeCollector(self))
        ProcessCollector(registry=r)  # CPU seconds, resident memory, open files, start time

    # ---- observed -----------------------------------------------------------------------------
    def turn_finished(self, report: TurnReport) -> None:
        m = report.metrics
        for stage, key in TURN_STAGES.items():
            value = m.get(key)
            if isinstance(value, int | float) and value >= 0:
                self.turn_stage.labels(stage).observe(value / 1000)
        v2v = m.get("voice_to_voice_ms")
        if not isinstance(v2v, int | float):
            decision, sent = m.get("turn_decision_ms"), m.get("first_audio_sent_ms")
            v2v = decision + sent if isinstance(decision, int | float) and isinstance(sent, int | float) else None
        if v2v is not None and v2v >= 0:
            self.voice_to_voice.observe(v2v / 1000)
        self.turns.labels(report.status).inc()
        for counter, key in ((self.underruns, "underruns"), (self.reply_tokens, "reply_tokens"),
                             (self.thought_tokens, "thought_tokens")):
            value = m.get(key)
            if isinstance(value, int) and value > 0:
                counter.inc(value)

    def refused(self, reason: str) -> None:
        self.own_refusals[reason] = self.own_refusals.get(reason, 0) + 1

    def watch_refusals(self, source: Callable[[], Mapping[str, int]]) -> None:
        """A transport's refused connections by reason, read at each scrape (a `collections.Counter` it keeps)."""
        self._refusal_sources.append(source)

    def refusals(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for source in self._refusal_sources:
            for reason, n in dict(source()).items():
                total[reason] = total.get(reason, 0) + n
        return total

    def render(self) -> bytes:
        return generate_latest(self.registry)


def attach(runtime: Runtime) -> Metrics:
    """The process's metrics, made and hooked to `runtime` on the first call (idempotent)."""
    for observer in runtime.observers:
        if isinstance(observer, Metrics):
            return observer
    metrics = Metrics(runtime)
    runtime.observers.append(metrics)
    return metrics


def serve_port(metrics: Metrics, host: str, port: int) -> None:
    """Also serve /metrics on a port of its own (prometheus_client's HTTP server, a daemon thread)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, port)


def _histogram(name: str, doc: str, h: StepHistogram) -> HistogramMetricFamily:
    buckets = [(_le(bound), float(n)) for bound, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _queue_depth(rt: Runtime, pool: ThreadPoolExecutor) -> int:
    """Jobs queued or running on a worker pool. `Runtime.run_in` queues per session in front of the executor
    (a `FairPool`, which knows both), so count that where it exists; else the executor's queue (waiting only)."""
    fair: Any = getattr(rt, "_fair", {}).get(id(pool))
    if fair is not None:
        return int(getattr(fair, "waiting", 0)) + int(getattr(fair, "_running", 0))
    return pool._work_queue.qsize()


def engine_families(st: EngineStats) -> Iterator[Metric]:
    """The engine's counters, gauges and histograms: `duet serve`'s and `duet engine`'s (one process each)."""
    yield CounterMetricFamily("duet_engine_steps", "Engine steps run", value=st.steps)
    yield CounterMetricFamily("duet_engine_busy_seconds", "Seconds the engine thread spent in steps; its rate "
                              "is the engine's busy share", value=st.busy_seconds)
    yield CounterMetricFamily("duet_engine_post_seconds", "Seconds the engine thread spent handing tokens to the "
                              "event loop (wake-ups give the GIL away); not in busy seconds", value=st.post_seconds)
    yield CounterMetricFamily("duet_engine_decode_tokens", "Tokens decoded", value=st.decode_tokens)
    yield CounterMetricFamily("duet_engine_prefill_tokens", "Prompt tokens prefilled", value=st.prefill_tokens)
    yield CounterMetricFamily("duet_engine_prefill_tokens_saved", "Prompt tokens reused from cached prefixes",
                              value=st.prefill_tokens_saved)
    yield CounterMetricFamily("duet_engine_failed_requests", "Generation requests ended by an error",
                              value=st.failed_requests)
    yield CounterMetricFamily("duet_engine_failed_steps", "Engine steps whose forward raised",
                              value=st.failed_steps)
    yield GaugeMetricFamily("duet_engine_requests_waiting", "Requests waiting for a KV slot", value=st.waiting)
    yield GaugeMetricFamily("duet_engine_sequences_live", "Sequences in KV slots", value=st.live)
    yield _histogram("duet_engine_step_seconds", "Engine step time", st.step_seconds)
    yield _histogram("duet_engine_batch_size", "Decode rows per engine step", st.batch_size)


def gc_families() -> Iterator[Metric]:
    """The process's garbage collections: every thread stops while the collector runs (realtime/gc_pauses.py)."""
    gcs = CounterMetricFamily("duet_gc_collections", "Garbage collections by generation", labels=["generation"])
    pauses = CounterMetricFamily("duet_gc_pause_seconds", "Wall time in garbage collections (every thread "
                                 "waits) by generation", labels=["generation"])
    longest = GaugeMetricFamily("duet_gc_pause_longest_seconds", "The longest garbage collection so far, by "
                                "generation", labels=["generation"])
    for g in GENERATIONS:
        gcs.add_metric([str(g)], GC_PAUSES.collections[g])
        pauses.add_metric([str(g)], GC_PAUSES.seconds[g])
        longest.add_metric([str(g)], GC_PAUSES.longest[g])
    yield from (gcs, pauses, longest)


class EngineCollector(Collector):
    """`duet engine`'s metrics, read at scrape time: its engine and the process's garbage collections."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        yield from engine_families(self.engine.stats)
        yield from gc_families()


def engine_registry(engine: GenerationEngine) -> CollectorRegistry:
    """The registry of a process that runs only an engine (`duet engine`): the engine, the process's CPU and
    memory, and its garbage collections."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    ProcessCollector(registry=registry)
    GC_PAUSES.install()
    return registry


class _RuntimeCollector(Collector):
    """Read at scrape time, on the scraping thread: only reads of counters, never a lock on a hot path."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        rt = self.m.rt
        yield GaugeMetricFamily("duet_sessions_active", "Open sessions (realtime and phone calls)",
                                value=len(rt.sessions))
        yield from engine_families(rt.engine.stats)
        depth = GaugeMetricFamily("duet_worker_queue_depth", "Jobs queued or running per worker pool", labels=["pool"])
        for name, pool in (("asr", rt.asr_pool), ("tts", rt.tts_pool)):
            depth.add_metric([name], _queue_depth(rt, pool))
        depth.add_metric(["vad"], rt.vad_batcher.waiting)
        yield depth
        workers = GaugeMetricFamily("duet_worker_threads", "Threads per worker pool (jobs that can run at once)",
                                    labels=["pool"])
        for name, pool in (("asr", rt.asr_pool), ("tts", rt.tts_pool)):
            workers.add_metric([name], pool._max_workers)
        workers.add_metric(["vad"], 1)
        yield workers
        passes = CounterMetricFamily("duet_asr_passes", "Whisper passes asked for, by why: final (a committed turn), "
                                     "speculative (the silence window's guess), partial (while speaking)",
                                     labels=["kind"])
        for kind, n in rt.asr_passes.items():
            passes.add_metric([kind], n)
        yield passes
        yield CounterMetricFamily("duet_prefetches_started", "Replies started on a speculative or partial transcript "
                                  "(adopted at the commit if the transcript holds, else cancelled)",
                                  value=rt.prefetches_started)
        yield from gc_families()
        # Frames per batched Silero call: near 1 when idle, near the live sessions under load.
        yield CounterMetricFamily("duet_vad_rounds", "Batched VAD model calls", value=rt.vad_batcher.rounds)
        yield CounterMetricFamily("duet_vad_frames", "32 ms frames run through the VAD", value=rt.vad_batcher.rows)
        # tts.decoder = "torch": chunks per decoder call, near 1 when idle, growing with the sessions speaking.
        decoder = getattr(getattr(rt.synthesizer, "vocoder", None), "batch_decoder", None)
        if decoder is not None:
            yield CounterMetricFamily("duet_tts_decoder_batches", "Batched TTS decoder calls (tts.decoder = torch)",
                                      value=decoder.batches)
            yield CounterMetricFamily("duet_tts_decoder_chunks", "Reply chunks decoded in those calls",
                                      value=decoder.items)
            yield CounterMetricFamily("duet_tts_decoder_busy_seconds", "Wall time the TTS decoder's thread spent "
                                      "in those calls; its rate is the thread's busy share", value=decoder.busy_seconds)
        # The event loop only routes events; these say whether it keeps up (realtime/runtime.py LoopMonitor).
        loop = getattr(rt, "loop_monitor", None)
        if loop is not None:
            yield CounterMetricFamily("duet_event_loop_busy_seconds", "CPU seconds of the event loop's thread; its "
                                      "rate is the loop's busy share", value=loop.busy_seconds)
            yield GaugeMetricFamily("duet_event_loop_busy_ratio", "The event loop thread's CPU share over the "
                                    "last ~5 s", value=loop.busy_ratio)
            yield GaugeMetricFamily("duet_event_loop_lag_seconds", "Worst delay of a scheduled callback on the "
                                    "event loop over the last ~5 s", value=loop.lag_max_s)
            # Leak watch for long runs (bench/soak.py): tasks alive on the serving loop. `all_tasks` copies the
            # loop's weak set with retries, so it is safe from the scraping thread too; it costs O(tasks).
            monitor_task = getattr(loop, "_task", None)
            if monitor_task is not None:
                yield GaugeMetricFamily("duet_asyncio_tasks", "Unfinished asyncio tasks on the serving event loop",
                                        value=len(asyncio.all_tasks(monitor_task.get_loop())))
        errors = CounterMetricFamily("duet_errors", "Error events sent to clients, by code", labels=["code"])
        for code, n in sorted(ev.ERROR_COUNTS.items()):
            errors.add_metric([code], n)
        yield errors
        refused = CounterMetricFamily("duet_connections_refused", "Refused connections and requests, by reason",
                                      labels=["reason"])
        for reason, n in sorted(self.m.refusals().items()):
            refused.add_metric([reason], n)
        yield refused
        # The MQTT bus (realtime/bus) is a session observer with a `dropped` count; read by name, since metrics
        # and the bus are siblings of one layer.
        yield CounterMetricFamily("duet_mqtt_dropped_events", "Bus events dropped because the MQTT broker was "
                                  "slow or away", value=sum(int(getattr(o, "dropped", 0))
                                                            for o in getattr(rt, "session_observers", ())))
