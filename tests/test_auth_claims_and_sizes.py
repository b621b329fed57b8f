"""What a token must be before the gateway's door looks further, checked on every entry point
of a real `modelgw gateway` process (gRPC inference, the gRPC RegistryService, OIP REST,
REST admin, OpenAI): claims of the RFC 7519 type, and one size limit.

- A signed token with a claim of the wrong type (`"exp": "1700000000"`, `"exp": true`,
  `"scope": 5`, ...) is refused with 401 / UNAUTHENTICATED naming the claim.
- A token of exactly max_token_bytes passes everywhere; one character more gets 401 with a
  WWW-Authenticate challenge / UNAUTHENTICATED, every time. The HTTP header and gRPC
  metadata limits sit above it, so the token limit decides, not the transport.
- Far beyond every limit (a 100 KB header) the answer is still JSON on HTTP (431) and
  one stable code on gRPC (RESOURCE_EXHAUSTED).

No runtime is needed: everything here is decided before a request would be forwarded (an
authenticated request about an unknown model gets the 404 / not-ready that proves it got
past the door)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from auth_helpers import ADMIN_SCOPE, AUDIENCE, AuthGateway, Issuer, Key
from gateway_helpers import Fleet, http_request

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.protos import registry_pb2 as rpb
from modelgw.protos import registry_pb2_grpc as rpb_grpc

LIMIT = 8192  # the gateway's default max_token_bytes
TRIES = 12  # "every time": the same answer on each of this many tries


@dataclass
class Setup:
    gateway: AuthGateway
    issuer: Issuer
    key: Key
    channel: grpc.Channel

    def token(self, **claims) -> str:
        return self.issuer.token(self.key, **{"scope": ADMIN_SCOPE, **claims})


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("auth-claims-sizes")
    issuer = Issuer().start()
    key = issuer.new_key("RS256")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)  # default limit
        with grpc.insecure_channel(gateway.grpc_url) as channel:
            yield Setup(gateway, issuer, key, channel)
    finally:
        fleet.close()
        issuer.stop()


# -- one call on each entry point: (status or code, message, WWW-Authenticate or None) --------


def _rpc(call, request, token: str) -> tuple[str, str, None]:
    try:
        call(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        return "OK", "", None
    except grpc.RpcError as err:
        return err.code().name, err.details() or "", None


def grpc_inference(setup: Setup, token: str):
    return _rpc(pb_grpc.GRPCInferenceServiceStub(setup.channel).ModelReady, pb.ModelReadyRequest(name="nope"), token)


def grpc_admin(setup: Setup, token: str):
    return _rpc(rpb_grpc.RegistryServiceStub(setup.channel).ListModels, rpb.ListRequest(), token)


def _http(setup: Setup, method: str, path: str, token: str, body: bytes | None = None) -> tuple[int, str, str | None]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, raw, answer = http_request(method, setup.gateway.base + path, body, headers)
    assert answer.get("Content-Type", "").startswith("application/json"), (path, status, raw[:200])
    error = json.loads(raw).get("error", "") if status >= 400 else ""
    message = error.get("message", "") if isinstance(error, dict) else error  # OpenAI's form: an object
    return status, message, answer.get("WWW-Authenticate")


def rest_inference(setup: Setup, token: str):
    return _http(setup, "GET", "/v2/models/nope", token)  # authorized like /infer


def rest_admin(setup: Setup, token: str):
    return _http(setup, "GET", "/admin/v1/models", token)


def openai(setup: Setup, token: str):
    return _http(setup, "GET", "/v1/models/nope", token)


PATHS = {"grpc": grpc_inference, "grpc-admin": grpc_admin, "rest": rest_inference, "rest-admin": rest_admin, "openai": openai}
PASSED = {"grpc": "OK", "grpc-admin": "OK", "rest": 404, "rest-admin": 200, "openai": 404}


def assert_unauthenticated(name: str, answer: tuple, *words: str) -> None:
    code, message, challenge = answer
    if name.startswith("grpc"):
        assert code == "UNAUTHENTICATED", (name, answer)
    else:
        assert code == 401, (name, answer)
        assert challenge and challenge.startswith('Bearer realm="modelgw", error="invalid_token"'), (name, answer)
    for word in words:
        assert word in message, (name, answer)
        if challenge is not None:
            assert word in challenge, (name, answer)


# -- claim types -------------------------------------------------------------------------------

WRONG_TYPES = {
    "exp": {"exp": "9999999999"},  # PyJWT's int() takes it: it was let in
    "nbf": {"nbf": True},  # true is an int to Python: it was let in
    "iat": {"iat": "0"},
    "aud": {"aud": 5},
    "sub": {"sub": ["alice"]},
    "scope": {"scope": 7},
    "scp": {"scp": {"modelgw:admin": True}},
    "groups": {"groups": [1, 2]},
    "realm_access.roles": {"realm_access": {"roles": [True]}},
}


@pytest.mark.parametrize("claim", WRONG_TYPES)
def test_a_signed_token_with_a_claim_of_the_wrong_type_is_refused_everywhere_naming_it(setup: Setup, claim: str) -> None:
    token = setup.token(**WRONG_TYPES[claim])
    for name, call in PATHS.items():
        assert_unauthenticated(name, call(setup, token), f"'{claim}' claim")


def test_the_well_typed_token_passes_everywhere(setup: Setup) -> None:
    token = setup.token(exp=int(setup.issuer.claims()["exp"]) + 0.5, scp=["a"], groups="g", realm_access={"roles": ["r"]})
    for name, call in PATHS.items():
        assert call(setup, token)[0] == PASSED[name], (name, call(setup, token))


# -- one token-size limit ----------------------------------------------------------------------


def test_a_token_at_the_limit_passes_on_every_path(setup: Setup) -> None:
    token = setup.issuer.sized_token(setup.key, LIMIT, scope=ADMIN_SCOPE)
    for name, call in PATHS.items():
        for _ in range(3):
            assert call(setup, token)[0] == PASSED[name], (name, call(setup, token))


@pytest.mark.parametrize("size", [LIMIT + 1, LIMIT + 4000])
def test_a_token_over_the_limit_is_refused_with_401_every_time(setup: Setup, size: int) -> None:
    token = setup.issuer.sized_token(setup.key, size, scope=ADMIN_SCOPE)
    for name, call in PATHS.items():
        for _ in range(TRIES):
            assert_unauthenticated(name, call(setup, token), f"more than the {LIMIT} accepted")


@pytest.mark.parametrize("size", [18_000, 100_000])
def test_far_beyond_every_limit_http_answers_json_and_grpc_one_code(setup: Setup, size: int) -> None:
    # 16-20 KB is where gRPC's soft metadata limit refused at random (RESOURCE_EXHAUSTED one
    # try, UNAUTHENTICATED the next); aiohttp answered in plain text
    token = "e" * size
    codes = {grpc_inference(setup, token)[0] for _ in range(2 * TRIES)} | {grpc_admin(setup, token)[0] for _ in range(TRIES)}
    assert codes == {"RESOURCE_EXHAUSTED"}, codes
    for path in ("/v2/models/nope", "/admin/v1/models", "/v1/models/nope"):
        for _ in range(3):
            status, raw, headers = http_request("GET", setup.gateway.base + path, headers={"Authorization": f"Bearer {token}"})
            assert status == 431 and headers.get("Content-Type", "").startswith("application/json"), (status, raw[:200])
            message = json.loads(raw)["error"]
            assert "header" in message and "bytes" in message, message
            assert "eeeeeeeeee" not in message  # the header's content is not echoed (it may be a token)
    assert "eeeeeeeeee" not in setup.gateway.output()  # nor logged


def test_other_requests_aiohttp_cannot_parse_get_json_too(setup: Setup) -> None:
    import socket

    for raw in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", setup.gateway.http_port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower(), answer[:300]
        status = int(head.split()[1])
        assert status in (400, 414) and json.loads(body)["error"], answer[:300]
