"""Builds the tiny random-weight checkpoints once and caches them on disk."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .tiny_idefics2 import build_tiny_idefics2
from .tiny_sdxl import build_tiny_sdxl

log = logging.getLogger(__name__)

# Bump when the builders change so cached checkpoints are rebuilt.
TINY_MODELS_REVISION = "2"
_MARKER = "TINY_MODELS_REVISION"


def build_tiny_models(out_dir: Path, *, seed: int = 0) -> None:
    """Writes every tiny checkpoint (see engine.presets.BUILT_LAYOUT) into out_dir."""
    build_tiny_idefics2(out_dir, seed=seed)
    build_tiny_sdxl(out_dir, seed=seed)
    (out_dir / _MARKER).write_text(TINY_MODELS_REVISION)


def ensure_tiny_models(models_dir: Path) -> Path:
    """Returns models_dir, building the checkpoints first if they are missing or stale."""
    return install_once(models_dir, _MARKER, TINY_MODELS_REVISION, build_tiny_models, what="tiny models")


def install_once(models_dir: Path, marker_name: str, revision: str, write: Callable[[Path], None], *,
                 what: str) -> Path:
    """Returns models_dir holding `revision` (recorded in models_dir/marker_name), first calling write(folder)
    to fill it when it holds no or another revision.

    Writes into a sibling temporary folder renamed into place (the marker written last), so a reader (or a
    concurrent writer) never sees a half-written directory. Raises FileExistsError rather than replace a
    non-empty folder without the marker: it is someone's files (say, real weights behind the wrong --models).
    """
    marker = models_dir / marker_name
    if marker.exists() and marker.read_text() == revision:
        return models_dir
    if models_dir.is_dir() and not marker.exists() and any(models_dir.iterdir()):
        raise FileExistsError(f"{models_dir} holds files that are not {what}: not replacing them (name an empty "
                              "or new folder with --models-dir, or the preset those files are for with --models)")
    log.info("writing %s into %s", what, models_dir)
    models_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{what.replace(' ', '-')}-", dir=models_dir.parent))
    try:
        write(staging)
        (staging / marker_name).write_text(revision)
        if models_dir.exists():
            shutil.rmtree(models_dir, ignore_errors=True)
        try:
            staging.rename(models_dir)
        except OSError:
            if not (marker.exists() and marker.read_text() == revision):
                raise  # not a concurrent writer winning the race
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return models_dir
