"""The small things of issue 25: request ids that cannot forge log fields, signed page tokens, an owner-only
database, a warning for secret files others may read, and a metrics port on loopback by default."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import stat

import grpc
import numpy as np
import psutil
import pytest
from PIL import Image, PngImagePlugin

from viper_client import RatedImage, ViperClient
from viper_profiles import open_store
from viper_proto.v1 import profile_pb2, profile_pb2_grpc
from viper_server.config import ServerConfig
from viper_server.imaging import strip_metadata
from viper_server.rpc.convert import PageTokens
from viper_server.server import page_token_key
from viper_server.testing import ServerProcess

from imagedata import encode

TOKEN = "s3cret-token-for-tests"
CALL_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    tokens = folder / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o644)  # readable by others: warned about, not refused
    with ServerProcess(folder / "profiles.db", tiny_models_dir, "--auth-tokens", str(tokens),
                       "--metrics-port", str(free_port())) as process:
        yield process


@pytest.fixture(scope="module")
def profiles(server):
    with grpc.insecure_channel(server.target) as channel:
        yield profile_pb2_grpc.ProfileServiceStub(channel)


def get_profile(profiles, user_id: str, request_id: str) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"), ("x-request-id", request_id))
    with pytest.raises(grpc.RpcError) as error:
        profiles.GetProfile(profile_pb2.GetProfileRequest(user_id=user_id), metadata=metadata, timeout=CALL_TIMEOUT)
    assert error.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_plain_request_id_is_logged_as_given(server, profiles):
    get_profile(profiles, "plain-id-user", "trace.ABC-123_x")
    server.wait_for_log(r"user=plain-id-user status=NOT_FOUND .* request_id=trace\.ABC-123_x$")


@pytest.mark.parametrize("given", ["r1 user=admin status=OK", "x" * 65, "semi;colon", "a/b"])
def test_any_other_request_id_is_replaced_by_a_generated_one(server, profiles, given):
    user = f"forger-{len(given)}"
    get_profile(profiles, user, given)
    line = server.wait_for_log(f"user={user} status=NOT_FOUND")
    assert re.search(r"request_id=[0-9a-f]{16}$", line), line
    assert "admin" not in line


def test_a_secret_file_others_may_read_is_warned_about_without_its_content(server):
    line = server.wait_for_log(r"--auth-tokens file .*tokens is readable by group or others \(mode 644\)")
    assert "WARNING" in line or "warning" in line.lower()
    assert not any(TOKEN in logged for logged in server.logs)


def test_the_metrics_port_listens_on_loopback_only(server):
    line = server.wait_for_log(r"metrics on http://")
    port = int(re.search(r":(\d+)/metrics", line).group(1))
    listening = [c.laddr for c in psutil.Process(server.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [address.ip for address in listening] == ["127.0.0.1"]


def test_metrics_host_is_a_flag():
    assert ServerConfig().metrics_host == "127.0.0.1"


# -- page tokens ----------------------------------------------------------------------------------------


def test_page_tokens_round_trip_and_refuse_forgeries():
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode("alice@example.com")
    assert tokens.decode(token) == "alice@example.com"
    assert "alice" not in token  # opaque: not the user id in clear
    for forged in (PageTokens(b"other key").encode("alice@example.com"), token.split(".")[0],
                   token[:-2] + ("AA" if not token.endswith("AA") else "BB"), "bWFsbG9yeQ==", ""):
        with pytest.raises(ValueError):
            tokens.decode(forged)


def test_replicas_of_one_database_share_the_key_and_a_key_file_overrides_it(tmp_path):
    same = ServerConfig(db="postgresql://viper:pw@db/viper")
    assert page_token_key(same) == page_token_key(ServerConfig(db="postgresql://viper:pw@db/viper", port=1))
    assert page_token_key(same) != page_token_key(ServerConfig(db="postgresql://viper:other@db/viper"))
    key_file = tmp_path / "page-key"
    key_file.write_text("a shared secret\n")
    assert page_token_key(ServerConfig(page_token_key=key_file)) != page_token_key(ServerConfig())


def test_a_forged_page_token_is_invalid_argument(server, profiles):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    forged = PageTokens(b"a guess").encode("someone")
    with pytest.raises(grpc.RpcError) as error:
        profiles.ListProfiles(profile_pb2.ListProfilesRequest(page_token=forged), metadata=metadata,
                              timeout=CALL_TIMEOUT)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in error.value.details()


# -- the SQLite file ------------------------------------------------------------------------------------


def test_the_database_and_its_wal_and_shm_are_owner_only(tmp_path):
    previous = os.umask(0o022)  # the usual umask, which would make them 0644
    try:
        with open_store(tmp_path / "profiles.db") as store:
            store.update_features  # noqa: B018 - opened: the schema is written, WAL and SHM exist
            files = sorted(tmp_path.iterdir())
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files}
    finally:
        os.umask(previous)
    assert {"profiles.db", "profiles.db-wal", "profiles.db-shm"} <= set(modes), modes
    assert all(mode == 0o600 for mode in modes.values()), modes


# -- metadata stripped from what is stored ----------------------------------------------------------------------


def photo_with_gps(fmt: str) -> bytes:
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    for x in range(64):
        image.putpixel((x, x % 48), (x * 4, 0, 255 - x * 4))
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x8825] = {1: "N", 2: (46.0, 31.0, 12.0), 3: "E", 4: (6.0, 34.0, 0.0)}  # GPSInfo: where it was taken
    extra = {"JPEG": dict(comment=b"at home"), "PNG": dict(pnginfo=_text_chunk()), "WEBP": dict(xmp=b"<x>at home</x>")}
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif.tobytes(), **extra[fmt])
    return buffer.getvalue()


def _text_chunk() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "at home")
    return info


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_metadata_is_stripped_and_the_pixels_stay(fmt):
    data = photo_with_gps(fmt)
    assert 0x8825 in Image.open(io.BytesIO(data)).getexif()
    stripped = strip_metadata(data)
    assert not Image.open(io.BytesIO(stripped)).getexif()
    assert b"PhoneMaker" not in stripped and b"at home" not in stripped
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stripped))), np.asarray(Image.open(io.BytesIO(data))))


def test_an_image_without_metadata_is_stored_as_uploaded():
    plain = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    assert strip_metadata(plain) == plain


def test_the_stored_image_has_no_gps_and_its_sha256_says_so(server):
    upload = photo_with_gps("JPEG")
    with ViperClient(server.target, token=TOKEN) as client:
        profile = client.extract_profile("traveller", [RatedImage(upload, rating="liked"),
                                                      RatedImage(encode(Image.new("RGB", (16, 16)), "PNG"),
                                                                 rating="disliked")])
    stored = next(image for image in profile.images if image.position == 0)
    assert stored.sha256 == hashlib.sha256(strip_metadata(upload)).hexdigest()
    assert stored.sha256 != hashlib.sha256(upload).hexdigest()
