"""Who the gateway trusts: token issuers, their audiences and algorithms, where the claims
that policies read live in their tokens, and the admin scope.

From flags (one issuer), the environment (one issuer) or a YAML/JSON file (any number):

    admin_scope: modelgw:admin          # needed for /admin/v1 and the gRPC RegistryService
    max_token_bytes: 8192               # longer tokens are refused unread (401); the HTTP
                                        # header and gRPC metadata limits are set above it
    issuers:
      - issuer: https://login.example.com/realms/ml    # exactly its tokens' `iss`
        audiences: [modelgw]                           # a token's `aud` must name one
        algorithms: [RS256, ES256]                     # default: every asymmetric one
        scope_claims: [scope, scp]                     # space-separated string or list
        group_claims: [groups]
        role_claims: [roles, realm_access.roles]       # dotted paths reach nested objects
        subject_claim: sub
        leeway_seconds: 60                             # clock skew allowed on exp/nbf/iat
        jwks_uri: https://...                          # default: from OIDC discovery
        jwks_cache_seconds: 600                        # unless Cache-Control max-age says
        shared_secret_env: ISSUER_SECRET               # HS256/384/512 only with a secret

Environment: MODELGW_AUTH_CONFIG (file), MODELGW_ISSUER, MODELGW_AUDIENCE (comma-separated),
MODELGW_ALGORITHMS, MODELGW_JWKS_URI, MODELGW_ADMIN_SCOPE. Flags win over the environment;
an issuer given by flag or environment is added to the file's issuers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
DEFAULT_ADMIN_SCOPE = "modelgw:admin"
DEFAULT_MAX_TOKEN_BYTES = 8 * 1024
# room for a request's other headers besides the largest token: the HTTP header-line and gRPC
# metadata limits are max_token_bytes plus this, so that a token's size is judged by the
# token limit (401 / UNAUTHENTICATED naming it), never cut off first by a transport
HEADER_ROOM_BYTES = 8 * 1024


class AuthConfigError(ValueError):
    """The authentication configuration cannot be used; the message says what to fix."""


def _strings(value: Any, what: str) -> tuple[str, ...]:
    """A list of strings from a list, or from one comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, Iterable) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v)
    raise AuthConfigError(f"{what}: expected a list of strings, got {value!r}")


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted issuer. Its tokens are verified against its keys and this config only."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
    scope_claims: tuple[str, ...] = ("scope", "scp")
    group_claims: tuple[str, ...] = ("groups",)
    role_claims: tuple[str, ...] = ("roles", "realm_access.roles")
    subject_claim: str = "sub"
    leeway_seconds: float = 60.0
    jwks_uri: str | None = None
    jwks_cache_seconds: float = 600.0
    # an unknown kid fetches the keys again at once, but at most once per this interval
    # (requests arriving within it wait for the next fetch instead of being refused)
    min_refetch_seconds: float = 1.0
    shared_secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        where = f"issuer '{self.issuer}'"
        if not self.issuer or not self.issuer.startswith(("https://", "http://")):
            raise AuthConfigError(f"issuer: expected an http(s) URL, got '{self.issuer}'")
        if not self.audiences:
            raise AuthConfigError(f"{where}: audiences: at least one is required (tokens must name one in 'aud')")
        if not self.algorithms:
            raise AuthConfigError(f"{where}: algorithms: at least one is required")
        for alg in self.algorithms:
            if alg in HMAC_ALGORITHMS:
                if not self.shared_secret:
                    raise AuthConfigError(
                        f"{where}: algorithm {alg} is HMAC and needs a shared secret (shared_secret_env or "
                        "shared_secret_file); asymmetric algorithms need none"
                    )
            elif alg not in ASYMMETRIC_ALGORITHMS:
                raise AuthConfigError(
                    f"{where}: algorithm '{alg}' is not accepted; choose from "
                    f"{', '.join(ASYMMETRIC_ALGORITHMS + HMAC_ALGORITHMS)}"
                )
        if self.shared_secret is not None and len(self.shared_secret) < 32:
            raise AuthConfigError(f"{where}: the shared secret is {len(self.shared_secret)} bytes; use at least 32")
        if self.leeway_seconds < 0 or self.jwks_cache_seconds <= 0 or self.min_refetch_seconds < 0:
            raise AuthConfigError(f"{where}: leeway, cache and refetch intervals must be positive")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> IssuerConfig:
        env = os.environ if env is None else env
        known = {f.name for f in fields(cls)} | {"shared_secret_env", "shared_secret_file"}
        unknown = sorted(set(data) - known)
        where = f"issuer '{data.get('issuer', '?')}'"
        if unknown:
            raise AuthConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        values: dict[str, Any] = {k: v for k, v in data.items() if k not in ("shared_secret_env", "shared_secret_file")}
        for name in ("audiences", "algorithms", "scope_claims", "group_claims", "role_claims"):
            if name in values:
                values[name] = _strings(values[name], f"{where}: {name}")
        for name in ("leeway_seconds", "jwks_cache_seconds", "min_refetch_seconds"):
            if name in values:
                try:
                    values[name] = float(values[name])
                except (TypeError, ValueError):
                    raise AuthConfigError(f"{where}: {name}: expected a number, got {values[name]!r}") from None
        secret = values.pop("shared_secret", None)
        if "shared_secret_env" in data:
            secret = env.get(data["shared_secret_env"])
            if not secret:
                raise AuthConfigError(f"{where}: shared_secret_env: ${data['shared_secret_env']} is not set")
        if "shared_secret_file" in data:
            try:
                secret = Path(data["shared_secret_file"]).read_bytes().strip()
            except OSError as err:
                raise AuthConfigError(f"{where}: shared_secret_file: {err}") from None
        if secret is not None:
            values["shared_secret"] = secret.encode() if isinstance(secret, str) else bytes(secret)
        if "issuer" not in values:
            raise AuthConfigError("issuers: every entry needs an 'issuer' URL")
        return cls(**values)


@dataclass(frozen=True)
class AuthConfig:
    """Every trusted issuer plus what applies to all of them. No issuer: nothing passes
    (the gateway refuses to start unless told --insecure-no-auth)."""

    issuers: tuple[IssuerConfig, ...] = ()
    admin_scope: str = DEFAULT_ADMIN_SCOPE
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    cache_entries: int = 10_000
    http_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        names = [i.issuer for i in self.issuers]
        if len(set(names)) != len(names):
            raise AuthConfigError(f"issuers: an issuer is configured twice: {sorted(names)}")
        if not self.admin_scope:
            raise AuthConfigError("admin_scope: must not be empty")
        if self.max_token_bytes < 256 or self.cache_entries < 0:
            raise AuthConfigError("max_token_bytes must be at least 256 and cache_entries not negative")

    @property
    def max_header_bytes(self) -> int:
        """The gateway's limit on one HTTP header line and on a gRPC call's metadata."""
        return self.max_token_bytes + HEADER_ROOM_BYTES

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> AuthConfig:
        if not isinstance(data, Mapping):
            raise AuthConfigError("the auth config must be a mapping with an 'issuers' list")
        unknown = sorted(set(data) - {"issuers", "admin_scope", "max_token_bytes", "cache_entries", "http_timeout_seconds"})
        if unknown:
            raise AuthConfigError(f"unknown setting(s) {', '.join(unknown)}")
        issuers = data.get("issuers") or []
        if not isinstance(issuers, list) or not all(isinstance(i, Mapping) for i in issuers):
            raise AuthConfigError("issuers: expected a list of mappings")
        values: dict[str, Any] = {k: v for k, v in data.items() if k != "issuers"}
        for name in ("max_token_bytes", "cache_entries"):
            if name in values:
                values[name] = int(values[name])
        return cls(issuers=tuple(IssuerConfig.from_dict(i, env) for i in issuers), **values)

    @classmethod
    def from_file(cls, path: str | Path, env: Mapping[str, str] | None = None) -> AuthConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise AuthConfigError(f"cannot read the auth config {path}: {err.strerror or err}") from None
        import yaml

        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as err:
            raise AuthConfigError(f"{path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'}: {err}") from None
        try:
            return cls.from_dict(data or {}, env)
        except AuthConfigError as err:
            raise AuthConfigError(f"{path}: {err}") from None


def load_auth_config(
    *,
    config_file: str | None = None,
    issuer: str | None = None,
    audiences: Iterable[str] = (),
    algorithms: Iterable[str] = (),
    jwks_uri: str | None = None,
    scope_claims: Iterable[str] = (),
    group_claims: Iterable[str] = (),
    role_claims: Iterable[str] = (),
    leeway_seconds: float | None = None,
    admin_scope: str | None = None,
    max_token_bytes: int | None = None,
    env: Mapping[str, str] | None = None,
) -> AuthConfig:
    """The configuration from a file, flags and environment (flags win over environment)."""
    env = os.environ if env is None else env
    config_file = config_file or env.get("MODELGW_AUTH_CONFIG")
    base = AuthConfig.from_file(config_file, env) if config_file else AuthConfig()
    issuer = issuer or env.get("MODELGW_ISSUER")
    issuers = list(base.issuers)
    if issuer:
        settings: dict[str, Any] = {
            "issuer": issuer,
            "audiences": tuple(audiences) or _strings(env.get("MODELGW_AUDIENCE"), "MODELGW_AUDIENCE"),
        }
        algs = tuple(algorithms) or _strings(env.get("MODELGW_ALGORITHMS"), "MODELGW_ALGORITHMS")
        if algs:
            settings["algorithms"] = algs
        if jwks_uri or env.get("MODELGW_JWKS_URI"):
            settings["jwks_uri"] = jwks_uri or env.get("MODELGW_JWKS_URI")
        for name, value in (("scope_claims", scope_claims), ("group_claims", group_claims), ("role_claims", role_claims)):
            if tuple(value):
                settings[name] = tuple(value)
        if leeway_seconds is not None:
            settings["leeway_seconds"] = leeway_seconds
        issuers = [i for i in issuers if i.issuer != issuer] + [IssuerConfig(**settings)]
    elif audiences or algorithms or jwks_uri:
        raise AuthConfigError("--audience, --algorithms and --jwks-uri describe an issuer: give --issuer too")
    return AuthConfig(
        issuers=tuple(issuers),
        admin_scope=admin_scope or env.get("MODELGW_ADMIN_SCOPE") or base.admin_scope,
        max_token_bytes=max_token_bytes or base.max_token_bytes,
        cache_entries=base.cache_entries,
        http_timeout_seconds=base.http_timeout_seconds,
    )


def check_auth_choice(config: AuthConfig, insecure_no_auth: bool) -> None:
    """Authentication is on with at least one issuer, or off by explicit choice: never
    off by omission. AuthConfigError otherwise."""
    if insecure_no_auth and config.issuers:
        raise AuthConfigError("--insecure-no-auth turns authentication off: give it or issuers, not both")
    if not insecure_no_auth and not config.issuers:
        raise AuthConfigError(
            "no token issuer is configured: give --issuer URL --audience AUD (or --auth-config FILE, or "
            "$MODELGW_ISSUER and $MODELGW_AUDIENCE); to run without authentication, --insecure-no-auth"
        )
