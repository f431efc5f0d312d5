"""kill -9 in the middle of concurrent writes: every acknowledged write survives a restart, and the file is intact."""

from __future__ import annotations

import random
import re
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import grpc

from viper_client import Profile, RatedImage, ViperClient, ViperError
from viper_server.testing import ServerProcess

from imagedata import png_bytes

USERS = [f"crash-{n}" for n in range(6)]
WRITES = 200
THREADS = 16
KILL_AFTER_ACKNOWLEDGEMENTS = 60
# Shared by many extractions, so the store's image de-duplication and clean-up run under the crash too.
SHARED_IMAGE = png_bytes(color=(7, 7, 7))
UPDATE_FEATURE = re.compile(r"(w\d+) liked")


@dataclass
class Write:
    index: int
    user_id: str
    kind: str  # "extract" or "update"
    acknowledged: Profile | None = None  # what the server answered
    failure: ViperError | None = None

    @property
    def tag(self) -> str:
        """Marks what this write stored: an update's features, an extraction's image comments."""
        return f"w{self.index}"

    def perform(self, client: ViperClient) -> Write:
        try:
            if self.kind == "extract":
                images = [RatedImage(png_bytes(color=(self.index % 256, 40, 90)), comment=self.tag, rating="liked")]
                if self.index % 2:
                    images.append(RatedImage(SHARED_IMAGE, comment=self.tag, rating="disliked"))
                self.acknowledged = client.extract_profile(self.user_id, images)
            else:
                self.acknowledged = client.update_profile(
                    self.user_id, liked_features=[f"{self.tag} liked"], disliked_features=[f"{self.tag} disliked"]
                )
        except ViperError as exc:
            self.failure = exc
        return self


def last_writer(profile: Profile) -> str:
    """The tag of the write that left the profile as it is."""
    update = UPDATE_FEATURE.fullmatch(profile.liked_features[0]) if len(profile.liked_features) == 1 else None
    return update.group(1) if update else profile.images[0].comment


def assert_acknowledged_writes_survived(stored: Profile, writes: list[Write]) -> None:
    acknowledged = [write for write in writes if write.acknowledged is not None]
    versions = [write.acknowledged.version for write in acknowledged]
    assert len(set(versions)) == len(versions), f"{stored.user_id}: one version acknowledged twice: {sorted(versions)}"
    newest = max(acknowledged, key=lambda write: write.acknowledged.version).acknowledged
    assert stored.version >= newest.version, f"{stored.user_id}: acknowledged version {newest.version} was lost"
    if stored.version == newest.version:
        assert stored == newest
    else:
        # Writes the kill cut off may have committed without their answer reaching the client.
        cut_off = {write.tag for write in writes if write.failure is not None}
        assert stored.version - newest.version <= len(cut_off)
        assert last_writer(stored) in cut_off


def assert_database_intact(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        orphans = db.execute(
            "SELECT count(*) FROM images WHERE sha256 NOT IN "
            "(SELECT sha256 FROM profile_images UNION SELECT sha256 FROM version_images)"
        ).fetchone()[0]
        assert orphans == 0, "images no profile or kept version uses were left behind"


def test_acknowledged_writes_survive_kill_9(tiny_models_dir, tmp_path):
    db_path = tmp_path / "profiles.db"
    rng = random.Random(9)
    seeds = [Write(index, user, "extract") for index, user in enumerate(USERS)]
    storm = [
        Write(index, USERS[index % len(USERS)], "extract" if rng.random() < 0.4 else "update")
        for index in range(len(seeds), len(seeds) + WRITES)
    ]

    server = ServerProcess(db_path, tiny_models_dir).start()
    try:
        with ViperClient(server.target) as client, ThreadPoolExecutor(THREADS) as pool:
            for seed in seeds:
                assert seed.perform(client).acknowledged is not None
            acknowledgements = 0
            for done in as_completed([pool.submit(write.perform, client) for write in storm]):
                acknowledgements += done.result().acknowledged is not None
                if acknowledgements == KILL_AFTER_ACKNOWLEDGEMENTS:
                    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
                    break
            # Leaving the pool waits for the rest, which fail at once now that the server is gone.
    finally:
        server.kill()

    failures = [write.failure for write in storm if write.failure is not None]
    assert acknowledgements == KILL_AFTER_ACKNOWLEDGEMENTS and failures, "the kill landed mid-way"
    assert {failure.code for failure in failures} == {grpc.StatusCode.UNAVAILABLE}, failures[:3]

    writes = seeds + storm
    with ServerProcess(db_path, tiny_models_dir) as restarted, ViperClient(restarted.target) as client:
        stored = {profile.user_id: profile for profile in client.list_profiles()}
        assert sorted(stored) == sorted(USERS)
        for user_id, profile in stored.items():
            assert_acknowledged_writes_survived(profile, [write for write in writes if write.user_id == user_id])
        after = client.update_profile(USERS[0], liked_features=["after the crash"])
        assert after.version == stored[USERS[0]].version + 1
        assert_database_intact(db_path)
