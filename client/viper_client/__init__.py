"""Python SDK and CLI for viper-serve: personalized image generation and scoring (ViPer)."""

from viper_client.aio import AsyncViperClient
from viper_client.channel import DEFAULT_LONG_TIMEOUT, DEFAULT_TIMEOUT, CleartextTokenError, Tls
from viper_client.client import ViperClient
from viper_client.errors import (
    Cancelled,
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    ViperError,
)
from viper_client.images import ImageSource
from viper_client.types import (
    GeneratedImage,
    GenerateEvent,
    Preview,
    Profile,
    ProfileImage,
    Progress,
    RatedImage,
    Rating,
    ScoreResult,
)

__all__ = [
    "AsyncViperClient",
    "Cancelled",
    "CleartextTokenError",
    "Conflict",
    "DEFAULT_LONG_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerateEvent",
    "GeneratedImage",
    "ImageSource",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Preview",
    "Profile",
    "ProfileImage",
    "Progress",
    "RatedImage",
    "Rating",
    "ResourceExhausted",
    "ScoreResult",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "ViperClient",
    "ViperError",
]
