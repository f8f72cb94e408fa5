"""`duet`: serve the realtime API, or talk to a server from a WAV file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys

from common.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def _serve(args: argparse.Namespace) -> int:
    from realtime.runtime import Runtime
    from realtime.transports.websocket import serve_forever

    config = load_config(args.config, args.set)
    print(f"loading models ({config.llm.model} on {config.llm.device}, whisper {config.asr.model}, "
          f"pacing {config.mind.mode})...", flush=True)
    runtime = Runtime.load(config)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever(runtime, host, port))
    finally:
        runtime.close()
    return 0


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
    serve.set_defaults(func=_serve)

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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"duet: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
