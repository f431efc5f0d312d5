"""`viper-server`: the server's own commands (`serve`, `build-tiny-models`, `train-toy-models`,
`train-toy-adapters`, `train-graded-metric`, `dev-token`).

The client's `viper serve` hands its process over to this command (python -m viper_server).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import warnings
from pathlib import Path

from viper_client.telemetry import TEXT_FORMAT, configure_log_format

from .config import ServerConfig, add_serve_arguments, config_from_args

# The libraries whose chatter (fallback notices, deprecations, loading progress bars) is for debugging.
_NOISY_LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft", "torch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viper-server", description="viper-serve's gRPC server")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_arguments(commands.add_parser("serve", help="run the gRPC server"))
    build = commands.add_parser("build-tiny-models", help="write tiny random-weight checkpoints to DIR")
    build.add_argument("dir", type=Path)
    train = commands.add_parser("train-toy-models", help="train the toy-world models into DIR (minutes on a CPU)")
    train.add_argument("dir", type=Path)
    train.add_argument("--seed", type=int, default=0, help="the seed every random draw derives from")
    adapters = commands.add_parser("train-toy-adapters", help="train the toy VPE and metric adapters (then the "
                                   "graded metric stage) on DIR's IDEFICS2 base (rewrites both and DIR/SHA256SUMS)")
    adapters.add_argument("dir", type=Path)
    adapters.add_argument("--seed", type=int, default=0, help="the seed train-toy-models was given")
    graded = commands.add_parser("train-graded-metric", help="run the toy metric's graded stage alone on DIR's "
                                 "IDEFICS2 base and metric adapter (rewrites DIR/metric-lora and DIR/SHA256SUMS)")
    graded.add_argument("dir", type=Path)
    graded.add_argument("--seed", type=int, default=0, help="the seed train-toy-models was given")
    dev = commands.add_parser("dev-token", help="print an end user's JWT signed by the local development key "
                              "(made in --dir on first use, with an auth config naming it: for local use only)")
    dev.add_argument("--user", required=True, help="the user id the token stands for")
    dev.add_argument("--ttl", type=int, default=8 * 3600, help="seconds the token is valid (default 8 h, at most 24 h)")
    dev.add_argument("--dir", type=Path, default=Path("var/dev-identity"),
                     help="where the key, its JWKS and auth.toml live (default var/dev-identity)")
    args = parser.parse_args(argv)

    if args.command == "build-tiny-models":
        configure_logging("info")
        from .models.tiny import ensure_tiny_models

        print(ensure_tiny_models(args.dir))
        return 0
    if args.command == "dev-token":
        from .dev_identity import dev_token

        try:
            print(dev_token(args.user, folder=args.dir, ttl=args.ttl))
        except ValueError as exc:
            print(f"viper-server: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "train-toy-models":
        configure_logging("info")
        from .toy import train_toy_models

        train_toy_models(args.dir, seed=args.seed)
        print(args.dir)
        return 0
    if args.command == "train-toy-adapters":
        configure_logging("info")
        from .toy.train import retrain_adapters

        retrain_adapters(args.dir, seed=args.seed)
        print(args.dir)
        return 0
    if args.command == "train-graded-metric":
        configure_logging("info")
        from .toy.train import retrain_graded_metric

        retrain_graded_metric(args.dir, seed=args.seed)
        print(args.dir)
        return 0
    try:
        config = config_from_args(args)
        check_auth_config(config)
    except (ValueError, OSError) as exc:  # one line saying why, exit status 2 (as argparse's own errors)
        print(f"viper-server: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    from .server import serve  # torch and the models: only once the arguments are known to be good

    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:  # unusable settings or files: say so, no traceback
        print(f"viper-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


def check_auth_config(config: ServerConfig) -> None:
    """Reads --auth-config before torch is imported, so that a bad one is refused in a moment, not after seconds of
    imports (the server reads it again as it starts)."""
    if config.auth_config is not None:
        from .rpc.auth_config import load_auth_config

        load_auth_config(config.auth_config)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Our log lines at `level`, as text or JSON; the model libraries' warnings and progress bars only at debug."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT, stream=sys.stderr)
    configure_log_format(log_format)
    if level == "debug":
        return
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="(transformers|diffusers|huggingface_hub|accelerate|peft|torch)")
    # Progress bars of from_pretrained and the pipelines.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
