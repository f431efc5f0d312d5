"""The gateway forwards a profile's life (issue 20): Connect JSON calls of the new ProfileService RPCs, through
the same real server and gateway as tests/test_web_gateway.py."""

from __future__ import annotations

import base64

import test_web_gateway
from test_web_gateway import AUTH, connect_json, png_b64

from viper_web.registry import METHODS

from fixture_data import FIXTURES

# That module's fixtures: a toy server with auth on, and a gateway in front of it.
server, gateway = test_web_gateway.server, test_web_gateway.gateway
PROFILES = "/viper.v1.ProfileService/"


def call(gateway, method: str, body: dict) -> dict:
    reply = connect_json(gateway.url, PROFILES + method, body, AUTH)
    assert reply.status == 200, reply.body
    return reply.json()


def rated(rating: str, index: int, comment: str) -> dict:
    return {"data": png_b64(FIXTURES / rating / f"{index}.png"), "comment": comment,
            "rating": f"RATING_{rating.upper()}"}


def test_every_new_rpc_is_served_and_the_reads_may_fail_over():
    for method in ("AddRatings", "RemoveRatings", "ListProfileVersions", "RestoreProfileVersion", "ExportProfile",
                   "ImportProfile"):
        assert PROFILES + method in METHODS
    assert METHODS[PROFILES + "ListProfileVersions"].read_only and METHODS[PROFILES + "ExportProfile"].read_only
    assert not METHODS[PROFILES + "AddRatings"].read_only and not METHODS[PROFILES + "ImportProfile"].read_only


def test_add_history_restore_export_and_import_through_the_gateway(gateway):
    first = call(gateway, "AddRatings", {"userId": "web-life", "images": [rated("liked", 0, "soft pastel light"),
                                                                          rated("disliked", 0, "too murky")]})
    assert first["version"] == "1"
    second = call(gateway, "AddRatings", {"userId": "web-life", "expectedVersion": "1",
                                          "images": [rated("liked", 1, "gentle glow")]})
    assert len(second["images"]) == 3
    history = call(gateway, "ListProfileVersions", {"userId": "web-life"})
    assert [(v["version"], v["change"]) for v in history["versions"]] == [("2", "PROFILE_CHANGE_ADD"),
                                                                        ("1", "PROFILE_CHANGE_ADD")]
    restored = call(gateway, "RestoreProfileVersion", {"userId": "web-life", "version": "1"})
    assert restored["version"] == "3" and len(restored["images"]) == 2
    stale = connect_json(gateway.url, PROFILES + "AddRatings",
                         {"userId": "web-life", "expectedVersion": "1", "images": [rated("liked", 2, "x")]}, AUTH)
    assert stale.status == 409

    archive = call(gateway, "ExportProfile", {"userId": "web-life"})["archive"]
    assert base64.b64decode(archive).startswith(b"PK")
    imported = call(gateway, "ImportProfile", {"userId": "web-life-copy", "archive": archive})
    assert imported["likedFeatures"] == restored["likedFeatures"] and imported["version"] == "3"
    bad = connect_json(gateway.url, PROFILES + "ImportProfile",
                       {"userId": "web-life-bad", "archive": base64.b64encode(b"PK junk").decode()}, AUTH)
    assert bad.status == 400 and "archive" in bad.json()["message"]
