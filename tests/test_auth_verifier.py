"""Token verification against a real issuer on loopback (discovery + JWKS over HTTP),
with tokens minted by joserfc: what passes, the attack corpus and why each is refused,
key rotation, the verified-token cache, issuer outages. In-process: the gateway's
Authenticator with its own aiohttp session, no gateway server (test_auth_gateway.py
drives the real one)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from auth_helpers import (
    JSON_NULL,
    Issuer,
    Key,
    hmac_token,
    unsigned_token,
    with_flipped_signature,
    with_payload,
)

from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
from modelgw.gateway.auth.guard import Authenticator
from modelgw.gateway.auth.keys import FetchError
from modelgw.gateway.auth.tokens import InvalidToken
from modelgw.gateway.routing import RoutingTable

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


@pytest.fixture
def issuer():
    with Issuer() as running:
        yield running


@contextlib.asynccontextmanager
async def door(*issuers: Issuer, auth: dict | None = None, **settings) -> AsyncIterator[Authenticator]:
    """An Authenticator trusting `issuers`, started (keys fetched in the background)."""
    config = AuthConfig(
        issuers=tuple(IssuerConfig(issuer=i.url, audiences=(i.audience,), **settings) for i in issuers),
        **(auth or {}),
    )
    authenticator = Authenticator(config, RoutingTable())
    await authenticator.start()
    try:
        yield authenticator
    finally:
        await authenticator.close()


async def refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        await auth.verifier.verify(token)
    return str(info.value)


async def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


# -- what passes --------------------------------------------------------------------------


async def test_tokens_of_every_asymmetric_kind_pass_with_their_claims(issuer: Issuer) -> None:
    keys = [issuer.new_key(alg) for alg in ("RS256", "RS512", "PS256", "ES256", "ES384", "EdDSA")]
    async with door(issuer) as auth:
        for key in keys:
            token = issuer.token(
                key, sub=f"user-{key.alg}", scope="models:read models:write",
                groups=["ml-team"], realm_access={"roles": ["predictor"]},
            )
            principal = await auth.verifier.verify(token)
            assert principal.subject == f"user-{key.alg}"
            assert principal.issuer == issuer.url and principal.key_id == key.kid
            assert principal.scopes == {"models:read", "models:write"}
            assert principal.groups == {"ml-team"} and principal.roles == {"predictor"}


async def test_claim_paths_read_lists_strings_and_nested_objects(issuer: Issuer) -> None:
    key = issuer.new_key("RS256")
    async with door(
        issuer, scope_claims=("scp",), group_claims=("https://example.com/groups",),
        role_claims=("resource_access.modelgw.roles",),
    ) as auth:
        principal = await auth.verifier.verify(issuer.token(
            key, scope="ignored", scp=["a", "b"], **{"https://example.com/groups": ["g"]},
            resource_access={"modelgw": {"roles": ["r1", "r2"]}, "other": {"roles": ["x"]}},
        ))
    assert principal.scopes == {"a", "b"} and principal.groups == {"g"} and principal.roles == {"r1", "r2"}


async def test_clock_leeway_is_honoured_on_exp_nbf_and_iat(issuer: Issuer) -> None:
    key = issuer.new_key("ES256")
    now = int(time.time())
    async with door(issuer, leeway_seconds=60) as auth:
        await auth.verifier.verify(issuer.token(key, exp=now - 20))
        await auth.verifier.verify(issuer.token(key, nbf=now + 20, iat=now + 20))
        assert "expired" in await refused(auth, issuer.token(key, exp=now - 120))
        assert "not valid yet" in await refused(auth, issuer.token(key, nbf=now + 120))
        assert "not valid yet" in await refused(auth, issuer.token(key, iat=now + 120))


async def test_hmac_passes_only_with_a_configured_shared_secret(issuer: Issuer) -> None:
    secret = b"s" * 40
    claims = issuer.claims()
    async with door(issuer, algorithms=("HS256",), shared_secret=secret) as auth:
        assert (await auth.verifier.verify(hmac_token(claims, secret))).subject == "alice"
        assert "signature does not verify" in await refused(auth, hmac_token(claims, b"t" * 40))
        assert "not accepted" in await refused(auth, hmac_token(claims, secret, alg="HS512"))
    async with door(issuer) as auth:  # no secret: HMAC is refused outright
        assert "not accepted" in await refused(auth, hmac_token(claims, secret))


# -- the attack corpus --------------------------------------------------------------------


async def test_attack_corpus_is_refused_with_a_reason(issuer: Issuer) -> None:
    key = issuer.new_key("RS256")
    enc_key = issuer.new_key("RS256", use="enc")
    rs_without_alg = issuer.new_key("RS256", publish_alg=False)
    unpublished = Key("RS256")
    now = int(time.time())
    with Issuer() as attacker:
        attacker_key = attacker.new_key("RS256")
        attacker_jwks = f"{attacker.url}/jwks.json"
        good = issuer.token(key, scope="read")
        corpus = {
            "malformed": ("not-a-jwt", "malformed"),
            "two segments": ("abc.def", "malformed"),
            "garbage base64": ("a!b.c!d.e!f", "malformed"),
            "alg none": (unsigned_token(issuer.claims()), "algorithm 'none' is not accepted"),
            "alg None": (unsigned_token(issuer.claims(), "None"), "algorithm 'None' is not accepted"),
            "HS256 with the issuer's RSA public key as secret": (
                hmac_token(issuer.claims(), Key("RS256").public_pem, kid=key.kid), "algorithm 'HS256' is not accepted",
            ),
            "HS256 with the published key's PEM": (
                hmac_token(issuer.claims(), key.public_pem, kid=key.kid), "algorithm 'HS256' is not accepted",
            ),
            "expired": (issuer.token(key, exp=now - 3600), "expired"),
            "nbf in the future": (issuer.token(key, nbf=now + 3600), "not valid yet"),
            "wrong iss": (issuer.token(key, iss="https://login.example.com"), "not trusted"),
            "wrong aud": (issuer.token(key, aud="someone-else"), "audience"),
            "no aud": (issuer.token(key, aud=None), "no 'aud' claim"),
            "no exp": (issuer.token(key, exp=None), "no 'exp' claim"),
            "no iss": (issuer.token(key, iss=None), "names no issuer"),
            "no sub": (issuer.token(key, sub=None), "no subject"),
            "no kid": (issuer.token(key, header={"kid": None}), "names no signing key"),
            "unknown kid": (issuer.token(unpublished), f"publishes no key '{unpublished.kid}'"),
            "tampered payload": (with_payload(good, scope="read modelgw:admin"), "signature does not verify"),
            "tampered signature": (with_flipped_signature(good), "signature does not verify"),
            "untrusted issuer": (attacker.token(attacker_key), "not trusted"),
            "jku to attacker keys": (
                issuer.token(attacker_key, header={"jku": attacker_jwks}), f"publishes no key '{attacker_key.kid}'",
            ),
            "jku with a real kid": (
                issuer.token(attacker_key, header={"jku": attacker_jwks, "kid": key.kid}), "signature does not verify",
            ),
            "x5u to attacker keys": (
                issuer.token(attacker_key, header={"x5u": attacker_jwks}), f"publishes no key '{attacker_key.kid}'",
            ),
            "embedded jwk": (
                issuer.token(attacker_key, header={"jwk": attacker_key.public, "kid": key.kid}), "signature does not verify",
            ),
            "embedded x5c": (issuer.token(attacker_key, header={"x5c": ["MIIBIjAN"], "kid": key.kid}), "signature does not verify"),
            "oversized": (issuer.token(key, padding="x" * 9000), "more than the 8192 accepted"),
            "key published for encryption": (issuer.token(enc_key), "for use 'enc'"),
            "PS256 on a key published for RS256": (issuer.token(key, header={"alg": "PS256"}), "is for RS256"),
            "ES256 naming an RSA key": (
                with_payload(issuer.token(Key("ES256", kid=rs_without_alg.kid))), "RSA key; ES256 needs a EC key",
            ),
        }
        async with door(issuer) as auth:
            assert (await auth.verifier.verify(good)).subject == "alice"  # the keys are there
            for name, (token, reason) in corpus.items():
                message = await refused(auth, token)
                assert reason in message, f"{name}: {message}"
            # nothing was ever fetched from where a token pointed
            assert attacker.jwks_requests == 0 and attacker.discovery_requests == 0


# claims of the wrong type (RFC 7519 4.1): each is refused naming the claim, whatever PyJWT
# would have made of it ("exp": "..." passes its int(); true is an int to Python)
NOW = int(time.time())
WRONG_TYPES = {
    "exp as a string": ("exp", {"exp": str(NOW + 300)}),
    "exp true": ("exp", {"exp": True}),
    "exp false": ("exp", {"exp": False}),
    "exp NaN": ("exp", {"exp": float("nan")}),
    "exp Infinity": ("exp", {"exp": float("inf")}),
    "exp beyond any float": ("exp", {"exp": 10**400}),
    "exp null": ("exp", {"exp": JSON_NULL}),
    "exp an array": ("exp", {"exp": [NOW + 300]}),
    "nbf as a string": ("nbf", {"nbf": str(NOW)}),
    "nbf true": ("nbf", {"nbf": True}),
    "nbf null": ("nbf", {"nbf": JSON_NULL}),
    "iat as a string": ("iat", {"iat": str(NOW)}),
    "iat true": ("iat", {"iat": True}),
    "iat -Infinity": ("iat", {"iat": float("-inf")}),
    "iss an array": ("iss", {"iss": ["{issuer}"]}),
    "sub a number": ("sub", {"sub": 5}),
    "sub an array": ("sub", {"sub": ["alice"]}),
    "aud a number": ("aud", {"aud": 5}),
    "aud an array with a number": ("aud", {"aud": ["{audience}", 5]}),
    "aud an object": ("aud", {"aud": {"{audience}": True}}),
    "scope a number": ("scope", {"scope": 5}),
    "scope true": ("scope", {"scope": True}),
    "scope an array with a number": ("scope", {"scope": ["read", 1]}),
    "scp an object": ("scp", {"scp": {"read": True}}),
    "groups a number": ("groups", {"groups": 7}),
    "groups nested arrays": ("groups", {"groups": [["ml-team"]]}),
    "roles an object": ("roles", {"roles": {"predictor": True}}),
    "realm_access a string": ("realm_access", {"realm_access": "predictor"}),
    "realm_access.roles numbers": ("realm_access.roles", {"realm_access": {"roles": [1, 2]}}),
    "realm_access.roles null": ("realm_access.roles", {"realm_access": {"roles": JSON_NULL}}),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
async def test_a_claim_of_the_wrong_type_is_refused_naming_the_claim(issuer: Issuer, case: str) -> None:
    claim, claims = WRONG_TYPES[case]
    filled = {k: _filled(v, issuer) for k, v in claims.items()}
    key = issuer.new_key("RS256")
    async with door(issuer) as auth:
        await auth.verifier.verify(issuer.token(key))  # the keys are there
        checks = auth.verifier.signature_checks
        message = await refused(auth, issuer.token(key, **filled))
        assert f"'{claim}' claim" in message, message
        assert auth.verifier.signature_checks == checks  # refused before any signature check


def _filled(value, issuer: Issuer):
    if isinstance(value, str):
        return value.format(issuer=issuer.url, audience=issuer.audience)
    if isinstance(value, list):
        return [_filled(v, issuer) for v in value]
    if isinstance(value, dict):
        return {_filled(k, issuer): None if v is JSON_NULL else _filled(v, issuer) for k, v in value.items()}
    return value


async def test_every_well_typed_form_of_the_claims_passes(issuer: Issuer) -> None:
    key = issuer.new_key("ES256")
    async with door(issuer) as auth:
        forms = [
            ({"exp": NOW + 300.5, "nbf": NOW - 1.25, "iat": NOW}, set(), set(), set()),
            ({"aud": [issuer.audience, "other"], "scope": "a b", "scp": ["c"]}, {"a", "b", "c"}, set(), set()),
            ({"scp": "a b", "groups": "one group", "roles": ["r"]}, {"a", "b"}, {"one group"}, {"r"}),
            ({"groups": [], "realm_access": {"roles": "r"}, "resource_access": 5}, set(), set(), {"r"}),
        ]
        for claims, scopes, groups, roles in forms:
            principal = await auth.verifier.verify(issuer.token(key, **claims))
            assert (principal.scopes, principal.groups, principal.roles) == (scopes, groups, roles), claims


async def test_a_token_at_the_size_limit_passes_and_one_character_more_is_refused(issuer: Issuer) -> None:
    key = issuer.new_key("RS256")
    async with door(issuer, auth={"max_token_bytes": 8192}) as auth:
        assert (await auth.verifier.verify(issuer.sized_token(key, 8192))).subject == "alice"
        assert "more than the 8192 accepted" in await refused(auth, issuer.sized_token(key, 8193))


async def test_algorithms_outside_the_issuers_allow_list_are_refused_before_any_signature_check(issuer: Issuer) -> None:
    rsa, ec = issuer.new_key("RS256"), issuer.new_key("ES256")
    async with door(issuer, algorithms=("RS256",)) as auth:
        await auth.verifier.verify(issuer.token(rsa))
        checks = auth.verifier.signature_checks
        assert "'ES256' is not accepted" in await refused(auth, issuer.token(ec))
        assert "'none' is not accepted" in await refused(auth, unsigned_token(issuer.claims()))
        assert auth.verifier.signature_checks == checks


# -- keys: rotation, refetch, outages -------------------------------------------------------


async def test_a_rotated_in_key_passes_at_once_and_old_tokens_pass_while_published(issuer: Issuer) -> None:
    old = issuer.new_key("RS256")
    async with door(issuer) as auth:
        old_token = issuer.token(old, sub="old")
        assert (await auth.verifier.verify(old_token)).subject == "old"
        new = issuer.new_key("RS256")  # the issuer publishes a new key: no restart, no wait
        fetches = issuer.jwks_requests
        assert (await auth.verifier.verify(issuer.token(new, sub="new"))).subject == "new"
        assert issuer.jwks_requests == fetches + 1
        assert (await auth.verifier.verify(issuer.token(old, sub="old-again"))).subject == "old-again"

        # the old key withdrawn: once the gateway has seen that, its tokens stop passing,
        # also the one already in the verified-token cache
        issuer.withdraw(old)
        await auth.keys[issuer.url].refresh()
        assert "publishes no key" in await refused(auth, old_token)
        assert (await auth.verifier.verify(issuer.token(new, sub="new"))).subject == "new"


async def test_concurrent_requests_with_a_new_kid_share_one_fetch(issuer: Issuer) -> None:
    issuer.new_key("ES256")
    async with door(issuer) as auth:
        await wait_for(lambda: auth.keys[issuer.url].fetched, 10, "first JWKS fetch")
        fetches = issuer.jwks_requests
        new = issuer.new_key("ES256")
        tokens = [issuer.token(new, sub=f"user-{i}") for i in range(20)]
        principals = await asyncio.gather(*(auth.verifier.verify(t) for t in tokens))
        assert [p.subject for p in principals] == [f"user-{i}" for i in range(20)]
        assert issuer.jwks_requests == fetches + 1

        # a burst of made-up kids: one fetch for all of them, every one refused
        bogus = [issuer.token(Key("ES256")) for _ in range(10)]
        fetches = issuer.jwks_requests
        results = await asyncio.gather(*(auth.verifier.verify(t) for t in bogus), return_exceptions=True)
        assert all(isinstance(r, InvalidToken) and "publishes no key" in str(r) for r in results)
        assert issuer.jwks_requests == fetches + 1


async def test_issuer_unreachable_at_start_nothing_passes_until_it_is_back() -> None:
    issuer = Issuer()  # its port is reserved, nothing listens yet
    key = issuer.new_key("RS256")
    async with door(issuer) as auth:
        message = await refused(auth, issuer.token(key))
        assert "not available yet" in message and issuer.url in message, message
        issuer.start()
        try:
            # the background retry (or the next request) finds the issuer again
            await wait_for(lambda: auth.keys[issuer.url].fetched, 30, "keys fetched after the issuer came up")
            assert (await auth.verifier.verify(issuer.token(key))).subject == "alice"
        finally:
            issuer.stop()


async def test_issuer_unreachable_after_keys_were_cached_valid_tokens_keep_passing(issuer: Issuer) -> None:
    key = issuer.new_key("EdDSA")
    async with door(issuer) as auth:
        cached = issuer.token(key, sub="cached")
        await auth.verifier.verify(cached)
        issuer.stop()
        with pytest.raises(FetchError):
            await auth.keys[issuer.url].refresh()  # the issuer is gone...
        # ...and its keys are still in use: a cached token and a never-seen one pass
        assert (await auth.verifier.verify(cached)).subject == "cached"
        assert (await auth.verifier.verify(issuer.token(key, sub="fresh"))).subject == "fresh"
        message = await refused(auth, issuer.token(Key("EdDSA")))
        assert "could not be refreshed" in message, message


async def test_discovery_naming_another_issuer_is_refused(issuer: Issuer) -> None:
    key = issuer.new_key("RS256")
    issuer.discovery_issuer = issuer.url + "/"  # not exactly equal
    async with door(issuer) as auth:
        message = await refused(auth, issuer.token(key))
        assert "names issuer" in message and "must be equal" in message, message
        assert issuer.jwks_requests == 0


async def test_cache_control_max_age_sets_the_refresh_interval() -> None:
    with Issuer(max_age=1) as issuer:
        issuer.new_key("RS256")
        async with door(issuer) as auth:
            # the default would be 600 s: more fetches mean max-age=1 was honoured
            await wait_for(lambda: issuer.jwks_requests >= 3, 20, "background JWKS refreshes")
            assert auth.keys[issuer.url].cache_seconds == 1.0


async def test_two_issuers_each_verified_with_its_own_keys() -> None:
    with Issuer() as first, Issuer() as second:
        k1, k2 = first.new_key("RS256"), second.new_key("ES256")
        async with door(first, second) as auth:
            assert (await auth.verifier.verify(first.token(k1, sub="a"))).issuer == first.url
            assert (await auth.verifier.verify(second.token(k2, sub="b"))).issuer == second.url
            # a token claiming the first issuer but signed with the second's key
            token = second.token(k2, iss=first.url, aud=first.audience)
            assert f"publishes no key '{k2.kid}'" in await refused(auth, token)


# -- the verified-token cache ----------------------------------------------------------------


async def test_a_repeated_token_costs_one_signature_check(issuer: Issuer) -> None:
    key = issuer.new_key("RS256")
    async with door(issuer) as auth:
        token = issuer.token(key)
        before = auth.verifier.signature_checks
        for _ in range(5):
            await auth.verifier.verify(token)
        assert auth.verifier.signature_checks == before + 1
        await auth.verifier.verify(issuer.token(key, sub="other"))
        assert auth.verifier.signature_checks == before + 2


async def test_the_cache_is_bounded_and_least_recently_used_goes_first(issuer: Issuer) -> None:
    key = issuer.new_key("RS256")
    async with door(issuer, auth={"cache_entries": 2}) as auth:
        a, b, c = (issuer.token(key, sub=s) for s in "abc")
        for token in (a, b, a, c):  # c evicts b, the least recently used
            await auth.verifier.verify(token)
        checks = auth.verifier.signature_checks
        await auth.verifier.verify(a)
        assert auth.verifier.signature_checks == checks
        await auth.verifier.verify(b)
        assert auth.verifier.signature_checks == checks + 1


async def test_a_cached_token_fails_once_it_expires(issuer: Issuer) -> None:
    key = issuer.new_key("RS256")
    async with door(issuer, leeway_seconds=0) as auth:
        exp = int(time.time()) + 2
        token = issuer.token(key, exp=exp)
        await auth.verifier.verify(token)
        await asyncio.sleep(max(0.0, exp + 0.1 - time.time()))
        assert "expired" in await refused(auth, token)
