"""API keys → tenants. Only sha256 hashes of keys are stored; hashes are compared in constant time."""
from __future__ import annotations

import hashlib
import hmac

from conveyor.gateway.config import TenantConfig


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    return authorization[7:].strip() or None


def key_matches(key: str | None, key_sha256: str | None) -> bool:
    if key is None or key_sha256 is None:
        return False
    return hmac.compare_digest(hash_key(key), key_sha256)


def find_tenant(authorization: str | None, tenants: list[TenantConfig]) -> TenantConfig | None:
    key = bearer_key(authorization)
    if key is None:
        return None
    digest = hash_key(key)
    found = None
    for t in tenants:  # no early exit: the time taken does not depend on which tenant matched
        if hmac.compare_digest(digest, t.api_key_sha256):
            found = t
    return found
