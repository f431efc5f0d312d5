"""The store of ViPer user profiles (preference features and their source images): SQLite or PostgreSQL.

`open_store(url)` opens one; see ProfileStore for the operations and their guarantees.
"""

from .errors import (
    InvalidText,
    InvalidUserId,
    ProfileNotFound,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    quote_user_id,
)
from .records import ImageRef, Rating, SourceImage, StoredImage, StoredProfile
from .store import DEFAULT_POOL_SIZE, DEFAULT_TIMEOUT, ProfileStore, open_store
from .user_ids import USER_ID_PATTERN, validate_user_id

__all__ = [
    "DEFAULT_POOL_SIZE",
    "DEFAULT_TIMEOUT",
    "USER_ID_PATTERN",
    "ImageRef",
    "InvalidText",
    "InvalidUserId",
    "ProfileNotFound",
    "ProfileStore",
    "Rating",
    "SourceImage",
    "StoreError",
    "StoreUnavailable",
    "StoredImage",
    "StoredProfile",
    "VersionConflict",
    "open_store",
    "quote_user_id",
    "validate_user_id",
]
