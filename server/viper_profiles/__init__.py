"""SQLite store of ViPer user profiles (preference features and their source images)."""

from .errors import InvalidUserId, ProfileNotFound, StoreError, VersionConflict, quote_user_id
from .records import ImageRef, Rating, SourceImage, StoredImage, StoredProfile
from .store import ProfileStore
from .user_ids import USER_ID_PATTERN, validate_user_id

__all__ = [
    "USER_ID_PATTERN",
    "ImageRef",
    "InvalidUserId",
    "ProfileNotFound",
    "ProfileStore",
    "Rating",
    "SourceImage",
    "StoreError",
    "StoredImage",
    "StoredProfile",
    "VersionConflict",
    "quote_user_id",
    "validate_user_id",
]
