"""Authentication (OIDC bearer JWTs) and per-model authorization for the gateway.

- config:    trusted issuers and what applies to them (flags, environment, file)
- keys:      an issuer's signing keys (discovery, JWKS cache, refetch on unknown kid)
- tokens:    verifying a token into a Principal (PyJWT), with a verified-token cache
- policy:    model access policies and the admin scope
- guard:     the frontends' hooks, the 401/403 answers, the guarded RegistryService
- devissuer: the development issuer `modelgw up` runs and `modelgw token` mints from
- cli:       the gateway's auth flags and `modelgw token`

Names are imported on first use, so that `modelgw token` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuthConfig": "config",
    "AuthConfigError": "config",
    "IssuerConfig": "config",
    "load_auth_config": "config",
    "AuthError": "guard",
    "Authenticator": "guard",
    "Door": "guard",
    "InsecureDoor": "guard",
    "admin_guard": "guard",
    "build_authenticator": "guard",
    "InvalidToken": "tokens",
    "Principal": "tokens",
    "TokenVerifier": "tokens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
