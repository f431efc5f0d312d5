"""Server-side commands of the `viper` CLI: `serve` and `build-tiny-models`.

The client CLI (viper_client.cli) delegates here, so `pip install viper-serve`
without the server extra still gives a working client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .config import add_serve_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viper", description="viper-serve server commands")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="run the gRPC server"))
    build = commands.add_parser("build-tiny-models", help="write tiny random-weight checkpoints to DIR")
    build.add_argument("dir", type=Path)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.command == "build-tiny-models":
        from .models.tiny import ensure_tiny_models

        print(ensure_tiny_models(args.dir))
        return 0
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from .app import serve

    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:  # unusable settings or files: say so, no traceback
        print(f"viper serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
