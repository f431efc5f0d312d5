"""Who is calling, and what they may do: the permission rules, transport-free.

The RPC layer authenticates a call and hands the application a `Caller`; every operation of the
application asks `authorize` before it touches anything. Deny by default: a permission the caller
does not hold is refused, and an end user acts only on their own user id.
"""

from __future__ import annotations

from dataclasses import dataclass

from viper_profiles import DEFAULT_TENANT

# One permission per RPC; "*" holds them all.
EXTRACT = "profiles.extract"
GET = "profiles.get"
LIST = "profiles.list"
UPDATE = "profiles.update"
DELETE = "profiles.delete"
ADD_RATINGS = "profiles.add_ratings"
REMOVE_RATINGS = "profiles.remove_ratings"
HISTORY = "profiles.history"
RESTORE = "profiles.restore"
EXPORT = "profiles.export"
IMPORT = "profiles.import"
GENERATE = "generate"
SCORE = "score"
ANY = "*"
PERMISSIONS = frozenset({EXTRACT, GET, LIST, UPDATE, DELETE, GENERATE, SCORE,
                         ADD_RATINGS, REMOVE_RATINGS, HISTORY, RESTORE, EXPORT, IMPORT})

SERVICE = "service"
USER = "user"


class PermissionDenied(Exception):
    """A valid caller without the right to do this (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller, as the application sees it.

    name: the service's name, or "issuer subject" for an end user (for audit records).
    user_id: for an end user, the only user id they may act on; None for a service.
    """

    name: str
    kind: str  # SERVICE or USER
    tenant: str
    permissions: frozenset[str]
    user_id: str | None = None

    def may(self, permission: str) -> bool:
        return ANY in self.permissions or permission in self.permissions

    def scope(self, user_id: str) -> str:
        """The key that names this user in this tenant for caches and fair turns ("/" is in neither part)."""
        return f"{self.tenant}/{user_id}"


# Without --auth-config / --auth-tokens (loopback only): everything, in the default tenant.
UNAUTHENTICATED_CALLER = Caller(name="anonymous", kind=SERVICE, tenant=DEFAULT_TENANT, permissions=frozenset({ANY}))


def authorize(caller: Caller, permission: str, user_id: str | None = None) -> None:
    """Raises PermissionDenied unless the caller holds permission (and, as an end user, acts on themselves).

    The message never depends on whether the other user's profile exists.
    """
    if not caller.may(permission):
        raise PermissionDenied(f"this credential does not grant {permission!r}")
    if caller.kind == USER and user_id is not None and user_id != caller.user_id:
        raise PermissionDenied("an end-user token acts only on its own user id")
