"""The user_id format shared by the store, the server and the client."""

from __future__ import annotations

import re

from .errors import InvalidUserId

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def validate_user_id(user_id: str) -> None:
    """Raises InvalidUserId unless user_id is 1-128 characters of [A-Za-z0-9._:@-]."""
    if not isinstance(user_id, str):
        raise InvalidUserId(user_id, f"must be a string, not {type(user_id).__name__}")
    if USER_ID_PATTERN.fullmatch(user_id) is None:
        raise InvalidUserId(user_id, "must be 1-128 characters of A-Z a-z 0-9 . _ : @ -")
