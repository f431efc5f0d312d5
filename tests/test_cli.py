"""The `viper` command against an in-process fake server holding profiles in memory (and, for `viper health`,
against a real server)."""

from __future__ import annotations

import _thread
import argparse
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image, UnidentifiedImageError

from viper_client import cli
from viper_proto.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    metric_pb2,
    metric_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)
from viper_server.testing import ServerProcess

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
CREATED = datetime(2024, 7, 1, 12, 0, tzinfo=timezone.utc)


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeServer(
    profile_pb2_grpc.ProfileServiceServicer,
    generation_pb2_grpc.GenerationServiceServicer,
    metric_pb2_grpc.MetricServiceServicer,
):
    """Keeps profiles in a dict, with versions checked like the real server; records every request."""

    def __init__(self) -> None:
        self.profiles: dict[str, profile_pb2.Profile] = {}
        self.requests: list[object] = []
        # False: extractions parse no features (as with the tiny random models).
        self.features_parsed = True
        # After the first preview of the last image, Generate "fails" (INTERNAL) or "hangs" until cancelled.
        self.generate_then: str | None = None
        self.generate_cancelled = threading.Event()
        self.side_by_side = False  # True: the images' progress interleaved, as a request's images denoise together

    def add(self, user_id: str, features: bool = True) -> profile_pb2.Profile:
        self.profiles[user_id] = profile_pb2.Profile(
            user_id=user_id,
            liked_features=["pastel pinks", "soft light"] if features else [],
            disliked_features=["gloom"] if features else [],
            raw_text="Liked Art Features: pastel pinks, soft light\nDisliked Art Features: gloom" if features
            else "#@ lorem zzk",
            version=1,
            liked_image_count=8,
            disliked_image_count=8,
            create_time=CREATED,
            update_time=CREATED,
            extractor_model="tiny-vpe",
            images=[profile_pb2.ProfileImage(sha256="ab" * 32, comment="nice", rating=profile_pb2.RATING_LIKED)],
        )
        return self.profiles[user_id]

    def _stored(self, user_id: str, expected_version: int, context: grpc.ServicerContext) -> profile_pb2.Profile:
        if user_id not in self.profiles:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no profile for {user_id}")
        profile = self.profiles[user_id]
        if expected_version and expected_version != profile.version:
            context.abort(grpc.StatusCode.ABORTED, f"profile {user_id} is at version {profile.version}")
        return profile

    def ExtractProfile(self, request, context):
        self.requests.append(request)
        for index, image in enumerate(request.images):  # as the real server words it
            if "<image>" in image.comment:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"images[{index}].comment: contains the control token '<image>', which comments may "
                              "not contain")
        return self.add(request.user_id, features=self.features_parsed)

    def GetProfile(self, request, context):
        self.requests.append(request)
        if request.user_id == "loading":
            context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading")
        return self._stored(request.user_id, 0, context)

    def ListProfiles(self, request, context):
        self.requests.append(request)
        # The token is the first user id of the next page.
        user_ids = [user_id for user_id in sorted(self.profiles) if user_id >= request.page_token]
        page, rest = user_ids[: request.page_size], user_ids[request.page_size :]
        return profile_pb2.ListProfilesResponse(
            profiles=[self.profiles[user_id] for user_id in page], next_page_token=rest[0] if rest else ""
        )

    def UpdateProfile(self, request, context):
        self.requests.append(request)
        profile = self._stored(request.user_id, request.expected_version, context)
        for path in request.update_mask.paths:
            getattr(profile, path)[:] = getattr(request, path)
        profile.version += 1
        return profile

    def DeleteProfile(self, request, context):
        self.requests.append(request)
        self._stored(request.user_id, request.expected_version, context)
        del self.profiles[request.user_id]
        return empty_pb2.Empty()

    def Generate(self, request, context):
        self.requests.append(request)
        self._stored(request.user_id, 0, context)
        if self.side_by_side:
            for step in range(1, request.steps + 1):
                for index in range(request.num_images):
                    yield generation_pb2.GenerateEvent(progress=generation_pb2.GenerateProgress(
                        image_index=index, step=step, total_steps=request.steps))
            for index in range(request.num_images):
                yield generation_pb2.GenerateEvent(image=generation_pb2.GeneratedImage(
                    image_index=index, png=png_bytes((index * 100, 0, 0)), seed=request.seed + index, width=8,
                    height=8))
            return
        for index in range(request.num_images):
            for step in range(1, request.steps + 1):
                yield generation_pb2.GenerateEvent(
                    progress=generation_pb2.GenerateProgress(image_index=index, step=step, total_steps=request.steps)
                )
                if request.preview_every and step % request.preview_every == 0:
                    preview = generation_pb2.GeneratePreview(image_index=index, step=step, png=png_bytes((0, 0, 0), 2))
                    yield generation_pb2.GenerateEvent(preview=preview)
                    if self.generate_then and index == request.num_images - 1:
                        self._fail_or_hang(context)
                        return
            image = generation_pb2.GeneratedImage(
                image_index=index, png=png_bytes((index * 100, 0, 0)), seed=request.seed + index, width=8, height=8
            )
            yield generation_pb2.GenerateEvent(image=image)

    def _fail_or_hang(self, context: grpc.ServicerContext) -> None:
        if self.generate_then == "fails":
            context.abort(grpc.StatusCode.INTERNAL, "the GPU fell off the bus")
        deadline = time.monotonic() + 30
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not context.is_active():
            self.generate_cancelled.set()

    def Score(self, request, context):
        self.requests.append(request)
        for index, query in enumerate(request.queries):  # queries first, as the real server checks them
            try:
                Image.open(io.BytesIO(query))
            except UnidentifiedImageError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"queries[{index}]: not a decodable image")
        self._stored(request.user_id, 0, context)
        # Last query first, as a server may stream them; query i scores (i + 1) / 10.
        for index in reversed(range(len(request.queries))):
            yield metric_pb2.ScoreResult(index=index, score=(index + 1) / 10)


@pytest.fixture
def server():
    fake = FakeServer()
    # The 16 fixture images are ~5 MB, above gRPC's default 4 MB limit.
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=2), options=options)
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(fake, grpc_server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(fake, grpc_server)
    metric_pb2_grpc.add_MetricServiceServicer_to_server(fake, grpc_server)
    fake.target = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    grpc_server.start()
    yield fake
    grpc_server.stop(grace=None)


def viper(server: FakeServer, *argv: object) -> int:
    return cli.main(["--target", server.target, *map(str, argv)])


def test_profile_extract_sends_the_fixture_images_with_their_comments(server, capsys):
    code = viper(
        server,
        "profile", "extract", "--user", "alice",
        "--liked", FIXTURES / "liked", "--disliked", FIXTURES / "disliked", "--comments", FIXTURES / "comments.json",
    )  # fmt: skip
    assert code == 0
    [request] = server.requests
    comments = json.loads((FIXTURES / "comments.json").read_text())
    expected = [(f"liked/{i}.png", profile_pb2.RATING_LIKED) for i in range(8)]
    expected += [(f"disliked/{i}.png", profile_pb2.RATING_DISLIKED) for i in range(8)]
    assert [(image.comment, image.rating) for image in request.images] == [
        (comments[name], rating) for name, rating in expected
    ]
    assert [image.data for image in request.images] == [(FIXTURES / name).read_bytes() for name, _ in expected]
    output = capsys.readouterr().out
    assert "alice" in output and "pastel pinks, soft light" in output and "8 liked, 8 disliked" in output


def write_image_folders(root: Path) -> None:
    (root / "liked").mkdir()
    (root / "disliked").mkdir()
    Image.new("RGB", (4, 4)).save(root / "liked" / "b.PNG")
    Image.new("RGB", (4, 4)).save(root / "liked" / "a.jpg")
    (root / "liked" / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 4)).save(root / "disliked" / "c.webp")


def test_profile_extract_takes_image_files_sorted_by_name_and_ignores_other_keys(server, tmp_path):
    write_image_folders(tmp_path)
    comments = {"about": "ignored", "liked/a.jpg": "A", "liked/b.PNG": "B", "disliked/c.webp": "C"}
    (tmp_path / "comments.json").write_text(json.dumps(comments))
    code = viper(
        server, "profile", "extract", "--user", "bob",
        "--liked", tmp_path / "liked", "--disliked", tmp_path / "disliked", "--comments", tmp_path / "comments.json",
    )  # fmt: skip
    assert code == 0
    assert [image.comment for image in server.requests[0].images] == ["A", "B", "C"]


def test_profile_extract_without_a_comment_fails_before_any_rpc(server, tmp_path, capsys):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    comments = json.loads((tmp_path / "comments.json").read_text())
    del comments["disliked/3.png"]
    (tmp_path / "comments.json").write_text(json.dumps(comments))
    code = viper(
        server, "profile", "extract", "--user", "alice",
        "--liked", tmp_path / "liked", "--disliked", tmp_path / "disliked", "--comments", tmp_path / "comments.json",
    )  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no comment in") and str(tmp_path / "disliked" / "3.png") in error
    assert "liked/0.png" not in error
    assert server.requests == []


def test_profile_get_prints_text_or_json(server, capsys):
    server.add("alice")
    assert viper(server, "profile", "get", "--user", "alice") == 0
    text = capsys.readouterr().out.splitlines()
    assert "user       alice" in text and "liked      pastel pinks, soft light" in text
    assert viper(server, "profile", "get", "--user", "alice", "--json") == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["user_id"] == "alice" and profile["version"] == 1
    assert profile["created_at"] == "2024-07-01T12:00:00+00:00"
    assert profile["images"] == [{"sha256": "ab" * 32, "comment": "nice", "rating": "liked", "position": 0}]


def test_profile_list_reads_every_page(server, capsys):
    for user_id in ("carol", "alice", "bob"):
        server.add(user_id)
    assert viper(server, "profile", "list", "--page-size", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["USER", "VERSION", "LIKED/DISLIKED", "IMAGES", "UPDATED"]
    assert [line.split()[0] for line in lines[1:]] == ["alice", "bob", "carol"]
    assert [request.page_token for request in server.requests] == ["", "carol"]
    assert viper(server, "profile", "list", "--json") == 0
    assert [profile["user_id"] for profile in json.loads(capsys.readouterr().out)] == ["alice", "bob", "carol"]


def test_profile_update_replaces_the_lists_given(server, capsys):
    server.add("alice")
    code = viper(
        server, "profile", "update", "--user", "alice",
        "--liked", "teal,  gold leaf ,", "--expected-version", 1, "--json",
    )  # fmt: skip
    assert code == 0
    [request] = server.requests
    assert list(request.update_mask.paths) == ["liked_features"] and request.expected_version == 1
    profile = json.loads(capsys.readouterr().out)
    assert (profile["liked_features"], profile["disliked_features"], profile["version"]) == (
        ["teal", "gold leaf"],
        ["gloom"],
        2,
    )


def test_profile_update_with_a_stale_version_reports_the_conflict(server, capsys):
    server.add("alice")
    assert viper(server, "profile", "update", "--user", "alice", "--disliked", "", "--expected-version", 5) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: ABORTED: profile alice is at version 1\n"
    assert captured.out == ""


def test_profile_update_needs_a_list(server, capsys):
    assert viper(server, "profile", "update", "--user", "alice") == 2
    assert "--liked" in capsys.readouterr().err
    assert server.requests == []


def test_profile_delete_then_get_is_not_found(server, capsys):
    server.add("alice")
    assert viper(server, "profile", "delete", "--user", "alice", "--expected-version", 1) == 0
    assert capsys.readouterr().out == "deleted alice\n"
    assert server.requests[0].expected_version == 1
    assert viper(server, "profile", "get", "--user", "alice") == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: no profile for alice\n"


def test_generate_writes_each_image_and_prints_its_path(server, tmp_path, capsys):
    server.add("alice")
    out = tmp_path / "out"
    code = viper(
        server, "generate", "--user", "alice", "--prompt", "a cat", "--out", out, "--num-images", 2,
        "--width", 64, "--height", 32, "--steps", 3, "--seed", 7, "--preview-every", 2, "--no-refine",
    )  # fmt: skip
    assert code == 0
    [request] = server.requests
    assert (request.prompt, request.num_images, request.width, request.height) == ("a cat", 2, 64, 32)
    assert (request.steps, request.seed, request.preview_every) == (3, 7, 2)
    assert request.HasField("refine") and not request.refine
    assert not request.HasField("guidance_scale")
    assert capsys.readouterr().out.splitlines() == [f"{out / '0.png'}  (seed 7)", f"{out / '1.png'}  (seed 8)"]
    assert sorted(path.name for path in out.iterdir()) == ["0.png", "1.png"]  # previews replaced
    assert Image.open(out / "1.png").getpixel((0, 0)) == (100, 0, 0)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("side_by_side", [False, True])
def test_generate_progress_bar_counts_the_steps_of_every_image(server, tmp_path, monkeypatch, side_by_side):
    server.add("alice")
    server.side_by_side = side_by_side
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert (
        viper(
            server,
            "generate",
            "--user",
            "alice",
            "--prompt",
            "a cat",
            "--out",
            tmp_path,
            "--num-images",
            2,
            "--steps",
            3,
        )
        == 0
    )
    assert terminal.getvalue().rstrip().rsplit("\r", 1)[-1].lstrip().startswith("100%|")
    assert "6/6" in terminal.getvalue()
    counts = [int(n) for n in re.findall(r"(\d+)/6 ", terminal.getvalue())]
    assert counts == sorted(counts), f"the bar went back: {counts}"


def test_score_prints_each_image_with_its_score_in_order(server, capsys):
    server.add("alice")
    images = [FIXTURES / "query1.png", FIXTURES / "query2.png"]
    assert viper(server, "score", "--user", "alice", *images) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [["IMAGE", "SCORE"], [str(images[0]), "0.1000"], [str(images[1]), "0.2000"]]
    assert list(server.requests[0].queries) == [path.read_bytes() for path in images]
    assert viper(server, "score", "--user", "alice", "--json", *images) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"image": str(images[0]), "score": 0.1},
        {"image": str(images[1]), "score": 0.2},
    ]


def test_a_missing_image_file_is_an_error_without_traceback(server, tmp_path, capsys):
    assert viper(server, "score", "--user", "alice", tmp_path / "nope.png") == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert server.requests == []


def test_target_comes_from_viper_target(server, monkeypatch, capsys):
    server.add("alice")
    monkeypatch.setenv("VIPER_TARGET", server.target)
    assert cli.main(["profile", "get", "--user", "alice", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["user_id"] == "alice"


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_is_reported_with_a_hint(capsys):
    target = f"127.0.0.1:{free_port()}"
    assert cli.main(["--target", target, "--timeout", "5", "profile", "get", "--user", "alice"]) == 1
    error, hint = capsys.readouterr().err.splitlines()
    assert error.startswith("error: UNAVAILABLE: ")
    assert hint.startswith(f"hint: is a server running at {target}? `make serve` starts one")
    assert "viper serve" in hint


def test_an_unavailable_answer_from_a_running_server_gets_no_connection_hint(server, capsys):
    assert viper(server, "profile", "get", "--user", "loading") == 1
    assert capsys.readouterr().err == "error: UNAVAILABLE: models are still loading\n"


def test_unknown_options_are_usage_errors():
    with pytest.raises(SystemExit) as caught:
        cli.main(["profile", "get", "--user", "alice", "--bogus"])
    assert caught.value.code == 2


@pytest.mark.parametrize(
    ("command", "package", "hint"),
    [
        ("serve", "viper_server", "viper serve needs the server, a separate package: from a viper-serve checkout run "
                                  "`pip install . ./profiles ./server`"),
        ("build-tiny-models", "viper_server", "viper build-tiny-models needs the server"),
        ("train-toy-models", "viper_server", "viper train-toy-models needs the server"),
        ("web", "viper_web", "viper web needs the web gateway, a separate package: from a viper-serve checkout run "
                             "`pip install ./web`"),
    ],
)
def test_delegated_commands_say_what_to_install(monkeypatch, capsys, command, package, hint):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == package else real_find_spec(name, *args)
    )
    assert cli.main([command, "--port", "1"]) == 2
    assert hint in capsys.readouterr().err


def test_server_commands_are_handed_to_the_server_with_their_arguments_untouched(monkeypatch):
    received = []
    monkeypatch.setattr(os, "execv", lambda path, argv: received.append((path, argv)))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    cli.main(["--target", "x:1", "serve", "--port", "1", "-h", "--", "--target"])
    assert received == [(sys.executable, [sys.executable, "-m", "viper_server", "serve", "--port", "1", "-h", "--",
                                          "--target"])]


def test_web_is_handed_to_the_gateway_with_its_arguments_untouched(monkeypatch):
    received = []
    monkeypatch.setattr(os, "execv", lambda path, argv: received.append((path, argv)))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    cli.main(["--target", "x:1", "web", "--backend", "127.0.0.1:50051", "--port", "0", "--help", "--", "--token"])
    assert received == [(sys.executable, [sys.executable, "-m", "viper_web", "--backend", "127.0.0.1:50051",
                                          "--port", "0", "--help", "--", "--token"])]


def test_viper_web_reaches_the_installed_gateway(tmp_path):
    """Not mocked: `viper web --help` runs viper_web's own command line."""
    import subprocess

    command = "import sys; from viper_client.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", command, "web", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: viper web") and "--backend" in result.stdout


# -- item 10: a profile without features says where the model's output is --------------------------------------


def test_a_profile_with_no_parsed_features_says_where_the_raw_output_is(server, capsys):
    server.features_parsed = False
    code = viper(
        server, "profile", "extract", "--user", "alice",
        "--liked", FIXTURES / "liked", "--disliked", FIXTURES / "disliked", "--comments", FIXTURES / "comments.json",
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "liked      (none)" in lines and "disliked   (none)" in lines
    assert lines[-1] == ("note: no features were parsed from the model's output; its raw text is in --json "
                         "(field raw_text)")
    assert viper(server, "profile", "get", "--user", "alice") == 0
    note = capsys.readouterr().out.splitlines()[-1]
    assert note.startswith("note: no features: none were parsed from the model's output, or an update removed them")
    assert "--json (field raw_text)" in note
    assert viper(server, "profile", "get", "--user", "alice", "--json") == 0
    assert json.loads(capsys.readouterr().out)["raw_text"] == "#@ lorem zzk"


def test_a_profile_with_features_has_no_note(server, capsys):
    server.add("alice")
    assert viper(server, "profile", "get", "--user", "alice") == 0
    assert "note:" not in capsys.readouterr().out


# -- item 11: errors name the files, not the request's indexes -----------------------------------------------


def test_score_errors_name_the_file_sent_as_the_query(server, tmp_path, capsys):
    server.add("alice")
    broken = tmp_path / "broken.png"
    broken.write_text("not a PNG")
    assert viper(server, "score", "--user", "alice", FIXTURES / "query1.png", broken) == 1
    assert capsys.readouterr().err == f"error: INVALID_ARGUMENT: {broken}: not a decodable image\n"


def test_extract_errors_name_the_file_whose_comment_was_refused(server, tmp_path, capsys):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    comments = json.loads((tmp_path / "comments.json").read_text())
    comments["liked/3.png"] = "I love the <image> of it"
    (tmp_path / "comments.json").write_text(json.dumps(comments))
    code = viper(
        server, "profile", "extract", "--user", "alice",
        "--liked", tmp_path / "liked", "--disliked", tmp_path / "disliked", "--comments", tmp_path / "comments.json",
    )  # fmt: skip
    assert code == 1
    assert capsys.readouterr().err == (
        f"error: INVALID_ARGUMENT: the comment on {tmp_path / 'liked' / '3.png'}: contains the control token "
        "'<image>', which comments may not contain\n"
    )


# -- item 12: generate leaves nothing behind after a failure or Ctrl-C -----------------------------------------


def test_generate_creates_no_folder_when_the_call_fails(server, tmp_path, capsys):
    out = tmp_path / "nested" / "out"
    assert viper(server, "generate", "--user", "nobody", "--prompt", "a cat", "--out", out, "--steps", 2) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_removes_its_previews_and_empty_folders_when_the_stream_fails(server, tmp_path, capsys):
    server.add("alice")
    server.generate_then = "fails"
    out = tmp_path / "nested" / "out"
    code = viper(server, "generate", "--user", "alice", "--prompt", "a cat", "--out", out, "--steps", 2,
                 "--preview-every", 1)
    assert code == 1
    assert capsys.readouterr().err.endswith("error: INTERNAL: the GPU fell off the bus\n")
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_an_out_that_is_a_file(server, tmp_path, capsys):
    server.add("alice")
    (tmp_path / "out").write_text("")
    assert viper(server, "generate", "--user", "alice", "--prompt", "a cat", "--out", tmp_path / "out") == 2
    assert "is not a folder" in capsys.readouterr().err
    assert server.requests == []


@pytest.fixture
def sigint_handled():
    """SIGINT handled by Python, as in a terminal: a test run in the background (`make test &`, some CI runners)
    starts with SIGINT ignored, where interrupt_main() does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_the_generation_and_removes_the_previews(server, tmp_path, capsys, sigint_handled):
    server.add("alice")
    server.generate_then = "hangs"  # after image 1's first preview, until the client cancels
    out = tmp_path / "out"

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 30
        while not (out / "1.preview.png").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if (out / "1.preview.png").exists():
            _thread.interrupt_main()  # what Ctrl-C does: SIGINT's KeyboardInterrupt in the main thread

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    try:
        code = viper(server, "generate", "--user", "alice", "--prompt", "a cat", "--out", out, "--num-images", 2,
                     "--steps", 3, "--preview-every", 1)
    finally:
        presser.join()
    assert code == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == f"generation cancelled; kept 1 finished image(s) in {out}"
    assert captured.out.splitlines() == [f"{out / '0.png'}  (seed 0)"]
    assert sorted(path.name for path in out.iterdir()) == ["0.png"]
    assert server.generate_cancelled.wait(10), "the server's call was not cancelled"


# -- item 14: every option says what it does and its default ------------------------------------------------


def all_parsers(parser: argparse.ArgumentParser, name: str = "viper"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for command, subparser in action.choices.items():
                assert helps.get(command), f"{name} {command} has no help line"
                yield from all_parsers(subparser, f"{name} {command}")


def test_every_option_of_every_command_has_help_with_its_default():
    parsers = list(all_parsers(cli.build_parser()))
    assert {"viper generate", "viper health", "viper profile list", "viper web"} <= {name for name, _ in parsers}
    for name, parser in parsers:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{label} has no help"
            takes_value = action.option_strings and action.nargs != 0
            if takes_value and not action.required:
                assert "default" in action.help, f"{label} does not say its default"
        text = parser.format_help()
        for placeholder in ("default None", "default: None", "default False", "default True"):
            assert placeholder not in text, f"{name} --help shows {placeholder!r}"


def test_generate_help_names_the_server_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("1024 for the real SDXL models, 64 for the tiny ones", "the server's 40", "the server's 5.0",
                    "the server's 0.85", "0 = not personalized", "0 = random", "no previews"):
        assert default in text


# -- item 15: viper health -------------------------------------------------------------------------------------


@pytest.fixture
def health_server():
    """A gRPC server with only the standard health service, its status set by the test (NOT_SERVING at first)."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    servicer.target = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    grpc_server.start()
    yield servicer
    grpc_server.stop(grace=None)


class _AnswersOnceThenHangs(health.HealthServicer):
    """NOT_SERVING once, then every check hangs until released: a server too busy to answer again."""

    def __init__(self) -> None:
        super().__init__()
        self.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.release = threading.Event()
        self._answered = False

    def Check(self, request, context):
        if self._answered:
            self.release.wait(30)
        self._answered = True
        return super().Check(request, context)


def test_health_wait_reports_the_last_answer_not_its_own_cut_short_check(capsys):
    servicer = _AnswersOnceThenHangs()
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    target = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    grpc_server.start()
    try:
        assert cli.main(["--target", target, "health", "--wait", "1"]) == 1
    finally:
        servicer.release.set()
        grpc_server.stop(grace=None)
    assert capsys.readouterr().err == f"error: {target} was not SERVING after 1 s (last answer: NOT_SERVING)\n"


def test_health_of_a_real_server_is_serving(toy_models_dir, tmp_path, capsys):
    with ServerProcess(tmp_path / "profiles.db", toy_models_dir, models="toy") as server:
        assert cli.main(["--target", server.target, "health"]) == 0
        assert capsys.readouterr().out == "SERVING\n"
        assert cli.main(["--target", server.target, "health", "--wait", "5"]) == 0
        assert capsys.readouterr().out == "SERVING\n"
        # The real server's messages name queries[N]: the CLI names the file instead.
        text = tmp_path / "notes.png"
        text.write_text("not an image")
        assert cli.main(["--target", server.target, "score", "--user", "alice", str(FIXTURES / "query1.png"),
                         str(text)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: INVALID_ARGUMENT: {text}: ") and "queries[" not in error


def test_health_not_serving_prints_the_status_and_exits_1(health_server, capsys):
    assert cli.main(["--target", health_server.target, "health"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_health_wait_polls_until_serving(health_server, capsys):
    timer = threading.Timer(0.5, health_server.set, ("", health_pb2.HealthCheckResponse.SERVING))
    timer.start()
    try:
        assert cli.main(["--target", health_server.target, "health", "--wait", "60"]) == 0
    finally:
        timer.cancel()
    assert capsys.readouterr().out == "SERVING\n"


def test_health_wait_gives_up_when_the_time_is_up(health_server, capsys):
    """The last answer is the server's, even when the wait's end cuts the last check short (a busy machine)."""
    assert cli.main(["--target", health_server.target, "health", "--wait", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: {health_server.target} was not SERVING after 2 s "
                            "(last answer: NOT_SERVING)\n")


def test_health_with_nothing_listening_fails_with_the_hint(capsys):
    target = f"127.0.0.1:{free_port()}"
    assert cli.main(["--target", target, "health"]) == 1
    error, hint = capsys.readouterr().err.splitlines()
    assert error.startswith("error: UNAVAILABLE: ") and hint.startswith(f"hint: is a server running at {target}?")
    assert cli.main(["--target", target, "health", "--wait", "0.5"]) == 1
    error, hint = capsys.readouterr().err.splitlines()
    assert error.startswith(f"error: {target} was not SERVING after 0.5 s (last answer: UNAVAILABLE: ")
    assert hint.startswith(f"hint: is a server running at {target}?")


def test_health_wait_must_not_be_negative(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["health", "--wait", "-1"])
    assert caught.value.code == 2
