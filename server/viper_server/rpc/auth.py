"""Bearer-token authentication against a token file.

The file holds one token a line, either as `sha256:<hex digest>` (better: the
file then holds no secret) or in plain text; blank lines and `#` comments are
skipped. Presented tokens are hashed and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from pathlib import Path

_SCHEME = "bearer "


def token_digest(token: str) -> str:
    """The `sha256:<hex>` line that stands for token in a token file."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class TokenAuthenticator:
    def __init__(self, digests: Sequence[str]) -> None:
        if not digests:
            raise ValueError("no tokens: every call would be refused")
        self._digests = tuple(digest.encode() for digest in digests)

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthenticator:
        digests = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                hex_digest = line.removeprefix("sha256:").lower()
                if len(hex_digest) != 64 or any(c not in "0123456789abcdef" for c in hex_digest):
                    raise ValueError(f"{path}:{number}: not a sha256 hex digest")
                digests.append("sha256:" + hex_digest)
            else:
                digests.append(token_digest(line))
        try:
            return cls(digests)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def allows(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        """True if the call's `authorization: Bearer <token>` names a known token."""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.lower().startswith(_SCHEME):
                presented = token_digest(value[len(_SCHEME):].strip()).encode()
                # Compare against every digest so the time taken says nothing about which matched.
                matches = [hmac.compare_digest(presented, digest) for digest in self._digests]
                return any(matches)
        return False
