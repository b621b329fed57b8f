"""An issuer's signing keys: OIDC discovery, then its JWKS, kept current in the background.

    keys = IssuerKeys(issuer_config, session)
    keys.start()                      # fetch now and every max-age, in the background
    key = await keys.find(kid)        # a known kid: a dict lookup; an unknown one: refetch

Requests never wait for the periodic refresh: the keys in hand stay in use until a newer
set arrives, and stay in use while the issuer is unreachable. A token naming a kid we do
not know triggers an immediate refetch (a key the issuer has just published passes at
once), shared by every request waiting for it and at most one per `min_refetch_seconds`,
so a stream of tokens with made-up kids costs the issuer one fetch per interval.

Keys come only from the JWKS at the issuer's discovered jwks_uri, never from a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import jwt
from jwt.exceptions import PyJWTError

from modelgw.gateway.auth.config import IssuerConfig

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1024 * 1024
MIN_CACHE_SECONDS = 1.0
MAX_CACHE_SECONDS = 24 * 3600.0
MAX_RETRY_SECONDS = 30.0

# which key a JWS algorithm needs: (kty, allowed curves or None)
_KEY_KINDS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    **{f"{p}{n}": ("RSA", None) for p in ("RS", "PS") for n in (256, 384, 512)},
    "ES256": ("EC", ("P-256",)),
    "ES384": ("EC", ("P-384",)),
    "ES512": ("EC", ("P-521",)),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}
_PRIVATE_MEMBERS = frozenset(("d", "p", "q", "dp", "dq", "qi", "oth", "k"))
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)")


class KeyMismatch(Exception):
    """A key cannot verify this token; str() says why (for the 401's description)."""


class FetchError(Exception):
    """Discovery or the JWKS could not be fetched or made no sense."""


def cache_seconds(cache_control: str | None, default: float) -> float:
    """How long a fetched JWKS is good for: Cache-Control max-age when given, else the
    default, within [1 s, 24 h]."""
    if cache_control:
        if "no-store" in cache_control or "no-cache" in cache_control:
            return MIN_CACHE_SECONDS
        match = _MAX_AGE.search(cache_control)
        if match:
            return min(MAX_CACHE_SECONDS, max(MIN_CACHE_SECONDS, float(match.group(1))))
    return default


class SigningKey:
    """One JWK of an issuer; PyJWK objects are built per algorithm on first use."""

    __slots__ = ("_verifiers", "jwk", "kid")

    def __init__(self, kid: str, jwk: Mapping[str, Any]) -> None:
        self.kid = kid
        # public members only: a private member published by mistake must not turn
        # this into a private (or a symmetric) key
        self.jwk = {k: v for k, v in jwk.items() if k not in _PRIVATE_MEMBERS}
        self._verifiers: dict[str, jwt.PyJWK] = {}

    def verifier(self, alg: str) -> jwt.PyJWK:
        """The key, bound to `alg`, if this key may verify `alg` signatures; else
        KeyMismatch naming the mismatch (kty, crv, alg or use)."""
        found = self._verifiers.get(alg)
        if found is not None:
            return found
        jwk = self.jwk
        use = jwk.get("use")
        if use is not None and use != "sig":
            raise KeyMismatch(f"key '{self.kid}' is published for use '{use}', not for signatures")
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            raise KeyMismatch(f"key '{self.kid}' is not published for verifying signatures (key_ops {ops})")
        if jwk.get("alg") not in (None, alg):
            raise KeyMismatch(f"key '{self.kid}' is for {jwk.get('alg')}, the token says {alg}")
        kty, curves = _KEY_KINDS.get(alg, (None, None))
        if kty is None or jwk.get("kty") != kty:
            raise KeyMismatch(f"key '{self.kid}' is a {jwk.get('kty')} key; {alg} needs a {kty} key")
        if curves is not None and jwk.get("crv") not in curves:
            raise KeyMismatch(f"key '{self.kid}' is on curve {jwk.get('crv')}; {alg} needs {' or '.join(curves)}")
        try:
            found = jwt.PyJWK(dict(jwk), algorithm=alg)
        except PyJWTError as err:
            raise KeyMismatch(f"key '{self.kid}' is unusable: {err}") from None
        self._verifiers[alg] = found
        return found


def parse_jwks(document: Any) -> dict[str, SigningKey]:
    """kid -> key, from a JWKS document. Keys without a kid cannot be named by a token
    and are left out."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchError("the JWKS is not a JSON object with a 'keys' list")
    keys: dict[str, SigningKey] = {}
    for entry in document["keys"]:
        if isinstance(entry, dict) and isinstance(entry.get("kid"), str) and entry["kid"]:
            keys[entry["kid"]] = SigningKey(entry["kid"], entry)
    return keys


class IssuerKeys:
    """The current signing keys of one issuer."""

    def __init__(
        self,
        config: IssuerConfig,
        session: Callable[[], aiohttp.ClientSession],
        on_removed: Callable[[str, set[str]], None] | None = None,
    ) -> None:
        self.config = config
        self._session = session
        self._on_removed = on_removed
        self.keys: dict[str, SigningKey] = {}
        self.jwks_uri = config.jwks_uri
        self.fetched = False           # at least one JWKS has been read
        self.fetches = 0               # JWKS fetches attempted (for metrics and tests)
        self.last_error: str | None = None
        self.cache_seconds = config.jwks_cache_seconds
        self._last_start = float("-inf")   # monotonic start time of the last fetch
        self._last_completed_start = float("-inf")
        self._inflight: asyncio.Future[None] | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._refresh_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()

    async def _refresh_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self.refresh()
                failures = 0
                delay = self.cache_seconds
            except FetchError as err:
                failures += 1
                delay = min(MAX_RETRY_SECONDS, 0.25 * 2**failures)
                level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
                kept = (
                    f"keeping the {len(self.keys)} key(s) fetched before" if self.fetched else "no keys yet: its tokens are refused"
                )
                log.log(level, "issuer %s: %s (%s; retrying in %.1fs)", self.config.issuer, err, kept, delay)
            except Exception:  # a bug of ours must not end the refreshing for good
                log.exception("issuer %s: refreshing its keys failed", self.config.issuer)
                delay = MAX_RETRY_SECONDS
            await asyncio.sleep(delay)

    # -- lookups ------------------------------------------------------------------------

    async def find(self, kid: str) -> SigningKey | None:
        """The key named `kid`, fetching the JWKS again when it is not known yet (a key
        the issuer has just published). None when the issuer does not publish it."""
        key = self.keys.get(kid)
        if key is not None:
            return key
        asked = time.monotonic()
        # until a fetch that started after we asked has completed: a fetch already under
        # way may have read the JWKS just before the key was published
        while self._last_completed_start < asked:
            try:
                await self.refresh(rate_limited=True)
            except FetchError:
                break
            key = self.keys.get(kid)
            if key is not None:
                return key
        return self.keys.get(kid)

    async def refresh(self, rate_limited: bool = False) -> None:
        """Fetch discovery (once) and the JWKS; concurrent callers share one fetch. With
        `rate_limited`, a fetch starts no sooner than min_refetch_seconds after the last
        one started (callers wait for it rather than being refused)."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch(rate_limited))
            self._inflight.add_done_callback(self._fetch_done)
        await asyncio.shield(self._inflight)

    def _fetch_done(self, future: asyncio.Future) -> None:
        self._inflight = None
        if not future.cancelled():
            future.exception()  # retrieved here; raised to the awaiting callers

    async def _fetch(self, rate_limited: bool) -> None:
        if rate_limited:
            wait = self._last_start + self.config.min_refetch_seconds - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        started = self._last_start = time.monotonic()
        self.fetches += 1
        try:
            if self.jwks_uri is None:
                self.jwks_uri = await self._discover()
            try:
                document, cache_control = await self._get_json(self.jwks_uri)
            except FetchError:
                if not self.config.jwks_uri:
                    self.jwks_uri = None  # discover again next time: the issuer may have moved it
                raise
            keys = parse_jwks(document)
        except FetchError as err:
            self.last_error = str(err)
            raise
        finally:
            self._last_completed_start = max(self._last_completed_start, started)
        self.cache_seconds = cache_seconds(cache_control, self.config.jwks_cache_seconds)
        removed = set(self.keys) - set(keys)
        added = set(keys) - set(self.keys)
        # keep the per-algorithm PyJWK objects of keys that did not change
        for kid, key in keys.items():
            old = self.keys.get(kid)
            if old is not None and old.jwk == key.jwk:
                keys[kid] = old
        self.keys = keys
        self.fetched = True
        self.last_error = None
        if added or removed:
            log.info(
                "issuer %s: %d signing key(s)%s%s", self.config.issuer, len(keys),
                f", new: {', '.join(sorted(added))}" if added else "",
                f", withdrawn: {', '.join(sorted(removed))}" if removed else "",
            )
        if removed and self._on_removed is not None:
            self._on_removed(self.config.issuer, removed)

    async def _discover(self) -> str:
        issuer = self.config.issuer
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document, _ = await self._get_json(url)
        if not isinstance(document, dict):
            raise FetchError(f"discovery document {url} is not a JSON object")
        if document.get("issuer") != issuer:
            raise FetchError(
                f"discovery document {url} names issuer {str(document.get('issuer'))[:200]!r}, "
                f"not {issuer!r} (they must be equal)"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise FetchError(f"discovery document {url} has no usable jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        try:
            async with self._session().get(url, headers={"Accept": "application/json"}) as response:
                if response.status != 200:
                    raise FetchError(f"GET {url}: HTTP {response.status}")
                body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"GET {url}: the document is larger than {MAX_DOCUMENT_BYTES} bytes")
                cache_control = response.headers.get("Cache-Control")
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise FetchError(f"GET {url}: {type(err).__name__}: {err}".rstrip(": ")) from None
        try:
            return json.loads(body), cache_control
        except ValueError:
            raise FetchError(f"GET {url}: the body is not JSON") from None
