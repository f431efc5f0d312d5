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
from .tenants import DEFAULT_TENANT, TENANT_PATTERN, InvalidTenant, validate_tenant
from .user_ids import USER_ID_PATTERN, validate_user_id

__all__ = [
    "DEFAULT_POOL_SIZE",
    "DEFAULT_TENANT",
    "DEFAULT_TIMEOUT",
    "USER_ID_PATTERN",
    "ImageRef",
    "InvalidTenant",
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
    "TENANT_PATTERN",
    "VersionConflict",
    "open_store",
    "quote_user_id",
    "validate_tenant",
    "validate_user_id",
]
