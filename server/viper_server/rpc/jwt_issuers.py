"""End users' JWTs, verified against their identity provider's JWKS with PyJWT.

- Algorithms are pinned to asymmetric ones: RS256 (RSA keys), ES256 (P-256) and EdDSA (Ed25519). Each
  key's algorithm comes from the key, never from the token's header, so `alg=none` and HS256 signed with
  a public key are refused.
- iss, aud, exp, iat and the user claim are required; nbf is honoured; leeway <= 60 s; a token whose
  exp - iat is over max_lifetime is refused.
- Keys are looked up by `kid`. The JWKS is re-read every jwks_cache_seconds, and when a token names an
  unknown kid, at most once per REFRESH_INTERVAL: a key added at rotation works without a restart, a
  removed key stops working within jwks_cache_seconds (verified tokens are remembered no longer than that).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from typing import Any

import jwt

from viper_profiles import USER_ID_PATTERN

from ..access import USER, Caller
from .auth_config import IssuerEntry

log = logging.getLogger(__name__)

# An unknown kid re-reads the JWKS at most this often: a flood of made-up kids cannot flood the provider.
REFRESH_INTERVAL = 10.0
FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1024 * 1024
_REQUIRED = ["iss", "aud", "exp", "iat"]


class TokenRefused(Exception):
    """Why a JWT is not accepted (the message goes to the caller: it never repeats the token)."""


def key_algorithm(jwk: dict[str, Any]) -> str | None:
    """The one algorithm a JWK may verify, from its type and curve; None for keys we never accept."""
    algorithm = {("RSA", None): "RS256", ("EC", "P-256"): "ES256", ("OKP", "Ed25519"): "EdDSA"}.get(
        (jwk.get("kty"), jwk.get("crv"))
    )
    if algorithm is None or jwk.get("use", "sig") != "sig" or jwk.get("alg", algorithm) != algorithm:
        return None
    return algorithm


class IssuerKeys:
    """One configured issuer: its keys by kid, and the verification of its tokens."""

    def __init__(self, entry: IssuerEntry) -> None:
        self.entry = entry
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at = -float("inf")
        self._last_refresh = -float("inf")

    @staticmethod
    def claimed_issuer(token: str) -> str | None:
        """The token's iss before verification: only to choose which issuer's keys verify it."""
        try:
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except (jwt.PyJWTError, AttributeError):
            return None
        return issuer if isinstance(issuer, str) else None

    async def verify(self, token: str) -> tuple[Caller, float]:
        """The caller the token stands for, and how long that may be remembered; raises TokenRefused."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise TokenRefused("not a well-formed JWT") from None
        if not isinstance(kid, str):
            raise TokenRefused("the token's header names no key (kid)")
        key = await self._key(kid)
        claims = self._decode(token, key)
        return self._caller(claims), self._remember_for(claims)

    async def _key(self, kid: str) -> jwt.PyJWK:
        now, cache_seconds = time.monotonic(), self.entry.jwks_cache_seconds
        # Counted from the last attempt, failed ones too: an unreachable provider is not asked on every call.
        since = now - self._last_refresh
        stale = now - self._loaded_at > cache_seconds and since >= min(REFRESH_INTERVAL, cache_seconds)
        unknown = kid not in self._keys and since >= REFRESH_INTERVAL
        if stale or unknown:
            self._last_refresh = now
            await asyncio.to_thread(self._reload)
        key = self._keys.get(kid)
        if key is None:
            raise TokenRefused("the token's key (kid) is not one of its issuer's keys")
        return key

    def _decode(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        entry = self.entry
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[key.algorithm_name], audience=entry.audience, issuer=entry.issuer,
                leeway=entry.leeway, options={"require": [*_REQUIRED, entry.user_claim]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("the token is not valid yet (nbf / iat)") from None
        except jwt.PyJWTError as error:
            raise TokenRefused(_reason(error)) from None
        if claims["exp"] - claims["iat"] > entry.max_lifetime:
            raise TokenRefused(f"the token lives longer than this issuer allows ({entry.max_lifetime:g} s)")
        return claims

    def _caller(self, claims: dict[str, Any]) -> Caller:
        user_id = claims[self.entry.user_claim]
        if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id):
            raise TokenRefused(f"claim {self.entry.user_claim!r} is not a valid user id")
        return Caller(name=f"{self.entry.issuer} {user_id}", kind=USER, tenant=self.entry.tenant,
                      permissions=self.entry.permissions, user_id=user_id)

    def _remember_for(self, claims: dict[str, Any]) -> float:
        return max(0.0, min(claims["exp"] - time.time(), self.entry.jwks_cache_seconds))

    def _reload(self) -> None:
        """Reads the JWKS again; a failure keeps the keys known so far (and is logged, without any token)."""
        try:
            document = json.loads(self._read_jwks())
            keys = {}
            for jwk in document.get("keys", []):
                algorithm = key_algorithm(jwk) if isinstance(jwk, dict) else None
                if algorithm is not None and isinstance(jwk.get("kid"), str):
                    keys[jwk["kid"]] = jwt.PyJWK(jwk, algorithm)
        except (OSError, ValueError, AttributeError, jwt.PyJWTError) as error:
            log.warning("issuer %s: cannot read its JWKS %s (%s); keeping %d known key(s)",
                        self.entry.issuer, self.entry.jwks, error, len(self._keys))
            return
        self._keys = keys
        self._loaded_at = time.monotonic()

    def _read_jwks(self) -> bytes:
        if not self.entry.jwks.startswith("https://"):
            with open(self.entry.jwks, "rb") as file:
                return file.read(MAX_JWKS_BYTES)
        with urllib.request.urlopen(self.entry.jwks, timeout=FETCH_TIMEOUT) as response:  # noqa: S310 (https only)
            return response.read(MAX_JWKS_BYTES)


def _reason(error: jwt.PyJWTError) -> str:
    if isinstance(error, jwt.InvalidAudienceError):
        return "the token is for another audience"
    if isinstance(error, jwt.InvalidIssuerError):
        return "the token is from another issuer"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the token lacks the claim {error.claim!r}"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "the token's algorithm is not its key's"
    if isinstance(error, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    return "the token is not valid"
