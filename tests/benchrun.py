"""Running a bench as the tests do: on the session's tiny models, in a temp folder of its own, with a marker in its
environment that everything it starts inherits, so that a process left behind is found."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def processes_marked(marker: str) -> list[int]:
    """Processes whose environment carries marker (inherited from the bench by everything it starts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return found


def run_bench(tmp_path: Path, tiny_models_dir: Path, bench: str, args: list[str], last: str) -> str:
    """Runs a bench on the session's tiny models; checks its last line and that it left nothing behind; its
    output."""
    marker = f"VIPER_BENCH_MARKER={uuid.uuid4().hex}"
    name, value = marker.split("=")
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        # The session's tiny models: building them is the tiny_models_dir fixture's (and make bench's) part.
        [sys.executable, str(ROOT / "bench" / bench), *args, "--models-dir", str(tiny_models_dir)],
        capture_output=True, text=True, timeout=1800,  # a guard against a hang: a loaded machine took 600 s
        env={**os.environ, name: value, "TMPDIR": str(temp)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(last)
    assert processes_marked(marker) == []
    # torch keeps its compiler cache in TMPDIR on purpose (torchinductor_<user>); anything else is ours.
    assert [path.name for path in temp.iterdir() if not path.name.startswith("torchinductor_")] == []
    return result.stdout
