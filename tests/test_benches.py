"""The benches run, and leave nothing behind: no server process, no temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("bench, args, last", [
    # One batch of queries: the fixture queries and their crops at other aspect ratios.
    ("metric.py", ["--repeats", "1", "--queries", "4"], "speedup: "),
    # Best of N's picks on 2 of the 20 held-out toy users: the section runs whole, its figures are the bench's.
    ("generation.py", ["--repeats", "1", "--steps", "4", "--images", "1", "--users", "2"], "speedup: "),
    ("concurrency.py", ["--repeats", "1", "--scores", "2", "--steps", "2", "--new-tokens", "4"], "concurrency: "),
    ("tracing.py", ["--calls", "5", "--generations", "1", "--steps", "2"], "tracing: "),
    ("auth.py", ["--calls", "20", "--rounds", "1"], "ratio: "),
])
def test_a_bench_leaves_no_process_or_temp_folder_behind(tmp_path, tiny_models_dir, bench, args, last):
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
