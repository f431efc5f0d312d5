"""Authentication: from a call's `authorization: Bearer <token>` metadata to a `Caller`, or Unauthenticated.

Two kinds of credential (README "Security"):
- a service token, known by its sha256 (the auth config's [[services]], or a --auth-tokens file, whose
  tokens are services holding "*" in the tenant "default");
- an end user's JWT from a configured identity provider ([[issuers]], verified in rpc/jwt_issuers.py).

Nothing here reads the request message: the interceptor authenticates from the metadata alone, before the
message is parsed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..access import ANY, SERVICE, Caller
from .auth_config import AuthConfig, ServiceEntry
from .jwt_issuers import IssuerKeys, TokenRefused

_SCHEME = "bearer "
# Verified JWTs remembered (until they expire, or their issuer's keys are re-read), so a call costs a dict look-up.
VERIFIED_CACHE_SIZE = 10_000


class Unauthenticated(Exception):
    """The call carries no credential, or one that is not valid (unknown, expired, forged): UNAUTHENTICATED."""


def token_digest(token: str) -> str:
    """The `sha256:<hex>` line that stands for token in a token file."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def read_token_file(path: Path) -> list[str]:
    """The hex sha256 digests of a token file: one token a line, `sha256:<hex>` or plain; `#` comments."""
    digests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            hex_digest = line.removeprefix("sha256:").lower()
            if len(hex_digest) != 64 or any(c not in "0123456789abcdef" for c in hex_digest):
                raise ValueError(f"{path}:{number}: not a sha256 hex digest")
            digests.append(hex_digest)
        else:
            digests.append(hashlib.sha256(line.encode()).hexdigest())
    if not digests:
        raise ValueError(f"{path}: no tokens: every call would be refused")
    return digests


def token_file_services(path: Path) -> list[ServiceEntry]:
    """A token file's tokens as services holding every permission in the tenant "default"."""
    return [
        ServiceEntry(name=f"token-file:{number}", token_sha256=digest, tenant="default", permissions=frozenset({ANY}))
        for number, digest in enumerate(read_token_file(path), 1)
    ]


@dataclass(frozen=True)
class _Verified:
    caller: Caller
    valid_until: float  # monotonic


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        if not config.services and not config.issuers:
            raise ValueError("no services and no issuers: every call would be refused")
        # Looked up by the digest of the presented token: the timing says nothing about any token.
        self._services = {
            entry.token_sha256: Caller(name=entry.name, kind=SERVICE, tenant=entry.tenant,
                                       permissions=entry.permissions)
            for entry in config.services
        }
        self._issuers = {issuer.issuer: IssuerKeys(issuer) for issuer in config.issuers}
        self._verified: dict[str, _Verified] = {}

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        token = _bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        service = self._services.get(hashlib.sha256(token.encode()).hexdigest())
        if service is not None:
            return service
        cached = self._verified.get(token)
        if cached is not None and time.monotonic() < cached.valid_until:
            return cached.caller
        if token.count(".") != 2 or not self._issuers:
            raise Unauthenticated("unknown bearer token")
        try:
            caller, expires_in = await self._verify_jwt(token)
        except TokenRefused as refused:
            raise Unauthenticated(f"bearer token refused: {refused}") from None
        self._remember(token, caller, expires_in)
        return caller

    async def _verify_jwt(self, token: str) -> tuple[Caller, float]:
        issuer = self._issuers.get(IssuerKeys.claimed_issuer(token))
        if issuer is None:
            raise TokenRefused("not issued by a configured issuer")
        return await issuer.verify(token)

    def _remember(self, token: str, caller: Caller, valid_for: float) -> None:
        now = time.monotonic()
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified = {t: v for t, v in self._verified.items() if v.valid_until > now}
            while len(self._verified) >= VERIFIED_CACHE_SIZE:  # all still valid: the oldest go first
                del self._verified[next(iter(self._verified))]
        self._verified[token] = _Verified(caller, now + valid_for)


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME:
            token = value[len(_SCHEME):].strip()
            return token or None
    return None
