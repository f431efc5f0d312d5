"""`viper-web` (and `python -m viper_web`, which `viper web` runs): the gateway and its page on one port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn

from viper_client.channel import is_loopback
from viper_client.telemetry import LOG_FORMATS, TEXT_FORMAT, configure_log_format, tracer_provider_from_env

from . import tracing
from .app import Gateway, Settings
from .backends import Backends, parse_targets, tls_credentials
from .http11 import h11_protocol
from .jsonlimits import JsonLimits

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
    _add_limit_flags(parser)
    _add_backend_tls_flags(parser)
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


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What one request may cost the gateway: body sizes, JSON counts, time, connections."""
    env = os.environ.get
    limits = JsonLimits()
    flags = [
        ("--max-body-bytes", "VIPER_WEB_MAX_BODY_BYTES", int, None,
         "largest request body of the calls that carry images, ExtractProfile and Score (default: 4/3 of "
         "--max-message-bytes, for base64 in JSON, plus 1 MiB)"),
        ("--max-small-body-bytes", "VIPER_WEB_MAX_SMALL_BODY_BYTES", int, MiB,
         "largest request body of every other call (default 1 MiB)"),
        ("--max-json-values", "VIPER_WEB_MAX_JSON_VALUES", int, limits.max_values,
         "most values in one JSON request, counted before it is parsed (default %(default)s)"),
        ("--max-json-depth", "VIPER_WEB_MAX_JSON_DEPTH", int, limits.max_depth,
         "deepest nesting of a JSON request (default %(default)s)"),
        ("--max-json-array", "VIPER_WEB_MAX_JSON_ARRAY", int, limits.max_array,
         "most elements of one JSON array (default %(default)s)"),
        ("--max-json-string-chars", "VIPER_WEB_MAX_JSON_STRING_CHARS", int, limits.max_string_chars,
         "longest JSON string of a text field, or key (default %(default)s; image bytes: the body limit)"),
        ("--max-buffered-bytes", "VIPER_WEB_MAX_BUFFERED_BYTES", int, 512 * MiB,
         "request bytes held at once over all calls while their bodies are read and decoded; past it new "
         "bodies are refused (default 512 MiB)"),
        ("--body-timeout", "VIPER_WEB_BODY_TIMEOUT", float, 60.0,
         "seconds a request's whole body may take to arrive (default %(default)s)"),
        ("--header-timeout", "VIPER_WEB_HEADER_TIMEOUT", float, 10.0,
         "seconds a request's headers may take to arrive, on a new or a kept-alive connection "
         "(default %(default)s)"),
        ("--keep-alive-timeout", "VIPER_WEB_KEEP_ALIVE_TIMEOUT", int, 5,
         "seconds an idle connection stays open between requests (default %(default)s)"),
        ("--limit-concurrency", "VIPER_WEB_LIMIT_CONCURRENCY", int, 256,
         "most open connections or requests; past it new requests get 503 (default %(default)s)"),
    ]
    for flag, var, kind, default, text in flags:
        value = env(var)
        parser.add_argument(flag, type=kind, default=default if value is None else kind(value),
                            help=f"{text} (env {var})")
    parser.add_argument(
        "--require-auth", action="store_true", default=env("VIPER_WEB_REQUIRE_AUTH", "") in ("1", "true", "yes"),
        help="refuse calls without an authorization header before reading their body (env "
             "VIPER_WEB_REQUIRE_AUTH=1). Without it the gateway learns this per method from the back end's "
             "first UNAUTHENTICATED answer to such a call",
    )


def _add_backend_tls_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--backend-tls", action="store_true", default=bool(env("VIPER_WEB_BACKEND_TLS")),
                        help="reach the back ends over TLS, verifying them (implied by the three flags below; "
                             "env VIPER_WEB_BACKEND_TLS=1; default: plaintext)")
    for flag, var, text in [
        ("--backend-ca", "VIPER_WEB_BACKEND_CA", "CA certificate (PEM) that verifies the back ends "
                                                 "(default: the system's roots)"),
        ("--backend-cert", "VIPER_WEB_BACKEND_CERT", "client certificate (PEM) for mutual TLS, with "
                                                     "--backend-key (default: none)"),
        ("--backend-key", "VIPER_WEB_BACKEND_KEY", "private key (PEM) of --backend-cert (default: none)"),
    ]:
        parser.add_argument(flag, type=Path, default=env(var), metavar="PEM", help=f"{text} (env {var})")


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace, origins: list[str]) -> Settings:
    for name in ("max_small_body_bytes", "max_json_values", "max_json_depth", "max_json_array",
                 "max_json_string_chars", "limit_concurrency", "max_buffered_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: at least 1")
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        parser.error("--max-body-bytes: at least 1024")
    for name in ("body_timeout", "header_timeout", "keep_alive_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')}: more than 0")
    limits = JsonLimits(max_values=args.max_json_values, max_depth=args.max_json_depth,
                        max_array=args.max_json_array, max_string_chars=args.max_json_string_chars)
    return Settings(max_message_bytes=args.max_message_bytes, allow_origins=frozenset(origins),
                    max_body_bytes=args.max_body_bytes, max_small_body_bytes=args.max_small_body_bytes,
                    json_limits=limits, body_timeout=args.body_timeout, require_auth=args.require_auth,
                    max_buffered_bytes=args.max_buffered_bytes)


def _backend_credentials(parser: argparse.ArgumentParser, args: argparse.Namespace):
    if not (args.backend_tls or args.backend_ca or args.backend_cert or args.backend_key):
        return None
    try:
        return tls_credentials(args.backend_ca, args.backend_cert, args.backend_key)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))


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
    settings = _settings(parser, args, origins)
    credentials = _backend_credentials(parser, args)
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
    app = Gateway(Backends(targets, args.max_message_bytes, credentials), settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("viper-web listening on http://%s:%d, back ends %s%s", host, port, ", ".join(targets),
             " (TLS)" if credentials is not None else "")
    remote = [target for target in targets if not is_loopback(target)]
    if remote and credentials is None:
        log.warning("back ends %s are reached in plaintext: callers' tokens cross the network in cleartext "
                    "(--backend-tls)", ", ".join(remote))
    config = uvicorn.Config(
        app, lifespan="on", access_log=False, log_config=None, log_level=args.log_level,
        # Streams still open then (a generation) are cancelled, and with them their back-end calls.
        timeout_graceful_shutdown=5,
        http=h11_protocol(args.header_timeout), ws="none",
        limit_concurrency=args.limit_concurrency, timeout_keep_alive=args.keep_alive_timeout,
    )
    try:
        asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))
    finally:
        tracing.shutdown()  # sends the spans still buffered
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=256)
