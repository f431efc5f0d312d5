"""The store of ViPer user profiles (preference features and their source images): SQLite or PostgreSQL.

`open_store(url)` opens one; see ProfileStore for the operations and their guarantees.
"""

from .errors import (
    BackupNotSupported,
    InvalidText,
    InvalidUserId,
    ProfileNotFound,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
    VersionConflict,
    quote_user_id,
)
from .records import (
    AppliedMigration,
    ImageRef,
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
    "ImageRef",
    "InvalidTenant",
    "InvalidText",
    "InvalidUserId",
    "ProfileNotFound",
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
    "open_store",
    "quote_user_id",
    "validate_tenant",
    "validate_user_id",
]
