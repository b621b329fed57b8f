"""The gateway's core behaviour on both data planes (`--data-plane python` and `envoy`),
against one registry, one real issuer and one runtime replica: routing to the named
version, the traffic split, sticky sessions, authentication (missing, bad, expired,
wrong-audience tokens: UNAUTHENTICATED), authorization (scopes, groups, roles:
PERMISSION_DENIED; a public model without a token), the verified subject passed on (a
client's copy dropped), unknown model and version NOT_FOUND, health without a token.

Where the planes differ, a test says so (`test_differs_*`): what the error messages say,
and an unknown kid (Python refetches the JWKS at once; Envoy waits for its cache)."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Iterator

import grpc
import pytest
from auth_helpers import AUDIENCE, Issuer, Key
from envoy_helpers import DATA_PLANES, ENVOY, gateway_on, grpc_code, infer, infer_request, wait_routed
from gateway_helpers import Fleet, GatewayProcess, http_get, model_spec, runtime_spec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.protos import registry_pb2 as rpb

ECHO = "tests.gateway_models:Echo"
WHOAMI = "tests.auth_models:WhoAmI"
MODELS = {
    # name: (class, versions, traffic, access policy)
    "split": (ECHO, ("1", "2"), {"1": 90, "2": 10}, None),
    "scoped": (ECHO, ("1",), None, rpb.AccessPolicy(scopes=["infer:read", "infer:fast"])),
    "grouped": (ECHO, ("1",), None, rpb.AccessPolicy(groups=["ml-team", "data"])),
    "roled": (ECHO, ("1",), None, rpb.AccessPolicy(roles=["predictor"])),
    "public": (ECHO, ("1",), None, rpb.AccessPolicy(public=True)),
    "whoami": (WHOAMI, ("1",), None, None),
}


class Setup:
    def __init__(self, issuer: Issuer, key: Key) -> None:
        self.issuer = issuer
        self.key = key
        self.gateways: dict[str, GatewayProcess] = {}

    def bearer(self, key: Key | None = None, **claims) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.issuer.token(key or self.key, **claims)}"),)


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("envoy-behaviour")
    issuer = Issuer().start()
    setup = Setup(issuer, issuer.new_key("RS256"))
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        specs: list = [runtime_spec("py", "python", ["python"])]
        for name, (cls, versions, traffic, access) in MODELS.items():
            spec = model_spec(name, "py", "python", dict.fromkeys(versions, cls), traffic=traffic)
            if access is not None:
                spec.access.CopyFrom(access)
            specs.append(spec)
        fleet.apply(*specs)
        config = root / "auth.yaml"
        config.write_text(f"issuers:\n  - issuer: {issuer.url}\n    audiences: [{AUDIENCE}]\n    min_refetch_seconds: 0.2\n")
        planes = ["python"] + (["envoy"] if ENVOY else [])
        for plane in planes:
            setup.gateways[plane] = gateway_on(fleet, plane, "--auth-config", str(config))
        fleet.replica("py", "python")
        everything = setup.bearer(scope="infer:read infer:fast", groups=["data"], roles=["predictor"])
        for gateway in setup.gateways.values():
            for name, (_, versions, _, _) in MODELS.items():
                for version in versions:
                    wait_routed(gateway.grpc_url, name, version, everything)
        yield setup
    finally:
        fleet.close()
        issuer.stop()


@pytest.fixture(params=DATA_PLANES)
def plane(request: pytest.FixtureRequest) -> str:
    return request.param


def url(setup: Setup, plane: str) -> str:
    return setup.gateways[plane].grpc_url


# -- routing ----------------------------------------------------------------------------------


def test_routes_to_the_named_version(setup: Setup, plane: str) -> None:
    for version in ("1", "2"):
        for _ in range(20):
            answer = infer(url(setup, plane), "split", version, setup.bearer())
            assert (answer.model_name, answer.model_version) == ("split", version)


async def _versions(target: str, count: int, metadata, concurrency: int = 16) -> collections.Counter[str]:
    served: collections.Counter[str] = collections.Counter()
    message = infer_request("split")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        remaining = iter(range(count))

        async def worker() -> None:
            for _ in remaining:
                served[(await stub.ModelInfer(message, metadata=metadata, timeout=30)).model_version] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


async def test_traffic_split_90_10(setup: Setup, plane: str) -> None:
    served = await _versions(url(setup, plane), 2000, setup.bearer())
    assert sum(served.values()) == 2000 and set(served) <= {"1", "2"}, served
    assert abs(served["2"] / 2000 - 0.10) <= 0.03, served


async def test_a_session_key_sticks_to_one_version(setup: Setup, plane: str) -> None:
    chosen = {}
    for i in range(40):
        served = await _versions(url(setup, plane), 6, (*setup.bearer(), ("x-modelgw-session", f"user-{i}")), concurrency=2)
        assert len(served) == 1, (i, served)
        chosen[i] = next(iter(served))
    assert set(chosen.values()) == {"1", "2"}, chosen  # spread over both, not pinned to one


def test_unknown_model_and_version_are_not_found(setup: Setup, plane: str) -> None:
    code, details = grpc_code(lambda: infer(url(setup, plane), "no-such-model", metadata=setup.bearer()))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-model" in details
    code, details = grpc_code(lambda: infer(url(setup, plane), "split", "7", metadata=setup.bearer()))
    assert code == grpc.StatusCode.NOT_FOUND and "'7'" in details


def test_health_needs_no_token(setup: Setup, plane: str) -> None:
    with grpc.insecure_channel(url(setup, plane)) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert http_get(setup.gateways[plane].base + "/v2/health/ready")[0] == 200


# -- authentication and authorization ----------------------------------------------------------


def test_missing_bad_expired_and_foreign_tokens_are_unauthenticated(setup: Setup, plane: str) -> None:
    target = url(setup, plane)
    other = Issuer()  # never started: its key is in no JWKS the gateway knows
    cases = {
        "missing": None,
        "garbage": (("authorization", "Bearer not.a.jwt"),),
        "expired": setup.bearer(exp=1_000_000, iat=999_000),
        "unknown signer": (
            ("authorization", f"Bearer {other.token(other.new_key('RS256', publish=False), iss=setup.issuer.url)}"),
        ),
    }
    for case, metadata in cases.items():
        code, details = grpc_code(lambda metadata=metadata: infer(target, "split", metadata=metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (case, code, details)


def test_policies_refuse_with_permission_denied(setup: Setup, plane: str) -> None:
    target = url(setup, plane)
    refused = {
        "scoped": setup.bearer(scope="infer:read"),  # one of the two scopes
        "grouped": setup.bearer(groups=["other"]),
        "roled": setup.bearer(roles=["viewer"]),
    }
    for model, metadata in refused.items():
        code, details = grpc_code(lambda model=model, metadata=metadata: infer(target, model, metadata=metadata))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (model, code, details)
    allowed = {
        "scoped": setup.bearer(scope="infer:fast infer:read other"),
        "grouped": setup.bearer(groups=["x", "ml-team"]),
        "roled": setup.bearer(realm_access={"roles": ["predictor"]}),  # a nested claim
    }
    for model, metadata in allowed.items():
        assert infer(target, model, metadata=metadata).model_name == model


def test_a_public_model_needs_no_token_but_refuses_a_bad_one(setup: Setup, plane: str) -> None:
    target = url(setup, plane)
    assert infer(target, "public").model_name == "public"
    code, _ = grpc_code(lambda: infer(target, "public", metadata=(("authorization", "Bearer not.a.jwt"),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_the_verified_subject_reaches_the_runtime_and_a_forged_one_does_not(setup: Setup, plane: str) -> None:
    metadata = (*setup.bearer(sub="carol"), ("x-modelgw-subject", "mallory"))
    answer = infer(url(setup, plane), "whoami", metadata=metadata)
    assert answer.raw_output_contents[0][4:] == b"carol"  # BYTES: a 4-byte length, then the value


def test_the_last_model_name_in_a_message_is_the_one_authorized(setup: Setup, plane: str) -> None:
    """Protobuf's last occurrence of a field wins, and so the runtime serves the last
    model_name: a body naming the public model first and the scoped one after it (past
    the tensors) is judged as the scoped one, not let in as public."""
    body = infer_request("public").SerializeToString() + infer_request("scoped").SerializeToString()[:8]
    assert body.endswith(b"\x0a\x06scoped")
    with grpc.insecure_channel(url(setup, plane)) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        code, _ = grpc_code(lambda: call(body, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        answer = pb.ModelInferResponse.FromString(
            call(body, metadata=setup.bearer(scope="infer:read infer:fast"), timeout=10)
        )
    assert answer.model_name == "scoped"


# -- where the data planes differ -------------------------------------------------------------


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary")
def test_differs_refusal_messages(setup: Setup) -> None:
    """Same codes, different words: Envoy's jwt_authn and RBAC say less than our gateway."""
    messages = {plane: grpc_code(lambda plane=plane: infer(url(setup, plane), "split"))[1] for plane in setup.gateways}
    assert "bearer token" in messages["python"]
    assert messages["envoy"] == "Jwt is missing"
    messages = {
        plane: grpc_code(lambda plane=plane: infer(url(setup, plane), "scoped", metadata=setup.bearer()))[1]
        for plane in setup.gateways
    }
    assert "infer:read" in messages["python"]
    assert messages["envoy"] == "RBAC: access denied"


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary")
def test_differs_wrong_audience_code(setup: Setup) -> None:
    """A token for another audience: UNAUTHENTICATED from the Python gateway (the token is
    not valid here), PERMISSION_DENIED from Envoy's jwt_authn (it treats the audience as
    an authorization check). Both refuse it."""
    metadata = setup.bearer(aud="someone-else")
    codes = {plane: grpc_code(lambda plane=plane: infer(url(setup, plane), "split", metadata=metadata)) for plane in setup.gateways}
    assert codes["python"][0] == grpc.StatusCode.UNAUTHENTICATED, codes
    assert codes["envoy"] == (grpc.StatusCode.PERMISSION_DENIED, "Audiences in Jwt are not allowed"), codes


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary")
def test_differs_unknown_kid(setup: Setup) -> None:
    """A key published after the gateways fetched the JWKS: the Python gateway refetches at
    once for the unknown kid and lets the token in; Envoy refuses it until its JWKS cache
    (jwks_cache_seconds, 600 s here) runs out. Rotate keys by publishing the new one at
    least that long before signing with it."""
    key = setup.issuer.new_key("ES256")
    try:
        metadata = setup.bearer(key)
        assert infer(url(setup, "python"), "split", metadata=metadata).model_name == "split"
        code, details = grpc_code(lambda: infer(url(setup, "envoy"), "split", metadata=metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED, details
    finally:
        setup.issuer.withdraw(key)
