"""The gateway process with authentication on: a real issuer on loopback, tokens minted
with joserfc, a python-kind runtime replica, unmodified tritonclient and plain HTTP.

Valid tokens pass on every entry point (gRPC, OIP REST, REST admin, the gRPC
RegistryService through `modelgw get`); the attack corpus gets UNAUTHENTICATED / 401
with a WWW-Authenticate challenge; policies give PERMISSION_DENIED / 403
insufficient_scope; the subject reaches the runtime and a client's copy never does; a key
rotated in mid-traffic passes at once with nothing refused."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from auth_helpers import (
    ADMIN_SCOPE,
    AUDIENCE,
    AuthGateway,
    Issuer,
    Key,
    hmac_token,
    unsigned_token,
    with_flipped_signature,
    with_payload,
)
from conftest import REPO, modelgw_command
from gateway_helpers import Fleet, GatewayProcess, http_request, metric_value, model_spec, runtime_spec, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from modelgw.protos import registry_pb2 as rpb

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

SCALE = "modelgw.runtimes.examples.scale:Scale"
WHOAMI = "tests.auth_models:WhoAmI"
TOKEN_LIMIT = 4096
MODELS = {
    # name: (class, access policy)
    "open": (SCALE, None),
    "scoped": (SCALE, rpb.AccessPolicy(scopes=["infer:read", "infer:fast"])),
    "grouped": (SCALE, rpb.AccessPolicy(groups=["ml-team", "data"])),
    "roled": (SCALE, rpb.AccessPolicy(roles=["predictor"])),
    "public": (SCALE, rpb.AccessPolicy(public=True)),
    "whoami": (WHOAMI, None),
    "whoami-public": (WHOAMI, rpb.AccessPolicy(public=True)),
}


class Setup:
    def __init__(self, fleet: Fleet, gateway: GatewayProcess, issuer: Issuer, key: Key, attacker: Issuer) -> None:
        self.fleet = fleet
        self.gateway = gateway
        self.issuer = issuer
        self.key = key
        self.attacker = attacker
        self.client = triton.InferenceServerClient(gateway.grpc_url)

    def token(self, key: Key | None = None, **claims) -> str:
        return self.issuer.token(key or self.key, **claims)

    def bearer(self, token: str | None = None, **claims) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token(**claims)}"}


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("auth-gateway")
    issuer, attacker = Issuer().start(), Issuer().start()
    key = issuer.new_key("RS256")
    attacker.new_key("RS256")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        specs: list = [runtime_spec("py", "python", ["python"])]
        for name, (cls, access) in MODELS.items():
            spec = model_spec(name, "py", "python", {"1": cls})
            if access is not None:
                spec.access.CopyFrom(access)
            specs.append(spec)
        fleet.apply(*specs)
        fleet.replica("py", "python")
        # the issuer from a config file (flags are used in test_auth_modes.py); a short
        # refetch interval keeps the unknown-kid cases of the corpus quick; a token limit
        # other than the default, which the HTTP and gRPC header limits follow
        # (test_auth_claims_and_sizes.py checks the default one on every path)
        config = root / "auth.yaml"
        config.write_text(
            f"max_token_bytes: {TOKEN_LIMIT}\n"
            f"issuers:\n  - issuer: {issuer.url}\n    audiences: [{AUDIENCE}]\n    min_refetch_seconds: 0.2\n"
        )
        gateway = AuthGateway.in_fleet(fleet, "--auth-config", str(config))
        setup = Setup(fleet, gateway, issuer, key, attacker)
        # a token every policy lets in (ModelReady is authorized like inference)
        everything = setup.bearer(scope="infer:read infer:fast", groups=["data"], roles=["predictor"])
        for name in MODELS:
            wait_until(
                lambda name=name: _ready(setup.client, name, everything), 90, f"model {name} not ready (logs in {root})"
            )
        yield setup
        setup.client.close()
    finally:
        fleet.close()
        issuer.stop()
        attacker.stop()


def _ready(client: triton.InferenceServerClient, model: str, headers: dict[str, str]) -> bool:
    try:
        return client.is_model_ready(model, headers=headers)
    except InferenceServerException:
        return False


# -- calls --------------------------------------------------------------------------------


def grpc_infer(setup: Setup, model: str, headers: dict[str, str] | None = None) -> triton.InferResult:
    x = triton.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1.0, 2.0, 3.0]], dtype=np.float32))
    return setup.client.infer(model, [x], headers=headers)


def grpc_error(setup: Setup, model: str, headers: dict[str, str] | None = None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(setup, model, headers)
    return info.value


def rest_infer(setup: Setup, model: str, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]})
    status, raw, response_headers = http_request(
        "POST", f"{setup.gateway.base}/v2/models/{model}/infer", body.encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )
    return status, json.loads(raw) if raw else {}, response_headers


def whoami_grpc(setup: Setup, model: str, headers: dict[str, str]) -> str:
    x = triton.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    return setup.client.infer(model, [x], headers=headers).as_numpy("subjects")[0].decode()


def registry_cli(setup: Setup, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MODELGW_TOKEN"}
    return subprocess.run(
        modelgw_command("get", "models", "-o", "json", "--server", setup.gateway.grpc_url, *args),
        capture_output=True, text=True, cwd=REPO, timeout=60, env={**environment, **(env or {})},
    )


# -- valid tokens pass everywhere -----------------------------------------------------------


def test_a_valid_token_passes_on_grpc_rest_and_admin(setup: Setup) -> None:
    headers = setup.bearer(scope=ADMIN_SCOPE)
    np.testing.assert_array_equal(grpc_infer(setup, "open", headers).as_numpy("y"), [[2.0, 4.0, 6.0]])
    status, body, _ = rest_infer(setup, "open", {"Authorization": headers["authorization"]})
    assert status == 200 and body["outputs"][0]["data"] == [2.0, 4.0, 6.0], body
    assert setup.client.get_model_metadata("open", headers=headers).name == "open"
    authorization = {"Authorization": headers["authorization"]}
    status, raw, _ = http_request("GET", f"{setup.gateway.base}/v2/models/open", headers=authorization)
    assert status == 200 and json.loads(raw)["name"] == "open"
    status, raw, _ = http_request("GET", f"{setup.gateway.base}/admin/v1/models", headers=authorization)
    assert status == 200 and "scoped" in {m["spec"]["name"] for m in json.loads(raw)["models"]}
    # the gRPC RegistryService on the same port, through the CLI with --token
    result = registry_cli(setup, "--token", setup.token(scope=ADMIN_SCOPE))
    assert result.returncode == 0, result.stderr
    assert set(MODELS) <= {item["spec"]["name"] for item in json.loads(result.stdout)["items"]}
    # ... and with $MODELGW_TOKEN
    result = registry_cli(setup, env={"MODELGW_TOKEN": setup.token(scope=ADMIN_SCOPE)})
    assert result.returncode == 0, result.stderr


def test_the_openai_routes_need_a_token_too(setup: Setup) -> None:
    url = f"{setup.gateway.base}/v1/chat/completions"
    body = json.dumps({"model": "open", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, raw, headers = http_request("POST", url, body, {"Content-Type": "application/json"})
    if status == 404 and b"no such endpoint" in raw:
        pytest.skip("the gateway has no OpenAI routes yet")
    assert status == 401 and headers["WWW-Authenticate"].startswith('Bearer realm="modelgw"'), raw
    status, raw, _ = http_request("POST", url, body, {"Content-Type": "application/json", **setup.bearer()})
    assert status not in (401, 403), raw  # authenticated: whatever the model says next


def test_health_server_metadata_and_metrics_stay_open(setup: Setup) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
        status, _, _ = http_request("GET", setup.gateway.base + path)
        assert status == 200, path
    assert setup.client.is_server_live() and setup.client.is_server_ready()
    assert setup.client.get_server_metadata().name == "modelgw"
    with grpc.insecure_channel(setup.gateway.grpc_url) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# -- the attack corpus -------------------------------------------------------------------------


def corpus(setup: Setup) -> dict[str, dict[str, str]]:
    """name -> request headers that must not get in."""
    issuer, key, attacker = setup.issuer, setup.key, setup.attacker
    attacker_key = Key("RS256")
    attacker.publish(attacker_key)
    jwks = f"{attacker.url}/jwks.json"
    good = setup.token()
    tokens = {
        "malformed token": "this-is-not.a-jwt",
        "alg none": unsigned_token(issuer.claims()),
        "HS256 signed with the issuer's RSA public key": hmac_token(issuer.claims(), key.public_pem, kid=key.kid),
        "expired": setup.token(exp=issuer.claims()["iat"] - 3600),
        "nbf in the future": setup.token(nbf=issuer.claims()["iat"] + 3600),
        "wrong iss": setup.token(iss="https://login.example.com"),
        "wrong aud": setup.token(aud="not-modelgw"),
        "unknown kid": issuer.token(Key("RS256")),
        "tampered payload": with_payload(good, sub="root", scope=ADMIN_SCOPE),
        "tampered signature": with_flipped_signature(good),
        "untrusted issuer": attacker.token(attacker_key),
        "jku to attacker keys": issuer.token(attacker_key, header={"jku": jwks}),
        "x5u to attacker keys": issuer.token(attacker_key, header={"x5u": jwks}),
        "embedded jwk": issuer.token(attacker_key, header={"jwk": attacker_key.public, "kid": key.kid}),
        "oversized": setup.token(padding="x" * TOKEN_LIMIT),
    }
    cases = {name: {"authorization": f"Bearer {token}"} for name, token in tokens.items()}
    basic = base64.b64encode(b"alice:secret").decode()
    cases.update({
        "no token": {},
        "Basic scheme": {"authorization": f"Basic {basic}"},
        "Token scheme": {"authorization": f"Token {good}"},
        "bare token": {"authorization": good},
        "x-api-key header": {"x-api-key": good},
        "empty bearer": {"authorization": "Bearer "},
    })
    return cases


def test_attack_corpus_is_refused_on_grpc_and_rest(setup: Setup) -> None:
    cases = corpus(setup)
    refused_before = metric_value(setup.gateway.metrics(), "modelgw_auth_refusals_total", decision="unauthenticated")
    for name, headers in cases.items():
        err = grpc_error(setup, "open", headers)
        assert err.status() == "StatusCode.UNAUTHENTICATED", f"{name}: {err}"
        status, body, response_headers = rest_infer(setup, "open", headers)
        assert status == 401, f"{name}: {status} {body}"
        challenge = response_headers.get("WWW-Authenticate", "")
        assert challenge.startswith('Bearer realm="modelgw"'), f"{name}: {challenge!r}"
        if name in ("no token", "x-api-key header"):
            assert "error=" not in challenge, f"{name}: {challenge!r}"  # RFC 6750: no credentials, no error code
        else:
            assert 'error="invalid_token"' in challenge or 'error="invalid_request"' in challenge, f"{name}: {challenge!r}"
            assert "error_description=" in challenge
        # the admin API refuses them the same way
        status, _, response_headers = http_request("GET", f"{setup.gateway.base}/admin/v1/models", headers=headers)
        assert status == 401 and "WWW-Authenticate" in response_headers, name
    counted = metric_value(setup.gateway.metrics(), "modelgw_auth_refusals_total", decision="unauthenticated")
    assert counted - refused_before == 3 * len(cases)
    # attackers' key URLs were never fetched, and no token ever reached the log
    assert setup.attacker.jwks_requests == 0
    log = setup.gateway.output()
    for name, headers in cases.items():
        for value in headers.values():
            secret = value.split(" ")[-1]
            if len(secret) > 20:
                assert secret not in log, f"{name}: a token is in the gateway log"
    assert "deny" in log  # decisions are logged, tokens are not


def test_error_descriptions_say_what_is_wrong(setup: Setup) -> None:
    err = grpc_error(setup, "open", setup.bearer(setup.token(exp=setup.issuer.claims()["iat"] - 3600)))
    assert "expired" in err.message()
    status, body, headers = rest_infer(setup, "open", {"Authorization": f"Bearer {setup.token(aud='nope')}"})
    assert status == 401 and "audience" in body["error"] and "audience" in headers["WWW-Authenticate"]
    err = grpc_error(setup, "open", {})
    assert "no bearer token" in err.message()


# -- authorization -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "denied", "allowed"),
    [
        ("scoped", {"scope": "infer:read"}, {"scope": "infer:fast other infer:read"}),
        ("grouped", {"groups": ["sales"]}, {"groups": ["sales", "data"]}),
        ("roled", {"roles": ["viewer"]}, {"realm_access": {"roles": ["predictor"]}}),
    ],
)
def test_model_policies_refuse_callers_without_the_scope_group_or_role(
    setup: Setup, model: str, denied: dict, allowed: dict
) -> None:
    err = grpc_error(setup, model, setup.bearer(**denied))
    assert err.status() == "StatusCode.PERMISSION_DENIED", err
    assert model in err.message()
    status, body, headers = rest_infer(setup, model, {"Authorization": setup.bearer(**denied)["authorization"]})
    assert status == 403, body
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    if model == "scoped":
        assert 'scope="infer:fast"' in headers["WWW-Authenticate"]  # the one it lacks
    # an authenticated caller without any claims is refused too; the right claims pass
    assert grpc_error(setup, model, setup.bearer()).status() == "StatusCode.PERMISSION_DENIED"
    np.testing.assert_array_equal(grpc_infer(setup, model, setup.bearer(**allowed)).as_numpy("y"), [[2.0, 4.0, 6.0]])
    status, body, _ = rest_infer(setup, model, {"Authorization": setup.bearer(**allowed)["authorization"]})
    assert status == 200, body


def test_a_model_without_policy_is_open_to_any_authenticated_caller(setup: Setup) -> None:
    grpc_infer(setup, "open", setup.bearer(sub="nobody-special"))
    assert grpc_error(setup, "open").status() == "StatusCode.UNAUTHENTICATED"


def test_a_public_model_needs_no_token_but_a_bad_token_is_still_refused(setup: Setup) -> None:
    np.testing.assert_array_equal(grpc_infer(setup, "public").as_numpy("y"), [[2.0, 4.0, 6.0]])
    status, body, _ = rest_infer(setup, "public")
    assert status == 200, body
    grpc_infer(setup, "public", setup.bearer())
    bad = {"authorization": f"Bearer {setup.token(exp=setup.issuer.claims()['iat'] - 3600)}"}
    assert grpc_error(setup, "public", bad).status() == "StatusCode.UNAUTHENTICATED"


def test_unknown_models_are_only_reported_to_authenticated_callers(setup: Setup) -> None:
    assert grpc_error(setup, "no-such-model").status() == "StatusCode.UNAUTHENTICATED"
    status, _, _ = rest_infer(setup, "no-such-model")
    assert status == 401
    assert grpc_error(setup, "no-such-model", setup.bearer()).status() == "StatusCode.NOT_FOUND"
    status, body, _ = rest_infer(setup, "no-such-model", {"Authorization": setup.bearer()["authorization"]})
    assert status == 404 and "no-such-model" in body["error"]


def test_the_admin_api_needs_the_admin_scope_over_rest_and_grpc(setup: Setup) -> None:
    url = f"{setup.gateway.base}/admin/v1/models"
    status, raw, headers = http_request("GET", url)
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="modelgw"', raw
    user = setup.bearer(scope="infer:read infer:fast", groups=["ml-team"])
    status, raw, headers = http_request("GET", url, headers=user)
    assert status == 403 and 'error="insufficient_scope"' in headers["WWW-Authenticate"], raw
    assert f'scope="{ADMIN_SCOPE}"' in headers["WWW-Authenticate"]
    spec = {"name": "sneaky", "versions": [{"version": "1", "uri": SCALE, "format": "python", "runtime": "py"}]}
    status, raw, _ = http_request("POST", url, json.dumps(spec).encode(), {"Content-Type": "application/json", **user})
    assert status == 403, raw

    result = registry_cli(setup)
    assert result.returncode == 1 and "UNAUTHENTICATED" not in result.stdout
    assert "no bearer token" in result.stderr and "--token" in result.stderr, result.stderr
    result = registry_cli(setup, "--token", setup.token(scope="infer:read"))
    assert result.returncode == 1 and ADMIN_SCOPE in result.stderr, result.stderr
    result = registry_cli(setup, "--token", setup.token(scope=f"infer:read {ADMIN_SCOPE}"))
    assert result.returncode == 0, result.stderr

    # a Watch (server streaming) is guarded like the unary calls
    with grpc.insecure_channel(setup.gateway.grpc_url) as channel:
        from modelgw.protos import registry_pb2_grpc as rpb_grpc

        stub = rpb_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.Watch(rpb.WatchRequest(), metadata=tuple(user.items()), timeout=10)))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- the subject travels to the runtime, a client's copy does not ------------------------------


def test_the_verified_subject_reaches_the_runtime_and_a_clients_copy_never_does(setup: Setup) -> None:
    forged = {"x-modelgw-subject": "mallory"}
    assert whoami_grpc(setup, "whoami", {**setup.bearer(sub="alice"), **forged}) == "alice"
    status, raw, _ = http_request(
        "POST", f"{setup.gateway.base}/v2/models/whoami/infer",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(),
        {"Content-Type": "application/json", "X-Modelgw-Subject": "mallory",
         "Authorization": setup.bearer(sub="bob")["authorization"]},
    )
    assert status == 200, raw
    assert json.loads(raw)["outputs"][0]["data"] == ["bob"]
    # anonymous on a public model: no subject at all, and still not the forged one
    assert whoami_grpc(setup, "whoami-public", forged) == ""
    # a subject outside printable ASCII travels percent-encoded
    assert whoami_grpc(setup, "whoami", setup.bearer(sub="zoë")) == "zo%C3%AB"


# -- the verified-token cache ------------------------------------------------------------------------


def test_a_repeated_token_is_verified_once(setup: Setup) -> None:
    headers = setup.bearer(sub=f"cache-{uuid.uuid4().hex[:6]}")
    before = metric_value(setup.gateway.metrics(), "modelgw_auth_signature_checks")
    for _ in range(4):
        grpc_infer(setup, "open", headers)
    rest_infer(setup, "open", {"Authorization": headers["authorization"]})
    assert metric_value(setup.gateway.metrics(), "modelgw_auth_signature_checks") == before + 1


# -- key rotation mid-traffic ---------------------------------------------------------------------------


def test_key_rotation_mid_traffic_refuses_nothing(setup: Setup) -> None:
    old_token = setup.bearer(sub="steady")
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal served
        client = triton.InferenceServerClient(setup.gateway.grpc_url)
        try:
            while not stop.is_set():
                try:
                    grpc_infer_with(client, old_token)
                    served += 1
                except InferenceServerException as err:
                    failures.append(str(err))
        finally:
            client.close()

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_until(lambda: served >= 5, 30, "steady traffic")
        new_key = setup.issuer.new_key("ES256")  # the issuer starts publishing a new key
        # its first token passes at once: no restart, no waiting for a cache to expire
        for i in range(3):
            np.testing.assert_array_equal(
                grpc_infer(setup, "open", setup.bearer(setup.token(new_key, sub=f"new-{i}"))).as_numpy("y"),
                [[2.0, 4.0, 6.0]],
            )
            status, body, _ = rest_infer(setup, "open", {"Authorization": f"Bearer {setup.token(new_key, sub=f'rest-{i}')}"})
            assert status == 200, body
        mark = served
        wait_until(lambda: served >= mark + 5, 30, "old-key traffic after the rotation")
        # a fresh token from the old key (still published) passes too
        grpc_infer(setup, "open", setup.bearer(sub="old-key-fresh"))
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:3]


def grpc_infer_with(client: triton.InferenceServerClient, headers: dict[str, str]) -> None:
    x = triton.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1.0, 2.0, 3.0]], dtype=np.float32))
    client.infer("open", [x], headers=headers)


# -- streams and REST bodies -----------------------------------------------------------------------------


def stream_subjects(setup: Setup, headers: dict[str, str], count: int = 2) -> list[str]:
    """Answers of `count` WhoAmI requests on one ModelStreamInfer stream: the subjects the
    runtime saw, or the stream's error messages."""
    answers: list[str] = []
    done = threading.Event()

    def callback(result, error) -> None:
        answers.append(str(error) if error is not None else result.as_numpy("subjects")[0].decode())
        if len(answers) == count:
            done.set()

    client = triton.InferenceServerClient(setup.gateway.grpc_url)
    try:
        client.start_stream(callback=callback, headers=headers)
        x = triton.InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.array([1.0], dtype=np.float32))
        for _ in range(count):
            client.async_stream_infer("whoami", [x])
        assert done.wait(30), answers
        client.stop_stream()
    finally:
        client.close()
    return answers


def test_streams_are_authorized_and_carry_the_subject(setup: Setup) -> None:
    forged = {"x-modelgw-subject": "mallory"}
    assert stream_subjects(setup, {**setup.bearer(sub="carol"), **forged}) == ["carol", "carol"]
    refused = stream_subjects(setup, forged)
    assert all("UNAUTHENTICATED" in answer and "no bearer token" in answer for answer in refused), refused


def test_an_unauthenticated_rest_request_is_refused_before_its_body_is_read(setup: Setup) -> None:
    status, raw, headers = http_request(
        "POST", f"{setup.gateway.base}/v2/models/open/infer", b"{this is not json", {"Content-Type": "application/json"}
    )
    assert status == 401 and "WWW-Authenticate" in headers, raw
    status, raw, _ = http_request(
        "POST", f"{setup.gateway.base}/v2/models/open/infer", b"{this is not json",
        {"Content-Type": "application/json", "Authorization": setup.bearer()["authorization"]},
    )
    assert status == 400, raw  # authenticated: now the body is read, and found wanting
