"""The `viper` command: the SDK's calls from a shell, plus the server's commands when installed."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from contextlib import closing
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from viper_client.channel import DEFAULT_TARGET, Tls
from viper_client.client import ViperClient
from viper_client.errors import ViperError
from viper_client.types import GeneratedImage, Preview, Profile, Progress, RatedImage, Rating

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# Handed to the server's own command (viper-server) with their arguments untouched.
SERVER_COMMANDS = ("serve", "build-tiny-models")
SERVER_INSTALL_HINT = (
    "viper {command} needs the server, a separate package: from a viper-serve checkout run "
    "`pip install . ./server`, then `viper-server {command}` (or `viper {command}`)"
)


class InputError(Exception):
    """A problem with the command's local inputs, found before any RPC."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in SERVER_COMMANDS:
        # The raw argv after the command, not argparse's leftovers (which may lose a '--').
        return run_server_command(args.command, argv[argv.index(args.command) + 1 :])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    timeouts = {} if args.timeout is None else {"timeout": args.timeout, "long_timeout": args.timeout}
    use_tls = args.tls or args.tls_ca or args.tls_cert
    tls = Tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if use_tls else None
    try:
        with ViperClient(args.target, token=args.token, tls=tls, **timeouts) as client:
            args.handler(client, args)
    except ViperError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (InputError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viper", description="Client of a viper-serve server.")
    parser.add_argument(
        "--target",
        default=os.environ.get("VIPER_TARGET", DEFAULT_TARGET),
        help="server address (env VIPER_TARGET; default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="deadline of each call in seconds (default 30, and 600 for extract, generate and score)",
    )
    parser.add_argument("--token", default=os.environ.get("VIPER_TOKEN"),
                        help="bearer token sent with every call (env VIPER_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server")
    parser.add_argument("--tls-ca", default=os.environ.get("VIPER_TLS_CA"),
                        help="CA certificate (PEM) that signed the server's; default: the system's (env VIPER_TLS_CA)")
    parser.add_argument("--tls-cert", default=os.environ.get("VIPER_CLIENT_TLS_CERT"),
                        help="client certificate (PEM) for mutual TLS (env VIPER_CLIENT_TLS_CERT)")
    parser.add_argument("--tls-key", default=os.environ.get("VIPER_CLIENT_TLS_KEY"),
                        help="client private key (PEM) for mutual TLS (env VIPER_CLIENT_TLS_KEY)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    json_output = argparse.ArgumentParser(add_help=False)
    json_output.add_argument("--json", action="store_true", help="print JSON instead of text")

    profile = commands.add_parser("profile", help="extract and manage preference profiles")
    actions = profile.add_subparsers(dest="action", required=True, metavar="ACTION")

    extract = actions.add_parser("extract", parents=[json_output], help="extract a profile from commented images")
    extract.add_argument("--user", required=True)
    extract.add_argument("--liked", required=True, type=Path, help="folder of images the user likes")
    extract.add_argument("--disliked", required=True, type=Path, help="folder of images the user dislikes")
    extract.add_argument(
        "--comments",
        required=True,
        type=Path,
        help="JSON object mapping image paths, relative to its folder, to the user's comments",
    )
    extract.set_defaults(handler=extract_profile)

    get = actions.add_parser("get", parents=[json_output], help="show a profile")
    get.add_argument("--user", required=True)
    get.set_defaults(handler=get_profile)

    list_ = actions.add_parser("list", parents=[json_output], help="list all profiles")
    list_.add_argument("--page-size", type=int, default=100)
    list_.set_defaults(handler=list_profiles)

    update = actions.add_parser("update", parents=[json_output], help="replace a profile's feature lists")
    update.add_argument("--user", required=True)
    update.add_argument("--liked", type=_features, help='comma-separated liked features, e.g. "pastel, soft light"')
    update.add_argument("--disliked", type=_features, help="comma-separated disliked features")
    update.add_argument("--expected-version", type=int, help="fail unless the stored profile has this version")
    update.set_defaults(handler=update_profile)

    delete = actions.add_parser("delete", parents=[json_output], help="delete a profile and its images")
    delete.add_argument("--user", required=True)
    delete.add_argument("--expected-version", type=int, help="fail unless the stored profile has this version")
    delete.set_defaults(handler=delete_profile)

    generate = commands.add_parser("generate", help="generate images personalized to a profile")
    generate.add_argument("--user", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--out", required=True, type=Path, help="folder to write <index>.png into")
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--num-images", type=_positive_int, default=1)
    generate.add_argument("--width", type=int, default=0, help="0: the server's default")
    generate.add_argument("--height", type=int, default=0, help="0: the server's default")
    generate.add_argument("--steps", type=int, default=0, help="0: the server's default (40)")
    generate.add_argument("--guidance-scale", type=float, help="default 5.0")
    generate.add_argument("--preference-strength", type=float, help="default 0.85")
    generate.add_argument("--no-refine", dest="refine", action="store_const", const=False, help="skip the refiner")
    generate.add_argument("--seed", type=int, default=0, help="0: random")
    generate.add_argument(
        "--preview-every", type=int, default=0, help="write <index>.preview.png every this many steps"
    )
    generate.set_defaults(handler=generate_images)

    score = commands.add_parser("score", parents=[json_output], help="score how much the user would like images")
    score.add_argument("--user", required=True)
    score.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    score.set_defaults(handler=score_images)

    for name in SERVER_COMMANDS:
        commands.add_parser(name, add_help=False, help="server command (needs the server package)")
    return parser


def run_server_command(command: str, arguments: list[str]) -> int:
    """Replaces this process with `python -m viper_server COMMAND ...`: the client imports no server code."""
    # find_spec, not import: it tells whether the server is installed without loading it (or torch).
    if importlib.util.find_spec("viper_server") is None:
        print(SERVER_INSTALL_HINT.format(command=command), file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "viper_server", command, *arguments])
    return 0  # not reached: execv does not return


def extract_profile(client: ViperClient, args: argparse.Namespace) -> None:
    images = load_rated_images(args.liked, args.disliked, args.comments)
    print_profile(client.extract_profile(args.user, images), args.json)


def get_profile(client: ViperClient, args: argparse.Namespace) -> None:
    print_profile(client.get_profile(args.user), args.json)


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
    args.out.mkdir(parents=True, exist_ok=True)
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
    )
    # closing(): an error or Ctrl-C here cancels the generation on the server.
    with closing(events), tqdm(unit="step", disable=None) as bar:
        for event in events:
            if isinstance(event, Progress):
                bar.total = event.total_steps * args.num_images
                bar.n = event.image_index * event.total_steps + event.step
                bar.refresh()
            elif isinstance(event, Preview):
                (args.out / f"{event.image_index}.preview.png").write_bytes(event.png)
            elif isinstance(event, GeneratedImage):
                path = args.out / f"{event.image_index}.png"
                path.write_bytes(event.png)
                (args.out / f"{event.image_index}.preview.png").unlink(missing_ok=True)
                tqdm.write(str(path), file=sys.stdout)


def score_images(client: ViperClient, args: argparse.Namespace) -> None:
    scores = client.score(args.user, args.images)
    if args.json:
        print_json([{"image": str(path), "score": score} for path, score in zip(args.images, scores, strict=True)])
    else:
        print_table(
            ("IMAGE", "SCORE"), [(str(path), f"{score:.4f}") for path, score in zip(args.images, scores, strict=True)]
        )


def load_rated_images(liked_dir: Path, disliked_dir: Path, comments_file: Path) -> list[RatedImage]:
    """The liked then the disliked images, each folder sorted by name, with their comments; all need one."""
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
    rated = [(path, Rating.LIKED) for path in image_files(liked_dir)]
    rated += [(path, Rating.DISLIKED) for path in image_files(disliked_dir)]
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


def print_profile(profile: Profile, as_json: bool) -> None:
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
            ("liked", ", ".join(profile.liked_features)),
            ("disliked", ", ".join(profile.disliked_features)),
        ],
    )


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
