"""Helpers for the auth tests: a real OIDC issuer on loopback and tokens minted with
joserfc, a JOSE library independent of the gateway's own verification (PyJWT).

    issuer = Issuer().start()            # discovery + JWKS on 127.0.0.1:<free port>
    key = issuer.new_key("RS256")        # published in its JWKS
    token = issuer.token(key, scope="a b")
    issuer.stop()                        # unreachable; start() again on the same port

The issuer runs its own event loop in a thread, so both in-process async tests and tests
driving a gateway subprocess can use it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web
from conftest import spawn
from gateway_helpers import Fleet, GatewayProcess, wait_until
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt

from modelgw.net import free_port

AUDIENCE = "modelgw-test"
ADMIN_SCOPE = "modelgw:admin"
JSON_NULL = object()  # as a claim's value: the claim is there, as JSON null (None leaves it out)



def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Key:
    """A joserfc key with the algorithm it signs with."""

    def __init__(self, alg: str, kid: str | None = None, use: str | None = "sig", publish_alg: bool = True) -> None:
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        # alg and use as published; the joserfc key has neither, so that it signs whatever
        # a test asks (joserfc refuses to sign against a key's declared alg or use)
        self.use = use
        self.publish_alg = publish_alg
        params: dict[str, Any] = {"kid": self.kid}
        if alg.startswith(("RS", "PS")):
            self.jose = jose_jwk.RSAKey.generate_key(2048, parameters=params)
        elif alg.startswith("ES"):
            curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
            self.jose = jose_jwk.ECKey.generate_key(curve, parameters=params)
        elif alg == "EdDSA":
            self.jose = jose_jwk.OKPKey.generate_key("Ed25519", parameters=params)
        else:
            raise ValueError(alg)

    @property
    def public(self) -> dict[str, Any]:
        jwk = self.jose.as_dict(private=False)
        if self.publish_alg:
            jwk["alg"] = self.alg
        if self.use:
            jwk["use"] = self.use
        return jwk

    @property
    def public_pem(self) -> bytes:
        return self.jose.as_pem(private=False)


class Issuer:
    """A real issuer: /.well-known/openid-configuration and /jwks.json over HTTP."""

    def __init__(self, port: int | None = None, audience: str = AUDIENCE, max_age: int = 600) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.audience = audience
        self.max_age = max_age
        self.published: list[dict[str, Any]] = []     # JWKS entries, in order
        self.discovery_issuer: str | None = None       # to serve a lying discovery document
        self.jwks_requests = 0
        self.discovery_requests = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    # -- keys -------------------------------------------------------------------------

    def new_key(self, alg: str = "RS256", publish: bool = True, **options: Any) -> Key:
        key = Key(alg, **options)
        if publish:
            self.publish(key)
        return key

    def publish(self, key: Key) -> None:
        with self._lock:
            self.published.append(key.public)

    def withdraw(self, key: Key) -> None:
        with self._lock:
            self.published = [k for k in self.published if k.get("kid") != key.kid]

    # -- tokens -----------------------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.url, "aud": self.audience, "sub": "alice", "iat": now, "exp": now + 300}
        claims.update(overrides)
        return {k: None if v is JSON_NULL else v for k, v in claims.items() if v is not None}  # None: leave it out

    def token(self, key: Key, header: dict[str, Any] | None = None, **claims: Any) -> str:
        protected = {"alg": key.alg, "kid": key.kid, **(header or {})}
        protected = {k: v for k, v in protected.items() if v is not None}
        return jose_jwt.encode(protected, self.claims(**claims), key.jose, algorithms=[protected["alg"]])

    def sized_token(self, key: Key, length: int, **claims: Any) -> str:
        """A valid token exactly `length` characters long: a `padding` claim fills it, and a
        `cty` header of 0-7 characters reaches the lengths base64url skips."""
        for extra in range(8):
            header = {"cty": "f" * extra} if extra else None
            estimate = (length - len(self.token(key, header=header, padding="", **claims))) * 3 // 4
            for size in range(max(0, estimate - 4), max(0, estimate + 4)):
                token = self.token(key, header=header, padding="p" * size, **claims)
                if len(token) == length:
                    return token
        raise ValueError(f"no token of {length} characters")

    # -- serving ------------------------------------------------------------------------

    def _app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            self.discovery_requests += 1
            document = {
                "issuer": self.discovery_issuer or self.url,
                "jwks_uri": f"{self.url}/jwks.json",
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
            }
            return web.json_response(document)

        async def jwks(request: web.Request) -> web.Response:
            self.jwks_requests += 1
            with self._lock:
                keys = list(self.published)
            return web.json_response({"keys": keys}, headers={"Cache-Control": f"public, max-age={self.max_age}"})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks.json", jwks)
        return app

    def start(self) -> Issuer:
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
            try:
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            except BaseException as err:
                failure.append(err)
                started.set()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())
                loop.close()

        self._thread = threading.Thread(target=serve, name=f"issuer-{self.port}", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Issuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- hand-made attack tokens (no library would sign these) -------------------------------


def unsigned_token(claims: dict[str, Any], alg: str = "none") -> str:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


def hmac_token(claims: dict[str, Any], secret: bytes, kid: str | None = None, alg: str = "HS256") -> str:
    """HMAC-signed with any bytes as the secret (e.g. an RSA public key's PEM)."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


def with_payload(token: str, **changes: Any) -> str:
    """The token with claims changed and its original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


def with_flipped_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64(bytes(raw))}"


# -- a gateway process with authentication on -----------------------------------------------


class AuthGateway(GatewayProcess):
    """`modelgw gateway` with the given auth flags (GatewayProcess turns auth off)."""

    def __init__(self, etcd: str, prefix: str, log: Path, *auth_args: str, timeout: float = 60.0) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.base = f"http://{self.http_url}"
        self.log = log
        self.process = spawn(
            "gateway", "--etcd", etcd, "--prefix", prefix, "--host", "127.0.0.1",
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *auth_args,
            log=log,
        )
        try:
            wait_until(self._ready, timeout, f"gateway not ready:\n{self.output()}")
        except BaseException:
            self.kill()
            raise

    @classmethod
    def in_fleet(cls, fleet: Fleet, *auth_args: str) -> AuthGateway:
        """Started against the fleet's registry and stopped by fleet.close()."""
        gateway = cls(fleet.etcd, fleet.prefix, fleet.logs / f"gateway-{len(fleet.gateways)}.log", *auth_args)
        fleet.gateways.append(gateway)
        return gateway
