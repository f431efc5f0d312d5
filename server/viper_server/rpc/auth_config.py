"""The auth configuration file (`--auth-config FILE`, TOML): calling services and identity providers.

    [[services]]                  # a calling service and its secret token
    name = "recommender"
    token_sha256 = "<hex sha256 of the token>"   # the file holds no secret
    tenant = "shop"                              # default "default"
    permissions = ["profiles.get", "score"]      # or ["*"]

    [[issuers]]                   # end users: JWTs from an identity provider
    issuer = "https://id.example.com/"
    audience = "viper"
    jwks = "/etc/viper/jwks.json"                # a file (relative to this one), or an https:// URL
    tenant = "shop"                              # default "default"
    user_claim = "sub"                           # the claim that is the user id (default "sub")
    max_lifetime = 86400                         # seconds from iat to exp, at most (default 24 h)
    leeway = 30                                  # clock skew allowed, seconds, 0-60 (default 30)
    jwks_cache_seconds = 300                     # keys are re-read at least this often (default 300)
    permissions = ["*"]                          # what a user may do, on their own profile only (default all)

Any mistake is a ValueError naming the file and the entry: the server refuses to start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from viper_profiles import DEFAULT_TENANT, InvalidTenant, validate_tenant

from ..access import ANY, PERMISSIONS

MAX_LEEWAY = 60.0
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_SERVICE_KEYS = {"name", "token_sha256", "tenant", "permissions"}
_ISSUER_KEYS = {"issuer", "audience", "jwks", "tenant", "user_claim", "max_lifetime", "leeway", "jwks_cache_seconds",
                "permissions"}


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    token_sha256: str  # lower-case hex
    tenant: str
    permissions: frozenset[str]


@dataclass(frozen=True)
class IssuerEntry:
    issuer: str
    audience: str
    jwks: str  # an absolute file path or an https:// URL
    tenant: str = DEFAULT_TENANT
    user_claim: str = "sub"
    max_lifetime: float = 24 * 3600.0
    leeway: float = 30.0
    jwks_cache_seconds: float = 300.0
    permissions: frozenset[str] = frozenset({ANY})


@dataclass(frozen=True)
class AuthConfig:
    services: tuple[ServiceEntry, ...] = ()
    issuers: tuple[IssuerEntry, ...] = ()


def load_auth_config(path: Path) -> AuthConfig:
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    unknown = set(document) - {"services", "issuers"}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}: expected [[services]] and [[issuers]]")
    services = tuple(_service(path, number, entry) for number, entry in _entries(path, document, "services"))
    issuers = tuple(_issuer(path, number, entry) for number, entry in _entries(path, document, "issuers"))
    digests = [service.token_sha256 for service in services]
    if len(set(digests)) != len(digests):
        raise ValueError(f"{path}: two services have the same token_sha256")
    if len({issuer.issuer for issuer in issuers}) != len(issuers):
        raise ValueError(f"{path}: an issuer is configured twice")
    if not services and not issuers:
        raise ValueError(f"{path}: no [[services]] and no [[issuers]]: every call would be refused")
    return AuthConfig(services=services, issuers=issuers)


def _entries(path: Path, document: dict[str, Any], section: str):
    entries = document.get(section, [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: {section} must be an array of tables ([[{section}]])")
    return enumerate(entries, 1)


def _service(path: Path, number: int, entry: dict[str, Any]) -> ServiceEntry:
    where = f"{path}: [[services]] #{number}"
    _known_keys(where, entry, _SERVICE_KEYS, required={"name", "token_sha256", "permissions"})
    digest = str(entry["token_sha256"]).lower()
    if not _HEX_SHA256.fullmatch(digest):
        raise ValueError(f"{where}: token_sha256 must be 64 hex digits (the sha256 of the token)")
    return ServiceEntry(name=_text(where, entry, "name"), token_sha256=digest,
                        tenant=_tenant(where, entry), permissions=_permissions(where, entry["permissions"]))


def _issuer(path: Path, number: int, entry: dict[str, Any]) -> IssuerEntry:
    where = f"{path}: [[issuers]] #{number}"
    _known_keys(where, entry, _ISSUER_KEYS, required={"issuer", "audience", "jwks"})
    jwks = _text(where, entry, "jwks")
    if jwks.startswith("http://"):
        raise ValueError(f"{where}: jwks must be a file or an https:// URL (keys over plain HTTP can be swapped)")
    if not jwks.startswith("https://"):
        jwks = str((path.parent / jwks).resolve())
    numbers = {name: _number(where, entry, name, IssuerEntry.__dataclass_fields__[name].default)
               for name in ("max_lifetime", "leeway", "jwks_cache_seconds")}
    if not 0 <= numbers["leeway"] <= MAX_LEEWAY:
        raise ValueError(f"{where}: leeway must be 0-{MAX_LEEWAY:g} seconds")
    return IssuerEntry(
        issuer=_text(where, entry, "issuer"), audience=_text(where, entry, "audience"), jwks=jwks,
        tenant=_tenant(where, entry), user_claim=str(entry.get("user_claim", "sub")), **numbers,
        permissions=_permissions(where, entry.get("permissions", [ANY])),
    )


def _known_keys(where: str, entry: dict[str, Any], known: set[str], required: set[str]) -> None:
    if unknown := set(entry) - known:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
    if missing := required - set(entry):
        raise ValueError(f"{where}: missing {sorted(missing)}")


def _text(where: str, entry: dict[str, Any], key: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key} must be a non-empty string")
    return value


def _number(where: str, entry: dict[str, Any], key: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}: {key} must be a number of seconds")
    return float(value)


def _tenant(where: str, entry: dict[str, Any]) -> str:
    try:
        return validate_tenant(entry.get("tenant", DEFAULT_TENANT))
    except InvalidTenant as error:
        raise ValueError(f"{where}: {error}") from None


def _permissions(where: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: permissions must be a list of strings")
    if unknown := set(value) - PERMISSIONS - {ANY}:
        raise ValueError(f"{where}: unknown permission(s) {sorted(unknown)}; known: {sorted(PERMISSIONS)} and '*'")
    return frozenset(value)
