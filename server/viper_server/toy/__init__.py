"""The toy world and the small models trained in it (issue 14).

Real architectures and file formats (IDEFICS2 base + VPE and metric LoRA adapters, SDXL base + refiner in
diffusers format), toy sizes, trained on CPU in minutes, so everything the service does to the real models
it does to these, with outputs that mean something: the VPE names the colours a user likes and dislikes,
the metric scores the liked colour high (the more of an image it covers, the higher), ViPer guidance pulls
images toward the liked colour.

- world: the images, comments and users (with held-out shades, phrasings and images).
- train_toy_models(out_dir): trains every checkpoint (layout: engine.presets.BUILT_LAYOUT) with a manifest
  (`viper-server train-toy-models DIR`).
- ensure_toy_models(models_dir): installs the committed, trained weights (checked against their manifest).
- evaluate: the held-out data and figures the tests (and the issue's targets) use.
- examples: a held-out user as image folders and comments.json for the `viper` CLI; figure: the docs' picture.
"""

from . import world
from .checkpoints import COMMITTED_WEIGHTS, ensure_toy_models
from .train import train_toy_models

# The `toy` preset's settings (engine.presets): the answers are ~15 tokens; the images are 64 px.
TOY_EXTRACTOR_NAME = "toy-vpe"
TOY_VPE_MAX_NEW_TOKENS = 32
TOY_IMAGE_SIZE = world.IMAGE_SIZE

__all__ = [
    "COMMITTED_WEIGHTS",
    "TOY_EXTRACTOR_NAME",
    "TOY_IMAGE_SIZE",
    "TOY_VPE_MAX_NEW_TOKENS",
    "ensure_toy_models",
    "train_toy_models",
]
