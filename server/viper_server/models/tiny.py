"""Builds the tiny random-weight checkpoints once and caches them on disk."""

from __future__ import annotations

import logging
import shutil
import tempfile
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
    """Returns models_dir, building the checkpoints first if they are missing or stale.

    Builds into a sibling temporary folder and renames it into place, so a
    reader (or a concurrent builder) never sees a half-written directory.
    """
    marker = models_dir / _MARKER
    if marker.exists() and marker.read_text() == TINY_MODELS_REVISION:
        return models_dir
    log.info("building tiny models in %s", models_dir)
    models_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-models-", dir=models_dir.parent))
    try:
        build_tiny_models(staging)
        if models_dir.exists():
            shutil.rmtree(models_dir, ignore_errors=True)
        try:
            staging.rename(models_dir)
        except OSError:
            if not (marker.exists() and marker.read_text() == TINY_MODELS_REVISION):
                raise  # not a concurrent builder winning the race
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return models_dir
