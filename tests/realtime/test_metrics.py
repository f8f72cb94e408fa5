"""The process's Prometheus registry: per-turn observations through the runtime's turn hook, and the values a
collector reads at scrape time (sessions, engine stats, queues, errors by code, refusals by reason)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from common.errors import SessionError
from realtime import metrics
from realtime.core import events as ev
from tests.brains.fakes import collect
from tests.realtime.fake_runtime import fake_runtime, report


def scrape(m: metrics.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_attach_is_once_per_runtime_and_hooks_the_turns() -> None:
    rt = fake_runtime()
    m = metrics.attach(rt)
    assert metrics.attach(rt) is m and rt.observers == [m]
    rt.turn_finished(report(ab_first_token_ms=420.0, first_audio_sent_ms=900.0, transcript_ms=150.0,
                            turn_decision_ms=310.0, underruns=2, reply_tokens=17, thought_tokens=40))
    rt.turn_finished(report(status="cancelled", ab_first_token_ms=5000.0, underruns=0))
    got = scrape(m)
    assert got[("duet_turn_stage_seconds_count", (("stage", "first_token"),))] == 2
    assert got[("duet_turn_stage_seconds_sum", (("stage", "first_token"),))] == 5.42
    assert got[("duet_turn_stage_seconds_bucket", (("le", "0.5"), ("stage", "first_token")))] == 1
    assert got[("duet_turn_stage_seconds_count", (("stage", "first_audio_sent"),))] == 1
    assert got[("duet_turn_stage_seconds_count", (("stage", "transcript"),))] == 1
    assert ("duet_turn_stage_seconds_count", (("stage", "first_audio_synthesized"),)) not in got  # never reached
    # Voice to voice: the turn decision plus the first audio after the commit, known for the first turn only.
    assert got[("duet_voice_to_voice_seconds_count", ())] == 1
    assert abs(got[("duet_voice_to_voice_seconds_sum", ())] - 1.21) < 1e-9
    assert got[("duet_turns_total", (("status", "completed"),))] == 1
    assert got[("duet_turns_total", (("status", "cancelled"),))] == 1
    assert got[("duet_playback_underruns_total", ())] == 2
    assert got[("duet_reply_tokens_total", ())] == 17


def test_a_failing_observer_never_fails_the_turn() -> None:
    rt = fake_runtime()

    class Broken:
        def turn_finished(self, _: object) -> None:
            raise RuntimeError("observer bug")

    rt.observers.append(Broken())
    m = metrics.attach(rt)
    rt.turn_finished(report(ab_first_token_ms=100.0))  # no exception
    assert scrape(m)[("duet_turns_total", (("status", "completed"),))] == 1


async def test_scrape_reads_sessions_engine_queues_errors_and_refusals() -> None:
    rt = fake_runtime()
    m = metrics.attach(rt)
    before = scrape(m)
    assert before[("duet_sessions_active", ())] == 0
    rt.sessions["sess_a"] = object()
    rt.sessions["sess_b"] = object()

    rt.engine.start()
    try:
        streams = [rt.engine.submit(_req([i, i + 1])) for i in (1, 5, 9)]
        for s in streams:
            await collect(s)
    finally:
        rt.engine.close()
    # Queue depth: one job running on the ASR pool, one waiting behind it.
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    jobs = [asyncio.ensure_future(rt.run_in(rt.asr_pool, lambda: asyncio.run_coroutine_threadsafe(
        gate.wait(), loop).result())) for _ in range(2)]
    await asyncio.sleep(0.1)
    ev.error_event(SessionError("x", code="test_metrics_code"))
    ev.error_event(SessionError("x", code="test_metrics_code"))
    transport_refusals = {"unauthorized": 3, "session_limit": 1}
    m.watch_refusals(lambda: transport_refusals)
    m.refused("draining")
    m.refused("session_limit")
    got = scrape(m)
    gate.set()
    await asyncio.gather(*jobs)

    assert got[("duet_sessions_active", ())] == 2
    steps = got[("duet_engine_steps_total", ())]
    assert steps > 0 and got[("duet_engine_step_seconds_count", ())] == steps
    assert got[("duet_engine_step_seconds_bucket", (("le", "+Inf"),))] == steps
    assert got[("duet_engine_decode_tokens_total", ())] == 12 == got[("duet_engine_batch_size_sum", ())]
    assert got[("duet_engine_busy_seconds_total", ())] > 0
    assert got[("duet_engine_post_seconds_total", ())] > 0  # the tokens went to the loop
    assert got[("duet_engine_requests_waiting", ())] == 0
    assert got[("duet_worker_queue_depth", (("pool", "asr"),))] == 2
    assert got[("duet_worker_queue_depth", (("pool", "tts"),))] == 0
    assert got[("duet_errors_total", (("code", "test_metrics_code"),))] - \
        before.get(("duet_errors_total", (("code", "test_metrics_code"),)), 0) == 2
    assert got[("duet_connections_refused_total", (("reason", "unauthorized"),))] == 3
    assert got[("duet_connections_refused_total", (("reason", "session_limit"),))] == 2
    assert got[("duet_connections_refused_total", (("reason", "draining"),))] == 1
    assert ("process_start_time_seconds", ()) in got


async def test_asr_passes_by_kind_and_replies_on_guesses_are_counted() -> None:
    rt = fake_runtime()
    rt.listener = SimpleNamespace(transcribe=lambda audio: "")  # type: ignore[assignment]
    m = metrics.attach(rt)
    await rt.transcribe(np.zeros(1600, dtype=np.float32))
    await rt.transcribe(np.zeros(1600, dtype=np.float32), "partial")
    await rt.transcribe(np.zeros(1600, dtype=np.float32), "partial")
    rt.prefetches_started += 1
    got = scrape(m)
    assert [got[("duet_asr_passes_total", (("kind", k),))] for k in ("final", "speculative", "partial")] == [1, 0, 2]
    assert got[("duet_prefetches_started_total", ())] == 1


async def test_the_tts_decoders_batches_are_counted_when_there_is_one() -> None:
    rt = fake_runtime()
    m = metrics.attach(rt)
    assert not any(name.startswith("duet_tts_decoder") for name, _ in scrape(m))  # tts.decoder = "onnx": none
    batcher = SimpleNamespace(batches=3, items=7, busy_seconds=0.25)
    rt.synthesizer = SimpleNamespace(vocoder=SimpleNamespace(batch_decoder=batcher))  # type: ignore[assignment]
    got = scrape(m)
    assert got[("duet_tts_decoder_batches_total", ())] == 3
    assert got[("duet_tts_decoder_chunks_total", ())] == 7
    assert got[("duet_tts_decoder_busy_seconds_total", ())] == 0.25


def _req(prompt: list[int]) -> object:
    from brains.engine import GenerationRequest

    return GenerationRequest(prompt=prompt, max_new_tokens=4)


def test_a_metrics_port_of_its_own() -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    m = metrics.attach(fake_runtime())
    metrics.serve_port(m, "127.0.0.1", port)  # a daemon thread; it ends with the test process
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert b"duet_sessions_active 0.0" in r.read()


async def test_asyncio_tasks_gauge_counts_the_serving_loops_tasks_from_any_thread() -> None:
    """`duet_asyncio_tasks` is the soak's leak watch (bench/soak.py): it must see tasks come and go, also when
    /metrics is scraped from a thread (the metrics port of its own)."""
    from realtime.runtime import LoopMonitor

    rt = fake_runtime()
    rt.loop_monitor = LoopMonitor()
    m = metrics.attach(rt)
    assert ("duet_asyncio_tasks", ()) not in scrape(m)  # no serving loop yet: no gauge rather than a wrong one
    rt.loop_monitor.start()
    try:
        gate = asyncio.Event()
        base = (await asyncio.to_thread(scrape, m))[("duet_asyncio_tasks", ())]
        waiting = [asyncio.create_task(gate.wait()) for _ in range(5)]
        await asyncio.sleep(0)
        during = (await asyncio.to_thread(scrape, m))[("duet_asyncio_tasks", ())]
        gate.set()
        await asyncio.gather(*waiting)
        after = scrape(m)[("duet_asyncio_tasks", ())]
    finally:
        rt.loop_monitor.stop()
    assert during - base == 5 and after == base


def test_garbage_collections_are_counted_and_timed_per_generation() -> None:
    """Every thread stops while the collector runs: /metrics says how often and for how long, by generation."""
    import gc

    m = metrics.attach(fake_runtime())
    before = scrape(m)
    gc.collect(2)
    gc.collect(0)
    got = scrape(m)

    def grew(name: str, generation: str) -> float:
        key = (name, (("generation", generation),))
        return got[key] - before.get(key, 0.0)

    assert grew("duet_gc_collections_total", "2") >= 1
    assert grew("duet_gc_collections_total", "0") >= 1
    assert grew("duet_gc_pause_seconds_total", "2") > 0
    assert got[("duet_gc_pause_longest_seconds", (("generation", "2"),))] > 0
