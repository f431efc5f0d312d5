"""The synchronous client: one method per RPC, returning the SDK's types and raising its errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from PIL import Image

from viper_client import convert
from viper_client.channel import (
    DEFAULT_LONG_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    UNSET,
    Timeout,
    Tls,
    TokenSource,
    connect,
    resolve_timeout,
)
from viper_client.convert import GenerateOptions
from viper_client.errors import error_from_rpc
from viper_client.images import ImageSource
from viper_client.types import GenerateEvent, Profile, RatedImage, ScoreResult
from viper_proto.v1 import profile_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")


class ViperClient:
    """A client of a viper-serve server over a sync gRPC channel; use it as a context manager or close() it.

    Every call has a deadline: `timeout` seconds (default 30) for profile reads and edits, and
    `long_timeout` seconds (default 600) for extract_profile, generate and score, which run models
    and may queue. A stream's deadline covers the whole stream; list_profiles' covers each page.
    Each method's timeout= overrides the default for that call; None means no deadline.
    `token` is sent as `authorization: Bearer <token>` with every call: a service token or an end user's JWT,
    fixed, or a callable returning a fresh one, asked before every call (gRPC call credentials: over TLS,
    or plaintext to a loopback address only, even with `insecure=True`); `tls` (a Tls) makes the
    channel TLS, verifying the server and, with a client certificate, authenticating the client.
    A token goes in plaintext only to a loopback target: elsewhere, without `tls`, the client refuses to be
    made (CleartextTokenError, a ValueError) unless `insecure=True`.

    `target` is one address ("host:port", or any gRPC target such as a proxy's), or several replicas' (a list,
    or "host1:port,host2:port"): then each user's calls go to one replica, chosen by consistent hashing of the
    user id (gRPC's ring_hash policy on the x-viper-user header; this sets
    GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY=true in the process's environment, which grpcio needs
    for it), and move to the next replica on the ring while theirs is down.
    With `retries` (default on), a call that fails with UNAVAILABLE is sent again with backoff, up to 5
    attempts within its deadline, when that is safe: get_profile, list_profiles, and generate and score
    until their first event. Writes (extract, update, delete) are never sent twice.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        long_timeout: float | None = DEFAULT_LONG_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        token: TokenSource = None,
        tls: Tls | None = None,
        retries: bool = True,
        insecure: bool = False,
    ) -> None:
        self._timeout = timeout
        self._long_timeout = long_timeout
        self._connection = connect(target, max_message_bytes=max_message_bytes, token=token, tls=tls,
                                   retries=retries, insecure=insecure)

    def close(self) -> None:
        self._connection.channel.close()

    def __enter__(self) -> ViperClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def extract_profile(self, user_id: str, images: Iterable[RatedImage], *, timeout: Timeout = UNSET) -> Profile:
        """Runs preference extraction over the rated images and stores (or replaces) the user's profile."""
        request = convert.extract_request(user_id, images)
        response = self._unary(self._connection.profiles.ExtractProfile, request, user_id, timeout, long=True)
        return convert.profile_from_proto(response)

    def get_profile(self, user_id: str, *, version: int | None = None, timeout: Timeout = UNSET) -> Profile:
        """The current profile, or with version= a kept version of it."""
        request = convert.get_request(user_id, version)
        response = self._unary(self._connection.profiles.GetProfile, request, user_id, timeout)
        return convert.profile_from_proto(response)

    def list_profiles(self, *, page_size: int = 100, timeout: Timeout = UNSET) -> Iterator[Profile]:
        """All profiles ordered by user id, fetched a page at a time as the iterator advances."""
        request = convert.list_request(page_size)
        while True:
            page = self._unary(self._connection.profiles.ListProfiles, request, None, timeout)
            yield from map(convert.profile_from_proto, page.profiles)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def update_profile(
        self,
        user_id: str,
        *,
        liked_features: Sequence[str] | None = None,
        disliked_features: Sequence[str] | None = None,
        expected_version: int | None = None,
        timeout: Timeout = UNSET,
    ) -> Profile:
        """Replaces the feature lists given (not None); with expected_version, raises Conflict if it is stale."""
        request = convert.update_request(user_id, liked_features, disliked_features, expected_version)
        response = self._unary(self._connection.profiles.UpdateProfile, request, user_id, timeout)
        return convert.profile_from_proto(response)

    def delete_profile(self, user_id: str, *, expected_version: int | None = None, timeout: Timeout = UNSET) -> None:
        request = convert.delete_request(user_id, expected_version)
        self._unary(self._connection.profiles.DeleteProfile, request, user_id, timeout)

    def add_ratings(self, user_id: str, images: Iterable[RatedImage], *, expected_version: int | None = None,
                    timeout: Timeout = UNSET) -> Profile:
        """Appends rated images to the user's stored ones (creating the profile if there is none) and
        re-extracts over all of them; with expected_version, raises Conflict if it is stale."""
        request = convert.add_ratings_request(user_id, images, expected_version)
        response = self._unary(self._connection.profiles.AddRatings, request, user_id, timeout, long=True)
        return convert.profile_from_proto(response)

    def remove_ratings(self, user_id: str, image_sha256: Iterable[str], *, expected_version: int | None = None,
                       timeout: Timeout = UNSET) -> Profile:
        """Removes stored images (by ProfileImage.sha256) and re-extracts over the rest; removing every one is
        FailedPrecondition (delete_profile erases a profile)."""
        request = convert.remove_ratings_request(user_id, image_sha256, expected_version)
        response = self._unary(self._connection.profiles.RemoveRatings, request, user_id, timeout, long=True)
        return convert.profile_from_proto(response)

    def list_profile_versions(self, user_id: str, *, page_size: int = 100,
                              timeout: Timeout = UNSET) -> Iterator[Profile]:
        """The kept versions of the user's profile, newest first, fetched a page at a time."""
        request = convert.list_versions_request(user_id, page_size)
        while True:
            page = self._unary(self._connection.profiles.ListProfileVersions, request, user_id, timeout)
            yield from map(convert.profile_from_proto, page.versions)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def restore_profile_version(self, user_id: str, version: int, *, expected_version: int | None = None,
                                timeout: Timeout = UNSET) -> Profile:
        """Makes a new version with a kept version's features and images."""
        request = convert.restore_request(user_id, version, expected_version)
        response = self._unary(self._connection.profiles.RestoreProfileVersion, request, user_id, timeout)
        return convert.profile_from_proto(response)

    def export_profile(self, user_id: str, *, timeout: Timeout = UNSET) -> bytes:
        """The profile with every kept version and its images, as a zip archive (docs/profile-archive.md)."""
        request = profile_pb2.ExportProfileRequest(user_id=user_id)
        return self._unary(self._connection.profiles.ExportProfile, request, user_id, timeout).archive

    def import_profile(self, user_id: str, archive: bytes | str | os.PathLike[str], *, replace: bool = False,
                       timeout: Timeout = UNSET) -> Profile:
        """Creates the user's profile from an archive (bytes or a file); Conflict if one exists, unless replace."""
        request = convert.import_request(user_id, archive, replace)
        response = self._unary(self._connection.profiles.ImportProfile, request, user_id, timeout)
        return convert.profile_from_proto(response)

    def generate(
        self, user_id: str, prompt: str, *, timeout: Timeout = UNSET, **options: Unpack[GenerateOptions]
    ) -> Iterator[GenerateEvent]:
        """Streams Progress, Preview and GeneratedImage events; options (GenerateOptions) left out mean the
        server's defaults.

        The RPC starts at the first next(); closing the iterator (close(), or leaving a
        `with contextlib.closing(...)` block) cancels it on the server.
        """
        request = convert.generate_request(user_id, prompt, options)
        return self._stream(self._connection.generation.Generate, request, user_id, timeout, convert.event_from_proto)

    def generate_images(self, user_id: str, prompt: str, **options: Any) -> list[Image.Image]:
        """The generated images in index order (with candidates: best first); options are generate()'s. Raises
        ViperError (DATA_LOSS) if the stream ends before every image arrived."""
        events = self.generate(user_id, prompt, **options)
        return [event.image() for event in convert.images_in_index_order(events, options.get("num_images") or 1)]

    def score(
        self,
        user_id: str,
        images: Iterable[ImageSource],
        *,
        liked: Iterable[ImageSource] | None = None,
        disliked: Iterable[ImageSource] | None = None,
        timeout: Timeout = UNSET,
    ) -> list[float]:
        """Scores in [0, 1] in the order of images, against the stored profile or an inline liked/disliked context."""
        request = convert.score_request(user_id, images, liked, disliked)
        results = self._stream(self._connection.metric.Score, request, user_id, timeout,
                               convert.score_result_from_proto)
        return convert.scores_in_query_order(results, len(request.queries))

    def score_stream(
        self,
        user_id: str,
        images: Iterable[ImageSource],
        *,
        liked: Iterable[ImageSource] | None = None,
        disliked: Iterable[ImageSource] | None = None,
        timeout: Timeout = UNSET,
    ) -> Iterator[ScoreResult]:
        """Results as the server computes them, not necessarily in query order."""
        request = convert.score_request(user_id, images, liked, disliked)
        return self._stream(self._connection.metric.Score, request, user_id, timeout, convert.score_result_from_proto)

    def _unary(self, rpc: Callable[..., T], request: object, user_id: str | None, timeout: Timeout, *,
               long: bool = False) -> T:
        deadline = resolve_timeout(timeout, self._long_timeout if long else self._timeout)
        try:
            return rpc(request, timeout=deadline, metadata=self._connection.metadata_for(user_id))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    def _stream(self, rpc: Callable[..., Any], request: object, user_id: str, timeout: Timeout,
                convert_message: Callable[[Any], T | None]) -> Iterator[T]:
        """The converted messages of a server stream (model work: the long deadline); messages converting to
        None are skipped."""
        call = rpc(request, timeout=resolve_timeout(timeout, self._long_timeout),
                   metadata=self._connection.metadata_for(user_id))
        try:
            for message in call:
                item = convert_message(message)
                if item is not None:
                    yield item
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            # A no-op once the stream has ended; otherwise (the caller closed the iterator) frees the server.
            call.cancel()
