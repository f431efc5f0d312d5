"""The store of ViPer user profiles (preference features and their source images): SQLite or PostgreSQL.

`open_store(url)` opens one; see ProfileStore for the operations and their guarantees.
"""

from .errors import (
    BackupNotSupported,
    InvalidText,
    InvalidUserId,
    ProfileExists,
    ProfileNotFound,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
    VersionConflict,
    VersionNotFound,
    quote_user_id,
)
from .records import (
    AppliedMigration,
    Change,
    ImageRef,
    ProfileVersion,
    Rating,
    RowCheck,
    SchemaStatus,
    SourceImage,
    StoredImage,
    StoredProfile,
    StoreStats,
)
from .store import DB_ENV, DEFAULT_DB, DEFAULT_POOL_SIZE, DEFAULT_TIMEOUT, ProfileStore, open_store
from .tenants import DEFAULT_TENANT, TENANT_PATTERN, InvalidTenant, validate_tenant
from .user_ids import USER_ID_PATTERN, validate_user_id

__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_TENANT",
    "DEFAULT_TIMEOUT",
    "USER_ID_PATTERN",
    "AppliedMigration",
    "BackupNotSupported",
    "Change",
    "ImageRef",
    "InvalidTenant",
    "InvalidText",
    "InvalidUserId",
    "ProfileExists",
    "ProfileNotFound",
    "ProfileVersion",
    "ProfileStore",
    "Rating",
    "RowCheck",
    "SchemaStatus",
    "SourceImage",
    "StoreError",
    "StoreNotFound",
    "StoreStats",
    "StoreUnavailable",
    "StoredImage",
    "StoredProfile",
    "TENANT_PATTERN",
    "VersionConflict",
    "VersionNotFound",
    "open_store",
    "quote_user_id",
    "validate_tenant",
    "validate_user_id",
]
