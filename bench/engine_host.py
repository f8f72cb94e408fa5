"""The engine thread's host work per pass, beside GPU-like forwards and busy Python threads: before and after.

A forward on a GPU waits with the GIL released; the engine thread's own Python around it (building the step's
input tensors, handing tokens to the event loop) needs the GIL back, and every torch call and every wake-up of the
loop releases and retakes it. With other threads runnable in Python (the VAD thread, the event loop, pool threads)
each retake can wait up to a switch interval (the server default, 1 ms), so host work that scales with the rows of a
step (up to 256 at 128 sessions) can cost more than the forward.

This runs the real `Engine` on a stand-in backend whose forward sleeps `--step-ms` (the GIL released, as a GPU
forward waits) and returns fixed logits, with `--contenders` threads of pure-Python work beside it, in three
variants taking turns (interleaved, so machine noise falls on all):
- `before`: the engine as it was: a step's input built with torch calls per row, and one `call_soon_threadsafe`
  per sequence with output;
- `batched_post`: input per row as before, output handed over in one call per loop per pass (`Engine._post`);
- `after`: the engine as it is: input built as lists and made into one tensor each, output batched.
It reports the median time per engine pass (the forward included) and the loop wake-ups per pass from the engine
thread. Not the whole server: a GPU figure of the server comes from bench/system.py. JSON out (rewritten after
every row, so a run cut short keeps what it measured).

    python bench/engine_host.py --rows 16,64,256 --contenders 0,1,2 --out bench/out/engine_host.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.contention import contend
from brains.engine import Engine, GenerationRequest
from brains.scheduler import SchedulerConfig
from common.config import ServerConfig

VOCAB = 64


class StandInBackend:
    """A forward that waits `step_s` without the GIL and always predicts token 7 (never a stop token)."""

    def __init__(self, slots: int, max_len: int, step_s: float) -> None:
        self.slots, self.max_len, self.step_s = slots, max_len, step_s

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        time.sleep(self.step_s)
        logits = torch.zeros((tokens.shape[0], VOCAB))
        logits[:, 7] = 1.0
        return logits

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        pass


class BatchedPostEngine(Engine):
    """The step's input built with torch calls per row, as `Engine._forward` did before."""

    def _forward(self, rows: Any) -> torch.Tensor:
        width = max(len(c) for _, _, c in rows)
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (_, start, chunk) in enumerate(rows):
            tokens[row, : len(chunk)] = torch.tensor(chunk)
            positions[row] = torch.arange(start, start + width)
        slots = torch.tensor([s.slot for s, _, _ in rows], dtype=torch.long)
        return self.backend.forward(tokens, positions, slots, int(positions.max()) + 1)


class BeforeEngine(BatchedPostEngine):
    """...and one `call_soon_threadsafe` per sequence's output, as `Engine` posted before."""

    def _post(self) -> None:
        outbox, self._outbox = self._outbox, []
        for loop, fn, args in outbox:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)


VARIANTS: dict[str, type[Engine]] = {"before": BeforeEngine, "batched_post": BatchedPostEngine, "after": Engine}


async def one_run(engine_cls: type[Engine], rows: int, tokens: int, step_s: float, contenders: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += threading.current_thread().name == "duet-engine"
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    backend = StandInBackend(slots=rows, max_len=tokens + 16, step_s=step_s)
    engine = engine_cls(backend, SchedulerConfig(token_budget=rows * 8 + 64, max_batch=rows, prefill_chunk=64))
    streams = [engine.submit(GenerationRequest(prompt=[1, 2, 3, i % 50 + 10], max_new_tokens=tokens))
               for i in range(rows)]
    stop = threading.Event()
    threads = [threading.Thread(target=contend, args=(stop,), daemon=True) for _ in range(contenders)]
    for t in threads:
        t.start()

    async def drain(stream: Any) -> int:
        return sum([len(batch) async for batch in stream])

    t0 = time.perf_counter()
    try:
        engine.start()
        got = await asyncio.gather(*(drain(s) for s in streams))
        wall = time.perf_counter() - t0
    finally:
        stop.set()
        for t in threads:
            t.join()
        engine.close()
        del loop.call_soon_threadsafe
    assert got == [tokens] * rows, "a stream lost tokens"
    steps = engine.stats.steps
    return {"wall_s": wall, "steps": steps, "pass_ms": wall / steps * 1e3, "wakeups": wakeups}


async def main(a: argparse.Namespace) -> dict[str, Any]:
    sys.setswitchinterval(a.switch_interval_ms / 1000)
    results: list[dict[str, Any]] = []
    for contenders in a.contenders:
        for rows in a.rows:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
            for _ in range(a.reps):  # interleaved: machine noise falls on every variant
                for name, cls in VARIANTS.items():
                    runs[name].append(await one_run(cls, rows, a.tokens, a.step_ms / 1000, contenders))
            row: dict[str, Any] = {"rows": rows, "contenders": contenders}
            for name, rs in runs.items():
                row[f"{name}_pass_ms_p50"] = round(statistics.median(r["pass_ms"] for r in rs), 2)
                row[f"{name}_wakeups_per_pass"] = round(statistics.median(r["wakeups"] / r["steps"] for r in rs), 2)
            row["before_over_after"] = round(row["before_pass_ms_p50"] / row["after_pass_ms_p50"], 2)
            print(json.dumps(row), flush=True)
            results.append(row)
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(report(a, results), indent=1) + "\n")
    return report(a, results)


def report(a: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": platform.processor() or "unknown",
            "python": platform.python_version(), "torch": torch.__version__, "step_ms": a.step_ms,
            "tokens": a.tokens, "reps": a.reps, "switch_interval_ms": a.switch_interval_ms, "results": results}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--rows", type=ints, default=[16, 64, 256], help="sequences decoding at once")
    p.add_argument("--contenders", type=ints, default=[0, 1, 2], help="threads of pure-Python work beside")
    p.add_argument("--tokens", type=int, default=30, help="tokens per sequence")
    p.add_argument("--step-ms", type=float, default=10.0, help="the stand-in forward's time")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--switch-interval-ms", type=float, default=ServerConfig().gil_switch_interval_ms,
                   help="sys.setswitchinterval (the server's is the default)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
