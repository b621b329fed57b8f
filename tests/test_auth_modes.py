"""How authentication is switched on: the configuration (flags, environment, file), the
gateway refusing to start without an issuer, --insecure-no-auth and its warnings, and a
gateway whose issuer is unreachable at start, comes back, then goes away again."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from auth_helpers import ADMIN_SCOPE, AUDIENCE, AuthGateway, Issuer
from conftest import REPO, modelgw_command
from gateway_helpers import Fleet, http_request, metric_value, wait_until
from tritonclient.utils import InferenceServerException

from modelgw.gateway.auth.config import ASYMMETRIC_ALGORITHMS, AuthConfig, AuthConfigError, load_auth_config
from modelgw.registry.client import RegistryClient
from modelgw.registry.errors import RegistryError

# -- configuration ----------------------------------------------------------------------------


def test_one_issuer_from_flags_or_environment() -> None:
    config = load_auth_config(issuer="https://id.example.com", audiences=["a", "b"], env={})
    (issuer,) = config.issuers
    assert issuer.issuer == "https://id.example.com" and issuer.audiences == ("a", "b")
    assert issuer.algorithms == ASYMMETRIC_ALGORITHMS and issuer.leeway_seconds == 60
    assert config.admin_scope == "modelgw:admin" and config.max_token_bytes == 8192

    env = {"MODELGW_ISSUER": "https://env.example.com", "MODELGW_AUDIENCE": "x, y", "MODELGW_ALGORITHMS": "ES256",
           "MODELGW_ADMIN_SCOPE": "ops"}
    config = load_auth_config(env=env)
    (issuer,) = config.issuers
    assert (issuer.issuer, issuer.audiences, issuer.algorithms) == ("https://env.example.com", ("x", "y"), ("ES256",))
    assert config.admin_scope == "ops"
    # flags win over the environment
    config = load_auth_config(issuer="https://flag.example.com", audiences=["f"], admin_scope="root", env=env)
    assert [i.issuer for i in config.issuers] == ["https://flag.example.com"] and config.admin_scope == "root"


def test_several_issuers_from_a_yaml_or_json_file(tmp_path: Path) -> None:
    document = {
        "admin_scope": "registry:write",
        "max_token_bytes": 4096,
        "issuers": [
            {"issuer": "https://a.example.com", "audiences": ["gw"], "role_claims": ["resource_access.gw.roles"]},
            {"issuer": "https://b.example.com/", "audiences": "gw,other", "algorithms": ["HS256"],
             "shared_secret_env": "B_SECRET", "leeway_seconds": 5},
        ],
    }
    yaml_file = tmp_path / "auth.yaml"
    import yaml

    yaml_file.write_text(yaml.safe_dump(document))
    json_file = tmp_path / "auth.json"
    json_file.write_text(json.dumps(document))
    for path in (yaml_file, json_file):
        config = load_auth_config(config_file=str(path), env={"B_SECRET": "s" * 32})
        a, b = config.issuers
        assert a.role_claims == ("resource_access.gw.roles",) and a.shared_secret is None
        assert b.audiences == ("gw", "other") and b.shared_secret == b"s" * 32 and b.leeway_seconds == 5
        assert config.admin_scope == "registry:write" and config.max_token_bytes == 4096
    # a flag issuer is added to the file's
    config = load_auth_config(config_file=str(yaml_file), issuer="https://c.example.com", audiences=["gw"],
                              env={"B_SECRET": "s" * 32})
    assert [i.issuer for i in config.issuers][-1] == "https://c.example.com" and len(config.issuers) == 3


@pytest.mark.parametrize(
    ("issuer", "problem"),
    [
        ({"issuer": "https://x", "audiences": []}, "audiences: at least one"),
        ({"issuer": "https://x", "audiences": ["a"], "algorithms": ["none"]}, "'none' is not accepted"),
        ({"issuer": "https://x", "audiences": ["a"], "algorithms": ["HS256"]}, "needs a shared secret"),
        ({"issuer": "https://x", "audiences": ["a"], "algorithms": ["HS256"], "shared_secret": "short"}, "at least 32"),
        ({"issuer": "x.example.com", "audiences": ["a"]}, "http(s) URL"),
        ({"issuer": "https://x", "audiences": ["a"], "audience": "typo"}, "unknown setting(s) audience"),
    ],
)
def test_unusable_configurations_are_refused_with_the_reason(issuer: dict, problem: str) -> None:
    with pytest.raises(AuthConfigError) as info:
        AuthConfig.from_dict({"issuers": [issuer]}, env={})
    assert problem in str(info.value)


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELGW_")}
    return subprocess.run(
        modelgw_command("gateway", "--etcd", "127.0.0.1:1", "--http-port", "0", "--grpc-port", "0", *args),
        capture_output=True, text=True, cwd=REPO, timeout=60, env={**clean, **(env or {})},
    )


def test_an_in_process_gateway_needs_an_issuer_or_the_explicit_insecure_flag() -> None:
    from modelgw.gateway.app import Gateway, GatewayConfig
    from modelgw.gateway.auth.guard import Authenticator, InsecureDoor

    with pytest.raises(AuthConfigError) as info:
        Gateway(GatewayConfig())
    assert "--insecure-no-auth" in str(info.value)
    assert isinstance(Gateway(GatewayConfig(insecure_no_auth=True)).auth, InsecureDoor)
    auth = load_auth_config(issuer="https://id.example.com", audiences=["a"], env={})
    assert isinstance(Gateway(GatewayConfig(auth=auth)).auth, Authenticator)


def test_the_gateway_refuses_to_start_without_an_issuer() -> None:
    result = run_gateway()
    assert result.returncode == 2
    assert "no token issuer is configured" in result.stderr and "--insecure-no-auth" in result.stderr
    result = run_gateway("--insecure-no-auth", "--issuer", "https://id.example.com", "--audience", "a")
    assert result.returncode == 2 and "not both" in result.stderr
    result = run_gateway("--issuer", "https://id.example.com", "--audience", "a", "--algorithms", "HS256")
    assert result.returncode == 2 and "shared secret" in result.stderr


# -- --insecure-no-auth ---------------------------------------------------------------------------


@pytest.fixture
def fleet(etcd_server, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def test_insecure_mode_warns_at_start_and_on_the_first_use_of_each_path(fleet: Fleet) -> None:
    gateway = AuthGateway.in_fleet(fleet, "--insecure-no-auth")
    client = triton.InferenceServerClient(gateway.grpc_url)
    x = triton.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    for _ in range(2):
        with pytest.raises(InferenceServerException) as info:
            client.infer("nothing-here", [x])
        assert info.value.status() == "StatusCode.NOT_FOUND"  # served, not refused
        status, _, _ = http_request("POST", f"{gateway.base}/v2/models/nothing-here/infer", b"{}")
        assert status in (400, 404)
        status, _, _ = http_request("GET", f"{gateway.base}/admin/v1/models")
        assert status == 200

        async def list_models() -> None:
            async with RegistryClient(gateway.grpc_url) as registry:
                await registry.list_models()

        import asyncio

        asyncio.run(list_models())
    client.close()
    warnings = [line for line in gateway.output().splitlines() if "WARNING" in line and "authentication is OFF" in line]
    assert len(warnings) == 5, "\n".join(warnings)  # at start, then once per path
    for path in ("gRPC inference", "REST inference", "REST admin", "gRPC RegistryService"):
        assert sum(path in line for line in warnings) == 1, path


# -- the issuer unreachable ---------------------------------------------------------------------------


def admin_status(gateway: AuthGateway, token: str) -> tuple[int, str]:
    status, raw, _ = http_request("GET", f"{gateway.base}/admin/v1/models", headers={"Authorization": f"Bearer {token}"})
    return status, raw.decode()


def test_issuer_unreachable_at_start_then_back_then_gone(fleet: Fleet) -> None:
    issuer = Issuer()  # its port is reserved, nothing listens yet
    key = issuer.new_key("RS256")
    gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)
    try:
        # the gateway runs, and nothing passes, with the reason
        status, body = admin_status(gateway, issuer.token(key, scope=ADMIN_SCOPE))
        assert status == 401 and "not available yet" in body, body
        client = triton.InferenceServerClient(gateway.grpc_url)
        with pytest.raises(InferenceServerException) as info:
            client.is_model_ready("anything", headers={"authorization": f"Bearer {issuer.token(key)}"})
        assert info.value.status() == "StatusCode.UNAUTHENTICATED" and "not available yet" in info.value.message()
        client.close()

        issuer.start()  # back: the gateway's background retries find it
        wait_until(lambda: admin_status(gateway, issuer.token(key, scope=ADMIN_SCOPE))[0] == 200, 60,
                   f"tokens still refused after the issuer came back:\n{gateway.output()[-2000:]}")
        assert metric_value(gateway.metrics(), "modelgw_auth_issuer_keys", issuer=issuer.url) == 1

        seen = issuer.token(key, scope=ADMIN_SCOPE, sub="seen")
        assert admin_status(gateway, seen)[0] == 200
        issuer.stop()  # gone again: the keys in hand keep working
        assert admin_status(gateway, seen)[0] == 200
        status, body = admin_status(gateway, issuer.token(key, scope=ADMIN_SCOPE, sub="never-seen"))
        assert status == 200, body
    finally:
        issuer.stop()


def test_the_registry_client_reports_a_refusal_clearly(fleet: Fleet) -> None:
    with Issuer() as issuer:
        key = issuer.new_key("ES256")
        gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)

        async def list_models(token: str | None) -> None:
            async with RegistryClient(gateway.grpc_url, token=token) as registry:
                await registry.list_models()

        import asyncio

        with pytest.raises(RegistryError) as info:
            asyncio.run(list_models(None))
        assert "refused" in str(info.value) and "MODELGW_TOKEN" in str(info.value)
        with pytest.raises(RegistryError) as info:
            asyncio.run(list_models(issuer.token(key)))
        assert ADMIN_SCOPE in str(info.value)
        asyncio.run(list_models(issuer.token(key, scope=ADMIN_SCOPE)))


def test_big_tokens_are_judged_by_the_token_limit_not_cut_off_by_grpc(fleet: Fleet) -> None:
    with Issuer() as issuer:
        key = issuer.new_key("RS256")
        gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)  # limit: 8192
        client = triton.InferenceServerClient(gateway.grpc_url)
        try:
            groups = [f"group-{i:04d}" for i in range(400)]  # a directory-heavy token
            big = issuer.token(key, groups=groups)
            assert 6000 < len(big) < 8192
            assert not client.is_model_ready("none", headers={"authorization": f"Bearer {big}"})  # passed: NOT_FOUND
            too_big = issuer.token(key, groups=groups + [f"more-{i:04d}" for i in range(100)])
            assert 8192 < len(too_big) < 12000
            with pytest.raises(InferenceServerException) as info:
                client.is_model_ready("none", headers={"authorization": f"Bearer {too_big}"})
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            assert "more than the 8192 accepted" in info.value.message()
        finally:
            client.close()
