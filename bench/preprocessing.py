"""The input work of one extraction (the 16 example images), in the handler's thread as before the workers
(decode, then transformers' Idefics2ImageProcessorPil) vs the preprocessing workers (engine.preprocessing:
without the cache, and with it warm), measured side by side in one run, in this process:

- wall time and this process's CPU time per extraction's images (the workers' CPU is theirs, not ours);
- what it costs a stand-in for the scheduler thread (steps of pure-Python work, GIL-bound like the step
  loop's Python) while --clients threads do extraction input work in a loop: that thread's p50 / p95 step time;
- with --models-dir (tiny models): two real servers, `--preprocess-workers 0` and the default, each serving
  --clients clients extracting the 16 images in a loop (no processed cache: every call's images decoded); the
  server process's CPU seconds (its workers' not counted) and its busiest thread's (the IDEFICS2 scheduler's)
  per extraction.

The last line: `preprocessing: wall N.NNx, server cpu N.NNx, warm N.NNx, scheduler p95 N.NNx` (in-thread /
workers: above 1 means the workers are faster or cheaper for the server; the scheduler figure compares its p95
step time under in-thread input work with that under the workers).

    .venv/bin/python bench/preprocessing.py [--workers N] [--repeats 5] [--clients 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from transformers import Idefics2ImageProcessorPil

from viper_client import RatedImage, ViperClient
from viper_server.engine.preprocessing import Preprocessor, default_workers
from viper_server.imaging import decode_image, strip_metadata
from viper_server.models.idefics2 import VIPER_PROCESSOR_SETTINGS
from viper_server.testing import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "viper_examples"
MAX_PIXELS = 36_000_000
STEP_WORK = 20_000  # a stand-in scheduler step: sum(range(STEP_WORK)), about a millisecond of Python


def uploads() -> list[bytes]:
    return [strip_metadata(path.read_bytes()) for path in sorted(EXAMPLES.glob("*/*.png"))]


def in_thread(processor: Idefics2ImageProcessorPil) -> Callable[[list[bytes]], object]:
    """The input work as it ran in a handler thread before the workers."""
    def work(images: list[bytes]) -> object:
        decoded = [decode_image(data, max_pixels=MAX_PIXELS) for data in images]
        return processor(images=[decoded], return_tensors="np")
    return work


def measure(work: Callable[[list[bytes]], object], images: list[bytes], repeats: int) -> tuple[float, float]:
    """Median wall and this process's CPU seconds of one call."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        work(images)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def scheduler_steps(work: Callable[[list[bytes]], object] | None, images: list[bytes], clients: int,
                    rounds: int) -> tuple[list[float], float]:
    """Step times of a pure-Python 'scheduler' thread while `clients` threads run `work` `rounds` times each
    (work None: for a second), and the seconds that took."""
    done = threading.Event()
    steps: list[float] = []

    def scheduler() -> None:
        while not done.is_set() or len(steps) < 50:
            started = time.perf_counter()
            sum(range(STEP_WORK))
            steps.append(time.perf_counter() - started)

    def client() -> None:
        for _ in range(rounds):
            work(images)

    loop = threading.Thread(target=scheduler)
    began = time.perf_counter()
    loop.start()
    if work is None:
        time.sleep(1.0)
    else:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    done.set()
    loop.join()
    return steps, time.perf_counter() - began


def server_cpu(models_dir: Path, workers: str, clients: int, rounds: int) -> tuple[float, float, float]:
    """Per extraction: wall seconds, the server process's CPU seconds, its busiest thread's CPU seconds."""
    rated = [RatedImage(path.read_bytes(), f"comment {index}", rating="liked" if index % 2 == 0 else "disliked")
             for index, path in enumerate(sorted(EXAMPLES.glob("*/*.png")))]
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "profiles.db", models_dir,
                                                             "--preprocess-workers", workers,
                                                             "--processed-cache-bytes", "0") as server:
        process = psutil.Process(server.pid)

        def client(index: int) -> None:
            with ViperClient(server.target) as viper:
                for round_ in range(rounds):
                    viper.extract_profile(f"user-{index}-{round_}", rated)

        client(-1)  # warm-up: first calls, first model runs
        threads_before = {thread.id: thread.user_time + thread.system_time for thread in process.threads()}
        cpu_before, began = sum(process.cpu_times()[:2]), time.perf_counter()
        threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall, cpu = time.perf_counter() - began, sum(process.cpu_times()[:2]) - cpu_before
        busiest = max(thread.user_time + thread.system_time - threads_before.get(thread.id, 0.0)
                      for thread in process.threads())
    extractions = clients * rounds
    return wall / extractions, cpu / extractions, busiest / extractions


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="extractions' input work per client")
    parser.add_argument("--models-dir", type=Path, help="tiny models: also measure two real servers")
    args = parser.parse_args()

    images = uploads()
    before = in_thread(Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS))
    cold = Preprocessor(args.workers, max_pixels=MAX_PIXELS, cache_bytes=0)
    warm = Preprocessor(args.workers, max_pixels=MAX_PIXELS)
    try:
        before(images), cold.process_uploads(images), warm.process_uploads(images)  # warm-up (imports, first use)
        rows = {"in the handler's thread": measure(before, images, args.repeats),
                f"{args.workers} worker(s), no cache": measure(cold.process_uploads, images, args.repeats),
                f"{args.workers} worker(s), cache warm": measure(warm.process_uploads, images, args.repeats)}
        print(f"input work of one extraction ({len(images)} images, {sum(map(len, images)) / 1e6:.1f} MB of PNG); "
              "median of", args.repeats)
        print(f"{'':32} {'wall ms':>8} {'server cpu ms':>14}")
        for name, (wall, cpu) in rows.items():
            print(f"{name:32} {wall * 1e3:8.1f} {cpu * 1e3:14.1f}")

        idle = scheduler_steps(None, images, args.clients, args.rounds)
        loaded_before = scheduler_steps(before, images, args.clients, args.rounds)
        loaded_workers = scheduler_steps(cold.process_uploads, images, args.clients, args.rounds)
        print(f"\na pure-Python 'scheduler' thread's step (ms) while {args.clients} clients' input work runs "
              f"({args.rounds} extractions each)")
        print(f"{'':32} {'p50':>8} {'p95':>8} {'steps/s':>8} {'seconds':>8}")
        for name, (steps, seconds) in (("idle", idle), ("input work in handler threads", loaded_before),
                                       ("input work in the workers", loaded_workers)):
            print(f"{name:32} {statistics.median(steps) * 1e3:8.2f} {p95(steps) * 1e3:8.2f} "
                  f"{len(steps) / seconds:8.0f} {seconds:8.2f}")
    finally:
        cold.close()
        warm.close()
    if args.models_dir is not None:
        print(f"\nreal servers (tiny models), {args.clients} clients extracting the 16 images {args.rounds} times each;"
              " per extraction")
        print(f"{'':32} {'wall ms':>8} {'server cpu ms':>14} {'busiest thread ms':>18}")
        for name, workers in (("--preprocess-workers 0", "0"), (f"--preprocess-workers {args.workers}",
                                                                str(args.workers))):
            wall, cpu, busiest = server_cpu(args.models_dir, workers, args.clients, args.rounds)
            print(f"{name:32} {wall * 1e3:8.1f} {cpu * 1e3:14.1f} {busiest * 1e3:18.1f}")
    (wall_before, cpu_before), (wall_cold, cpu_cold), (wall_warm, _) = rows.values()
    print(f"preprocessing: wall {wall_before / wall_cold:.2f}x, server cpu {cpu_before / cpu_cold:.2f}x, "
          f"warm {wall_before / wall_warm:.2f}x, scheduler p95 {p95(loaded_before[0]) / p95(loaded_workers[0]):.2f}x")


if __name__ == "__main__":
    main()
