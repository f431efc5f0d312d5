"""A development identity provider: a local signing key, its JWKS and an auth config naming it as an issuer.

`viper-server dev-token --user alice` prints an end user's JWT signed by this key, and `make web` starts
the server with `--auth-config var/dev-identity/auth.toml`, so the page signs in with a user token in one
command. The key is made on first use, readable by its owner only. It is for local use: a server trusts it
only when its auth config lists it; a deployment lists its real identity provider instead (README "Security").
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from viper_profiles import validate_user_id

DEV_DIR = Path("var/dev-identity")
DEV_ISSUER = "viper-dev"
DEV_AUDIENCE = "viper"
DEV_KID = "viper-dev-1"
DEFAULT_TTL = 8 * 3600


def ensure_dev_identity(folder: Path = DEV_DIR) -> Path:
    """Makes the key, JWKS and auth config in folder unless there; returns the auth config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / "key.pem"
    if not key_path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        public = json.loads(jwt.get_algorithm_by_name("EdDSA").to_jwk(key.public_key()))
        (folder / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": DEV_KID, "use": "sig"}]}))
    config = folder / "auth.toml"
    if not config.exists():
        config.write_text(
            "# The development identity provider (viper-server dev-token): for local use only.\n"
            f'[[issuers]]\nissuer = "{DEV_ISSUER}"\naudience = "{DEV_AUDIENCE}"\njwks = "jwks.json"\n'
            'tenant = "default"\n'
        )
    return config


def dev_token(user_id: str, *, folder: Path = DEV_DIR, ttl: int = DEFAULT_TTL) -> str:
    """An end user's JWT from the development issuer, valid for ttl seconds."""
    validate_user_id(user_id)
    if not 0 < ttl <= 24 * 3600:
        raise ValueError("--ttl must be 1-86400 seconds (the server refuses tokens living longer than 24 h)")
    ensure_dev_identity(folder)
    key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), password=None)
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": user_id, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": DEV_KID})
