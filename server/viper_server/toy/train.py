"""One command trains every toy checkpoint: `train_toy_models(out_dir)`."""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .manifest import MANIFEST, write_manifest
from .train_idefics2 import train_adapters, train_graded_metric, train_idefics2
from .train_sdxl import train_sdxl

log = logging.getLogger(__name__)


def train_toy_models(out_dir: Path, *, seed: int = 0, parallel: bool = True) -> None:
    """Trains the toy IDEFICS2 (+ VPE and metric LoRA adapters) and the toy SDXL base + refiner into out_dir,
    in the layout of engine.presets.BUILT_LAYOUT, with a SHA256SUMS manifest of every file.

    Fixed seeds; each model trains on one torch thread (on a shared CPU more threads mostly wait for each
    other), the two in parallel processes unless parallel=False: about 21 minutes on two shared cores (IDEFICS2
    the longer), plus about 4 for the graded metric stage. The same seed gives the same files, bit for bit, with
    the same library versions (README "Training": not the committed ones, made with earlier versions).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = (_train_idefics2, _train_sdxl)
    if parallel:
        level = logging.getLogger().getEffectiveLevel()
        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(job, out_dir, seed, level) for job in jobs]:
                future.result()
    else:
        for job in jobs:
            job(out_dir, seed)
    write_manifest(out_dir)
    log.info("toy models trained into %s in %.0f s", out_dir, time.perf_counter() - started)


def retrain_graded_metric(models_dir: Path, *, seed: int = 0) -> None:
    """Runs the graded metric stage alone (train_idefics2.train_graded_metric) on models_dir's IDEFICS2 base and
    metric adapter, on one torch thread, and rewrites models_dir's manifest when it has one: what
    train_toy_models gives for that seed, from its first three stages' files (e.g. the committed weights)."""
    models_dir = Path(models_dir)
    with _one_thread():
        train_graded_metric(models_dir, seed=seed)
    if (models_dir / MANIFEST).is_file():
        write_manifest(models_dir)


def retrain_adapters(models_dir: Path, *, seed: int = 0) -> None:
    """Runs the adapter stage and then the graded metric stage (train_idefics2.train_adapters,
    train_graded_metric) on models_dir's IDEFICS2 base as it is, on one torch thread, and rewrites both adapters
    and models_dir's manifest when it has one (each stage has its own random state and reads only the files
    before it). train_toy_models trains the VPE adapter before it draws the base's "+" / "-" rows apart
    (train_idefics2.spread_answer_rows); on a base whose rows are already apart, as the committed one, the
    metric adapter comes out as there, the VPE adapter not."""
    models_dir = Path(models_dir)
    with _one_thread():
        train_adapters(models_dir, seed=seed)
        train_graded_metric(models_dir, seed=seed)
    if (models_dir / MANIFEST).is_file():
        write_manifest(models_dir)


def _train_idefics2(out_dir: Path, seed: int, log_level: int | None = None) -> None:
    _log_to_stderr(log_level)
    with _one_thread():
        train_idefics2(out_dir, seed=seed)


def _train_sdxl(out_dir: Path, seed: int, log_level: int | None = None) -> None:
    _log_to_stderr(log_level)
    with _one_thread():
        train_sdxl(out_dir, seed=seed)


def _log_to_stderr(level: int | None) -> None:
    """In a worker process (level given): report progress at the parent's level."""
    if level is not None and not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(name)s %(message)s")


class _one_thread:
    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)
