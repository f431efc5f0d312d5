"""The flags the model benches share (bench/generation.py, bench/metric.py): which models, on which device, with
how many torch threads, here and in the servers they start."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, here and in the servers (the cores are shared); 0 = torch's default")
    parser.add_argument("--models", choices=("tiny", "full-random"), default="tiny",
                        help="tiny (built here) or full-random (the real architectures, random weights: for a GPU)")
    parser.add_argument("--device", default="cpu", help="where the models run, here and in the servers")
    parser.add_argument("--models-dir", type=Path,
                        help="tiny models already built there, or built there once "
                             "(default: built in a temp folder, removed after)")


def threads_env(threads: int) -> dict[str, str]:
    """The environment that gives a server `threads` torch threads, or its own default for 0."""
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}
