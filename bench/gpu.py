"""`make bench-gpu`: the generation, metric and concurrency benches at real size on one CUDA GPU.

Each bench runs with `--models full-random --device cuda` (IDEFICS2-8b and SDXL base + refiner at full size with
random weights, made on the GPU: nothing is downloaded) and settings sized so that the three, model builds
included, end within 8 minutes on one 80+ GB GPU: each has a budget of its own (its process group is killed
past it, and the next one runs). Writes OUT/gpu.md (each bench's command, time, peak GPU memory and its output
with its tables) and OUT/gpu.json (the figures: each bench's last line parsed, the concurrency bench's whole
figures), and each bench's stderr to OUT/gpu-NAME.log. Without CUDA it prints one line and exits 2.

    .venv/bin/python bench/gpu.py [--out var/bench] [--only concurrency]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sampling import Sampler

BENCH = Path(__file__).resolve().parent
REAL = ["--models", "full-random", "--device", "cuda"]


@dataclass(frozen=True)
class Section:
    name: str
    args: list[str]
    budget_s: int  # the whole bench, its model builds included; the three together stay within 8 minutes

    def command(self, figures_file: Path | None = None) -> list[str]:
        """The bench's command line, from the repository's root."""
        extra = ["--json", str(figures_file)] if self.name == "concurrency" and figures_file else []
        return [f"bench/{self.name}.py", *REAL, *self.args, *extra]


# Why these settings (README "Benchmarks on a GPU"): 1024 px is SDXL's size; 20 steps (10 in the concurrency bench,
# whose four images run twice one after another and twice at once) and one image keep each generation to seconds;
# extractions generate 128 tokens (random weights never stop early: the real VPE's lists of features are of that
# order, its cap is 2,000) so the concurrency bench's extraction loops turn over within its budget; the profiles the
# generation and metric benches extract first need no decoding to speak of (32 tokens). The budgets add up to 470 s.
SECTIONS = [
    Section("generation", ["--size", "1024", "--steps", "20", "--images", "1", "--repeats", "2", "--threads", "0",
                           "--server-tokens", "32"], budget_s=130),
    Section("metric", ["--repeats", "2", "--threads", "0", "--server-tokens", "32"], budget_s=150),
    Section("concurrency", ["--size", "1024", "--steps", "10", "--new-tokens", "128", "--warm-new-tokens", "128",
                            "--repeats", "2", "--scores", "20", "--warm-repeats", "2"], budget_s=190),
]


class GpuMemory(Sampler):
    """The peak of the GPU memory in use (nvidia-smi, every second) while a bench runs; None without nvidia-smi."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_mib: float | None = None

    def sample(self) -> None:
        used = _nvidia_smi("memory.used")
        if used:
            self.peak_mib = max(self.peak_mib or 0.0, sum(float(line) for line in used.splitlines()))


def _nvidia_smi(query: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Result:
    section: Section
    command: list[str]
    seconds: float
    returncode: int | None  # None: killed at its budget
    stdout: str
    peak_gpu_mib: float | None
    details: dict = field(default_factory=dict)

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def figures(self) -> dict[str, float]:
        """The `name N.NNx` pairs of the bench's last line."""
        if self.returncode != 0:
            return {}
        return {name: float(value) for name, value in re.findall(r"([A-Za-z-]+):? (\d+(?:\.\d+)?)x", self.last_line)}

    def status(self) -> str:
        if self.returncode is None:
            return f"stopped at its budget of {self.section.budget_s} s"
        return "ok" if self.returncode == 0 else f"failed (exit {self.returncode})"


def run_section(section: Section, out: Path) -> Result:
    """Runs one bench in a process group of its own (its servers included), killed whole past its budget."""
    with tempfile.TemporaryDirectory() as tmp, open(out / f"gpu-{section.name}.log", "w") as log, GpuMemory() as gpu:
        figures_file = Path(tmp) / "figures.json"
        started = time.perf_counter()
        # TMPDIR: what a bench killed at its budget leaves in its temp folders goes with this one.
        process = subprocess.Popen([sys.executable, *section.command(figures_file)], cwd=BENCH.parent,
                                   stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": tmp})
        try:
            stdout, _ = process.communicate(timeout=section.budget_s)
            returncode: int | None = process.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _kill_group(process.pid)
        if returncode is None:
            stdout, _ = process.communicate()
        seconds = time.perf_counter() - started
        details = json.loads(figures_file.read_text()) if figures_file.exists() else {}
    return Result(section, section.command(), seconds, returncode, stdout, gpu.peak_mib, details)


def _kill_group(pgid: int) -> None:
    """Whatever of the bench's process group is left (its servers, should it have died without stopping them)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def markdown(output: str) -> str:
    """The bench's output as markdown: its tables as they are, every other line a paragraph of its own."""
    blocks, table = [], []
    for line in output.strip().splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            blocks.append("\n".join(table))
            table = []
        if line.strip():
            blocks.append(line)
    if table:
        blocks.append("\n".join(table))
    return "\n\n".join(blocks)


def write_report(out: Path, gpu: str, started: str, results: list[Result], total_s: float) -> None:
    import torch

    header = (f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; started {started}; "
              f"{total_s:.0f} s in all")
    parts = ["# make bench-gpu", header]
    for result in results:
        gpu_memory = f"{result.peak_gpu_mib / 1024:.1f} GiB" if result.peak_gpu_mib is not None else "unknown"
        parts += [f"## {result.section.name}",
                  f"`{' '.join(result.command)}`: {result.status()}, {result.seconds:.0f} s (budget "
                  f"{result.section.budget_s} s), peak GPU memory in use {gpu_memory}",
                  markdown(result.stdout) or "(no output)"]
    (out / "gpu.md").write_text("\n\n".join(parts) + "\n")
    figures = {
        "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "started": started, "total_s": total_s,
        "benches": {result.section.name: {
            "command": result.command, "status": result.status(), "seconds": result.seconds,
            "budget_s": result.section.budget_s, "peak_gpu_mib": result.peak_gpu_mib, "last_line": result.last_line,
            "figures": result.figures(), "details": result.details,
        } for result in results},
    }
    (out / "gpu.json").write_text(json.dumps(figures, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("var/bench"), help="where gpu.md and gpu.json go")
    parser.add_argument("--only", choices=[section.name for section in SECTIONS], action="append",
                        help="run only this bench (repeatable)")
    args = parser.parse_args()
    import torch  # after the arguments: --help needs no torch

    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU host",
              file=sys.stderr)
        return 2
    gpu = _nvidia_smi("name") or torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    started, clock = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    results = []
    for section in SECTIONS:
        if args.only is None or section.name in args.only:
            print(f"bench-gpu: {section.name} (at most {section.budget_s} s)", flush=True)
            results.append(run_section(section, args.out))
            print(f"bench-gpu: {section.name}: {results[-1].status()}, {results[-1].seconds:.0f} s; "
                  f"{results[-1].last_line}", flush=True)
    write_report(args.out, gpu, started, results, time.perf_counter() - clock)
    print(f"bench-gpu: wrote {args.out / 'gpu.md'} and {args.out / 'gpu.json'}")
    return 0 if all(result.returncode == 0 for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
