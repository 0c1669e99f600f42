"""API keys: which requests may use the models. Checked in the router, on both front ends:
HTTP `Authorization: Bearer KEY`, gRPC metadata `authorization: Bearer KEY`. A missing or wrong
key is refused before the body is parsed, with 401 / UNAUTHENTICATED and the usual error body.
Health checks (`/health`, the gRPC Health rpc) stay open: load balancers call them without keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from router.config import RouterConfig
from router.errors import Unauthenticated


class ApiKeys:
    def __init__(self, config: RouterConfig, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        keys = list(config.api_keys)
        if config.api_keys_env:
            keys += [k.strip() for k in env.get(config.api_keys_env, "").split(",") if k.strip()]
        # Compared as digests: equal length, constant time, whatever the client sends.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is "Bearer <an accepted key>"."""
        if not self.enabled:
            return
        if not authorization:
            raise Unauthenticated("missing API key: send `Authorization: Bearer <key>`")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("expected `Authorization: Bearer <key>`")
        digest = hashlib.sha256(key.strip().encode()).digest()
        ok = False
        for d in self._digests:  # no early exit: the time taken says nothing about the keys
            ok |= hmac.compare_digest(d, digest)
        if not ok:
            raise Unauthenticated("invalid API key")
