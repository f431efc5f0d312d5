"""The README's Python example runs as printed, from the repository root, against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from viper_server.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    return next(block for block in blocks if "ViperClient(" in block)


def test_the_python_example_runs_from_the_repository_root(toy_models_dir, tmp_path):
    # The repository root as the example sees it: its example images at the same relative paths.
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    (workdir / "tests").symlink_to(ROOT / "tests")
    with ServerProcess(tmp_path / "profiles.db", toy_models_dir, models="toy") as server:
        code = python_example().replace('"127.0.0.1:50051"', repr(server.target))
        result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 0, result.stderr
    saved = sorted((workdir / "out").glob("castle-*.png"))
    assert [path.name for path in saved] == ["castle-0.png", "castle-1.png"]
    assert Image.open(saved[0]).size == (64, 64)  # the toy models' default size


def test_the_example_output_folder_is_not_tracked():
    result = subprocess.run(["git", "check-ignore", "-q", "out/castle-0.png"], cwd=ROOT)
    assert result.returncode == 0
