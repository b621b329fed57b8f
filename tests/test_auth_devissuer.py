"""The development issuer `modelgw up` runs, and `modelgw token`: its tokens verify with an
independent library against the JWKS it serves, carry what was asked, survive a restart,
and pass the gateway's verifier."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import urllib.request
from pathlib import Path

from conftest import REPO, modelgw_command
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt

from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
from modelgw.gateway.auth.devissuer import DevIssuer
from modelgw.gateway.auth.guard import Authenticator
from modelgw.gateway.routing import RoutingTable


def mint(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        modelgw_command("token", "--data-dir", str(data_dir), *args),
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


async def test_modelgw_token_mints_what_was_asked_and_it_verifies_independently(tmp_path: Path) -> None:
    issuer = DevIssuer(tmp_path / "issuer")
    await issuer.start()
    try:
        result = mint(tmp_path, "--sub", "alice", "--scope", "modelgw:admin infer:read", "--scope", "extra",
                      "--group", "ml-team", "--role", "predictor", "--ttl", "120")
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()

        # the issuer serves on this test's event loop: fetch from a thread
        discovery = await asyncio.to_thread(get_json, f"{issuer.url}/.well-known/openid-configuration")
        assert discovery["issuer"] == issuer.url
        jwks = jose_jwk.KeySet.import_key_set(await asyncio.to_thread(get_json, discovery["jwks_uri"]))
        decoded = jose_jwt.decode(token, jwks, algorithms=["RS256"])
        claims = decoded.claims
        assert claims["iss"] == issuer.url and claims["aud"] == "modelgw" and claims["sub"] == "alice"
        assert claims["scope"].split() == ["modelgw:admin", "infer:read", "extra"]
        assert claims["groups"] == ["ml-team"] and claims["roles"] == ["predictor"]
        assert claims["exp"] - claims["iat"] == 120
        jose_jwt.JWTClaimsRegistry(exp={"essential": True}).validate(claims)  # not expired
        assert stat.S_IMODE(os.stat(tmp_path / "issuer" / "signing-key.pem").st_mode) == 0o600
    finally:
        await issuer.stop()

    # a restart serves the same issuer and key: the token minted before still passes
    again = DevIssuer(tmp_path / "issuer")
    await again.start()
    try:
        assert again.url == issuer.url
        auth = Authenticator(AuthConfig(issuers=(IssuerConfig(issuer=again.url, audiences=("modelgw",)),)), RoutingTable())
        await auth.start()
        try:
            principal = await auth.verifier.verify(token)
        finally:
            await auth.close()
        assert principal.subject == "alice" and "modelgw:admin" in principal.scopes
        assert principal.groups == {"ml-team"} and principal.roles == {"predictor"}
    finally:
        await again.stop()


def test_modelgw_token_without_a_development_issuer_says_how_to_get_one(tmp_path: Path) -> None:
    result = mint(tmp_path, "--sub", "alice")
    assert result.returncode == 1 and "modelgw up" in result.stderr and not result.stdout
