"""Assembles the server (store, engine, application, gRPC) and runs it until SIGTERM / SIGINT.

Lifecycle: open the store, start listening with health NOT_SERVING, load the
models off the event loop, then report SERVING. On the first signal: report
NOT_SERVING, stop accepting calls and give in-flight ones the grace period;
a second signal stops at once. The store is closed last.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from viper_client.telemetry import tracer_provider_from_env
from viper_profiles import StoreUnavailable, open_store
from viper_proto.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    metric_pb2,
    metric_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)

from . import tracing
from .application import ViperService
from .audit import JsonLinesAudit
from .config import BUILT_MODELS_ROOT, ServerConfig
from .engine.engine import ModelEngine
from .engine.loading import LoadSettings
from .engine.preprocessing import Preprocessor, available_cores, default_workers
from .engine.presets import model_preset
from .imaging import limit_concurrent_decodes
from .observability import Telemetry
from .rpc.auth import Authenticator, token_file_services
from .rpc.auth_config import AuthConfig, load_auth_config
from .rpc.convert import PageTokens
from .rpc.interceptor import RpcInterceptor
from .rpc.limits import RequestLimit
from .rpc.servicers import GenerationServicer, MetricServicer, ProfileServicer
from .rpc.validation import MAX_FEATURES

log = logging.getLogger(__name__)

# How often health asks the profile store whether it answers, and how long it waits for the answer.
DATABASE_CHECK_SECONDS = 2.0
DATABASE_CHECK_TIMEOUT = 1.0

SERVICE_NAMES = (
    profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name,
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    metric_pb2.DESCRIPTOR.services_by_name["MetricService"].full_name,
)


class ViperServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.telemetry = Telemetry()
        check_secret_files(config)
        limit_concurrent_decodes(config.max_concurrent_decodes)
        self.store = open_store(config.db, keep_versions=config.keep_versions)
        workers = preprocess_workers(config)
        self.engine = ModelEngine(
            model_preset(config.models, config.models_dir, BUILT_MODELS_ROOT),
            load_settings(config),
            max_queue=config.max_queue,
            max_image_pixels=config.limits.max_image_pixels,
            observer=self.telemetry,
            preprocessor=Preprocessor(workers, max_pixels=config.limits.max_image_pixels,
                                      cache_bytes=config.processed_cache_bytes),
        )
        self.telemetry.watch(self.engine, self.store)
        # Traced: the store's reads and writes become spans (only while tracing is on).
        service = ViperService(tracing.Traced(self.store, "store") if tracing.enabled() else self.store, self.engine,
                               max_profile_images=config.limits.max_profile_images)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._database_ok = True
        self._watching: asyncio.Task | None = None
        self.audit = JsonLinesAudit(config.audit_log) if config.audit_log else None
        self._server = grpc.aio.server(
            interceptors=[RpcInterceptor(self.telemetry, authenticator(config), self.audit, request_limits(config),
                                         config.max_call_seconds)],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # Bind exclusively: with SO_REUSEPORT a second server on a busy port would start and share it.
                ("grpc.so_reuseport", 0),
                *connection_options(config),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(
            ProfileServicer(service, config.limits, PageTokens(page_token_key(config)), config.max_message_bytes),
            self._server
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(service, config.limits, config.max_message_bytes), self._server
        )
        metric_pb2_grpc.add_MetricServiceServicer_to_server(MetricServicer(service, config.limits), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if config.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )

    async def start(self) -> int:
        """Starts listening (NOT_SERVING until the models are loaded); returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = server_credentials(self.config)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(self.config.address)
            else:
                self.port = self._server.add_secure_port(self.config.address, credentials)
        except RuntimeError as exc:  # grpc's way of saying the address cannot be bound
            raise OSError(f"cannot listen on {self.config.address}: in use by another process, or not "
                          f"an address of this machine ({exc})") from None
        await self._server.start()
        self._watching = asyncio.create_task(self._watch_database())
        log.info("viper-serve listening on %s:%d (models=%s, tls=%s, auth=%s)", self.config.host, self.port,
                 self.config.models, credentials is not None,
                 self.config.auth_tokens is not None or self.config.auth_config is not None)
        if self.config.metrics_port:
            metrics_port = self.telemetry.serve(self.config.metrics_port, self.config.metrics_host)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, metrics_port)
        return self.port

    async def load_models(self) -> None:
        await asyncio.to_thread(self.engine.load)
        await self._update_health()
        log.info("viper-serve ready")

    async def drain(self, grace: float | None) -> None:
        """Reports NOT_SERVING, refuses new calls, waits up to grace seconds for in-flight ones."""
        await self.health.enter_graceful_shutdown()  # health stays NOT_SERVING from here on
        await self._server.stop(grace)

    async def stop_now(self) -> None:
        """Cancels whatever is still in flight."""
        await self._server.stop(0)

    def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
        self.engine.close()
        self.store.close()
        if self.audit is not None:
            self.audit.close()
        log.info("viper-serve stopped")

    async def _watch_database(self) -> None:
        """Keeps health NOT_SERVING while the profile store does not answer (a PostgreSQL restart, say)."""
        while True:
            try:
                await asyncio.to_thread(self.store.ping, timeout=DATABASE_CHECK_TIMEOUT)
                database_ok = True
            except StoreUnavailable as exc:
                database_ok = False
                if self._database_ok:
                    log.warning("profile store unreachable: %s", exc)
            if database_ok and not self._database_ok:
                log.info("profile store reachable again")
            self._database_ok = database_ok
            await self._update_health()
            await asyncio.sleep(DATABASE_CHECK_SECONDS)

    async def _update_health(self) -> None:
        serving = self.engine.ready and self._database_ok
        await self._set_health(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)


def load_settings(config: ServerConfig) -> LoadSettings:
    return LoadSettings(
        device=config.device,
        torch_threads=torch_threads(config),
        idefics2_dtype=config.idefics2_dtype,
        vpe_max_new_tokens=config.vpe_max_new_tokens,
        cpu_offload=config.cpu_offload,
        vae_tiling=config.vae_tiling,
        metric_cache=config.metric_cache,
        metric_cache_bytes=config.metric_cache_bytes,
        metric_batch_size=config.metric_batch_size,
        metric_max_pairs=config.metric_max_pairs,
        vision_cache_bytes=config.vision_cache_bytes,
        extract_batch=config.extract_batch,
        generate_batch=config.generate_batch,
        score_batch=config.score_batch,
        scheduling_policy=config.scheduling_policy,
        prefill_images=config.prefill_images,
        prefill_tokens=config.prefill_tokens,
        query_step_tokens=config.query_step_tokens,
        stream_buffer=config.stream_buffer,
    )


def torch_threads(config: ServerConfig, environ: Mapping[str, str] = os.environ) -> int:
    """The models' CPU threads: the flag's; else 0 (torch's default, which reads it) with OMP_NUM_THREADS set;
    else the cores the preprocessing workers leave (at least 1)."""
    if config.torch_threads is not None:
        return config.torch_threads
    if environ.get("OMP_NUM_THREADS"):
        return 0
    return max(1, available_cores() - preprocess_workers(config))


def preprocess_workers(config: ServerConfig) -> int:
    """The preprocessing worker processes: the flag's, else default_workers()."""
    return default_workers() if config.preprocess_workers is None else config.preprocess_workers


def authenticator(config: ServerConfig) -> Authenticator | None:
    """The credentials of --auth-config and --auth-tokens together; None when neither is set (no auth)."""
    if config.auth_config is None and config.auth_tokens is None:
        return None
    auth = load_auth_config(config.auth_config) if config.auth_config else AuthConfig()
    if config.auth_tokens:
        auth = AuthConfig(services=(*auth.services, *token_file_services(config.auth_tokens)), issuers=auth.issuers)
    return Authenticator(auth)


def request_limits(config: ServerConfig) -> dict[str, RequestLimit]:
    """Each method's request size limit (checked on the raw bytes before parsing), within max_message_bytes."""
    profile = f"/{SERVICE_NAMES[0]}/"
    by_method = {
        f"{profile}ExtractProfile": ("--max-extract-bytes", config.max_extract_bytes),
        **{f"{profile}{method}": ("--max-profile-call-bytes", config.max_profile_call_bytes)
           for method in ("GetProfile", "ListProfiles", "UpdateProfile", "DeleteProfile")},
        f"/{SERVICE_NAMES[1]}/Generate": ("--max-generate-bytes", config.max_generate_bytes),
        f"/{SERVICE_NAMES[2]}/Score": ("--max-score-bytes", config.max_score_bytes),
    }
    return {method: RequestLimit(min(limit, config.max_message_bytes), flag, *field_limit(method, config))
            for method, (flag, limit) in by_method.items()}


def field_limit(method: str, config: ServerConfig) -> tuple[int, str]:
    """A method's cap on top-level fields, counted on the raw bytes (rpc.wire): four times what its repeated
    fields may hold, plus room for the rest, so only a request far beyond its limits is refused unparsed."""
    limits = config.limits
    if method.endswith("/ExtractProfile"):
        return 4 * limits.max_images + 16, f"images: at most {limits.max_images} (--max-images)"
    if method.endswith("/Score"):
        return (4 * 3 * limits.max_score_queries + 16,
                f"queries, liked, disliked: at most {limits.max_score_queries} each (--max-score-queries)")
    if method.endswith("/UpdateProfile"):
        return 4 * 2 * MAX_FEATURES + 16, f"at most {MAX_FEATURES} features a list"
    return 64, "a few fields"


def check_secret_files(config: ServerConfig) -> None:
    """Warns about a secret file that group or others may read (refusing it would break Kubernetes secret
    volumes, 0644 unless defaultMode says otherwise); says which file and flag, never what it holds."""
    secrets = {"--auth-tokens": config.auth_tokens, "--tls-key": config.tls_key,
               "--page-token-key": config.page_token_key}
    for flag, path in secrets.items():
        if path is not None and path.exists() and path.stat().st_mode & 0o077:
            log.warning("%s file %s is readable by group or others (mode %o): chmod 600 it", flag, path,
                        path.stat().st_mode & 0o777)


def read_secret(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if not secret:
        raise ValueError(f"{path} is empty: a secret is needed")
    return secret


def page_token_key(config: ServerConfig) -> bytes:
    """The key signing ListProfiles page tokens: --page-token-key's file, else one derived from the database URL
    (its password included), so every replica on one database accepts the others' tokens."""
    secret = read_secret(config.page_token_key) if config.page_token_key else config.db.encode()
    return hashlib.sha256(b"viper-serve page tokens\0" + secret).digest()


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's connection lifetime options, in milliseconds; a 0 setting leaves gRPC's default (no limit)."""
    options = [("grpc.max_connection_idle_ms", config.max_connection_idle),
               ("grpc.max_connection_age_ms", config.max_connection_age)]
    return [(name, int(seconds * 1000)) for name, seconds in options if seconds > 0] + [
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace * 1000))]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files; with a client CA, client certificates are required."""
    if config.tls_cert is None:
        return None
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def serve(config: ServerConfig) -> None:
    """Runs the server until SIGTERM / SIGINT, then drains it."""
    tracing.configure(tracer_provider_from_env("viper-server"))  # OTEL_TRACES_EXPORTER; off by default
    try:
        await _serve(config)
    finally:
        tracing.shutdown()  # sends the spans still buffered


async def _serve(config: ServerConfig) -> None:
    server = ViperServer(config)
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)

    if server.audit is not None:  # logrotate's postrotate: kill -HUP
        loop.add_signal_handler(signal.SIGHUP, server.audit.reopen)
    await server.start()
    loading = asyncio.create_task(server.load_models())
    first = asyncio.create_task(signals.get())
    await asyncio.wait({loading, first}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        first.cancel()
        await server.stop_now()
        server.close()
        raise loading.exception()
    sig = await first
    log.info("received %s: draining for up to %.0f s (signal again to stop now)", sig.name, config.grace_period)
    draining = asyncio.create_task(server.drain(config.grace_period))
    second = asyncio.create_task(signals.get())
    await asyncio.wait({draining, second}, return_when=asyncio.FIRST_COMPLETED)
    if not draining.done():
        log.info("second signal: stopping now")
        await server.stop_now()
        await draining
    second.cancel()
    server.close()
