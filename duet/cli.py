"""`duet`: serve the realtime API (or its engine alone), route connections among servers, or talk to a server from
a WAV file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common import logs
from common.config import DEFAULT_CONFIG_PATH, ConfigError, ServerConfig, load_config

if TYPE_CHECKING:
    from realtime.runtime import Runtime


def _serve(args: argparse.Namespace) -> int:
    from duet.front_ends import FrontEnds, stop_signals

    stop_signals()  # a supervised front end stops only on its supervisor's signal, from before the models load
    from realtime.transports.auth import Authenticator, server_ssl_context

    tls = [f"server.{name}={json.dumps(path)}" for name, path in (("tls_cert_file", args.tls_cert),
                                                                   ("tls_key_file", args.tls_key)) if path]
    sets = [*args.set, *tls, *([f"server.log_format={json.dumps(args.log_format)}"] if args.log_format else [])]
    config = load_config(args.config, sets)
    # Before ~20 s of model loading: an open server on a public address must not start at all.
    Authenticator(config.auth, os.environ).check_bind(args.host or config.server.host)
    server_ssl_context(config.server.tls_cert_file, config.server.tls_key_file)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, config.server.log_format)
    _quiet_libraries()
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    if config.server.front_ends:  # the process split: this process only starts and watches the others
        config_args = ["--config", args.config, *[x for s in sets for x in ("--set", s)]]
        return FrontEnds(config, config_args, host, port, flags=["-v"] if args.verbose else []).run()
    from realtime.runtime import Runtime  # (torch and the models' libraries: not for the supervisor)

    print(f"loading models ({config.llm.model} on {config.llm.device}, whisper {config.asr.model}, "
          f"pacing {config.mind.mode})...", flush=True)
    runtime = Runtime.load(config)
    settle_process(config.server)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_until_stopped(runtime, host, port))
    finally:
        runtime.close()
    return 0


def settle_process(cfg: ServerConfig) -> None:
    """Once the models are loaded, before serving (the GIL switch interval is set by `Runtime.load`)."""
    from realtime.gc_pauses import freeze_heap

    if cfg.gc_freeze:
        frozen = freeze_heap()
        logging.getLogger(__name__).info("%d objects of the loaded models left out of garbage collection", frozen)


async def _serve_until_stopped(runtime: Runtime, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then drain (realtime/lifecycle.py): refuse new sessions, let replies in
    flight finish for up to `server.shutdown_grace_seconds`, close the rest with 1001, and return, so the
    process exits 0. A second signal cuts the grace period short."""
    from duet.front_ends import stop_signals, watch_supervisor
    from realtime import metrics, transcripts
    from realtime.bus import mqtt as mqtt_bus
    from realtime.transports.websocket import DuetServer

    server = DuetServer(runtime)
    lifecycle = server.lifecycle

    def on_signal() -> None:
        if lifecycle.draining:
            lifecycle.grace_seconds = 0.0  # asked twice: stop waiting for replies
        lifecycle.request_stop()

    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, on_signal)
    watcher = asyncio.create_task(watch_supervisor(lifecycle.request_stop))  # returns at once if unsupervised
    await server.start(host, port)
    if runtime.config.server.metrics_port:
        metrics.serve_port(metrics.attach(runtime), host, runtime.config.server.metrics_port)
    url = f"{server.scheme}://{host}:{server.port}/v1/realtime"
    # A wildcard address is no place to send a client: presence names this host (or mqtt.url where set).
    bus = await mqtt_bus.start(runtime, url.replace(f"//{host}:", f"//{socket.getfqdn()}:")
                               if host in ("0.0.0.0", "::", "") else url)  # None unless [mqtt] enabled
    print(f"listening on {url}", flush=True)
    await lifecycle.stopped()
    if bus is not None:
        bus.set_status("draining")  # routers stop sending new clients here at once
    try:
        await lifecycle.drain()  # while the port still answers: /readyz 503, new sessions 503
    finally:
        await server.close()  # closes the sessions left with 1001 (going away)
        if bus is not None:
            await bus.close()  # presence "offline" (a clean disconnect sends no last will)
        log_ = transcripts.attach(runtime)
        if log_ is not None:
            await asyncio.to_thread(log_.close)  # every finished turn on disk before exit
        watcher.cancel()
    print("stopped", flush=True)


def _engine(args: argparse.Namespace) -> int:
    """`duet engine`: the configured engine alone, for `duet serve` front-ends with `llm.backend = "remote"`."""
    from aiohttp import web
    from prometheus_client import generate_latest

    from brains.backends.engine_server import EngineServer, serve
    from brains.load import load_engine
    from duet.front_ends import stop_signals, watch_supervisor
    from realtime import metrics
    from realtime.transports.auth import is_loopback

    signals = stop_signals()  # a supervised engine stops only on its supervisor's signal, from before the model loads
    config = load_config(args.config, args.set)
    if config.llm.backend == "remote":
        print("duet engine: llm.backend is \"remote\": this process would only forward; give it the engine's "
              "config (torch or vllm)", file=sys.stderr)
        return 2
    key = os.environ.get("DUET_LLM_API_KEY", "")
    if not key and not is_loopback(args.host):
        print(f"duet engine: refusing to serve {args.host} without a key: set DUET_LLM_API_KEY (the front-ends "
              "send it too) or listen on loopback", file=sys.stderr)
        return 2
    sys.setswitchinterval(config.server.gil_switch_interval_ms / 1000)  # the engine thread beside the loop
    engine, _ = load_engine(config)
    engine.start()
    settle_process(config.server)  # the loaded weights out of the collector's walks, as in duet serve
    name = args.served_model_name or Path(config.llm.model).name

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(watch_supervisor(stop.set))  # returns at once if unsupervised
        server = EngineServer(engine, name, api_key=key)
        registry = metrics.engine_registry(engine)  # the same duet_engine_* names as duet serve's /metrics

        async def scrape(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": metrics.CONTENT_TYPE})

        server.app.router.add_get("/metrics", scrape)
        runner = await serve(server, args.host, args.port, reuse_port=config.server.reuse_port)
        port = runner.addresses[0][1]  # the port taken, where --port 0 asked for any
        print(f"serving engine {name} on http://{args.host}:{port}/v1", flush=True)
        try:
            await stop.wait()
        finally:
            watcher.cancel()
            await runner.cleanup()

    try:
        asyncio.run(run())
    finally:
        engine.close()
    print("stopped", flush=True)
    return 0


def _quiet_libraries() -> None:
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)


def _talk(args: argparse.Namespace) -> int:
    from clients.talk import talk

    result = asyncio.run(talk(args.wav, args.url, out=args.out, pacing=args.pacing, tail_s=args.tail,
                              timeout_s=args.timeout))
    print(json.dumps(result, indent=2))
    return 0 if result.get("reply_transcript") else 1


def _mic(args: argparse.Namespace) -> int:
    from clients.mic import MicOptions, run_mic

    return run_mic(MicOptions(url=args.url, pacing=args.pacing, partials_ms=args.partials, seconds=args.seconds,
                              turns=args.turns))


def _route(args: argparse.Namespace) -> int:
    from realtime.bus.router import Router, RouterOptions

    config = load_config(args.config, args.set)
    options = RouterOptions(stale_after_s=args.stale_after, haproxy_config=args.haproxy_config or "",
                            haproxy_bind=args.haproxy_bind, haproxy_cert=args.haproxy_cert or "",
                            reload_command=args.reload_cmd or "")

    async def run() -> int:
        router = await Router(config.mqtt, options).start()
        try:
            if args.once:  # render the proxy's file from the retained presence, and stop
                try:
                    async with asyncio.timeout(10):
                        await router.connected.wait()
                except TimeoutError:
                    print(f"duet route: no broker at {config.mqtt.host}:{config.mqtt.port}", file=sys.stderr)
                    return 1
                await asyncio.sleep(options.settle_s)
                await router.write_proxy_config(Path(args.haproxy_config))
                print(f"{args.haproxy_config}: {len(router.registry.live())} servers", flush=True)
                return 0
            port = await router.serve(args.host, args.port)
            print(f"routing on http://{args.host}:{port}/v1/realtime/route", flush=True)
            await asyncio.Future()
        finally:
            await router.close()
        return 0

    if args.once and not args.haproxy_config:
        print("duet route: --once needs --haproxy-config", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run())
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from brains.backends.export import export_hf

    config = load_config(args.config, args.set)
    out = export_hf(args.out, config.llm)
    print(f"exported {config.llm.model} to {out} (load it with llm.model = \"{out}\")")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the realtime WebSocket server")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="TOML config file")
    serve.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set mind.mode='\"tbs\"'")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--tls-cert", default=None, metavar="PEM", help="serve https/wss with this certificate "
                       "(server.tls_cert_file); API keys come from DUET_API_KEYS or [auth] api_keys")
    serve.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key "
                       "(server.tls_key_file)")
    serve.add_argument("--log-format", default=None, choices=["text", "json"],
                       help="log records as text lines or one JSON object each (default: server.log_format)")
    serve.set_defaults(func=_serve)

    engine = sub.add_parser("engine", help="serve the configured engine alone to `duet serve` front-ends "
                                           "(llm.backend = \"remote\"; docs/gpu.md)")
    engine.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="TOML config file ([llm], [mind])")
    engine.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set llm.max_slots=256")
    engine.add_argument("--host", default="127.0.0.1")
    engine.add_argument("--port", type=int, default=8000, help="the front-ends' llm.remote_url port")
    engine.add_argument("--served-model-name", default="", help="the model's name in /v1/models "
                        "(default: the last part of llm.model)")
    engine.set_defaults(func=_engine)

    talk = sub.add_parser("talk", help="speak a WAV file to a server and save the spoken reply")
    talk.add_argument("--wav", required=True, help="the question, any WAV (resampled to 24 kHz)")
    talk.add_argument("--out", default=None, help="save the reply audio here (WAV)")
    talk.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime")
    talk.add_argument("--pacing", default=None, choices=["nothink", "speak-first", "think-first", "tbs"])
    talk.add_argument("--tail", type=float, default=1.5, help="seconds of silence streamed after the WAV")
    talk.add_argument("--timeout", type=float, default=60.0)
    talk.set_defaults(func=_talk)

    mic = sub.add_parser("mic", help="talk to a server with your microphone: live transcript, reasoning, latency")
    mic.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime")
    mic.add_argument("--pacing", default=None, choices=["nothink", "speak-first", "think-first", "tbs"])
    mic.add_argument("--partials", type=int, default=None, metavar="MS",
                     help="ask for partial transcripts every MS ms while you speak (Duet; 0 = off)")
    mic.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    mic.add_argument("--turns", type=int, default=None, help="stop after this many replies")
    mic.set_defaults(func=_mic)

    route = sub.add_parser("route", help="send new connections to the least-loaded of the servers on an MQTT "
                                         "broker (docs/scale-out.md)")
    route.add_argument("--config", default=None, help="TOML config whose [mqtt] names the broker")
    route.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set mqtt.host='\"broker\"'")
    route.add_argument("--host", default="127.0.0.1")
    route.add_argument("--port", type=int, default=8780)
    route.add_argument("--stale-after", type=float, default=30.0, metavar="S",
                       help="forget a server not heard from for S seconds (3 presence intervals)")
    route.add_argument("--haproxy-config", default=None, metavar="PATH",
                       help="keep an HAProxy configuration of the live servers here (leastconn)")
    route.add_argument("--haproxy-bind", default=":8765", help="the HAProxy frontend's bind address")
    route.add_argument("--haproxy-cert", default=None, metavar="PEM", help="HAProxy terminates TLS with this")
    route.add_argument("--reload-cmd", default=None, metavar="CMD",
                       help="run after each rewrite of the HAProxy file, e.g. 'systemctl reload haproxy'")
    route.add_argument("--once", action="store_true", help="write the HAProxy file once and exit")
    route.set_defaults(func=_route)

    export = sub.add_parser("export-hf", help="write the LLM (default: the bundled SmolLM2 GGUF) as a Hugging Face "
                                              "safetensors folder, e.g. for the vLLM backend")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--config", default=None, help="TOML config whose [llm] model/dtype to export")
    export.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set llm.dtype='\"bfloat16\"'")
    export.set_defaults(func=_export_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    _quiet_libraries()
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"duet: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
