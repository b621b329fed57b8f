"""The gateway's core behaviour on both data planes (`--data-plane python` and `envoy`),
against one registry, one real issuer and one runtime replica: routing to the named
version (on the envoy plane: by Envoy's own cluster counts), the traffic split, sticky
sessions, authentication (missing, bad, expired, wrong-audience, foreign tokens:
UNAUTHENTICATED), authorization (scopes, groups, roles: PERMISSION_DENIED; a public model
without a token), the verified subject passed on (a client's copy dropped), unknown model
and version NOT_FOUND, health without a token, a model at its in-flight cap
RESOURCE_EXHAUSTED with the Python proxy's words.

The envoy plane sends every request it would refuse for its token or policy to the Python
gateway (lua.py's auth gate), so refusals are the same code and words on both planes
(test_refusals_are_the_python_gateways_word_for_word), a key published after start is
fetched at once on both, and forged x-modelgw-* headers and attack tokens never reach a
runtime. What still differs (test_differs_*): Envoy's in-flight cap counts per version (one
circuit breaker per version's cluster), the Python proxy's per model."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Iterator

import grpc
import pytest
from auth_helpers import (
    AUDIENCE,
    JSON_NULL,
    Issuer,
    Key,
    hmac_token,
    unsigned_token,
    with_flipped_signature,
    with_payload,
)
from envoy_helpers import DATA_PLANES, ENVOY, gateway_on, grpc_code, infer, infer_request, wait_routed
from gateway_helpers import Fleet, GatewayProcess, http_get, model_spec, runtime_spec, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgw.gateway.envoy.config import cluster_name
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.protos import registry_pb2 as rpb

ECHO = "tests.gateway_models:Echo"
WHOAMI = "tests.auth_models:WhoAmI"
SLOW = "tests.gateway_models:Slow"
MODELS = {
    # name: (class, versions, traffic, access policy)
    "split": (ECHO, ("1", "2"), {"1": 90, "2": 10}, None),
    "scoped": (ECHO, ("1",), None, rpb.AccessPolicy(scopes=["infer:read", "infer:fast"])),
    "grouped": (ECHO, ("1",), None, rpb.AccessPolicy(groups=["ml-team", "data"])),
    "roled": (ECHO, ("1",), None, rpb.AccessPolicy(roles=["predictor"])),
    "public": (ECHO, ("1",), None, rpb.AccessPolicy(public=True)),
    "whoami": (WHOAMI, ("1",), None, None),
    "public-whoami": (WHOAMI, ("1",), None, rpb.AccessPolicy(public=True)),
    "slow": (SLOW, ("1",), None, None),  # max_in_flight 1 (LIMITED)
    "slow2": (SLOW, ("1", "2"), None, None),
}
LIMITED = {"slow": 1, "slow2": 1}
UNSERVED = "unserved"  # a model whose runtime has no replica


class Setup:
    def __init__(self, issuer: Issuer, key: Key) -> None:
        self.issuer = issuer
        self.key = key
        self.gateways: dict[str, GatewayProcess] = {}
        self.outside_algorithms: Key | None = None

    def bearer(self, key: Key | None = None, **claims) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.issuer.token(key or self.key, **claims)}"),)


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("envoy-behaviour")
    issuer = Issuer().start()
    setup = Setup(issuer, issuer.new_key("RS256"))
    # published (without an alg) before the gateways start, so Envoy's JWKS holds it: an RSA
    # key signs PS256, which the issuer's algorithms below do not allow
    setup.outside_algorithms = issuer.new_key("PS256", publish_alg=False)
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        # "idle" never gets a replica: its model's requests have nowhere to go
        specs: list = [runtime_spec("py", "python", ["python"]), runtime_spec("idle", "python", ["python"]),
                       model_spec(UNSERVED, "idle", "python", {"1": ECHO})]
        for name, (cls, versions, traffic, access) in MODELS.items():
            spec = model_spec(name, "py", "python", dict.fromkeys(versions, cls), traffic=traffic)
            if access is not None:
                spec.access.CopyFrom(access)
            if name in LIMITED:
                spec.limits.max_in_flight = LIMITED[name]
            specs.append(spec)
        fleet.apply(*specs)
        config = root / "auth.yaml"
        config.write_text(f"issuers:\n  - issuer: {issuer.url}\n    audiences: [{AUDIENCE}]\n    min_refetch_seconds: 0.2\n"
                          "    algorithms: [RS256, ES256]\n")
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


def cluster_requests(setup: Setup) -> dict[str, float]:
    """Envoy's upstream_rq_total per cluster (the envoy plane's /metrics/envoy)."""
    status, body = http_get(setup.gateways["envoy"].base + "/metrics/envoy")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("envoy_cluster_upstream_rq_total{"):
            name = line.split('envoy_cluster_name="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def test_routes_to_the_named_version(setup: Setup, plane: str) -> None:
    for version in ("1", "2"):
        before = cluster_requests(setup) if plane == "envoy" else {}
        for _ in range(20):
            answer = infer(url(setup, plane), "split", version, setup.bearer())
            assert (answer.model_name, answer.model_version) == ("split", version)
        if plane == "envoy":
            # one replica serves both versions and obeys the body's version: only the
            # cluster's count shows that Envoy itself chose the version's cluster
            after = cluster_requests(setup)
            cluster = cluster_name("split", version)
            assert after[cluster] - before.get(cluster, 0) == 20, (before, after)


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


def test_a_model_without_a_ready_replica_is_unavailable_saying_why(setup: Setup) -> None:
    """The same code and words on both planes: Envoy leaves a version without endpoints to
    the Python gateway, which says which runtime has no replica (not "no healthy upstream")."""
    metadata = setup.bearer()
    answers = {
        (plane, version): grpc_code(lambda plane=plane, version=version: infer(url(setup, plane), UNSERVED, version, metadata))
        for plane in setup.gateways for version in ("", "1")  # the split's route, the named version's
    }
    assert len(set(answers.values())) == 1, answers
    code, details = answers["python", "1"]
    assert code == grpc.StatusCode.UNAVAILABLE
    assert f"model '{UNSERVED}' version '1' has no ready replica" in details and "'idle'" in details


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
    # no token (a public model): no subject at all, not the client's
    answer = infer(url(setup, plane), "public-whoami", metadata=(("x-modelgw-subject", "mallory"),))
    assert answer.raw_output_contents[0][4:] == b""


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


def slow_request(model: str, marker, version: str = "") -> pb.ModelInferRequest:
    message = infer_request(model, version)
    message.parameters["seconds"].double_param = 3.0
    message.parameters["marker"].string_param = str(marker)
    return message


def test_a_model_at_its_in_flight_cap_is_resource_exhausted(setup: Setup, plane: str, tmp_path) -> None:
    """A model's max_in_flight reached: RESOURCE_EXHAUSTED naming the model and its limit,
    the Python proxy's words (on the envoy plane: the version's circuit breaker open, its
    local reply rewritten)."""
    marker = tmp_path / "started"
    with grpc.insecure_channel(url(setup, plane)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer.future(slow_request("slow", marker), metadata=setup.bearer(), timeout=30)
        wait_until(marker.exists, 20, "the slow request never started")
        code, details = grpc_code(lambda: stub.ModelInfer(infer_request("slow"), metadata=setup.bearer(), timeout=10))
        assert first.result().model_name == "slow"
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert details == "model 'slow' is at its limit of 1 requests in flight; retry later"


# -- refusals: the Python gateway's words on both planes ----------------------------------------


def refusal_cases(setup: Setup) -> dict[str, tuple[str, tuple[tuple[str, str], ...] | None]]:
    """(model, metadata) of requests refused for their token or the model's policy."""
    other = Issuer()  # never started: its key is in no JWKS the gateway knows
    good = setup.issuer.token(setup.key, scope="infer:read")
    return {
        "missing": ("split", None),
        "garbage": ("split", (("authorization", "Bearer not.a.jwt"),)),
        "not bearer": ("split", (("authorization", "Basic YWxpY2U6cHc="),)),
        "expired": ("split", setup.bearer(exp=1_000_000, iat=999_000)),
        "no exp": ("split", setup.bearer(exp=None)),
        "null exp": ("split", setup.bearer(exp=JSON_NULL)),
        "wrong audience": ("split", setup.bearer(aud="someone-else")),
        "wrong issuer": ("split", setup.bearer(iss="https://elsewhere.example.com")),
        "no sub": ("split", setup.bearer(sub=None)),
        "numeric sub": ("split", setup.bearer(sub=42)),
        "exp as a string": ("split", setup.bearer(exp="4102444800")),
        "not yet valid": ("split", setup.bearer(nbf=4_102_444_800)),
        "unknown signer": ("split", (
            ("authorization", f"Bearer {other.token(other.new_key('RS256', publish=False), iss=setup.issuer.url)}"),
        )),
        "an algorithm the issuer does not allow": ("split", setup.bearer(setup.outside_algorithms)),
        "alg none": ("split", (("authorization", f"Bearer {unsigned_token(setup.issuer.claims())}"),)),
        "flipped signature": ("split", (("authorization", f"Bearer {with_flipped_signature(good)}"),)),
        "missing on a scoped model": ("scoped", None),
        "one of two scopes": ("scoped", setup.bearer(scope="infer:read")),
        "no scope": ("scoped", setup.bearer()),
        "another group": ("grouped", setup.bearer(groups=["other"])),
        "another role": ("roled", setup.bearer(roles=["viewer"])),
        "bad token on a public model": ("public", (("authorization", "Bearer not.a.jwt"),)),
    }


def outcome(call) -> tuple[object, str]:
    """(code, details) of a refused call; ("answered", "") of one that was answered."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return "answered", ""


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary")
def test_refusals_are_the_python_gateways_word_for_word(setup: Setup) -> None:
    """Envoy verifies tokens and policies on the common path, and sends every request it
    would refuse to the Python gateway: the same code and the same actionable message on
    both planes, whatever the reason (the wrong audience included: UNAUTHENTICATED)."""
    for case, (model, metadata) in refusal_cases(setup).items():
        answers = {
            plane: outcome(lambda plane=plane, model=model, metadata=metadata: infer(url(setup, plane), model, metadata=metadata))
            for plane in setup.gateways
        }
        assert answers["envoy"] == answers["python"], (case, answers)
        assert answers["python"][0] in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), case
    # the words are the actionable ones: the scope the token lacks
    assert "infer:fast" in grpc_code(lambda: infer(url(setup, "envoy"), "scoped", metadata=setup.bearer(scope="infer:read")))[1]


def test_forged_headers_and_tokens_never_reach_a_runtime(setup: Setup, plane: str) -> None:
    """Attacks on the envoy plane's routing: a client's own x-modelgw-* headers (the gate's
    mark, the model, the version, the subject) with a token that does not verify, or with
    none, are refused as the Python gateway refuses them; a tampered claim (the scope
    widened, the signature kept) does not pass the policy."""
    other = Issuer()
    good = setup.issuer.token(setup.key, scope="infer:read")
    forged = (
        ("x-modelgw-python", "0"), ("x-modelgw-model", "public"), ("x-modelgw-version", "1"),
        ("x-modelgw-subject", "mallory"), ("x-modelgw-unversioned", "1"),
    )
    tokens = {
        "none": None,
        "alg none": unsigned_token(setup.issuer.claims(scope="infer:read infer:fast")),
        "unpublished key": other.token(other.new_key("ES256", publish=False), iss=setup.issuer.url, aud=AUDIENCE),
        "no exp": setup.issuer.token(setup.key, exp=None, scope="infer:read infer:fast"),
        "widened scope": with_payload(good, scope="infer:read infer:fast"),
        "rsa key as hmac secret": hmac_token(
            setup.issuer.claims(scope="infer:read infer:fast"), setup.key.public_pem, kid=setup.key.kid,
        ),
    }
    for case, token in tokens.items():
        metadata = forged + ((("authorization", f"Bearer {token}"),) if token else ())
        for model in ("scoped", "whoami"):
            code, details = grpc_code(lambda model=model, metadata=metadata: infer(url(setup, plane), model, metadata=metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (case, model, code, details)


def test_a_key_published_after_start_is_fetched_at_once(setup: Setup, plane: str) -> None:
    """A token signed with a key the gateway has not seen (an unknown kid): the Python
    gateway refetches the JWKS at once and lets it in; on the envoy plane jwt_authn fails
    it (its JWKS is cached) and the gate sends it to the Python gateway, which does the
    same. A key rotation needs no waiting for Envoy's cache on either plane."""
    key = setup.issuer.new_key("ES256")
    try:
        metadata = setup.bearer(key)
        assert infer(url(setup, plane), "split", metadata=metadata).model_name == "split"
    finally:
        setup.issuer.withdraw(key)


# -- where the data planes still differ ---------------------------------------------------------


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary")
def test_differs_the_in_flight_cap_counts_per_version(setup: Setup, tmp_path) -> None:
    """max_in_flight 1 on a model with two versions, one request in flight on version 1: the
    Python proxy counts the model (a request for version 2 is RESOURCE_EXHAUSTED); Envoy's
    circuit breaker belongs to each version's cluster (version 2 is admitted). Envoy has no
    breaker shared by clusters; one cluster per model would lose the per-version replicas."""
    answers = {}
    for plane in setup.gateways:
        marker = tmp_path / f"started-{plane}"
        with grpc.insecure_channel(url(setup, plane)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            first = stub.ModelInfer.future(slow_request("slow2", marker, "1"), metadata=setup.bearer(), timeout=30)
            wait_until(marker.exists, 20, "the slow request never started")
            try:
                answers[plane] = stub.ModelInfer(infer_request("slow2", "2"), metadata=setup.bearer(), timeout=20).model_version
            except grpc.RpcError as err:
                answers[plane] = err.code()
            assert first.result().model_version == "1"
    assert answers == {"python": grpc.StatusCode.RESOURCE_EXHAUSTED, "envoy": "2"}, answers
