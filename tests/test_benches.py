"""The benches run, and leave nothing behind: no server process, no temp folder; `make bench-gpu` refuses to run
without CUDA."""

from __future__ import annotations

import os
import re
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
    ("concurrency.py", ["--repeats", "1", "--scores", "2", "--steps", "2", "--new-tokens", "4",
                        "--warm-new-tokens", "4"], "concurrency: "),
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
    if bench == "concurrency.py":
        assert_concurrency_report(result.stdout)
    assert processes_marked(marker) == []
    # torch keeps its compiler cache in TMPDIR on purpose (torchinductor_<user>); anything else is ours.
    assert [path.name for path in temp.iterdir() if not path.name.startswith("torchinductor_")] == []


def assert_concurrency_report(stdout: str) -> None:
    """The last line's figures, 1-query and 4-query Scores under load, the peak memory, and the warm extraction's
    text equal to the cold one's (the same request, once with nothing cached and once with what the server keeps)."""
    number = r"\d+\.\d"
    assert re.fullmatch(rf"concurrency: score-under-load {number}x, generate {number}\dx, extract {number}\dx, "
                        rf"score {number}\dx, warm-extract {number}\dx", stdout.strip().splitlines()[-1])
    assert re.search(r"^\| 1 query \|", stdout, re.M) and re.search(r"^\| 4 queries \|", stdout, re.M)
    assert re.search(r"peak resident memory, server of \(a\)-\(d\): server process [1-9]\d* MiB", stdout)
    assert "the same request gave the same text: yes (1/1)" in stdout


def test_bench_gpu_without_cuda_exits_2_with_one_line(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA" in result.stderr
    assert not out.exists()  # nothing written
