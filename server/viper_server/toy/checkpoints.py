"""The committed toy checkpoints, installed into a models directory once: `ensure_toy_models(models_dir)`."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from ..models.tiny import install_once
from .manifest import MANIFEST, ManifestError, verify

log = logging.getLogger(__name__)

# The trained weights shipped with the package (train_toy_models' output, with its SHA256SUMS).
COMMITTED_WEIGHTS = Path(__file__).parent / "weights"
# Written last into an installed folder: the revision it holds.
MARKER = "TOY_MODELS_REVISION"


def revision(weights: Path = COMMITTED_WEIGHTS) -> str:
    """Names one set of weights: the sha256 of its manifest (so of every file it lists)."""
    return hashlib.sha256((weights / MANIFEST).read_bytes()).hexdigest()


def ensure_toy_models(models_dir: Path, *, weights: Path = COMMITTED_WEIGHTS) -> Path:
    """Returns models_dir holding the toy checkpoints (layout: engine.presets.BUILT_LAYOUT).

    Copies the committed weights after checking every file against their manifest, once: a models_dir
    already holding this revision is returned as is. Without committed weights (e.g. an install that left
    them out) it trains them instead (train_toy_models). Written like the tiny models (models.tiny.install_once),
    so a reader never sees a half-written directory. Raises ManifestError when the committed weights do not
    match their manifest.
    """
    models_dir = Path(models_dir)
    if not (weights / MANIFEST).is_file():
        from .train import train_toy_models  # torch training code: imported only when needed

        log.warning("no committed toy weights in %s: training them into %s", weights, models_dir)
        return install_once(models_dir, MARKER, "trained", train_toy_models, what="toy models")

    def install(staging: Path) -> None:
        shutil.copytree(weights, staging, dirs_exist_ok=True)
        try:
            verify(staging)
        except ManifestError as error:
            raise ManifestError(
                f"the committed toy weights in {weights} are damaged ({error}); restore them "
                f"(e.g. git checkout) or train new ones with `viper-server train-toy-models DIR`"
            ) from error

    return install_once(models_dir, MARKER, revision(weights), install, what="toy models")
