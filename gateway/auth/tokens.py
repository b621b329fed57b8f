"""Bearer token verification. PyJWT checks the signature and the registered claims; this
module decides what PyJWT may accept: the issuer (from a fixed list), the algorithm (from
that issuer's allow-list), the key (from that issuer's JWKS, never from the token).

    verifier = TokenVerifier(config, keys_by_issuer)
    principal = await verifier.verify(token)      # or InvalidToken with the reason

The unverified `iss` claim only chooses whose keys and settings to use; everything is
then verified against that issuer's configuration. Verified tokens are cached by their
SHA-256 (bounded LRU) until they expire, so a token used again costs a dict lookup.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


def metadata_safe(subject: str) -> str:
    """gRPC metadata values are printable ASCII: anything else is %-encoded."""
    if subject.isascii() and subject.isprintable():
        return subject
    return quote(subject, safe="")


def _lookup(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects (`realm_access.roles`).
    A top-level claim whose name contains dots (`https://example.com/groups`) wins."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def claim_values(claims: Mapping[str, Any], paths: Iterable[str], split: bool = False) -> frozenset[str]:
    """Every string found at `paths`: lists of strings, or strings (split on spaces
    with `split`, as OAuth's `scope` is)."""
    values: set[str] = set()
    for path in paths:
        value = _lookup(claims, path)
        if isinstance(value, str):
            values.update(value.split() if split else (value,))
        elif isinstance(value, list):
            values.update(v for v in value if isinstance(v, str))
    return frozenset(values)


def _shown(value: Any, limit: int = 80) -> str:
    """A value from an unverified token, fit for a message: repr'd and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise InvalidToken("the token names no issuer (iss)")
        config = self._issuers.get(iss)
        if config is None:
            raise InvalidToken(f"the token's issuer {_shown(iss)} is not trusted here")
        alg = header.get("alg")
        if alg not in config.algorithms:
            raise InvalidToken(
                f"algorithm {_shown(alg)} is not accepted for issuer {iss}; accepted: {', '.join(config.algorithms)}"
            )
        kid = header.get("kid")
        if alg in HMAC_ALGORITHMS:
            key: Any = config.shared_secret
        else:
            key = await self._key(config, kid, alg)
        self.signature_checks += 1
        try:
            claims = self._jwt.decode(
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
        subject = claims.get(config.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise InvalidToken(f"the token has no subject ('{config.subject_claim}' claim)")
        return Principal(
            subject=subject,
            issuer=iss,
            scopes=claim_values(claims, config.scope_claims, split=True),
            groups=claim_values(claims, config.group_claims),
            roles=claim_values(claims, config.role_claims),
            valid_until=float(claims["exp"]) + config.leeway_seconds,
            key_id=kid if isinstance(kid, str) else "",
            header_value=metadata_safe(subject),
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
