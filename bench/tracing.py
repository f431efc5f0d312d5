"""What tracing costs: two servers side by side on the tiny models, one with tracing off (the default) and one
exporting every span over OTLP (to a receiver in this process, as a collector would take them), called
alternately. GetProfile p50 and Generate p50 (64 px) on each; and, in process, what the tracing hooks of one
call cost while tracing is off. The last line:
`tracing: getprofile N.NNx, generate N.NNx, off N.N us per call`.

    .venv/bin/python bench/tracing.py [--calls 300] [--generations 6] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from viper_client import ViperClient
from viper_server import tracing
from viper_server.models.tiny import ensure_tiny_models
from viper_server.testing import ServerProcess
from viper_server.testing.otlp import OtlpReceiver

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "viper_examples"
USER = "bench-user"


def rated_images():
    import json

    from viper_client import RatedImage

    comments = json.loads((EXAMPLES / "comments.json").read_text())
    return [RatedImage(path, comment=comments[f"{rating}/{path.name}"], rating=rating)
            for rating in ("liked", "disliked") for path in sorted((EXAMPLES / rating).glob("*.png"))]


def alternate(calls: int, first: Callable[[], None], second: Callable[[], None]) -> tuple[float, float]:
    """p50 seconds of each, called in turn (so that the machine's noise falls on both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(calls):
        for call, into in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            call()
            into.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def off_cost_per_call(repeats: int = 200_000) -> float:
    """Seconds the hooks of one traced call cost while tracing is off: the RPC span, three child spans, a step
    handle, a trace-id lookup (generously more than a GetProfile runs)."""
    tracing.configure(None)
    started = time.perf_counter()
    for _ in range(repeats):
        with tracing.rpc_span("/viper.v1.ProfileService/GetProfile", {}):
            with tracing.span("validate"), tracing.span("store.get"), tracing.span("engine.prepare"):
                tracing.capture("idefics2", "score")
                tracing.current_trace_id()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="GetProfile calls per server")
    parser.add_argument("--generations", type=int, default=6, help="Generate calls per server")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per generation")
    parser.add_argument("--models-dir", type=Path,
                        help="the tiny models: built there if missing (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, OtlpReceiver() as receiver:
        run(args, Path(tmp), receiver)


def run(args: argparse.Namespace, tmp: Path, receiver: OtlpReceiver) -> None:
    models = ensure_tiny_models(args.models_dir or tmp / "models")
    env = {"OMP_NUM_THREADS": "1"}
    # The exporter on its defaults (OTEL_BSP_*: a batch every 5 s), as a production server would run.
    traced = {key: value for key, value in receiver.env("bench").items() if not key.startswith("OTEL_BSP_")}
    with ServerProcess(tmp / "off.db", models, env=env).start() as off, \
            ServerProcess(tmp / "on.db", models, env={**env, **traced}).start() as on, \
            ViperClient(off.target) as client_off, ViperClient(on.target) as client_on:
        for client in (client_off, client_on):
            client.extract_profile(USER, rated_images())
        options = {"num_images": 1, "width": 64, "height": 64, "steps": args.steps, "seed": 1}
        for client in (client_off, client_on):  # warm both: first calls pay for connections and caches
            for _ in range(5):
                client.get_profile(USER)
            client.generate_images(USER, "a castle", **options)
        get_off, get_on = alternate(args.calls, lambda: client_off.get_profile(USER),
                                    lambda: client_on.get_profile(USER))
        gen_off, gen_on = alternate(args.generations, lambda: client_off.generate_images(USER, "a castle", **options),
                                    lambda: client_on.generate_images(USER, "a castle", **options))
        exported = len(receiver.wait_for(lambda service, span: service == "bench"))
    off_cost = off_cost_per_call()
    print(f"{'':28}{'tracing off':>14}{'tracing on (OTLP)':>20}{'ratio':>8}")
    print(f"{'GetProfile p50':28}{get_off * 1e3:>11.2f} ms{get_on * 1e3:>17.2f} ms{get_on / get_off:>7.2f}x")
    print(f"{'Generate p50 (64 px)':28}{gen_off * 1e3:>11.1f} ms{gen_on * 1e3:>17.1f} ms{gen_on / gen_off:>7.2f}x")
    print(f"spans exported by the traced server: {exported}")
    print(f"tracing off, the hooks of one call: {off_cost * 1e6:.1f} us ({off_cost / get_off:.2%} of a GetProfile)")
    print(f"tracing: getprofile {get_on / get_off:.2f}x, generate {gen_on / gen_off:.2f}x, "
          f"off {off_cost * 1e6:.1f} us per call")


if __name__ == "__main__":
    main()
