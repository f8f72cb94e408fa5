"""Does the event loop keep up with the sessions' input when other threads want the GIL? (the convoy effect)

Every socket receive of the event loop releases the GIL and must take it back; while another thread runs Python,
each retake can wait up to a switch interval. At 128 sessions sending 20 ms audio appends, the loop receives
~6,400 messages a second, so that wait alone could starve it while its own CPU share stays low (a wait for the GIL
is not CPU time). This measures it without the models: an aiohttp WebSocket server on loopback that does what the
real one does with each `input_audio_buffer.append` (parse the JSON, decode the base64 PCM), `--contenders`
threads of pure-Python work in the server process (standing in for the VAD thread, the engine's Python, pool
threads), and clients in a separate process sending one append per 20 ms per session at real-time pace.

Reported per level: the loop's lag (how late a 10 ms sleep wakes: p50, p99, max), the loop thread's CPU share,
and the messages handled against those sent. Not the whole server; the server's own figures come from
bench/system.py. JSON out.

    python bench/loop_convoy.py --sessions 16,64,128 --contenders 0,1,2 --out bench/out/loop_convoy.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.contention import contend
from common.config import ServerConfig

CHUNK_S = 0.02

CLIENT = r"""
import asyncio, base64, json, sys, time
import numpy as np
from websockets.asyncio.client import connect

url, sessions, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pcm = base64.b64encode((np.random.default_rng(0).standard_normal(480) * 3000).astype('<i2').tobytes()).decode()
message = json.dumps({"type": "input_audio_buffer.append", "audio": pcm})

async def one(i):
    async with connect(url, max_queue=None) as ws:
        start = time.perf_counter() + (i % 50) * 0.0004  # spread over a 20 ms cycle
        n = 0
        while (t := start + n * 0.02) < start + seconds:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            await ws.send(message)
            n += 1
        return n

async def main():
    print(sum(await asyncio.gather(*(one(i) for i in range(sessions)))), flush=True)

asyncio.run(main())
"""


async def level(sessions: int, contenders: int, seconds: float) -> dict[str, Any]:
    handled = 0

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        nonlocal handled
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                event = json.loads(msg.data)
                np.frombuffer(base64.b64decode(event["audio"]), dtype="<i2").astype(np.float32)
                handled += 1
        return ws

    app = web.Application()
    app.router.add_get("/", ws_handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    stop = threading.Event()
    threads = [threading.Thread(target=contend, args=(stop,), daemon=True) for _ in range(contenders)]
    for t in threads:
        t.start()
    lags: list[float] = []
    done = asyncio.Event()

    async def monitor() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append((time.perf_counter() - t0 - 0.01) * 1000)

    mon = asyncio.create_task(monitor())
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, f"ws://127.0.0.1:{port}/",
                                                  str(sessions), str(seconds), stdout=subprocess.PIPE)
    out, _ = await client.communicate()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    await asyncio.sleep(0.2)  # the last messages in flight
    done.set()
    await mon
    stop.set()
    for t in threads:
        t.join()
    await runner.cleanup()
    sent = int(out.strip() or 0)
    lags.sort()
    p99 = lags[int(0.99 * (len(lags) - 1))]
    return {"sessions": sessions, "contenders": contenders, "sent": sent, "handled": handled,
            "loop_lag_p50_ms": round(statistics.median(lags), 2), "loop_lag_p99_ms": round(p99, 1),
            "loop_lag_max_ms": round(lags[-1], 1), "loop_cpu_share": round(cpu / wall, 3)}


async def main(a: argparse.Namespace) -> None:
    sys.setswitchinterval(a.switch_interval_ms / 1000)
    results = []
    for contenders in a.contenders:
        for sessions in a.sessions:
            row = await level(sessions, contenders, a.seconds)
            print(json.dumps(row), flush=True)
            results.append(row)
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({
                    "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": platform.processor() or "unknown",
                    "python": platform.python_version(), "switch_interval_ms": a.switch_interval_ms,
                    "seconds": a.seconds, "results": results}, indent=1) + "\n")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--sessions", type=ints, default=[16, 64, 128])
    p.add_argument("--contenders", type=ints, default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=8.0, help="audio each session sends per level")
    p.add_argument("--switch-interval-ms", type=float, default=ServerConfig().gil_switch_interval_ms)
    p.add_argument("--out", type=Path)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
