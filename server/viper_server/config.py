"""Server configuration: one dataclass, filled from flags with env-var fallbacks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viper_client.telemetry import LOG_FORMATS
from viper_profiles import DB_ENV, DEFAULT_DB

from .engine.policy import POLICY_NAMES
from .engine.presets import PRESET_NAMES

MiB = 1024 * 1024
IDEFICS2_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Limits:
    """What a request may carry. Violations are INVALID_ARGUMENT."""

    max_images: int = 64
    max_comment_chars: int = 4000
    # Checked from the image header before decoding: stops decompression bombs.
    max_image_pixels: int = 36_000_000
    # The pixels of all of a request's images together, from their headers: 16 images at the largest size.
    max_request_pixels: int = 576_000_000
    max_generate_images: int = 8
    min_generate_size: int = 64
    max_generate_size: int = 2048
    max_steps: int = 150
    max_score_queries: int = 64
    # Images one profile holds (AddRatings): what fits the real VPE's prompt budget (README "Profile history").
    max_profile_images: int = 100
    # Best of N: candidates generated and ranked per Generate call.
    max_candidates: int = 16


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # The profile store: a SQLite file path (or sqlite:///path), or postgresql://user:password@host/db.
    db: str = DEFAULT_DB
    models: str = "toy"
    # viper: a folder holding local copies of the model repos; unset = the HF cache.
    # toy / tiny: where the checkpoints are installed or built; unset = var/models/toy or var/models/tiny.
    models_dir: Path | None = None
    device: str = "auto"
    # auto = bfloat16 on CUDA, float32 elsewhere (the reference runs IDEFICS2 in float32).
    idefics2_dtype: str = "auto"
    max_message_bytes: int = 64 * MiB
    # Request bytes per method, checked before the message is parsed (RESOURCE_EXHAUSTED beyond): what the
    # largest valid request of each needs, within max_message_bytes.
    max_extract_bytes: int = 64 * MiB
    max_score_bytes: int = 32 * MiB
    max_generate_bytes: int = 8 * MiB
    max_profile_call_bytes: int = 1 * MiB
    # Calls in flight at once (more are RESOURCE_EXHAUSTED), and connection lifetimes in seconds (0 = none).
    max_concurrent_rpcs: int = 128
    max_connection_idle: float = 300.0
    max_connection_age: float = 1800.0
    max_connection_age_grace: float = 300.0
    # Model jobs waiting per model before RESOURCE_EXHAUSTED.
    max_queue: int = 16
    # Images this process decodes at once (each is shrunk to the models' size as it is decoded).
    max_concurrent_decodes: int = 2
    # Processes that decode and process images (engine.preprocessing); 0 = in the server's own threads;
    # unset = half the cores, at most 8.
    preprocess_workers: int | None = None
    # Threads of the models' CPU work (torch intra-op); unset = OMP_NUM_THREADS if set, else the cores the
    # preprocessing workers leave: more threads than free cores stall every parallel op on a busy core.
    torch_threads: int | None = None
    # Bytes of processed images kept, by content (the image's sha256 and the processor's settings); 0 = none.
    processed_cache_bytes: int = 256 * MiB
    # Tokens the VPE may generate; unset = the preset's (2000 for viper, 64 for tiny).
    vpe_max_new_tokens: int | None = None
    # Seconds in-flight calls get to finish after SIGTERM.
    grace_period: float = 30.0
    # For GPUs too small to hold SDXL: move idle submodels to the CPU / decode in tiles.
    cpu_offload: bool = False
    vae_tiling: bool = False
    # Metric: reuse each user's context KV cache (off = the reference procedure, for cross-checks).
    metric_cache: bool = True
    metric_cache_bytes: int = 2 * 1024 * MiB
    metric_batch_size: int = 4
    metric_max_pairs: int = 8
    # IDEFICS2's image features (vision encoder + connector) per image, adapter and dtype; 0 = not cached.
    vision_cache_bytes: int = 1024 * MiB
    # The step schedulers (README "Scheduling"): requests of a kind running (and batched) at once per model,
    # who goes first, and how much of an extraction's prefill one step does.
    extract_batch: int = 8
    generate_batch: int = 4
    score_batch: int = 8
    scheduling_policy: str = "fair"
    prefill_images: int = 1
    prefill_tokens: int = 256
    query_step_tokens: int = 4096
    # Backpressure: unread events a streaming call may have before its work pauses between steps.
    stream_buffer: int = 8
    # Seconds a call without a client deadline may run (DEADLINE_EXCEEDED beyond; its work is cancelled).
    max_call_seconds: float = 900.0
    # Bearer tokens, one a line (`sha256:<hex>` or plain): services with "*" in the tenant "default".
    auth_tokens: Path | None = None
    # The auth configuration (TOML: [[services]] and [[issuers]]; README "Security"). Neither set = no auth.
    auth_config: Path | None = None
    # One JSON line per call (README "Security"); "-" = stderr; unset = no audit log.
    audit_log: str | None = None
    # Serving a non-loopback address without auth must be asked for explicitly.
    allow_unauthenticated: bool = False
    reflection: bool = True
    # TLS: certificate chain and key in PEM; with a client CA, clients must present a certificate (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # The secret signing ListProfiles page tokens (shared by replicas); unset = derived from the database URL.
    page_token_key: Path | None = None
    # Prometheus metrics over HTTP on this port of the same host; 0 = off.
    metrics_port: int = 0
    # Where the metrics port binds: loopback unless asked (a scraper elsewhere needs e.g. 0.0.0.0).
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    # text for a terminal; json: one object a line (time, level, logger, message, request and trace ids, ...).
    log_format: str = "text"
    # Versions of each profile the history keeps; unset = all of them.
    keep_versions: int | None = None
    limits: Limits = Limits()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# Where presets that the project builds itself (tiny) keep their checkpoints unless --models-dir says.
BUILT_MODELS_ROOT = Path("var/models")


def on_off(text: str) -> bool:
    """Parses a switch given as a flag value or env var: on/off, true/false, yes/no, 1/0."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"expected on or off, not {text!r}")


@dataclass(frozen=True)
class _Flag:
    env: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    # The default as --help shows it, where the field's own value would say less (None, True/False).
    shown_default: str | None = None


def _switch(env: str, help_text: str) -> _Flag:
    return _Flag(env, on_off, help_text + " (on/off)")


# flag -> how to read it. Flags override env vars, which override defaults.
_SERVE_FLAGS: dict[str, _Flag] = {
    "host": _Flag("VIPER_HOST", str, "address to bind"),
    "port": _Flag("VIPER_PORT", int, "port to bind; 0 picks a free one"),
    # The store's own CLI (viper-profiles) reads the same variable: the name lives in viper_profiles.
    "db": _Flag(DB_ENV, str, "profile store: a SQLite file path (or sqlite:///path) or a "
                "postgresql://user:password@host:port/database URL"),
    "models": _Flag("VIPER_MODELS", str, "tiny (random-weight test models), toy (small models trained on a toy "
                    "world of colours), viper (the real weights) or full-random (the real architectures at full "
                    "size with random weights, for benchmarks)",
                    choices=PRESET_NAMES),
    "models_dir": _Flag("VIPER_MODELS_DIR", Path, "folder of local model checkpoints",
                        shown_default="the HF cache for viper, var/models/NAME for tiny and toy"),
    "device": _Flag("VIPER_DEVICE", str, "auto, cpu, cuda or cuda:N"),
    "idefics2_dtype": _Flag("VIPER_IDEFICS2_DTYPE", str,
                            "IDEFICS2 precision: auto = bfloat16 on CUDA, float32 on CPU", choices=IDEFICS2_DTYPES),
    "max_message_bytes": _Flag("VIPER_MAX_MESSAGE_BYTES", int, "largest gRPC message accepted"),
    "max_extract_bytes": _Flag("VIPER_MAX_EXTRACT_BYTES", int, "largest ExtractProfile request, refused unparsed"),
    "max_score_bytes": _Flag("VIPER_MAX_SCORE_BYTES", int, "largest Score request, refused unparsed"),
    "max_generate_bytes": _Flag("VIPER_MAX_GENERATE_BYTES", int, "largest Generate request, refused unparsed"),
    "max_profile_call_bytes": _Flag("VIPER_MAX_PROFILE_CALL_BYTES", int,
                                    "largest Get/List/Update/DeleteProfile request, refused unparsed"),
    "max_concurrent_rpcs": _Flag("VIPER_MAX_CONCURRENT_RPCS", int, "calls in flight at once (health probes too)"),
    "max_connection_idle": _Flag("VIPER_MAX_CONNECTION_IDLE", float,
                                 "seconds a connection without calls stays open; 0 = no limit"),
    "max_connection_age": _Flag("VIPER_MAX_CONNECTION_AGE", float,
                                "seconds before a connection is asked to reconnect; 0 = no limit"),
    "max_connection_age_grace": _Flag("VIPER_MAX_CONNECTION_AGE_GRACE", float,
                                      "seconds an aged connection's calls get to finish"),
    "max_queue": _Flag("VIPER_MAX_QUEUE", int, "model jobs that may wait per model"),
    "max_concurrent_decodes": _Flag("VIPER_MAX_CONCURRENT_DECODES", int,
                                    "images decoded at once in the server's process (--preprocess-workers 0)"),
    "preprocess_workers": _Flag("VIPER_PREPROCESS_WORKERS", int,
                                "processes decoding and processing images for the models; 0 = in the server's "
                                "own threads", shown_default="half the cores, at most 8"),
    "torch_threads": _Flag("VIPER_TORCH_THREADS", int, "threads of the models' CPU work (torch intra-op)",
                           shown_default="OMP_NUM_THREADS if set, else the cores the preprocessing workers leave"),
    "processed_cache_bytes": _Flag("VIPER_PROCESSED_CACHE_BYTES", int,
                                   "bytes of processed images kept by content (sha256 and processor settings); "
                                   "0 = none"),
    "vpe_max_new_tokens": _Flag("VIPER_VPE_MAX_NEW_TOKENS", int, "tokens the preference extractor may generate",
                                shown_default="2000 for viper, 64 for tiny, 32 for toy"),
    "grace_period": _Flag("VIPER_GRACE_PERIOD", float, "seconds to finish in-flight calls on SIGTERM"),
    "cpu_offload": _switch("VIPER_CPU_OFFLOAD", "SDXL model CPU offload"),
    "vae_tiling": _switch("VIPER_VAE_TILING", "decode SDXL latents in tiles"),
    "metric_cache": _switch("VIPER_METRIC_CACHE", "per-user prefix cache for the metric"),
    "metric_cache_bytes": _Flag("VIPER_METRIC_CACHE_BYTES", int, "bytes of cached metric prefixes"),
    "metric_batch_size": _Flag("VIPER_METRIC_BATCH_SIZE", int, "queries scored per model call"),
    "metric_max_pairs": _Flag("VIPER_METRIC_MAX_PAIRS", int, "liked/disliked pairs in a metric context"),
    "vision_cache_bytes": _Flag("VIPER_VISION_CACHE_BYTES", int,
                                "bytes of cached image features (by image sha256, adapter, dtype); 0 = off"),
    "extract_batch": _Flag("VIPER_EXTRACT_BATCH", int, "extractions running at once, decoding in one forward pass"),
    "generate_batch": _Flag("VIPER_GENERATE_BATCH", int,
                            "generations running at once, and images in one UNet call (a request's images "
                            "side by side, others' of one size and stage with them)"),
    "score_batch": _Flag("VIPER_SCORE_BATCH", int,
                         "Score requests running at once; equally long contexts share each forward pass"),
    "scheduling_policy": _Flag("VIPER_SCHEDULING_POLICY", str,
                               "who takes the next step: fair (round robin between users, kinds in turn), "
                               "kinds (kinds in turn first) or fifo", choices=POLICY_NAMES),
    "prefill_images": _Flag("VIPER_PREFILL_IMAGES", int, "an extraction's images encoded per step"),
    "prefill_tokens": _Flag("VIPER_PREFILL_TOKENS", int, "an extraction's prompt tokens prefilled per step"),
    "query_step_tokens": _Flag("VIPER_QUERY_STEP_TOKENS", int,
                               "prompt tokens of the Score queries batched into one step (a query: ~90)"),
    "stream_buffer": _Flag("VIPER_STREAM_BUFFER", int,
                           "unread events a Generate or Score stream may have before its work pauses"),
    "max_call_seconds": _Flag("VIPER_MAX_CALL_SECONDS", float,
                              "seconds a call without a deadline may run (health Watch exempt); 0 = no limit"),
    "auth_tokens": _Flag("VIPER_AUTH_TOKENS", Path,
                         "file of accepted bearer tokens, one a line (sha256:<hex> or plain)",
                         shown_default="none: no auth, allowed on loopback only"),
    "auth_config": _Flag("VIPER_AUTH_CONFIG", Path,
                         "auth configuration (TOML): calling services with their permissions and tenants, and "
                         "identity providers whose end-user JWTs are accepted", shown_default="none"),
    "audit_log": _Flag("VIPER_AUDIT_LOG", str, "audit log, one JSON line per call (- = stderr; reopened on SIGHUP)",
                       shown_default="none"),
    "allow_unauthenticated": _switch("VIPER_ALLOW_UNAUTHENTICATED", "serve a non-loopback address without auth"),
    "reflection": _switch("VIPER_REFLECTION", "gRPC server reflection (behind auth when auth is on)"),
    "tls_cert": _Flag("VIPER_TLS_CERT", Path, "server certificate chain (PEM)", shown_default="none: no TLS"),
    "tls_key": _Flag("VIPER_TLS_KEY", Path, "server private key (PEM)", shown_default="none"),
    "tls_client_ca": _Flag("VIPER_TLS_CLIENT_CA", Path, "CA whose client certificates are required (mTLS)",
                           shown_default="none: no client certificates"),
    "page_token_key": _Flag("VIPER_PAGE_TOKEN_KEY", Path, "file holding the secret that signs ListProfiles page "
                            "tokens (the same on every replica)",
                            shown_default="derived from --db, the same on every replica of one database"),
    "metrics_port": _Flag("VIPER_METRICS_PORT", int, "Prometheus metrics port; 0 = off"),
    "metrics_host": _Flag("VIPER_METRICS_HOST", str, "address the metrics port binds (0.0.0.0 for a scraper "
                          "on another host)"),
    "log_level": _Flag("VIPER_LOG_LEVEL", str, "log verbosity (debug shows the libraries' warnings and progress)",
                       choices=LOG_LEVELS),
    "log_format": _Flag("VIPER_LOG_FORMAT", str, "log lines as text, or json: one object a line for log pipelines",
                        choices=LOG_FORMATS),
    "keep_versions": _Flag("VIPER_KEEP_VERSIONS", int, "versions of each profile the history keeps",
                           shown_default="unlimited"),
}
_LIMIT_FLAGS: dict[str, _Flag] = {
    "max_images": _Flag("VIPER_MAX_IMAGES", int, "images per extraction"),
    "max_comment_chars": _Flag("VIPER_MAX_COMMENT_CHARS", int, "characters per comment"),
    "max_image_pixels": _Flag("VIPER_MAX_IMAGE_PIXELS", int, "pixels per image (width x height)"),
    "max_request_pixels": _Flag("VIPER_MAX_REQUEST_PIXELS", int, "pixels of all a request's images together"),
    "max_generate_images": _Flag("VIPER_MAX_GENERATE_IMAGES", int, "images per Generate call"),
    "min_generate_size": _Flag("VIPER_MIN_GENERATE_SIZE", int, "smallest generated width / height"),
    "max_generate_size": _Flag("VIPER_MAX_GENERATE_SIZE", int, "largest generated width / height"),
    "max_steps": _Flag("VIPER_MAX_STEPS", int, "denoising steps per image"),
    "max_score_queries": _Flag("VIPER_MAX_SCORE_QUERIES", int, "query images per Score call"),
    "max_profile_images": _Flag("VIPER_MAX_PROFILE_IMAGES", int, "images one profile holds (AddRatings)"),
    "max_candidates": _Flag("VIPER_MAX_CANDIDATES", int, "candidates a Generate call may rank (best of N)"),
}


def _shown(flag: _Flag, default: object) -> str:
    if flag.shown_default is not None:
        return flag.shown_default
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    for flags, source in ((_SERVE_FLAGS, defaults), (_LIMIT_FLAGS, defaults.limits)):
        for name, flag in flags.items():
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                type=flag.parse,
                choices=flag.choices,
                default=None,
                metavar="on|off" if flag.parse is on_off else None,
                help=f"{flag.help} (env {flag.env}; default {_shown(flag, getattr(source, name))})",
            )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    def value(name: str, flag: _Flag, default: object) -> object:
        given = getattr(args, name, None)
        if given is not None:
            return given
        if flag.env in environ:
            return flag.parse(environ[flag.env])
        return default

    defaults = ServerConfig()
    limits = Limits(**{
        name: value(name, flag, getattr(defaults.limits, name)) for name, flag in _LIMIT_FLAGS.items()
    })
    config = ServerConfig(
        **{name: value(name, flag, getattr(defaults, name)) for name, flag in _SERVE_FLAGS.items()},
        limits=limits,
    )
    check_config(config)
    return config


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def check_config(config: ServerConfig) -> None:
    """Refuses settings that cannot work or would be unsafe; raises ValueError."""
    for name in ("extract_batch", "generate_batch", "score_batch", "prefill_images", "prefill_tokens",
                 "query_step_tokens", "max_concurrent_decodes", "max_concurrent_rpcs", "max_extract_bytes",
                 "max_score_bytes", "max_generate_bytes", "max_profile_call_bytes", "stream_buffer"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, not {getattr(config, name)}")
    for name in ("models", "idefics2_dtype", "log_level", "log_format", "scheduling_policy"):
        choices = _SERVE_FLAGS[name].choices
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be {' or '.join(choices)}, not {getattr(config, name)!r}")
    for name in ("max_connection_idle", "max_connection_age", "max_connection_age_grace", "max_call_seconds",
                 "vision_cache_bytes"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must not be negative, not {getattr(config, name)}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    for name in ("preprocess_workers", "processed_cache_bytes"):
        if (getattr(config, name) or 0) < 0:
            raise ValueError(f"{name} must not be negative, not {getattr(config, name)}")
    if config.torch_threads is not None and config.torch_threads < 1:
        raise ValueError(f"torch_threads must be at least 1, not {config.torch_threads}")
    if config.keep_versions is not None and config.keep_versions < 1:
        raise ValueError(f"keep_versions must be at least 1, not {config.keep_versions}")
    unauthenticated = config.auth_tokens is None and config.auth_config is None
    if not is_loopback(config.host) and unauthenticated and not config.allow_unauthenticated:
        raise ValueError(
            f"refusing to serve {config.host} without auth: pass --auth-config FILE or --auth-tokens FILE "
            "(or --allow-unauthenticated on if something in front of the server authenticates)"
        )
