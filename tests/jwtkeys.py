"""Signing keys, JWKS files and tokens for the identity tests: good ones, and every kind of forgery."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://id.test/"
AUDIENCE = "viper"


class SigningKey:
    def __init__(self, kid: str, algorithm: str) -> None:
        self.kid = kid
        self.algorithm = algorithm
        self.private = {
            "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "EdDSA": ed25519.Ed25519PrivateKey.generate,
        }[algorithm]()

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        jwk = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers={"kid": kid or self.kid})


def write_jwks(path: Path, *keys: SigningKey) -> Path:
    path.write_text(json.dumps({"keys": [key.jwk() for key in keys]}))
    return path


def claims(user: str = "alice", *, lifetime: float = 600, issued: float | None = None, **changes: Any):
    """Good claims for user; a change to None leaves that claim out."""
    now = time.time() if issued is None else issued
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": user, "iat": int(now), "exp": int(now + lifetime), **changes}
    return {name: value for name, value in body.items() if value is not None}


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_segment(value: dict[str, Any]) -> str:
    return _segment(json.dumps(value).encode())


def unsigned(body: dict[str, Any]) -> str:
    """alg=none: no signature at all."""
    return f"{_json_segment({'alg': 'none', 'typ': 'JWT'})}.{_json_segment(body)}."


def hs256_with_public_key(key: SigningKey, body: dict[str, Any]) -> str:
    """The classic confusion: HMAC-signed with the issuer's public key as the secret, under its kid."""
    signing_input = f"{_json_segment({'alg': 'HS256', 'typ': 'JWT', 'kid': key.kid})}.{_json_segment(body)}"
    signature = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_segment(signature)}"


def tampered(token: str, **changes: Any) -> str:
    """The token with its payload changed and its signature kept."""
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{_json_segment({**body, **changes})}.{signature}"


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bad_tokens(rsa: SigningKey, service_token: str) -> dict[str, str]:
    """Every kind of credential that must be UNAUTHENTICATED, by name; rsa is a key the issuer publishes."""
    now = time.time()
    other = SigningKey("rsa-1", "RS256")  # a key of our own, under the issuer's kid
    good = rsa.sign(claims("alice"))
    return {
        "expired": rsa.sign(claims(issued=now - 3600, lifetime=600)),
        "not yet valid (nbf)": rsa.sign(claims(nbf=int(now + 600))),
        "issued in the future": rsa.sign(claims(issued=now + 600)),
        "wrong audience": rsa.sign(claims(aud="someone-else")),
        "wrong issuer": rsa.sign(claims(iss="https://evil.test/")),
        "no exp": rsa.sign(claims(exp=None)),
        "no iat": rsa.sign(claims(iat=None)),
        "no sub": rsa.sign(claims(sub=None)),
        "no aud": rsa.sign(claims(aud=None)),
        "no iss": rsa.sign(claims(iss=None)),
        "lives longer than max_lifetime": rsa.sign(claims(lifetime=2 * 86400)),
        "sub not a user id": rsa.sign(claims("al/ice")),
        "alg none": unsigned(claims()),
        "HS256 with the public key": hs256_with_public_key(rsa, claims()),
        "another key under a known kid": other.sign(claims()),
        "unknown kid": SigningKey("never-published", "RS256").sign(claims()),
        "tampered payload": tampered(good, sub="bob"),
        "garbage": "not.a.jwt",
        "random bytes": os.urandom(16).hex(),
        "a service token's digest": sha256_hex(service_token),
    }
