"""The `viper` command: the SDK's calls from a shell, plus the server's and the gateway's commands when installed."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from viper_client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    Tls,
    create_channel,
    refuse_cleartext_token,
)
from viper_client.client import ViperClient
from viper_client.errors import ViperError, error_from_rpc
from viper_client.types import GeneratedImage, Preview, Profile, Progress, RatedImage, Rating

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# How often `viper health --wait` asks again.
HEALTH_POLL_SECONDS = 0.25
# Exit status of a command stopped with Ctrl-C, as shells report SIGINT.
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Delegated:
    """A command of another package that `viper` runs as `python -m MODULE *PREFIX ...` with its arguments
    untouched, or explains how to install."""

    module: str
    prefix: tuple[str, ...]
    help: str
    install_hint: str


_SERVER_HINT = (
    "viper {command} needs the server, a separate package: from a viper-serve checkout run "
    "`pip install . ./profiles ./server`, then `viper-server {command}` (or `viper {command}`)"
)
DELEGATED_COMMANDS = {
    "serve": Delegated("viper_server", ("serve",), "run the gRPC server: `viper-server serve`, see "
                       "`viper serve --help` (needs the server package)", _SERVER_HINT.format(command="serve")),
    "build-tiny-models": Delegated(
        "viper_server", ("build-tiny-models",),
        "write the tiny random-weight checkpoints to DIR: `viper-server build-tiny-models` (needs the server package)",
        _SERVER_HINT.format(command="build-tiny-models"),
    ),
    "train-toy-models": Delegated(
        "viper_server", ("train-toy-models",),
        "train the toy-world models into DIR: `viper-server train-toy-models` (needs the server package)",
        _SERVER_HINT.format(command="train-toy-models"),
    ),
    "web": Delegated(
        "viper_web", (), "run the web gateway (Connect, gRPC-Web) and the ViPer web page: `viper-web`, see "
        "`viper web --help` (needs the web package)",
        "viper web needs the web gateway, a separate package: from a viper-serve checkout run `pip install ./web` "
        "(beside the client: `pip install . ./web`), then `viper web` (or `viper-web`)",
    ),
}


class InputError(Exception):
    """A problem with the command's local inputs, found before any RPC."""


class CommandCancelled(Exception):
    """Ctrl-C, after the command cleaned up; the message says what was stopped and what was kept."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in DELEGATED_COMMANDS:
        # The raw argv after the command, not argparse's leftovers (which may lose a '--').
        return run_delegated(args.command, argv[argv.index(args.command) + 1 :])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    timeouts = {} if args.timeout is None else {"timeout": args.timeout, "long_timeout": args.timeout}
    use_tls = args.tls or args.tls_ca or args.tls_cert
    tls = Tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if use_tls else None
    try:
        if args.command == "health":
            if args.token:  # the health check makes its own channel: the same refusal as connect()'s
                refuse_cleartext_token(args.target, tls=tls, insecure=args.insecure)
            return check_health(args, tls)
        with ViperClient(args.target, token=args.token, tls=tls, insecure=args.insecure, **timeouts) as client:
            args.handler(client, args)
    except ViperError as error:
        report_error(error, args.target)
        return 1
    except (InputError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CommandCancelled as cancelled:
        print(cancelled, file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def report_error(error: ViperError, target: str) -> None:
    print(f"error: {error}", file=sys.stderr)
    hint = connection_hint(error, target)
    if hint:
        print(hint, file=sys.stderr)


def connection_hint(error: ViperError, target: str) -> str | None:
    """What to check when the server could not be reached at all (not when it answered UNAVAILABLE)."""
    if error.code != grpc.StatusCode.UNAVAILABLE:
        return None
    message = error.message.lower()
    if "failed to connect" in message or "connection refused" in message or "connect failed" in message:
        return (f"hint: is a server running at {target}? `make serve` starts one from a viper-serve checkout "
                "(or `viper serve`); --target (env VIPER_TARGET) names another address")
    if "resolv" in message or "dns" in message:
        return f"hint: the host of {target} was not found; --target (env VIPER_TARGET) names the server's address"
    return None


USER_HELP = "the user's id: 1-128 characters of A-Z a-z 0-9 . _ : @ -"
EXPECTED_VERSION_HELP = "fail with ABORTED unless the stored profile has this version (default: any version)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viper", description="Client of a viper-serve server.")
    parser.add_argument(
        "--target",
        default=os.environ.get("VIPER_TARGET", DEFAULT_TARGET),
        help="server address, HOST:PORT (env VIPER_TARGET; default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="deadline of each call in seconds (default 30, and 600 for extract, generate and score; "
             "for health, of each check)",
    )
    # Never %(default)s here: the default comes from the environment and is a secret.
    parser.add_argument("--token", default=os.environ.get("VIPER_TOKEN"),
                        help="bearer token sent with every call: a service token or an end user's JWT, for "
                             "servers run with --auth-config or --auth-tokens (env VIPER_TOKEN; default: none)")
    parser.add_argument("--insecure", action="store_true",
                        default=os.environ.get("VIPER_INSECURE", "") in ("1", "true", "yes"),
                        help="send --token in plaintext to a host that is not this machine (env VIPER_INSECURE=1; "
                             "default: refused without TLS)")
    parser.add_argument("--tls", action="store_true",
                        help="connect with TLS, verifying the server (implied by --tls-ca and --tls-cert; "
                             "default: plaintext)")
    parser.add_argument("--tls-ca", default=os.environ.get("VIPER_TLS_CA"),
                        help="CA certificate (PEM) that signed the server's (env VIPER_TLS_CA; default: the "
                             "system's trusted roots)")
    parser.add_argument("--tls-cert", default=os.environ.get("VIPER_CLIENT_TLS_CERT"),
                        help="client certificate (PEM) for mutual TLS, with --tls-key (env VIPER_CLIENT_TLS_CERT; "
                             "default: none)")
    parser.add_argument("--tls-key", default=os.environ.get("VIPER_CLIENT_TLS_KEY"),
                        help="private key (PEM) of --tls-cert (env VIPER_CLIENT_TLS_KEY; default: none)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    json_output = argparse.ArgumentParser(add_help=False)
    json_output.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")

    profile = commands.add_parser("profile", help="extract and manage preference profiles")
    actions = profile.add_subparsers(dest="action", required=True, metavar="ACTION")

    extract = actions.add_parser(
        "extract", parents=[json_output], help="extract a profile from commented images",
        description="Runs the ViPer preference extractor over the liked and disliked images with their comments "
                    "and stores the result as the user's profile, replacing any earlier one.",
    )
    extract.add_argument("--user", required=True, help=USER_HELP)
    extract.add_argument("--liked", required=True, type=Path,
                         help="folder of images the user likes (.png, .jpg, .jpeg, .webp; taken in name order)")
    extract.add_argument("--disliked", required=True, type=Path,
                         help="folder of images the user dislikes (.png, .jpg, .jpeg, .webp; taken in name order)")
    extract.add_argument(
        "--comments",
        required=True,
        type=Path,
        help="JSON object mapping each image's path, relative to the JSON file's folder (e.g. \"liked/0.png\"), "
             "to the user's comment on it; every image needs one",
    )
    extract.set_defaults(handler=extract_profile)

    get = actions.add_parser("get", parents=[json_output], help="show a profile")
    get.add_argument("--user", required=True, help=USER_HELP)
    get.add_argument("--version", type=_positive_int, help="a kept version (default: the current one)")
    get.set_defaults(handler=get_profile)

    list_ = actions.add_parser("list", parents=[json_output], help="list all profiles")
    list_.add_argument("--page-size", type=_positive_int, default=100,
                       help="profiles fetched per call, 1-1000; every page is read (default %(default)s)")
    list_.set_defaults(handler=list_profiles)

    update = actions.add_parser("update", parents=[json_output], help="replace a profile's feature lists")
    update.add_argument("--user", required=True, help=USER_HELP)
    update.add_argument("--liked", type=_features,
                        help='comma-separated liked features replacing the stored list, e.g. "pastel, soft light"; '
                             '"" empties it (default: keep the stored list)')
    update.add_argument("--disliked", type=_features,
                        help='comma-separated disliked features replacing the stored list; "" empties it '
                             "(default: keep the stored list)")
    update.add_argument("--expected-version", type=int, help=EXPECTED_VERSION_HELP)
    update.set_defaults(handler=update_profile)

    delete = actions.add_parser("delete", parents=[json_output], help="delete a profile and its images")
    delete.add_argument("--user", required=True, help=USER_HELP)
    delete.add_argument("--expected-version", type=int, help=EXPECTED_VERSION_HELP)
    delete.set_defaults(handler=delete_profile)
    _add_life_commands(actions, json_output)

    generate = commands.add_parser(
        "generate", help="generate images personalized to a profile",
        description="Generates images for a prompt, guided by the user's liked and disliked features, with a "
                    "progress bar; prints each image's path and seed. Ctrl-C cancels the generation on the server. "
                    "Options left at their defaults take the server's.",
    )
    generate.add_argument("--user", required=True, help="the user whose profile guides the images")
    generate.add_argument("--prompt", required=True, help="what to draw (at most 77 CLIP tokens)")
    generate.add_argument("--out", required=True, type=Path,
                          help="folder for <index>.png, created when the first image or preview arrives")
    generate.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    generate.add_argument("--num-images", type=_positive_int, default=1,
                          help="how many images, at most 8 on a server with default limits (default %(default)s)")
    size_help = ("in pixels, a multiple of 8 within the server's bounds, 64-2048 by default (default 0: the "
                 "server's model size, 1024 for the real SDXL models, 64 for the tiny ones)")
    generate.add_argument("--width", type=int, default=0, help=f"image width {size_help}")
    generate.add_argument("--height", type=int, default=0, help=f"image height {size_help}")
    generate.add_argument("--steps", type=int, default=0,
                          help="denoising steps over base and refiner, 1-150 on a server with default limits "
                               "(default 0: the server's 40)")
    generate.add_argument("--guidance-scale", type=float,
                          help="classifier-free guidance scale, above 1 and at most 30 (default: the server's 5.0)")
    generate.add_argument("--preference-strength", type=float,
                          help="weight of the profile's liked and disliked features, 0-2; 0 = not personalized "
                               "(default: the server's 0.85)")
    generate.add_argument("--no-refine", dest="refine", action="store_const", const=False,
                          help="skip the refiner (default: base, then refiner)")
    generate.add_argument("--seed", type=int, default=0,
                          help="seed of image 0; image i uses seed + i, and the seed printed with an image "
                               "makes it again as image 0 with the same options; 0 = random (default 0)")
    generate.add_argument(
        "--preview-every", type=int, default=0,
        help="write <index>.preview.png every this many steps, replaced by <index>.png when it is done "
             "(default 0: no previews)",
    )
    generate.add_argument(
        "--best-of", type=int, default=0, metavar="N",
        help="generate N candidates (seeds seed, seed+1, ...), score each with the user's metric and keep the best "
             "--num-images, best first as 0.png, 1.png, ...; prints each image's score; at most 16 on a server "
             "with default limits (default 0: no ranking)",
    )
    generate.set_defaults(handler=generate_images)

    score = commands.add_parser(
        "score", parents=[json_output], help="score how much the user would like images",
        description="Scores each image in [0, 1] (higher: liked more) against the user's stored liked and "
                    "disliked images.",
    )
    score.add_argument("--user", required=True, help="the user whose profile images are the context")
    score.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                       help="image files to score, at most 64 on a server with default limits")
    score.set_defaults(handler=score_images)

    health = commands.add_parser(
        "health", help="ask whether the server is ready (grpc.health.v1.Health)",
        description="Prints the server's health status (SERVING, NOT_SERVING while models load or during "
                    "shutdown, ...); exits 0 when SERVING, 1 otherwise. Uses --target, --token and the TLS options.",
    )
    health.add_argument("--wait", type=_non_negative_float, default=0.0, metavar="SECONDS",
                        help="ask again until the server is SERVING, for at most this many seconds "
                             "(default 0: ask once)")

    for name, delegated in DELEGATED_COMMANDS.items():
        commands.add_parser(name, add_help=False, help=delegated.help)
    return parser


def run_delegated(command: str, arguments: list[str]) -> int:
    """Replaces this process with `python -m MODULE ...`: the client imports no server or gateway code."""
    delegated = DELEGATED_COMMANDS[command]
    # find_spec, not import: it tells whether the package is installed without loading it (or torch).
    if importlib.util.find_spec(delegated.module) is None:
        print(delegated.install_hint, file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", delegated.module, *delegated.prefix, *arguments])
    return 0  # not reached: execv does not return


# Shown under a profile whose two feature lists are empty, instead of two blank lines.
NOTHING_PARSED = "no features were parsed from the model's output; its raw text is in --json (field raw_text)"
NO_FEATURES = ("no features: none were parsed from the model's output, or an update removed them; the model's "
               "raw output is in --json (field raw_text)")


def extract_profile(client: ViperClient, args: argparse.Namespace) -> None:
    images = load_rated_images(args.liked, args.disliked, args.comments)
    try:
        profile = client.extract_profile(args.user, images)
    except ViperError as error:
        raise name_files(error, "images", [image.image for image in images]) from error
    print_profile(profile, args.json, empty_note=NOTHING_PARSED)


def get_profile(client: ViperClient, args: argparse.Namespace) -> None:
    print_profile(client.get_profile(args.user, version=args.version), args.json, empty_note=NO_FEATURES)


def _add_life_commands(actions: argparse._SubParsersAction, json_output: argparse.ArgumentParser) -> None:
    """add, remove, history, restore, export, import: a profile's life (README "Profile history")."""
    add = actions.add_parser(
        "add", parents=[json_output], help="rate more images: add them to a profile and re-extract",
        description="Appends commented images to the user's stored ones (creating the profile if there is none) "
                    "and re-extracts over all of them. An image stored already keeps its place and takes the new "
                    "comment and rating.")
    add.add_argument("--user", required=True, help=USER_HELP)
    add.add_argument("--liked", type=Path, help="folder of newly liked images (taken in name order; default: none)")
    add.add_argument("--disliked", type=Path,
                     help="folder of newly disliked images (taken in name order; default: none)")
    add.add_argument("--comments", required=True, type=Path,
                     help="JSON object mapping each image's path, relative to the JSON file's folder, to its comment")
    add.add_argument("--expected-version", type=int, help=EXPECTED_VERSION_HELP)
    add.set_defaults(handler=add_ratings)
    remove = actions.add_parser("remove", parents=[json_output], help="remove images from a profile and re-extract")
    remove.add_argument("--user", required=True, help=USER_HELP)
    remove.add_argument("--image", required=True, action="append", metavar="SHA256",
                        help="a stored image's sha256 (as `viper profile get --json` shows); repeat for more")
    remove.add_argument("--expected-version", type=int, help=EXPECTED_VERSION_HELP)
    remove.set_defaults(handler=remove_ratings)
    history = actions.add_parser("history", parents=[json_output], help="list a profile's kept versions")
    history.add_argument("--user", required=True, help=USER_HELP)
    history.set_defaults(handler=profile_history)
    restore = actions.add_parser("restore", parents=[json_output],
                                 help="make a new version from a kept one (no re-extraction)")
    restore.add_argument("--user", required=True, help=USER_HELP)
    restore.add_argument("--version", required=True, type=_positive_int, help="the kept version to restore")
    restore.add_argument("--expected-version", type=int, help=EXPECTED_VERSION_HELP)
    restore.set_defaults(handler=restore_version)
    export = actions.add_parser("export", help="save a profile, every kept version and its images, as a zip")
    export.add_argument("--user", required=True, help=USER_HELP)
    export.add_argument("-o", "--output", required=True, type=Path, metavar="FILE",
                        help="the archive to write; must not exist")
    export.set_defaults(handler=export_profile)
    import_ = actions.add_parser("import", parents=[json_output], help="create a profile from an exported zip")
    import_.add_argument("--user", required=True, help=USER_HELP)
    import_.add_argument("file", type=Path, metavar="FILE", help="an archive made by `viper profile export`")
    import_.add_argument("--replace", action="store_true",
                         help="erase and replace an existing profile (default: refuse, exit 1)")
    import_.set_defaults(handler=import_profile)


def add_ratings(client: ViperClient, args: argparse.Namespace) -> None:
    if args.liked is None and args.disliked is None:
        raise InputError("give --liked and/or --disliked")
    images = load_rated_images(args.liked, args.disliked, args.comments)
    try:
        profile = client.add_ratings(args.user, images, expected_version=args.expected_version)
    except ViperError as error:
        raise name_files(error, "images", [image.image for image in images]) from error
    print_profile(profile, args.json, empty_note=NOTHING_PARSED)


def remove_ratings(client: ViperClient, args: argparse.Namespace) -> None:
    print_profile(client.remove_ratings(args.user, args.image, expected_version=args.expected_version), args.json)


def profile_history(client: ViperClient, args: argparse.Namespace) -> None:
    versions = client.list_profile_versions(args.user)
    if args.json:
        print_json([dataclasses.asdict(version) for version in versions])
        return
    rows = [(str(v.version), v.change or "-", f"{v.liked_image_count}/{v.disliked_image_count}",
             v.updated_at.isoformat(), ", ".join(v.liked_features) or "(none)") for v in versions]
    print_table(("VERSION", "MADE BY", "LIKED/DISLIKED IMAGES", "TIME", "LIKED FEATURES"), rows)


def restore_version(client: ViperClient, args: argparse.Namespace) -> None:
    profile = client.restore_profile_version(args.user, args.version, expected_version=args.expected_version)
    print_profile(profile, args.json)


def export_profile(client: ViperClient, args: argparse.Namespace) -> None:
    if args.output.exists():
        raise InputError(f"{args.output} exists: remove it or name another file")
    archive = client.export_profile(args.user)
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_bytes(archive)
    partial.replace(args.output)  # complete or absent
    print(f"exported {args.user} to {args.output} ({len(archive)} bytes)")


def import_profile(client: ViperClient, args: argparse.Namespace) -> None:
    print_profile(client.import_profile(args.user, args.file.read_bytes(), replace=args.replace), args.json)


def list_profiles(client: ViperClient, args: argparse.Namespace) -> None:
    profiles = client.list_profiles(page_size=args.page_size)
    if args.json:
        print_json([dataclasses.asdict(profile) for profile in profiles])
        return
    rows = [
        (p.user_id, str(p.version), f"{p.liked_image_count}/{p.disliked_image_count}", p.updated_at.isoformat())
        for p in profiles
    ]
    print_table(("USER", "VERSION", "LIKED/DISLIKED IMAGES", "UPDATED"), rows)


def update_profile(client: ViperClient, args: argparse.Namespace) -> None:
    if args.liked is None and args.disliked is None:
        raise InputError("give --liked and/or --disliked")
    profile = client.update_profile(
        args.user,
        liked_features=args.liked,
        disliked_features=args.disliked,
        expected_version=args.expected_version,
    )
    print_profile(profile, args.json)


def delete_profile(client: ViperClient, args: argparse.Namespace) -> None:
    client.delete_profile(args.user, expected_version=args.expected_version)
    if args.json:
        print_json({"user_id": args.user, "deleted": True})
    else:
        print(f"deleted {args.user}")


def generate_images(client: ViperClient, args: argparse.Namespace) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")
    out = OutputFolder(args.out)
    events = client.generate(
        args.user,
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        preference_strength=args.preference_strength,
        refine=args.refine,
        seed=args.seed,
        preview_every=args.preview_every,
        candidates=args.best_of,
    )
    with CtrlC(client) as ctrl_c:
        try:
            # closing(): an error here cancels the generation on the server.
            with closing(events), tqdm(unit="step", disable=None) as bar:
                steps_done: dict[int, int] = {}
                for event in events:
                    if ctrl_c.pressed:
                        break
                    show_event(event, out, bar, max(args.num_images, args.best_of), steps_done)
        except Exception:
            # After Ctrl-C the stream fails as cancelled (or never starts, on a closed channel): that is the
            # Ctrl-C, reported below.
            if not ctrl_c.pressed:
                raise
        finally:
            # After an error (or Ctrl-C): no previews and no folder of ours left empty.
            out.discard_partial()
    kept = f"; kept {len(out.images)} finished image(s) in {args.out}" if out.images else ""
    if ctrl_c.pressed:
        raise CommandCancelled(f"generation cancelled{kept}")
    if len(out.images) < args.num_images:
        # A stream that ended early without an error is no success.
        raise ViperError(grpc.StatusCode.DATA_LOSS,
                         f"the stream ended after {len(out.images)} of {args.num_images} images{kept}")


def show_event(event: object, out: OutputFolder, bar: tqdm, images_made: int, steps_done: dict[int, int]) -> None:
    """images_made: every image the server generates (with --best-of, all the candidates); steps_done: each
    image's latest step so far (the server denoises a request's images side by side, their progress
    interleaved)."""
    if isinstance(event, Progress):
        steps_done[event.image_index] = event.step
        bar.total = event.total_steps * images_made
        bar.n = sum(steps_done.values())
        bar.refresh()
    elif isinstance(event, Preview):
        out.write_preview(event.image_index, event.png)
    elif isinstance(event, GeneratedImage):
        path = out.write_image(event.image_index, event.png)
        score = "" if event.score is None else f", score {event.score:.4f}"
        tqdm.write(f"{path}  (seed {event.seed}{score})", file=sys.stdout)


class CtrlC:
    """Ctrl-C during a call, made safe: SIGINT only records it, and a helper thread closes the client's
    channel, which cancels the call on the server and ends its stream; the command then sees `pressed`.

    Python's own handler raises KeyboardInterrupt wherever the main thread happens to be, and one raised
    inside a finalizer (a __del__ run by the garbage collector) is printed and dropped: the stream then ran
    on, and the command could end as if Ctrl-C had never been pressed.
    """

    def __init__(self, client: ViperClient) -> None:
        self.pressed = False
        self._client = client
        self._wake = threading.Event()
        self._previous: object = None
        self._installed = False
        self._closer = threading.Thread(target=self._close_when_pressed, name="viper-ctrl-c", daemon=True)

    def __enter__(self) -> CtrlC:
        # Only the main thread may set handlers; a SIGINT ignored (a job started with `nohup`) stays ignored.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        self._closer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            # First: the handler never runs again, so it cannot wait on _wake's lock while we hold it.
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
        self._wake.set()
        self._closer.join()

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.pressed = True
        self._wake.set()

    def _close_when_pressed(self) -> None:
        self._wake.wait()
        if self.pressed:
            self._client.close()


class OutputFolder:
    """generate's --out: created when the first file arrives; previews tracked so a failure removes them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.images: list[Path] = []
        self._previews: set[Path] = set()
        self._created: list[Path] = []  # the folders this command made, innermost first

    def write_preview(self, index: int, png: bytes) -> None:
        path = self.folder / f"{index}.preview.png"
        self._previews.add(path)  # before writing: a Ctrl-C mid-write still removes it
        self._write(path, png)

    def write_image(self, index: int, png: bytes) -> Path:
        path = self.folder / f"{index}.png"
        self._write(path, png)
        self.images.append(path)
        preview = self.folder / f"{index}.preview.png"
        if preview in self._previews:
            preview.unlink(missing_ok=True)
            self._previews.discard(preview)
        return path

    def discard_partial(self) -> None:
        """Removes the previews still there, then the folders this command created if they are empty."""
        for path in self._previews:
            path.unlink(missing_ok=True)
        self._previews.clear()
        for folder in self._created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self._created = [folder for folder in self._created if folder.exists()]

    def _write(self, path: Path, data: bytes) -> None:
        if not self.folder.is_dir():
            missing = [self.folder, *(parent for parent in self.folder.parents if not parent.exists())]
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created = [folder for folder in missing if folder.is_dir()]
        path.write_bytes(data)


def score_images(client: ViperClient, args: argparse.Namespace) -> None:
    with CtrlC(client) as ctrl_c:
        try:
            scores = client.score(args.user, args.images)
        except Exception as error:
            if ctrl_c.pressed:  # the call failed as cancelled, or never started
                raise CommandCancelled("cancelled") from None
            if isinstance(error, ViperError):
                raise name_files(error, "queries", args.images) from error
            raise
    if ctrl_c.pressed:
        raise CommandCancelled("cancelled")
    if args.json:
        print_json([{"image": str(path), "score": score} for path, score in zip(args.images, scores, strict=True)])
    else:
        print_table(
            ("IMAGE", "SCORE"), [(str(path), f"{score:.4f}") for path, score in zip(args.images, scores, strict=True)]
        )


def name_files(error: ViperError, field: str, paths: Sequence[object]) -> ViperError:
    """The error with the server's `field[N]` (e.g. "queries[1]: not a decodable image") replaced by the file
    sent as item N: the request's indexes mean nothing to the person at the shell."""

    def file_name(match: re.Match[str]) -> str:
        index = int(match.group("index"))
        if index >= len(paths):
            return match.group(0)
        part = match.group("part")
        if part == "comment":
            return f"the comment on {paths[index]}"
        return f"{paths[index]}" if part in (None, "data") else f"{paths[index]} ({part})"

    pattern = re.compile(rf"\b{re.escape(field)}\[(?P<index>\d+)\](?:\.(?P<part>\w+))?")
    message = pattern.sub(file_name, error.message)
    return error if message == error.message else type(error)(error.code, message)


def check_health(args: argparse.Namespace, tls: Tls | None) -> int:
    """Prints the server's health status; 0 when SERVING. With --wait, asks again until SERVING or time is up."""
    deadline = time.monotonic() + args.wait
    call_timeout = args.timeout or DEFAULT_TIMEOUT
    answer = None  # the last status the server gave: a later check cut short by the wait's end is no answer
    while True:
        # While waiting, a check that hangs (a server accepting but not answering yet) may not outlast --wait.
        timeout = call_timeout
        if args.wait:
            timeout = min(call_timeout, max(deadline - time.monotonic(), HEALTH_POLL_SECONDS))
        try:
            status = health_status(args.target, tls, args.token, timeout)
            error = None
        except ViperError as failed:
            status, error = None, failed
        if status == "SERVING":
            print(status)
            return 0
        answer = status or answer
        # Not listening yet, or listening but not answering yet: worth another try while waiting.
        retry = error is None or error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        if not args.wait or not retry or time.monotonic() + HEALTH_POLL_SECONDS > deadline:
            break
        time.sleep(HEALTH_POLL_SECONDS)
    if args.wait and retry:  # the time is up
        last = answer if answer is not None else str(error)
        print(f"error: {args.target} was not SERVING after {args.wait:g} s (last answer: {last})", file=sys.stderr)
        hint = None if error is None else connection_hint(error, args.target)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    if error is not None:
        raise error
    print(status)
    return 1


def health_status(target: str, tls: Tls | None, token: str | None, timeout: float) -> str:
    """One grpc.health.v1.Health/Check of the whole server (service ""), on a fresh channel: a channel that
    failed to connect waits out a growing reconnect backoff, which would slow --wait down."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with create_channel(target, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, tls=tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def load_rated_images(liked_dir: Path | None, disliked_dir: Path | None, comments_file: Path) -> list[RatedImage]:
    """The liked then the disliked images, each folder sorted by name, with their comments; all need one.
    A folder that is None is left out."""
    try:
        comments = json.loads(comments_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{comments_file} is not valid JSON: {error}") from error
    if not isinstance(comments, dict):
        raise InputError(f"{comments_file} must hold a JSON object of image path -> comment")
    # Keys are paths relative to the JSON file; keys that name no image ("about") are never looked up.
    comment_by_path = {
        (comments_file.parent / key).resolve(): text
        for key, text in comments.items()
        if isinstance(text, str) and text.strip()
    }
    rated = [(path, Rating.LIKED) for path in (image_files(liked_dir) if liked_dir is not None else [])]
    rated += [(path, Rating.DISLIKED) for path in (image_files(disliked_dir) if disliked_dir is not None else [])]
    uncommented = [str(path) for path, _ in rated if path.resolve() not in comment_by_path]
    if uncommented:
        raise InputError(f"no comment in {comments_file} for: {', '.join(uncommented)}")
    return [RatedImage(path, comment_by_path[path.resolve()], rating=rating) for path, rating in rated]


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    files = sorted(
        (path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES), key=lambda path: path.name
    )
    if not files:
        raise InputError(f"no .png, .jpg, .jpeg or .webp images in {folder}")
    return files


def print_profile(profile: Profile, as_json: bool, empty_note: str | None = None) -> None:
    """The profile as a table, or JSON; empty_note is printed under a profile whose two feature lists are empty."""
    if as_json:
        print_json(dataclasses.asdict(profile))
        return
    print_table(
        None,
        [
            ("user", profile.user_id),
            ("version", str(profile.version)),
            ("extractor", profile.extractor_model),
            ("images", f"{profile.liked_image_count} liked, {profile.disliked_image_count} disliked"),
            ("created", profile.created_at.isoformat()),
            ("updated", profile.updated_at.isoformat()),
            ("liked", ", ".join(profile.liked_features) or "(none)"),
            ("disliked", ", ".join(profile.disliked_features) or "(none)"),
        ],
    )
    if empty_note and not profile.liked_features and not profile.disliked_features:
        print(f"note: {empty_note}")


def print_table(header: tuple[str, ...] | None, rows: Sequence[tuple[str, ...]]) -> None:
    lines = ([header] if header else []) + list(rows)
    if not lines:
        return
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]) - 1)]
    for line in lines:
        print("  ".join([cell.ljust(width) for cell, width in zip(line, widths, strict=False)] + [line[-1]]))


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=_json_value))


def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _features(text: str) -> list[str]:
    return [feature.strip() for feature in text.split(",") if feature.strip()]


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
