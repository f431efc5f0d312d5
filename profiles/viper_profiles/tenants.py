"""Tenants: every profile lives in one, and nothing the store does crosses from one to another.

The same user id in two tenants is two profiles. Data stored before tenants existed is in DEFAULT_TENANT.
"""

from __future__ import annotations

import re

from .errors import StoreError

DEFAULT_TENANT = "default"
# No "/": the server joins tenant and user id with it into one unambiguous cache and scheduling key.
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class InvalidTenant(StoreError, ValueError):
    def __init__(self, tenant: object) -> None:
        super().__init__(f"invalid tenant {tenant!r:.70}: must be 1-63 characters of a-z 0-9 . _ - (first a-z 0-9)")
        self.tenant = tenant


def validate_tenant(tenant: str) -> str:
    """Returns tenant, or raises InvalidTenant unless it matches TENANT_PATTERN."""
    if not isinstance(tenant, str) or TENANT_PATTERN.fullmatch(tenant) is None:
        raise InvalidTenant(tenant)
    return tenant
