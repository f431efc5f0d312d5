"""`viper-web` (and `python -m viper_web`, which `viper web` runs): the gateway and its page on one port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

import uvicorn

from viper_client.telemetry import LOG_FORMATS, TEXT_FORMAT, configure_log_format, tracer_provider_from_env

from . import tracing
from .app import Gateway, Settings
from .backends import Backends, parse_targets

log = logging.getLogger("viper_web")

DEFAULT_BACKEND = "127.0.0.1:50051"
MiB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="viper web",
        description="Serves the viper.v1 API over Connect (JSON and binary) and gRPC-Web, forwarding each call "
                    "to viper-serve's gRPC server, and the ViPer web page at /.",
    )
    parser.add_argument(
        "--backend", action="append", metavar="HOST:PORT",
        help="a gRPC back end; repeat the flag or separate with commas for several replicas, among which each "
             f"user sticks to one (env VIPER_WEB_BACKENDS; default {DEFAULT_BACKEND})",
    )
    parser.add_argument("--host", default=env("VIPER_WEB_HOST", "127.0.0.1"),
                        help="address to listen on (env VIPER_WEB_HOST; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(env("VIPER_WEB_PORT", "8080")),
                        help="port to listen on, 0 for any free one (env VIPER_WEB_PORT; default %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=int(env("VIPER_WEB_MAX_MESSAGE_BYTES", 64 * MiB)),
                        help="largest request or response message (env VIPER_WEB_MAX_MESSAGE_BYTES; default 64 MiB)")
    parser.add_argument(
        "--allow-origin", action="append", metavar="ORIGIN",
        help="let pages of this origin (e.g. https://app.example.com, or *) call the API from the browser (CORS); "
             "repeatable (env VIPER_WEB_ALLOW_ORIGINS, comma-separated). The gateway's own page needs none.",
    )
    parser.add_argument("--log-level", default=env("VIPER_WEB_LOG_LEVEL", "info"),
                        choices=("debug", "info", "warning", "error"), help="(env VIPER_WEB_LOG_LEVEL)")
    parser.add_argument("--log-format", default=env("VIPER_WEB_LOG_FORMAT", "text"), choices=LOG_FORMATS,
                        help="text, or json: one object a line for log pipelines (env VIPER_WEB_LOG_FORMAT; "
                             "default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.backend or [os.environ.get("VIPER_WEB_BACKENDS", DEFAULT_BACKEND)])
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port}: expected 0-65535")
    if args.max_message_bytes < 1024:
        parser.error("--max-message-bytes: at least 1024")
    origins = args.allow_origin or [o for o in os.environ.get("VIPER_WEB_ALLOW_ORIGINS", "").split(",") if o]
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=TEXT_FORMAT)
    configure_log_format(args.log_format)
    try:  # traces: the standard OTEL_* variables (OTEL_TRACES_EXPORTER=otlp|console; off by default)
        tracing.configure(tracer_provider_from_env("viper-web"))
    except ValueError as exc:
        print(f"viper web: error: {exc}", file=sys.stderr)
        return 2

    try:
        sock = _listen(args.host, args.port)
    except OSError as exc:
        print(f"viper web: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    settings = Settings(max_message_bytes=args.max_message_bytes, allow_origins=frozenset(origins))
    app = Gateway(Backends(targets, args.max_message_bytes), settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("viper-web listening on http://%s:%d, back ends %s", host, port, ", ".join(targets))
    config = uvicorn.Config(
        app, lifespan="on", access_log=False, log_config=None, log_level=args.log_level,
        # Streams still open then (a generation) are cancelled, and with them their back-end calls.
        timeout_graceful_shutdown=5,
    )
    try:
        asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))
    finally:
        tracing.shutdown()  # sends the spans still buffered
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=256)
