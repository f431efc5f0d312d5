"""The concurrency and tracing benches run and leave nothing behind (the others: test_benches.py); the
concurrency bench's report has every figure the README quotes."""

from __future__ import annotations

import re

from benchrun import run_bench


def test_the_concurrency_bench_reports_every_figure_and_leaves_nothing_behind(tmp_path, tiny_models_dir):
    stdout = run_bench(tmp_path, tiny_models_dir, "concurrency.py",
                       ["--repeats", "1", "--scores", "2", "--steps", "2", "--new-tokens", "4",
                        "--warm-new-tokens", "4", "--warm-repeats", "1"], "concurrency: ")
    assert_concurrency_report(stdout)


def test_the_tracing_bench_leaves_nothing_behind(tmp_path, tiny_models_dir):
    run_bench(tmp_path, tiny_models_dir, "tracing.py", ["--calls", "5", "--generations", "1", "--steps", "2"],
              "tracing: ")


def assert_concurrency_report(stdout: str) -> None:
    """The last line's figures, 1-query and 4-query Scores under load, the peak memory, and the warm extraction's
    text equal to the cold one's (the same request, once with nothing cached and once with what the server keeps)."""
    number = r"\d+\.\d"
    assert re.fullmatch(rf"concurrency: score-under-load {number}x, generate {number}\dx, extract {number}\dx, "
                        rf"score {number}\dx, warm-extract {number}\dx", stdout.strip().splitlines()[-1])
    assert re.search(r"^\| 1 query \|", stdout, re.M) and re.search(r"^\| 4 queries \|", stdout, re.M)
    assert re.search(r"peak resident memory, server of \(a\)-\(d\): server process [1-9]\d* MiB", stdout)
    assert "the same request gave the same text: yes (1/1)" in stdout
