"""Server configuration: one dataclass, filled from flags with env-var fallbacks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What a request may carry. Violations are INVALID_ARGUMENT."""

    max_images: int = 64
    max_comment_chars: int = 4000
    # Checked from the image header before decoding: stops decompression bombs.
    max_image_pixels: int = 36_000_000
    max_generate_images: int = 8
    min_generate_size: int = 64
    max_generate_size: int = 2048
    max_steps: int = 150
    max_score_queries: int = 64


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    db_path: Path = Path("var/profiles.db")
    models: Literal["tiny", "viper"] = "tiny"
    # tiny: where the tiny checkpoints are built and cached (default var/tiny-models).
    # viper: a folder holding local copies of the model repos; unset = the HF cache.
    models_dir: Path | None = None
    device: str = "auto"
    max_message_bytes: int = 64 * MiB
    # Model jobs waiting per runtime before RESOURCE_EXHAUSTED.
    max_queue: int = 16
    # Tokens the VPE may generate; unset = 2000 for the real model, 64 for the tiny one.
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
    # Bearer tokens, one a line (`sha256:<hex>` or plain); unset = no auth.
    auth_tokens: Path | None = None
    # Serving a non-loopback address without auth must be asked for explicitly.
    allow_unauthenticated: bool = False
    reflection: bool = True
    # TLS: certificate chain and key in PEM; with a client CA, clients must present a certificate (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Prometheus metrics over HTTP on this port of the same host; 0 = off.
    metrics_port: int = 0
    limits: Limits = Limits()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def on_off(text: str) -> bool:
    """Parses a switch given as a flag value or env var: on/off, true/false, yes/no, 1/0."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"expected on or off, not {text!r}")


# flag -> (env var, type, help). Flags override env vars, which override defaults.
_SERVE_FLAGS: dict[str, tuple[str, type, str]] = {
    "host": ("VIPER_HOST", str, "address to bind"),
    "port": ("VIPER_PORT", int, "port to bind; 0 picks a free one"),
    "db_path": ("VIPER_DB", Path, "SQLite profile store"),
    "models": ("VIPER_MODELS", str, "tiny (random-weight test models) or viper (the real weights)"),
    "models_dir": ("VIPER_MODELS_DIR", Path, "folder of local model checkpoints"),
    "device": ("VIPER_DEVICE", str, "auto, cpu, cuda or cuda:N"),
    "max_message_bytes": ("VIPER_MAX_MESSAGE_BYTES", int, "largest gRPC message accepted"),
    "max_queue": ("VIPER_MAX_QUEUE", int, "model jobs that may wait per runtime"),
    "vpe_max_new_tokens": ("VIPER_VPE_MAX_NEW_TOKENS", int, "tokens the preference extractor may generate"),
    "grace_period": ("VIPER_GRACE_PERIOD", float, "seconds to finish in-flight calls on SIGTERM"),
    "cpu_offload": ("VIPER_CPU_OFFLOAD", on_off, "SDXL model CPU offload (on/off)"),
    "vae_tiling": ("VIPER_VAE_TILING", on_off, "decode SDXL latents in tiles (on/off)"),
    "metric_cache": ("VIPER_METRIC_CACHE", on_off, "per-user prefix cache for the metric (on/off)"),
    "metric_cache_bytes": ("VIPER_METRIC_CACHE_BYTES", int, "bytes of cached metric prefixes"),
    "metric_batch_size": ("VIPER_METRIC_BATCH_SIZE", int, "queries scored per model call"),
    "metric_max_pairs": ("VIPER_METRIC_MAX_PAIRS", int, "liked/disliked pairs in a metric context"),
    "auth_tokens": ("VIPER_AUTH_TOKENS", Path, "file of accepted bearer tokens, one a line (sha256:<hex> or plain)"),
    "allow_unauthenticated": ("VIPER_ALLOW_UNAUTHENTICATED", on_off,
                              "serve a non-loopback address without auth (on/off)"),
    "reflection": ("VIPER_REFLECTION", on_off, "gRPC server reflection (on/off; behind auth when auth is on)"),
    "tls_cert": ("VIPER_TLS_CERT", Path, "server certificate chain (PEM)"),
    "tls_key": ("VIPER_TLS_KEY", Path, "server private key (PEM)"),
    "tls_client_ca": ("VIPER_TLS_CLIENT_CA", Path, "CA whose client certificates are required (mTLS)"),
    "metrics_port": ("VIPER_METRICS_PORT", int, "Prometheus metrics port; 0 = off"),
}
_LIMIT_FLAGS: dict[str, tuple[str, type, str]] = {
    "max_images": ("VIPER_MAX_IMAGES", int, "images per extraction"),
    "max_comment_chars": ("VIPER_MAX_COMMENT_CHARS", int, "characters per comment"),
    "max_image_pixels": ("VIPER_MAX_IMAGE_PIXELS", int, "pixels per image (width x height)"),
    "max_generate_images": ("VIPER_MAX_GENERATE_IMAGES", int, "images per Generate call"),
    "min_generate_size": ("VIPER_MIN_GENERATE_SIZE", int, "smallest generated width / height"),
    "max_generate_size": ("VIPER_MAX_GENERATE_SIZE", int, "largest generated width / height"),
    "max_steps": ("VIPER_MAX_STEPS", int, "denoising steps per image"),
    "max_score_queries": ("VIPER_MAX_SCORE_QUERIES", int, "query images per Score call"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    for flags, source in ((_SERVE_FLAGS, defaults), (_LIMIT_FLAGS, defaults.limits)):
        for name, (env, kind, help_text) in flags.items():
            default = getattr(source, name)
            choices = ("tiny", "viper") if name == "models" else None
            parser.add_argument(
                "--db" if name == "db_path" else "--" + name.replace("_", "-"),
                dest=name,
                type=kind,
                choices=choices,
                default=None,
                help=f"{help_text} (env {env}; default {default})",
            )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    def value(name: str, env: str, kind: type, default: object) -> object:
        flag = getattr(args, name, None)
        if flag is not None:
            return flag
        if env in environ:
            return kind(environ[env])
        return default

    defaults = ServerConfig()
    limits = Limits(**{
        name: value(name, env, kind, getattr(defaults.limits, name))
        for name, (env, kind, _) in _LIMIT_FLAGS.items()
    })
    config = ServerConfig(
        **{name: value(name, env, kind, getattr(defaults, name)) for name, (env, kind, _) in _SERVE_FLAGS.items()},
        limits=limits,
    )
    check_config(config)
    return config


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def check_config(config: ServerConfig) -> None:
    """Refuses settings that cannot work or would be unsafe; raises ValueError."""
    if config.models not in ("tiny", "viper"):
        raise ValueError(f"models must be tiny or viper, not {config.models!r}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    if not is_loopback(config.host) and config.auth_tokens is None and not config.allow_unauthenticated:
        raise ValueError(
            f"refusing to serve {config.host} without auth: pass --auth-tokens FILE "
            "(or --allow-unauthenticated on if something in front of the server authenticates)"
        )

