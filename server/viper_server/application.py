"""The service's operations, transport-free: what a ViPer user can do, in plain Python values.

The gRPC servicers (rpc/) call these after validation; a second transport would call them unchanged.
Each operation reads or writes the store (off the event loop) and hands model work to the engine.
Errors are the domain's own exceptions (ProfileNotFound, VersionConflict, ContextError, QueueFull, ...);
the RPC layer maps them to status codes. Every operation takes the `Caller` first and is authorized
(access.authorize) before it reads anything, and acts only in the caller's tenant.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from viper_profiles import (
    Change,
    ProfileNotFound,
    ProfileStore,
    ProfileVersion,
    SourceImage,
    StoredImage,
    StoredProfile,
    VersionConflict,
)
from viper_profiles.archive import Archive, build_archive, import_archive

from . import access
from .access import Caller
from .domain import FinishedImage, GenerationEvent, GenerationParams, RatedUpload, ScoredQuery, ScoringContext
from .engine.engine import ModelEngine
from .imaging import ImageDecodeError
from .pixels import ProcessedImage


@dataclass(frozen=True)
class Generation:
    """A generation under way: the profile version it follows, and its events."""

    profile_version: int
    events: AsyncIterator[GenerationEvent]


@dataclass(frozen=True)
class Scoring:
    """A scoring under way: how many liked/disliked pairs of context it uses, and the scores as they come."""

    pairs_used: int
    results: AsyncIterator[ScoredQuery]


@dataclass(frozen=True)
class InlineContext:
    """Liked and disliked images given with a Score request instead of a stored profile."""

    liked: Sequence[ProcessedImage]
    disliked: Sequence[ProcessedImage]


class TooManyProfileImages(ValueError):
    """AddRatings would make the profile hold more images than --max-profile-images (INVALID_ARGUMENT)."""


class ImageNotInProfile(LookupError):
    """RemoveRatings names an image the profile does not hold (NOT_FOUND)."""


class NoImagesLeft(Exception):
    """RemoveRatings would remove every image: nothing left to extract from (FAILED_PRECONDITION)."""


# Without --max-profile-images: what the real VPE's prompt holds (README "Profile history").
DEFAULT_MAX_PROFILE_IMAGES = 100


class ViperService:
    def __init__(self, store: ProfileStore, engine: ModelEngine, *,
                 max_profile_images: int = DEFAULT_MAX_PROFILE_IMAGES) -> None:
        self._store = store
        self._engine = engine
        self._max_profile_images = max_profile_images

    # -- what the loaded models accept (rpc.validation.Vocabulary) -------------------------------------

    @property
    def control_tokens(self) -> frozenset[str]:
        return self._engine.control_tokens

    @property
    def max_prompt_tokens(self) -> int:
        return self._engine.max_prompt_tokens

    def prompt_token_count(self, text: str) -> int:
        return self._engine.prompt_token_count(text)

    @property
    def default_image_size(self) -> int:
        return self._engine.default_image_size

    @property
    def metric_max_pairs(self) -> int:
        """The liked / disliked pairs a score uses at most: inline context images beyond them are not decoded."""
        return self._engine.metric_max_pairs

    def process_uploads(self, uploads: Sequence[bytes]) -> list[ProcessedImage | ImageDecodeError]:
        """Uploaded images decoded and processed for the models, off this process (blocking: validation calls it
        from a handler's thread); each a ProcessedImage or why its bytes are no acceptable image, up to the first
        bad one."""
        return self._engine.process_uploads(uploads)

    def check_room(self, kind: str) -> None:
        """QueueFull at once when work of this kind ("extract", "score", "generate") could not queue: checked
        before the request's images are decoded."""
        self._engine.check_room(generate=kind == "generate", score=kind in ("extract", "score"))

    # -- profiles -------------------------------------------------------------------------------------

    async def extract_profile(self, caller: Caller, user_id: str, uploads: Sequence[RatedUpload]) -> StoredProfile:
        """Runs the VPE over the rated images and stores the profile with them, replacing any earlier one."""
        access.authorize(caller, access.EXTRACT, user_id)
        return await self._extract_and_save(caller, user_id, uploads, Change.EXTRACT, version=None)

    async def get_profile(self, caller: Caller, user_id: str, version: int | None = None) -> StoredProfile:
        """The current profile, or a kept version of it."""
        access.authorize(caller, access.GET, user_id)
        if version is not None:
            return await asyncio.to_thread(self._store.get_version, user_id, version, tenant=caller.tenant)
        return await asyncio.to_thread(self._store.get, user_id, tenant=caller.tenant)

    async def list_profiles(self, caller: Caller, page_size: int,
                            after: str | None) -> tuple[list[StoredProfile], bool]:
        """Up to page_size profiles of the caller's tenant after the user id `after`, and whether more follow.

        An end user's listing holds their own profile only."""
        access.authorize(caller, access.LIST)
        if caller.user_id is not None:
            return await self._own_listing(caller, after), False
        # One extra row tells whether another page follows.
        rows = await asyncio.to_thread(self._store.list, page_size=page_size + 1, after=after, tenant=caller.tenant)
        return rows[:page_size], len(rows) > page_size

    async def _own_listing(self, caller: Caller, after: str | None) -> list[StoredProfile]:
        if after is not None and caller.user_id <= after:
            return []
        try:
            return [await asyncio.to_thread(self._store.get, caller.user_id, tenant=caller.tenant)]
        except ProfileNotFound:
            return []

    async def update_profile(self, caller: Caller, user_id: str, *, liked_features: Sequence[str] | None,
                             disliked_features: Sequence[str] | None, expected_version: int | None) -> StoredProfile:
        """Replaces the feature lists given (None keeps one)."""
        access.authorize(caller, access.UPDATE, user_id)
        stored = await asyncio.to_thread(
            self._store.update_features, user_id, liked_features=liked_features,
            disliked_features=disliked_features, expected_version=expected_version, tenant=caller.tenant,
        )
        self._engine.forget_user(caller.scope(user_id), stored.version)
        return stored

    async def delete_profile(self, caller: Caller, user_id: str, *, expected_version: int | None) -> None:
        access.authorize(caller, access.DELETE, user_id)
        deleted_version = await asyncio.to_thread(
            self._store.delete, user_id, expected_version=expected_version, tenant=caller.tenant
        )
        # Versions are never reused: a Score that read the deleted profile must not cache it afterwards.
        self._engine.forget_user(caller.scope(user_id), deleted_version + 1)

    # -- a profile's life: ratings added and removed, history, export and import ----------------------

    async def add_ratings(self, caller: Caller, user_id: str, uploads: Sequence[RatedUpload], *,
                          expected_version: int | None) -> StoredProfile:
        """Appends the rated images to the stored ones (an image already stored keeps its position and takes
        the new comment and rating) and re-extracts over all of them; creates the profile if there is none."""
        access.authorize(caller, access.ADD_RATINGS, user_id)
        version, stored = await self._stored_images(caller, user_id, expected_version)
        merged: dict[str, RatedUpload | StoredImage] = {image.sha256: image for image in stored}
        for upload in uploads:
            merged[upload.sha256] = upload  # dicts keep the first insertion's place
        if len(merged) > self._max_profile_images:
            raise TooManyProfileImages(
                f"images: the profile would hold {len(merged)} images, at most {self._max_profile_images} "
                "(--max-profile-images)"
            )
        return await self._extract_and_save(caller, user_id, list(merged.values()), Change.ADD, version)

    async def remove_ratings(self, caller: Caller, user_id: str, shas: Sequence[str], *,
                             expected_version: int | None) -> StoredProfile:
        """Removes the stored images named by sha256 and re-extracts over the rest."""
        access.authorize(caller, access.REMOVE_RATINGS, user_id)
        version, stored = await self._stored_images(caller, user_id, expected_version)
        if version == 0:
            raise ProfileNotFound(user_id)
        removed = set(shas)
        if missing := removed - {image.sha256 for image in stored}:
            raise ImageNotInProfile(f"image_sha256: {sorted(missing)[0]} is not one of the profile's images")
        kept = [image for image in stored if image.sha256 not in removed]
        if not kept:
            raise NoImagesLeft("removing every image leaves nothing to extract from: DeleteProfile erases a profile")
        return await self._extract_and_save(caller, user_id, kept, Change.REMOVE, version)

    async def list_versions(self, caller: Caller, user_id: str, page_size: int,
                            before: int | None) -> tuple[list[ProfileVersion], bool]:
        """Up to page_size kept versions, newest first, below the version `before`; and whether more follow."""
        access.authorize(caller, access.HISTORY, user_id)
        rows = await asyncio.to_thread(self._store.list_versions, user_id, page_size=page_size + 1, before=before,
                                       tenant=caller.tenant)
        return rows[:page_size], len(rows) > page_size

    async def restore_version(self, caller: Caller, user_id: str, version: int, *,
                              expected_version: int | None) -> StoredProfile:
        access.authorize(caller, access.RESTORE, user_id)
        stored = await asyncio.to_thread(self._store.restore_version, user_id, version,
                                         expected_version=expected_version, tenant=caller.tenant)
        self._engine.forget_user(caller.scope(user_id), stored.version)
        return stored

    async def export_profile(self, caller: Caller, user_id: str) -> bytes:
        access.authorize(caller, access.EXPORT, user_id)
        return await asyncio.to_thread(build_archive, self._store, user_id, tenant=caller.tenant)

    async def import_profile(self, caller: Caller, user_id: str, archive: Archive, *, replace: bool) -> StoredProfile:
        """Creates the profile from a checked archive (rpc.validation), every version kept, no re-extraction."""
        access.authorize(caller, access.IMPORT, user_id)
        stored = await asyncio.to_thread(import_archive, self._store, user_id, archive, replace=replace,
                                         tenant=caller.tenant)
        self._engine.forget_user(caller.scope(user_id), stored.version)
        return stored

    async def _stored_images(self, caller: Caller, user_id: str,
                             expected_version: int | None) -> tuple[int, list[StoredImage]]:
        """The current version (0: no profile) and its images, checked against expected_version."""
        try:
            profile, images = await asyncio.to_thread(self._store.get_with_images, user_id, tenant=caller.tenant)
            version = profile.version
        except ProfileNotFound:
            version, images = 0, []
        if expected_version is not None and expected_version != version:
            raise VersionConflict(user_id, expected=expected_version, actual=version)
        return version, images

    async def _extract_and_save(self, caller: Caller, user_id: str, images: Sequence[RatedUpload | StoredImage],
                                change: Change, version: int | None) -> StoredProfile:
        """Extracts over the images in order (uploads processed already, stored ones processed here) and stores the
        result, if the profile is still at `version` (ABORTED otherwise: another write came first, while the
        model ran; None: whatever it is, as ExtractProfile replaces it)."""
        stored = [image for image in images if isinstance(image, StoredImage)]
        processed = iter(await self._engine.process_stored(stored) if stored else ())
        pictures = [image.image if isinstance(image, RatedUpload) else next(processed) for image in images]
        preferences = await self._engine.extract(pictures, [image.comment for image in images],
                                                 user=caller.scope(user_id))
        saved = await asyncio.to_thread(
            self._store.save_extraction, user_id, liked_features=preferences.liked,
            disliked_features=preferences.disliked, raw_text=preferences.raw_text,
            extractor_model=self._engine.extractor_name,
            images=[SourceImage(data=image.data, comment=image.comment, rating=image.rating) for image in images],
            tenant=caller.tenant, change=change, expected_version=version,
        )
        self._engine.forget_user(caller.scope(user_id), saved.version)
        return saved

    # -- generation and scoring -----------------------------------------------------------------------

    async def generate(self, caller: Caller, user_id: str, params: GenerationParams) -> Generation:
        """Starts generating images for the prompt, guided by the user's liked and disliked features."""
        access.authorize(caller, access.GENERATE, user_id)
        if params.scored:
            return await self._generate_scored(caller, user_id, params)
        profile = await asyncio.to_thread(self._store.get, user_id, tenant=caller.tenant)
        events = self._engine.generate(params, profile.liked_features, profile.disliked_features,
                                       user=caller.scope(user_id))
        return Generation(profile_version=profile.version, events=events)

    async def _generate_scored(self, caller: Caller, user_id: str, params: GenerationParams) -> Generation:
        """A generation whose images carry the user's metric score; ranked (best of N), the best num_images of
        params.candidates in descending score order. One store snapshot gives the features and the metric
        context; both models' queues are checked before any work, so it is not refused with its images made."""
        scope = caller.scope(user_id)  # the metric context's cache key and the fair turns: tenant-qualified
        profile, context = await self._stored_context(caller, user_id)
        self._engine.context_pairs(context)  # ContextError (no liked/disliked pair) before any model work
        self._engine.check_room(generate=True, score=True)
        features = profile.liked_features, profile.disliked_features
        if params.ranked:
            made = self._engine.generate_candidates(params, *features, user=scope)
            events = self._ranked(made, context, params.num_images, scope)
        else:
            events = self._scored(self._engine.generate(params, *features, user=scope), context, scope)
        return Generation(profile_version=profile.version, events=events)

    async def _ranked(self, made: AsyncIterator[GenerationEvent], context: ScoringContext, keep: int,
                      user_id: str) -> AsyncIterator[GenerationEvent]:
        """Passes the candidates' progress on and scores each candidate as it is made (beside the next ones'
        denoising); once all are scored, the best `keep` follow, best first (ties: the lower seed), each
        with its rank as image_index."""
        finished: list[FinishedImage] = []
        scorings: list[asyncio.Task] = []
        try:
            async for event in made:
                if isinstance(event, FinishedImage):
                    finished.append(event)
                    scorings.append(asyncio.create_task(self._score_image(context, event, user_id)))
                else:
                    yield event
                _raise_if_failed(scorings)
            scores = await asyncio.gather(*scorings)
        finally:
            for scoring in scorings:
                scoring.cancel()
            await made.aclose()
        best = sorted(range(len(finished)), key=lambda i: (-scores[i], finished[i].image_index))[:keep]
        for rank, i in enumerate(best):
            yield replace(finished[i], image_index=rank, score=scores[i], picture=None)

    async def _scored(self, made: AsyncIterator[GenerationEvent], context: ScoringContext,
                      user_id: str) -> AsyncIterator[GenerationEvent]:
        """The generation's events, each image once it is scored."""
        try:
            async for event in made:
                if isinstance(event, FinishedImage):
                    event = replace(event, score=await self._score_image(context, event, user_id), picture=None)
                yield event
        finally:
            await made.aclose()

    async def _score_image(self, context: ScoringContext, image: FinishedImage, user_id: str) -> float:
        """The metric's score of the image's pixels (those of its PNG): one query, as Score runs it."""
        batches = self._engine.score(context, [image.picture], user=user_id, reserved=True)
        return [result.score async for batch in batches for result in batch][0]

    async def score(self, caller: Caller, user_id: str, queries: Sequence[ProcessedImage],
                    inline: InlineContext | None = None) -> Scoring:
        """Scores the queries for the user's stored liked / disliked images, or for an inline context."""
        access.authorize(caller, access.SCORE, user_id)
        scope = caller.scope(user_id)
        if inline is not None:
            context = ScoringContext(liked=inline.liked, disliked=inline.disliked)
        else:
            _, context = await self._stored_context(caller, user_id)
        pairs = self._engine.context_pairs(context)  # ContextError before any model work
        return Scoring(pairs_used=pairs, results=self._flatten(self._engine.score(context, queries, user=scope)))

    async def _stored_context(self, caller: Caller, user_id: str) -> tuple[StoredProfile, ScoringContext]:
        """The profile and its metric context from one read of the profile row. The images' bytes are read
        only on a prefix-cache miss, by sha256, which names exactly the images the row listed."""
        profile = await asyncio.to_thread(self._store.get, user_id, tenant=caller.tenant)
        image_data = functools.partial(self._store.image_data, user_id, tenant=caller.tenant)
        return profile, self._engine.stored_context(caller.scope(user_id), profile.version, profile.images,
                                                    image_data)

    @staticmethod
    async def _flatten(batches: AsyncIterator[list[ScoredQuery]]) -> AsyncIterator[ScoredQuery]:
        async for batch in batches:
            for result in batch:
                yield result


def _raise_if_failed(tasks: Sequence[asyncio.Task]) -> None:
    """Fails a generation as soon as one of its scorings has failed, not after its last candidate."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
