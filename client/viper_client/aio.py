"""The asyncio client: ViperClient's methods over grpc.aio, with async iterators for streams."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
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
from viper_client.types import GeneratedImage, GenerateEvent, Profile, RatedImage, ScoreResult
from viper_proto.v1 import profile_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")


class AsyncViperClient:
    """ViperClient for asyncio: create it inside the running event loop; `async with` it or await close().

    Deadlines, token (a string, or a callable returning a fresh one), tls, several targets and retries are as
    in ViperClient. Closing a stream's async
    iterator (aclose(), or `async with contextlib.aclosing(...)`) cancels the RPC on the server.
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
                                   asynchronous=True, retries=retries, insecure=insecure)

    async def close(self) -> None:
        await self._connection.channel.close()

    async def __aenter__(self) -> AsyncViperClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def extract_profile(self, user_id: str, images: Iterable[RatedImage], *, timeout: Timeout = UNSET) -> Profile:
        request = convert.extract_request(user_id, images)
        response = await self._unary(self._connection.profiles.ExtractProfile, request, user_id, timeout, long=True)
        return convert.profile_from_proto(response)

    async def get_profile(self, user_id: str, *, version: int | None = None, timeout: Timeout = UNSET) -> Profile:
        request = convert.get_request(user_id, version)
        response = await self._unary(self._connection.profiles.GetProfile, request, user_id, timeout)
        return convert.profile_from_proto(response)

    async def list_profiles(self, *, page_size: int = 100, timeout: Timeout = UNSET) -> AsyncIterator[Profile]:
        request = convert.list_request(page_size)
        while True:
            page = await self._unary(self._connection.profiles.ListProfiles, request, None, timeout)
            for profile in page.profiles:
                yield convert.profile_from_proto(profile)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def update_profile(
        self,
        user_id: str,
        *,
        liked_features: Sequence[str] | None = None,
        disliked_features: Sequence[str] | None = None,
        expected_version: int | None = None,
        timeout: Timeout = UNSET,
    ) -> Profile:
        request = convert.update_request(user_id, liked_features, disliked_features, expected_version)
        response = await self._unary(self._connection.profiles.UpdateProfile, request, user_id, timeout)
        return convert.profile_from_proto(response)

    async def delete_profile(
        self, user_id: str, *, expected_version: int | None = None, timeout: Timeout = UNSET
    ) -> None:
        request = convert.delete_request(user_id, expected_version)
        await self._unary(self._connection.profiles.DeleteProfile, request, user_id, timeout)

    async def add_ratings(self, user_id: str, images: Iterable[RatedImage], *, expected_version: int | None = None,
                    timeout: Timeout = UNSET) -> Profile:
        """Appends rated images to the user's stored ones (creating the profile if there is none) and
        re-extracts over all of them; with expected_version, raises Conflict if it is stale."""
        request = convert.add_ratings_request(user_id, images, expected_version)
        response = await self._unary(self._connection.profiles.AddRatings, request, user_id, timeout, long=True)
        return convert.profile_from_proto(response)

    async def remove_ratings(self, user_id: str, image_sha256: Iterable[str], *, expected_version: int | None = None,
                       timeout: Timeout = UNSET) -> Profile:
        """Removes stored images (by ProfileImage.sha256) and re-extracts over the rest; removing every one is
        FailedPrecondition (delete_profile erases a profile)."""
        request = convert.remove_ratings_request(user_id, image_sha256, expected_version)
        response = await self._unary(self._connection.profiles.RemoveRatings, request, user_id, timeout, long=True)
        return convert.profile_from_proto(response)

    async def list_profile_versions(self, user_id: str, *, page_size: int = 100,
                                    timeout: Timeout = UNSET) -> AsyncIterator[Profile]:
        """The kept versions of the user's profile, newest first, fetched a page at a time."""
        request = convert.list_versions_request(user_id, page_size)
        while True:
            page = await self._unary(self._connection.profiles.ListProfileVersions, request, user_id, timeout)
            for version in page.versions:
                yield convert.profile_from_proto(version)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def restore_profile_version(self, user_id: str, version: int, *, expected_version: int | None = None,
                                timeout: Timeout = UNSET) -> Profile:
        """Makes a new version with a kept version's features and images."""
        request = convert.restore_request(user_id, version, expected_version)
        response = await self._unary(self._connection.profiles.RestoreProfileVersion, request, user_id, timeout)
        return convert.profile_from_proto(response)

    async def export_profile(self, user_id: str, *, timeout: Timeout = UNSET) -> bytes:
        """The profile with every kept version and its images, as a zip archive (docs/profile-archive.md)."""
        request = profile_pb2.ExportProfileRequest(user_id=user_id)
        return (await self._unary(self._connection.profiles.ExportProfile, request, user_id, timeout)).archive

    async def import_profile(self, user_id: str, archive: bytes | str | os.PathLike[str], *, replace: bool = False,
                       timeout: Timeout = UNSET) -> Profile:
        """Creates the user's profile from an archive (bytes or a file); Conflict if one exists, unless replace."""
        request = convert.import_request(user_id, archive, replace)
        response = await self._unary(self._connection.profiles.ImportProfile, request, user_id, timeout)
        return convert.profile_from_proto(response)

    def generate(
        self, user_id: str, prompt: str, *, timeout: Timeout = UNSET, **options: Unpack[GenerateOptions]
    ) -> AsyncIterator[GenerateEvent]:
        request = convert.generate_request(user_id, prompt, options)
        return self._stream(self._connection.generation.Generate, request, user_id, timeout, convert.event_from_proto)

    async def generate_images(self, user_id: str, prompt: str, **options: Any) -> list[Image.Image]:
        """The generated images in index order; raises ViperError (DATA_LOSS) if the stream ends before every
        image arrived."""
        stream = self.generate(user_id, prompt, **options)
        events = [event async for event in stream if isinstance(event, GeneratedImage)]
        return [event.image() for event in convert.images_in_index_order(events, options.get("num_images") or 1)]

    async def score(
        self,
        user_id: str,
        images: Iterable[ImageSource],
        *,
        liked: Iterable[ImageSource] | None = None,
        disliked: Iterable[ImageSource] | None = None,
        timeout: Timeout = UNSET,
    ) -> list[float]:
        request = convert.score_request(user_id, images, liked, disliked)
        stream = self._stream(self._connection.metric.Score, request, user_id, timeout, convert.score_result_from_proto)
        return convert.scores_in_query_order([result async for result in stream], len(request.queries))

    def score_stream(
        self,
        user_id: str,
        images: Iterable[ImageSource],
        *,
        liked: Iterable[ImageSource] | None = None,
        disliked: Iterable[ImageSource] | None = None,
        timeout: Timeout = UNSET,
    ) -> AsyncIterator[ScoreResult]:
        request = convert.score_request(user_id, images, liked, disliked)
        return self._stream(self._connection.metric.Score, request, user_id, timeout, convert.score_result_from_proto)

    async def _unary(self, rpc: Callable[..., Awaitable[T]], request: object, user_id: str | None,
                     timeout: Timeout, *, long: bool = False) -> T:
        deadline = resolve_timeout(timeout, self._long_timeout if long else self._timeout)
        try:
            return await rpc(request, timeout=deadline, metadata=self._connection.metadata_for(user_id))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    async def _stream(self, rpc: Callable[..., Any], request: object, user_id: str, timeout: Timeout,
                      convert_message: Callable[[Any], T | None]) -> AsyncIterator[T]:
        """The converted messages of a server stream; messages converting to None are skipped."""
        call = rpc(request, timeout=resolve_timeout(timeout, self._long_timeout),
                   metadata=self._connection.metadata_for(user_id))
        try:
            async for message in call:
                item = convert_message(message)
                if item is not None:
                    yield item
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            # A no-op once the stream has ended; otherwise (the caller closed the iterator) frees the server.
            call.cancel()
