"""API keys → tenants (only sha256 hashes of keys are stored; hashes are compared in constant time), and what keeps
tenants apart upstream: per-tenant prefix-cache salts and opaque replica names."""
from __future__ import annotations

import hashlib
import hmac
import json

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
    """The tenant whose key is the bearer token, else None. O(1) in the number of tenants: the presented key is
    hashed once and looked up by its hash; the one compare with a stored hash is constant-time (a miss compares
    against a dummy, so a hit and a miss do the same work)."""
    key = bearer_key(authorization)
    if key is None:
        return None
    digest = hash_key(key)
    found = _index(tenants).get(digest)
    ok = hmac.compare_digest(digest, found.api_key_sha256 if found is not None else _NO_KEY)
    return found if ok and found is not None else None


_NO_KEY = "0" * 64  # no key hashes to this (it is not a sha256 anyone knows a preimage of)
_INDEX: tuple[list[TenantConfig] | None, dict[str, TenantConfig]] = (None, {})


def _index(tenants: list[TenantConfig]) -> dict[str, TenantConfig]:
    """Key hash → tenant, built once per tenants list (a config reload brings a new list)."""
    global _INDEX
    if _INDEX[0] is not tenants:
        _INDEX = (tenants, {t.api_key_sha256: t for t in tenants})
    return _INDEX[1]


def tenant_cache_salt(tenant: str, client_salt: str | None) -> str:
    """The cache_salt the gateway sends upstream: derived from the tenant, so replicas share cached prefix blocks
    only within one tenant. A client's own salt narrows sharing further (to requests with the same salt); it can
    never reach another tenant's blocks, because the tenant part is not the client's to choose. 64 hex digits."""
    material = json.dumps(["conveyor-cache-salt-v1", tenant, client_salt])  # ASCII: lone surrogates are escaped
    return hashlib.sha256(material.encode()).hexdigest()


def replica_label(url: str) -> str:
    """The opaque name a client sees for a replica (`x-conveyor-replica`): stable, but no internal address."""
    return "r-" + hashlib.sha256(url.encode()).hexdigest()[:12]
