"""/healthz, /readyz, /metrics on an aiohttp app, and the 503 for everything else while draining."""

from __future__ import annotations

from collections import Counter

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from realtime.transports.ops_routes import LIFECYCLE, add_ops_routes
from tests.realtime.fake_runtime import fake_runtime


async def test_health_readiness_metrics_and_draining() -> None:
    rt = fake_runtime()
    refused = Counter({"unauthorized": 2})
    app = web.Application()
    add_ops_routes(app, rt, refusals=lambda: refused)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app.router.add_get("/v1/realtime", hello)
    lc = app[LIFECYCLE]
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        r = await client.get("/readyz")
        assert r.status == 503 and "loading" in await r.text()  # models not warmed yet
        rt.warmed = True
        assert (await client.get("/readyz")).status == 200
        assert (await client.get("/v1/realtime")).status == 200
        m = await client.get("/metrics")
        assert m.status == 200 and m.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = await m.text()
        assert "duet_sessions_active 0.0" in body
        assert 'duet_connections_refused_total{reason="unauthorized"} 2.0' in body

        lc.request_stop()
        r = await client.get("/readyz")
        assert r.status == 503 and "draining" in await r.text()
        r = await client.get("/v1/realtime")
        assert r.status == 503 and r.headers["Retry-After"] == "5"
        assert (await client.get("/healthz")).status == 200  # alive while draining
        body = await (await client.get("/metrics")).text()
        assert 'duet_connections_refused_total{reason="draining"} 1.0' in body
    assert lc.drained  # the app's shutdown ran the drain
