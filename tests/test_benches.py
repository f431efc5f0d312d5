"""The benches run, and leave nothing behind: no server process, no temp folder; `make bench-gpu` refuses to run
without CUDA. (The concurrency and tracing benches: test_benches_load.py, a module of its own so that another
test worker runs it.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from benchrun import ROOT, run_bench


@pytest.mark.parametrize("bench, args, last", [
    # One batch of queries: the fixture queries and their crops at other aspect ratios.
    ("metric.py", ["--repeats", "1", "--queries", "4"], "speedup: "),
    # Best of N's picks on 2 of the 20 held-out toy users: the section runs whole, its figures are the bench's.
    ("generation.py", ["--repeats", "1", "--steps", "4", "--images", "1", "--users", "2"], "speedup: "),
    ("auth.py", ["--calls", "20", "--rounds", "1"], "ratio: "),
])
def test_a_bench_leaves_no_process_or_temp_folder_behind(tmp_path, tiny_models_dir, bench, args, last):
    run_bench(tmp_path, tiny_models_dir, bench, args, last)


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
