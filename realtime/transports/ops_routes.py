"""The operations routes on the server's own port: `GET /metrics`, `GET /healthz`, `GET /readyz`, and the
shutdown drain.

- `/healthz`: 200 while the process serves HTTP at all (liveness: restart it when this fails).
- `/readyz`: 200 once the models are loaded and warmed, 503 before and while draining (readiness: send new
  sessions only while this is 200).
- `/metrics`: the process's Prometheus registry (realtime/metrics.py).

While draining, every other request (a new WebSocket handshake included) is answered 503 with a
`Retry-After`, counted as a refusal for reason `draining`. The drain itself (realtime/lifecycle.py) runs on
the app's shutdown, before the transport's own hook closes the sockets left with 1001, and `duet serve`
runs it on SIGTERM while the port still answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from realtime import metrics as metrics_mod
from realtime import transcripts
from realtime.lifecycle import Lifecycle
from realtime.runtime import Runtime

OPS_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
LIFECYCLE = web.AppKey("duet_lifecycle", Lifecycle)
METRICS = web.AppKey("duet_metrics", metrics_mod.Metrics)


def add_ops_routes(app: web.Application, runtime: Runtime, lifecycle: Lifecycle | None = None, *,
                   refusals: Callable[[], Mapping[str, int]] | None = None) -> None:
    """Register the ops routes, the draining guard and the drain-on-shutdown hook on `app` (before it starts,
    and before the transport's own shutdown hook that closes sockets). `refusals`: the transport's refused
    connections by reason, exported as `duet_connections_refused_total`. Makes the process's metrics and
    transcript log on first use (they hang on `runtime`, so every app over one runtime shares them)."""
    lc = lifecycle or Lifecycle(runtime, runtime.config.server.shutdown_grace_seconds)
    metrics = metrics_mod.attach(runtime)
    transcripts.attach(runtime)
    if refusals is not None:
        metrics.watch_refusals(refusals)
    app[LIFECYCLE] = lc
    app[METRICS] = metrics

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if lc.ready:
            return web.Response(text="ready\n")
        state = "draining" if lc.draining else "loading"
        return web.Response(status=503, text=f"{state}\n", headers={"Retry-After": "5"})

    async def metrics_route(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics_mod.CONTENT_TYPE})

    @web.middleware
    async def draining_guard(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if lc.draining and request.path not in OPS_PATHS:
            metrics.refused("draining")
            return web.Response(status=503, text="server is shutting down\n", headers={"Retry-After": "5"})
        return await handler(request)

    async def drain_on_shutdown(app: web.Application) -> None:
        await lc.drain()

    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.middlewares.append(draining_guard)
    app.on_shutdown.append(drain_on_shutdown)
