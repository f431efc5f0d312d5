from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight checkpoints (layout: engine.presets.BUILT_LAYOUT), built once per test session
    through the same builder `make serve` uses."""
    from viper_server.models.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("models") / "tiny-models")
