"""Bearer token verification. PyJWT checks the signature and the registered claims; this
module decides what PyJWT may accept: the issuer (from a fixed list), the algorithm (from
that issuer's allow-list), the key (from that issuer's JWKS, never from the token), the
size (AuthConfig.max_token_bytes) and the type of every claim read (RFC 7519; checked
before the signature, a wrong one refused naming the claim).

    verifier = TokenVerifier(config, keys_by_issuer)
    principal = await verifier.verify(token)      # or InvalidToken with the reason

The unverified `iss` claim only chooses whose keys and settings to use; everything is
then verified against that issuer's configuration. Verified tokens are cached by their
SHA-256 (bounded LRU) until they expire, so a token used again costs a dict lookup.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import jwt
from jwt import exceptions as jwt_errors

from modelgw.gateway.auth.config import HMAC_ALGORITHMS, AuthConfig, IssuerConfig
from modelgw.gateway.auth.keys import IssuerKeys, KeyMismatch


class InvalidToken(Exception):
    """The token is not accepted; str() is the reason, safe to send back to the caller."""


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller."""

    subject: str
    issuer: str
    scopes: frozenset[str]
    groups: frozenset[str]
    roles: frozenset[str]
    valid_until: float  # epoch seconds: exp + leeway, when verification would start refusing it
    key_id: str
    header_value: str  # the subject as it travels in gRPC metadata (x-modelgw-subject)
    # every claim of the verified token (read-only), e.g. the tenant claim of per-tenant limits
    claims: Mapping[str, Any] = field(default_factory=dict)


def metadata_safe(subject: str) -> str:
    """gRPC metadata values are printable ASCII: anything else is %-encoded."""
    if subject.isascii() and subject.isprintable():
        return subject
    return quote(subject, safe="")


# -- claim types (RFC 7519: NumericDates are JSON numbers, iss/sub strings, aud a string or
# an array of strings). PyJWT checks some and coerces others (`"exp": "1700000000"` passes its
# int(), `true` is an int to Python), so every claim the verifier or a policy reads is checked
# here, before the signature is, and a wrong type is refused naming the claim.


def _json_type(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _wrong_type(name: str, expected: str, value: Any) -> InvalidToken:
    return InvalidToken(f"the token's '{name}' claim must be {expected}, not {_json_type(value)}")


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim in epoch seconds (None when absent): a finite JSON number."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(name, "a number (seconds since the epoch)", value)
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        seconds = math.inf
    if not math.isfinite(seconds):
        raise InvalidToken(f"the token's '{name}' claim must be a finite number of seconds, not {_shown(value, 40)}")
    return seconds


def string_claim(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim that must be a string (None when absent)."""
    if name not in claims:
        return None
    value = claims[name]
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    return value


def _strings(value: Any, name: str, split: bool) -> Iterable[str]:
    """A string (split on spaces with `split`, as OAuth's `scope` is) or an array of strings."""
    if isinstance(value, str):
        return value.split() if split else (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _wrong_type(name, "a string or an array of strings", value)


_ABSENT = object()


def _lookup(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects (`realm_access.roles`);
    _ABSENT when there is none. A top-level claim whose name contains dots
    (`https://example.com/groups`) wins. A step of the path that is there but is no
    object is a wrong type."""
    if path in claims:
        return claims[path]
    node: Any = claims
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping):
            raise _wrong_type(".".join(parts[:depth]), f"an object (to read '{path}')", node)
        if part not in node:
            return _ABSENT
        node = node[part]
    return node


def claim_values(claims: Mapping[str, Any], paths: Iterable[str], split: bool = False) -> frozenset[str]:
    """Every string found at `paths`: arrays of strings, or strings (split on spaces with
    `split`). A claim of any other type: InvalidToken naming it."""
    values: set[str] = set()
    for path in paths:
        value = _lookup(claims, path)
        if value is not _ABSENT:
            values.update(_strings(value, path, split))
    return frozenset(values)


def _shown(value: Any, limit: int = 80) -> str:
    """A value from an unverified token, fit for a message: repr'd and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class _Claims:
    """What the verifier and the policies read from a payload, its types checked."""

    subject: str
    expires: float
    scopes: frozenset[str]
    groups: frozenset[str]
    roles: frozenset[str]


def _read_claims(claims: Mapping[str, Any], config: IssuerConfig) -> _Claims:
    """Every claim the verifier or a policy reads, each of its RFC 7519 type (InvalidToken
    naming the first that is not). The values PyJWT then checks (exp, nbf, iat, aud) are
    only type-checked here."""
    expires = numeric_date(claims, "exp")
    if expires is None:
        raise InvalidToken("the token has no 'exp' claim")
    numeric_date(claims, "nbf")
    numeric_date(claims, "iat")
    if "aud" not in claims:
        raise InvalidToken("the token has no 'aud' claim")
    _strings(claims["aud"], "aud", split=False)
    string_claim(claims, "sub")
    subject = string_claim(claims, config.subject_claim)
    if not subject:
        raise InvalidToken(f"the token has no subject ('{config.subject_claim}' claim)")
    return _Claims(
        subject=subject,
        expires=expires,
        scopes=claim_values(claims, config.scope_claims, split=True),
        groups=claim_values(claims, config.group_claims),
        roles=claim_values(claims, config.role_claims),
    )


class TokenVerifier:
    def __init__(self, config: AuthConfig, keys: Mapping[str, IssuerKeys]) -> None:
        self._issuers: dict[str, IssuerConfig] = {i.issuer: i for i in config.issuers}
        self._keys = keys
        self._max_bytes = config.max_token_bytes
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._cache_entries = config.cache_entries
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})
        self.signature_checks = 0  # tokens whose signature was checked (cache misses)

    async def verify(self, token: str) -> Principal:
        if len(token) > self._max_bytes:
            raise InvalidToken(f"the token is {len(token)} bytes long, more than the {self._max_bytes} accepted")
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidToken("malformed token: it has characters a JWT cannot have") from None
        digest = hashlib.sha256(raw).digest()
        principal = self._cache.get(digest)
        if principal is not None:
            if principal.valid_until > time.time():
                self._cache.move_to_end(digest)
                return principal
            del self._cache[digest]
        principal = await self._verify(token)
        if self._cache_entries:
            self._cache[digest] = principal
            if len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return principal

    def forget_keys(self, issuer: str, kids: set[str]) -> None:
        """An issuer withdrew keys: tokens they signed stop passing now, cached or not."""
        stale = [d for d, p in self._cache.items() if p.issuer == issuer and p.key_id in kids]
        for digest in stale:
            del self._cache[digest]

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = self._jwt.decode(token, options={"verify_signature": False})
        except jwt_errors.PyJWTError as err:
            raise InvalidToken(f"malformed token: {err}") from None
        iss = string_claim(unverified, "iss")
        if iss is None:
            raise InvalidToken("the token names no issuer (iss)")
        config = self._issuers.get(iss)
        if config is None:
            raise InvalidToken(f"the token's issuer {_shown(iss)} is not trusted here")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            raise InvalidToken(
                f"algorithm {_shown(alg)} is not accepted for issuer {iss}; accepted: {', '.join(config.algorithms)}"
            )
        # the payload's types, before any key is fetched or signature checked; the signature
        # then covers these very bytes
        read = _read_claims(unverified, config)
        kid = header.get("kid")
        if alg in HMAC_ALGORITHMS:
            key: Any = config.shared_secret
        else:
            key = await self._key(config, kid, alg)
        self.signature_checks += 1
        try:
            self._jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=list(config.audiences),
                issuer=config.issuer,
                leeway=config.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt_errors.ExpiredSignatureError:
            raise InvalidToken("the token has expired") from None
        except jwt_errors.ImmatureSignatureError as err:
            raise InvalidToken(f"the token is not valid yet: {err}") from None
        except jwt_errors.MissingRequiredClaimError as err:
            raise InvalidToken(f"the token has no '{err.claim}' claim") from None
        except jwt_errors.InvalidAudienceError:
            raise InvalidToken(
                f"the token's audience is not one this gateway accepts ({', '.join(config.audiences)})"
            ) from None
        except jwt_errors.InvalidSignatureError:
            raise InvalidToken("the token's signature does not verify") from None
        except jwt_errors.PyJWTError as err:
            raise InvalidToken(f"invalid token: {err}") from None
        return Principal(
            subject=read.subject,
            issuer=iss,
            scopes=read.scopes,
            groups=read.groups,
            roles=read.roles,
            valid_until=read.expires + config.leeway_seconds,
            key_id=kid if isinstance(kid, str) else "",
            header_value=metadata_safe(read.subject),
            claims=MappingProxyType(dict(unverified)),  # the signature just verified covers them
        )

    async def _key(self, config: IssuerConfig, kid: Any, alg: str) -> jwt.PyJWK:
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("the token names no signing key (kid header)")
        keys = self._keys[config.issuer]
        key = await keys.find(kid)
        if key is None:
            if not keys.fetched:
                raise InvalidToken(
                    f"the signing keys of issuer {config.issuer} are not available yet "
                    f"({keys.last_error or 'still fetching'}); retry later"
                )
            reason = f"issuer {config.issuer} publishes no key {_shown(kid)}"
            if keys.last_error:
                reason += f" (its keys could not be refreshed: {keys.last_error})"
            raise InvalidToken(reason)
        try:
            return key.verifier(alg)
        except KeyMismatch as err:
            raise InvalidToken(str(err)) from None
