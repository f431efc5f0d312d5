"""How the SDK and the `viper` command treat the end of a Generate stream, with the server, the CLI and Ctrl-C
in separate processes: a stream that ends before every image arrived is never a success, and Ctrl-C at any
moment of a stream exits 130 and cancels the call on the server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from viper_client import AsyncViperClient, ViperClient, ViperError

FIXTURES = Path(__file__).parent / "fixtures" / "processes"
FINALIZER = FIXTURES / "viper_in_a_finalizer.py"
# `viper` as started from a terminal, Ctrl-C handled: a test run in the background (`make test &`, some CI
# runners) hands its children SIGINT ignored, and a command started that way rightly keeps ignoring it.
AS_FROM_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"
VIPER = [sys.executable, "-c", f"{AS_FROM_A_TERMINAL}; import sys; from viper_client import cli; sys.exit(cli.main())"]
# How long the fake server's "hang" call waits for a cancellation before ending the stream short.
HANG_SECONDS = 30


@dataclass
class FakeServer:
    target: str
    process: subprocess.Popen

    def next_line(self) -> str:
        """What it says next: "cancelled", or "not cancelled" when a hanging call gave up waiting."""
        return self.process.stdout.readline().strip()


@pytest.fixture(scope="module")
def fake_server():
    process = subprocess.Popen(
        [sys.executable, str(FIXTURES / "fake_generation_server.py"), "--hang-seconds", str(HANG_SECONDS)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        first = process.stdout.readline()  # "port N" once listening; "" if it died
        assert first.startswith("port "), f"the fake server did not start: {first!r}"
        yield FakeServer(f"127.0.0.1:{first.split()[1]}", process)
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the file exists; fails at once if the process ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exited {process.returncode} before {path.name} appeared"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


def generate(server: FakeServer, prompt: str, out: Path, command=VIPER, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [*command, "--target", server.target, "generate", "--user", "alice", "--prompt", prompt, "--out", str(out),
         "--num-images", "2", "--steps", "3", "--preview-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def test_the_sdk_raises_when_a_stream_ends_before_every_image(fake_server):
    with ViperClient(fake_server.target) as client:
        with pytest.raises(ViperError) as caught:
            client.generate_images("alice", "short", num_images=2)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS
    assert caught.value.message.startswith("the stream ended after 1 of 2 images")


def test_the_async_sdk_raises_when_a_stream_ends_before_every_image(fake_server):
    async def generate_images() -> None:
        async with AsyncViperClient(fake_server.target) as client:
            await client.generate_images("alice", "short", num_images=2)

    with pytest.raises(ViperError) as caught:
        asyncio.run(generate_images())
    assert caught.value.code == grpc.StatusCode.DATA_LOSS
    assert caught.value.message.startswith("the stream ended after 1 of 2 images")


def test_the_cli_fails_and_says_how_many_arrived_when_a_stream_ends_short(fake_server, tmp_path):
    out = tmp_path / "out"
    viper = generate(fake_server, "short", out)
    stdout, stderr = viper.communicate(timeout=120)
    assert (viper.returncode, stderr.splitlines()[-1:]) == (
        1, [f"error: DATA_LOSS: the stream ended after 1 of 2 images; kept 1 finished image(s) in {out}"]
    ), stderr
    assert stdout.splitlines() == [f"{out / '0.png'}  (seed 0)"]
    assert sorted(path.name for path in out.iterdir()) == ["0.png"]


def check_cancelled(viper: subprocess.Popen, server: FakeServer, out: Path) -> None:
    stdout, stderr = viper.communicate(timeout=120)
    assert (viper.returncode, stderr.splitlines()[-1:]) == (
        130, [f"generation cancelled; kept 1 finished image(s) in {out}"]
    ), stderr
    assert stdout.splitlines() == [f"{out / '0.png'}  (seed 0)"]
    assert sorted(path.name for path in out.iterdir()) == ["0.png"]  # the preview of image 1 removed
    assert server.next_line() == "cancelled"


def test_ctrl_c_while_a_stream_waits_exits_130_and_cancels_the_call(fake_server, tmp_path):
    out = tmp_path / "out"
    viper = generate(fake_server, "hang", out)
    wait_for(out / "1.preview.png", viper)
    viper.send_signal(signal.SIGINT)
    check_cancelled(viper, fake_server, out)


def test_ctrl_c_that_lands_in_a_finalizer_is_not_lost(fake_server, tmp_path):
    """A KeyboardInterrupt raised inside a finalizer is dropped: with Python's own SIGINT handler this Ctrl-C
    was lost, and `viper generate` went on waiting, then exited 0 with 1 of 2 images."""
    out, parked, release = tmp_path / "out", tmp_path / "parked", tmp_path / "release"
    env = {"PARK_WHEN": str(out / "1.preview.png"), "PARKED": str(parked), "RELEASE": str(release)}
    harness = [sys.executable, "-c", f"{AS_FROM_A_TERMINAL}; import runpy; runpy.run_path({str(FINALIZER)!r})"]
    viper = generate(fake_server, "hang", out, command=harness, env={**os.environ, **env})
    wait_for(parked, viper)
    viper.send_signal(signal.SIGINT)
    release.touch()
    check_cancelled(viper, fake_server, out)
