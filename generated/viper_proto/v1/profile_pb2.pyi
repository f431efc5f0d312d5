import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProfileChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROFILE_CHANGE_UNSPECIFIED: _ClassVar[ProfileChange]
    PROFILE_CHANGE_EXTRACT: _ClassVar[ProfileChange]
    PROFILE_CHANGE_ADD: _ClassVar[ProfileChange]
    PROFILE_CHANGE_REMOVE: _ClassVar[ProfileChange]
    PROFILE_CHANGE_UPDATE: _ClassVar[ProfileChange]
    PROFILE_CHANGE_RESTORE: _ClassVar[ProfileChange]
    PROFILE_CHANGE_IMPORT: _ClassVar[ProfileChange]

class Rating(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RATING_UNSPECIFIED: _ClassVar[Rating]
    RATING_LIKED: _ClassVar[Rating]
    RATING_DISLIKED: _ClassVar[Rating]
PROFILE_CHANGE_UNSPECIFIED: ProfileChange
PROFILE_CHANGE_EXTRACT: ProfileChange
PROFILE_CHANGE_ADD: ProfileChange
PROFILE_CHANGE_REMOVE: ProfileChange
PROFILE_CHANGE_UPDATE: ProfileChange
PROFILE_CHANGE_RESTORE: ProfileChange
PROFILE_CHANGE_IMPORT: ProfileChange
RATING_UNSPECIFIED: Rating
RATING_LIKED: Rating
RATING_DISLIKED: Rating

class RatedImage(_message.Message):
    __slots__ = ("data", "comment", "rating")
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    comment: str
    rating: Rating
    def __init__(self, data: _Optional[bytes] = ..., comment: _Optional[str] = ..., rating: _Optional[_Union[Rating, str]] = ...) -> None: ...

class ExtractProfileRequest(_message.Message):
    __slots__ = ("user_id", "images")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    images: _containers.RepeatedCompositeFieldContainer[RatedImage]
    def __init__(self, user_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[RatedImage, _Mapping]]] = ...) -> None: ...

class ProfileImage(_message.Message):
    __slots__ = ("sha256", "comment", "rating", "position")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    comment: str
    rating: Rating
    position: int
    def __init__(self, sha256: _Optional[str] = ..., comment: _Optional[str] = ..., rating: _Optional[_Union[Rating, str]] = ..., position: _Optional[int] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("user_id", "liked_features", "disliked_features", "raw_text", "version", "liked_image_count", "disliked_image_count", "create_time", "update_time", "extractor_model", "images", "change")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LIKED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    DISLIKED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RAW_TEXT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LIKED_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DISLIKED_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    liked_features: _containers.RepeatedScalarFieldContainer[str]
    disliked_features: _containers.RepeatedScalarFieldContainer[str]
    raw_text: str
    version: int
    liked_image_count: int
    disliked_image_count: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    extractor_model: str
    images: _containers.RepeatedCompositeFieldContainer[ProfileImage]
    change: ProfileChange
    def __init__(self, user_id: _Optional[str] = ..., liked_features: _Optional[_Iterable[str]] = ..., disliked_features: _Optional[_Iterable[str]] = ..., raw_text: _Optional[str] = ..., version: _Optional[int] = ..., liked_image_count: _Optional[int] = ..., disliked_image_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., extractor_model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ProfileImage, _Mapping]]] = ..., change: _Optional[_Union[ProfileChange, str]] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("user_id", "version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListProfilesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListProfilesResponse(_message.Message):
    __slots__ = ("profiles", "next_page_token")
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[Profile]
    next_page_token: str
    def __init__(self, profiles: _Optional[_Iterable[_Union[Profile, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateProfileRequest(_message.Message):
    __slots__ = ("user_id", "liked_features", "disliked_features", "update_mask", "expected_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LIKED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    DISLIKED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    liked_features: _containers.RepeatedScalarFieldContainer[str]
    disliked_features: _containers.RepeatedScalarFieldContainer[str]
    update_mask: _field_mask_pb2.FieldMask
    expected_version: int
    def __init__(self, user_id: _Optional[str] = ..., liked_features: _Optional[_Iterable[str]] = ..., disliked_features: _Optional[_Iterable[str]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeleteProfileRequest(_message.Message):
    __slots__ = ("user_id", "expected_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    expected_version: int
    def __init__(self, user_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class AddRatingsRequest(_message.Message):
    __slots__ = ("user_id", "images", "expected_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    images: _containers.RepeatedCompositeFieldContainer[RatedImage]
    expected_version: int
    def __init__(self, user_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[RatedImage, _Mapping]]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class RemoveRatingsRequest(_message.Message):
    __slots__ = ("user_id", "image_sha256", "expected_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    image_sha256: _containers.RepeatedScalarFieldContainer[str]
    expected_version: int
    def __init__(self, user_id: _Optional[str] = ..., image_sha256: _Optional[_Iterable[str]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ListProfileVersionsRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListProfileVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[Profile]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[Profile, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RestoreProfileVersionRequest(_message.Message):
    __slots__ = ("user_id", "version", "expected_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    version: int
    expected_version: int
    def __init__(self, user_id: _Optional[str] = ..., version: _Optional[int] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ExportProfileRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ExportProfileResponse(_message.Message):
    __slots__ = ("archive",)
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    archive: bytes
    def __init__(self, archive: _Optional[bytes] = ...) -> None: ...

class ImportProfileRequest(_message.Message):
    __slots__ = ("user_id", "archive", "replace")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    archive: bytes
    replace: bool
    def __init__(self, user_id: _Optional[str] = ..., archive: _Optional[bytes] = ..., replace: _Optional[bool] = ...) -> None: ...
