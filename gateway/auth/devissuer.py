"""A development OIDC issuer for one machine: `modelgw up` serves it on loopback (OIDC
discovery and JWKS) and `modelgw token` mints tokens with its key.

NOT for production: anyone who can read its directory can mint any token. Point the
gateway at your organisation's issuer instead (--issuer / --auth-config).

Its directory (DATA_DIR/issuer) keeps signing-key.pem (RSA 2048, mode 0600) and
issuer.json (the issuer URL, with its port, and the audience), so tokens minted before a
restart of `modelgw up` are still valid after it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from modelgw.net import free_port

DEFAULT_AUDIENCE = "modelgw"
ALGORITHM = "RS256"
JWKS_MAX_AGE = 300


class DevIssuerMissing(FileNotFoundError):
    """No development issuer has been set up in this directory yet."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """The public JWK, its kid the RFC 7638 thumbprint (stable for the key's life)."""
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True)
    return {**jwk, "kid": _b64(hashlib.sha256(canonical.encode()).digest()), "alg": ALGORITHM, "use": "sig"}


@dataclass(frozen=True)
class DevIssuerState:
    issuer: str
    audience: str
    key: rsa.RSAPrivateKey

    @property
    def jwk(self) -> dict[str, Any]:
        return public_jwk(self.key)

    def mint(
        self,
        subject: str,
        scopes: Iterable[str] = (),
        groups: Iterable[str] = (),
        roles: Iterable[str] = (),
        ttl: float = 3600,
        audience: str | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience or self.audience,
            "iat": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
        }
        if scopes := [s for s in scopes if s]:
            claims["scope"] = " ".join(scopes)
        if groups := list(groups):
            claims["groups"] = groups
        if roles := list(roles):
            claims["roles"] = roles
        return jwt.encode(claims, self.key, algorithm=ALGORITHM, headers={"kid": self.jwk["kid"]})


def _paths(directory: Path) -> tuple[Path, Path]:
    return directory / "signing-key.pem", directory / "issuer.json"


def load_state(directory: Path) -> DevIssuerState:
    key_path, info_path = _paths(directory)
    if not key_path.exists() or not info_path.exists():
        raise DevIssuerMissing(
            f"no development issuer in {directory}: start `modelgw up` once with the same data dir"
        )
    info = json.loads(info_path.read_text())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{key_path} is not an RSA private key")
    return DevIssuerState(issuer=info["issuer"], audience=info["audience"], key=key)


def ensure_state(directory: Path, host: str = "127.0.0.1", port: int | None = None) -> DevIssuerState:
    """The issuer of this directory, made on first use (key and a port of its own)."""
    key_path, info_path = _paths(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not key_path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(pem)
    if not info_path.exists():
        url_host = f"[{host}]" if ":" in host else host
        info = {"issuer": f"http://{url_host}:{port or free_port()}", "audience": DEFAULT_AUDIENCE}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    return load_state(directory)


class DevIssuer:
    """Discovery and JWKS of the directory's issuer, served on its loopback port."""

    def __init__(self, directory: Path, host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.host = host
        self.state: DevIssuerState | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        assert self.state is not None, "start() first"
        return self.state.issuer

    @property
    def audience(self) -> str:
        assert self.state is not None, "start() first"
        return self.state.audience

    def prepare(self) -> DevIssuerState:
        """Load (or make, on first use) the key and the issuer URL; no network yet."""
        if self.state is None:
            self.state = ensure_state(self.directory, self.host)
        return self.state

    async def start(self) -> None:
        self.prepare()
        assert self.state is not None
        port = int(self.state.issuer.rsplit(":", 1)[1])
        document = {
            "issuer": self.state.issuer,
            "jwks_uri": f"{self.state.issuer}/jwks.json",
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
        }
        jwks = {"keys": [self.state.jwk]}
        cache = {"Cache-Control": f"max-age={JWKS_MAX_AGE}"}

        async def discovery(request: web.Request) -> web.Response:
            return web.json_response(document, headers=cache)

        async def keys(request: web.Request) -> web.Response:
            return web.json_response(jwks, headers=cache)

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks.json", keys)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, port).start()
        except OSError as err:
            await self._runner.cleanup()
            raise OSError(
                f"the development issuer cannot listen on {self.host}:{port} (kept in {self.directory / 'issuer.json'} "
                f"so that tokens survive restarts): {err.strerror or err}"
            ) from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
