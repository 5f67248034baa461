"""Optional API keys for both frontends: ``Authorization: Bearer KEY``.

Rules (the same on gRPC and HTTP):
* no keys configured at all -> everything is open;
* generation calls need an API key or an admin key once any key is configured;
* admin calls need an admin key once admin keys are configured (a valid API key that is not an
  admin key gets PERMISSION_DENIED); with API keys but no admin keys, admin calls take an API key.
Missing or wrong keys get UNAUTHENTICATED. Keys are compared with ``hmac.compare_digest``
against every configured key (no early exit) and never appear in messages or logs.

``check`` returns the ``Caller``: requests remember who started them, and Cancel is allowed to
the caller holding the same key, or an admin key (on an open server, to anyone).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from kvrelay.cluster.api.errors import ApiError, ErrorCode


def _matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


def bearer_token(header: str | None) -> str | None:
    """The key in an ``Authorization`` value, or None when there is none."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a call: ``key_id`` is a digest of the key (never the key; None on an open
    server); ``admin_key`` whether it is an admin key."""

    key_id: str | None = None
    admin_key: bool = False

    def may_cancel(self, owner: Caller) -> bool:
        """Cancel a request ``owner`` started: the same key, or an admin key."""
        return self.admin_key or self.key_id == owner.key_id


OPEN = Caller(None, admin_key=True)  # no keys configured: everyone may do everything


@dataclass(frozen=True, slots=True)
class ApiKeys:
    api_keys: tuple[bytes, ...] = ()
    admin_keys: tuple[bytes, ...] = ()

    @classmethod
    def from_strings(cls, api_keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> ApiKeys:
        api = tuple(k.encode() for k in api_keys)
        admin = tuple(k.encode() for k in admin_keys)
        if any(not k for k in api + admin):
            raise ValueError("API keys must not be empty")
        return cls(api, admin)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def __repr__(self) -> str:  # keys never reach a log line through repr()
        return f"ApiKeys(api_keys=<{len(self.api_keys)}>, admin_keys=<{len(self.admin_keys)}>)"

    def check(self, authorization: str | None, *, admin: bool) -> Caller:
        """The caller, or ApiError(UNAUTHENTICATED / PERMISSION_DENIED) unless the header grants
        access."""
        if not self.enabled:
            return OPEN
        token = bearer_token(authorization)
        if token is None:
            raise ApiError(ErrorCode.UNAUTHENTICATED, "missing API key (Authorization: Bearer KEY)")
        raw = token.encode()
        is_admin = _matches(raw, self.admin_keys)
        is_user = _matches(raw, self.api_keys)
        if not (is_admin or is_user):
            raise ApiError(ErrorCode.UNAUTHENTICATED, "invalid API key")
        if admin and self.admin_keys and not is_admin:
            raise ApiError(ErrorCode.PERMISSION_DENIED, "this call needs an admin key")
        return Caller(hashlib.sha256(raw).hexdigest()[:16], admin_key=is_admin)
