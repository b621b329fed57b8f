"""The OpenAI API behind the gateway's authentication: a real `modelgw gateway` process
trusting a real OIDC issuer on loopback (tests/auth_helpers.py), the same per-model
policies as the other routes, refusals in OpenAI's error format. No runtime is needed:
everything here is decided before a request would be forwarded (an authorized request
to a model with no replica gets the 503 that proves it got that far)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
from auth_helpers import AUDIENCE, AuthGateway, Issuer, Key
from gateway_helpers import Fleet, GatewayProcess, http_request, model_spec, runtime_spec, wait_until

from modelgw.protos import registry_pb2 as rpb

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

SCOPE = "llm:use"
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Setup:
    gateway: GatewayProcess
    issuer: Issuer
    key: Key

    @property
    def base(self) -> str:
        return f"{self.gateway.base}/v1"

    def token(self, **claims) -> str:
        return self.issuer.token(self.key, **claims)

    def client(self, api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("openai-auth")
    issuer = Issuer().start()
    key = issuer.new_key("RS256")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        restricted = model_spec("restricted", "llm", "hf-llama", {"1": str(root / "ckpt")})
        restricted.access.CopyFrom(rpb.AccessPolicy(scopes=[SCOPE]))
        fleet.apply(
            runtime_spec("llm", "llm", ["hf-llama"]),
            model_spec("tiny", "llm", "hf-llama", {"1": str(root / "ckpt")}),
            restricted,
            runtime_spec("vision", "onnx", ["onnx"]),
            model_spec("classifier", "vision", "onnx", {"1": str(root / "model.onnx")}),
        )
        gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)
        setup = Setup(gateway, issuer, key)
        everything = {"Authorization": f"Bearer {setup.token(scope=SCOPE)}"}

        def listed() -> bool:
            status, raw, _ = http_request("GET", setup.base + "/models", headers=everything)
            return status == 200 and len(json.loads(raw)["data"]) == 2

        wait_until(listed, 30, f"the gateway never listed the models (logs in {root})")
        yield setup
    finally:
        fleet.close()
        issuer.stop()


def call(setup: Setup, method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    raw_body = json.dumps(body).encode() if body is not None else None
    status, raw, answer_headers = http_request(method, setup.base + path, raw_body, headers)
    return status, json.loads(raw), answer_headers


def assert_error(status: int, body: dict, expected: int, kind: str) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == kind and body["error"]["message"], body


REQUESTS = [
    ("POST", "/chat/completions", {"model": "tiny", "messages": MESSAGES}),
    ("POST", "/chat/completions", {"model": "tiny", "messages": MESSAGES, "stream": True}),
    ("POST", "/completions", {"model": "tiny", "prompt": "hi"}),
    ("GET", "/models", None),
    ("GET", "/models/tiny", None),
]


@pytest.mark.parametrize("method, path, body", REQUESTS)
def test_a_missing_token_is_refused_in_openai_format(setup: Setup, method: str, path: str, body: dict | None) -> None:
    status, answer, headers = call(setup, method, path, body)
    assert_error(status, answer, 401, "authentication_error")
    assert headers["WWW-Authenticate"].startswith('Bearer realm="modelgw"')


def test_the_sdk_raises_authentication_error_for_a_key_that_is_no_token(setup: Setup) -> None:
    client = setup.client("unused")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="tiny", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        list(client.completions.create(model="tiny", prompt="hi", stream=True))


def test_a_caller_sees_the_llm_models_its_token_may_use(setup: Setup) -> None:
    assert [m.id for m in setup.client(setup.token()).models.list()] == ["tiny"]
    assert [m.id for m in setup.client(setup.token(scope=SCOPE)).models.list()] == ["restricted", "tiny"]
    with pytest.raises(openai.PermissionDeniedError):
        setup.client(setup.token()).models.retrieve("restricted")


def test_a_token_without_the_models_scope_is_forbidden(setup: Setup) -> None:
    status, answer, _ = call(setup, "POST", "/chat/completions", {"model": "restricted", "messages": MESSAGES},
                             setup.token())
    assert_error(status, answer, 403, "permission_error")
    assert SCOPE in answer["error"]["message"]
    with pytest.raises(openai.PermissionDeniedError):
        setup.client(setup.token(scope="other")).completions.create(model="restricted", prompt="hi")


def test_authorized_requests_go_on_to_routing(setup: Setup) -> None:
    token = setup.token(scope=SCOPE)
    for model in ("tiny", "restricted"):
        for stream in (False, True):
            status, answer, _ = call(setup, "POST", "/chat/completions",
                                     {"model": model, "messages": MESSAGES, "stream": stream}, token)
            # no replica of the runtime is running: the request got past the door
            assert_error(status, answer, 503, "server_error")
            assert "no replica" in answer["error"]["message"]
    with pytest.raises(openai.InternalServerError):
        setup.client(token).completions.create(model="tiny", prompt="hi")
    # unknown models are only reported as such to callers who authenticated
    status, answer, _ = call(setup, "POST", "/completions", {"model": "nope", "prompt": "hi"}, token)
    assert_error(status, answer, 404, "invalid_request_error")
    assert answer["error"]["code"] == "model_not_found"
    status, answer, _ = call(setup, "POST", "/completions", {"model": "nope", "prompt": "hi"})
    assert_error(status, answer, 401, "authentication_error")


def test_listing_models_checks_the_caller_even_when_there_is_no_llm(etcd_server, tmp_path) -> None:
    """With no LLM model to filter, /v1/models must still refuse a missing or forged token
    (it answered 200 [] to anyone before)."""
    issuer = Issuer().start()
    key = issuer.new_key("RS256")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", tmp_path)
    try:
        fleet.apply(
            runtime_spec("vision", "onnx", ["onnx"]),
            model_spec("classifier", "vision", "onnx", {"1": str(tmp_path / "model.onnx")}),
        )
        gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)
        setup = Setup(gateway, issuer, key)
        forged = issuer.token(issuer.new_key("RS256", publish=False))  # signed by a key the issuer never published
        for token in (None, "not-a-jwt", forged):
            status, body, headers = call(setup, "GET", "/models", token=token)
            assert_error(status, body, 401, "authentication_error")
            assert headers.get("WWW-Authenticate", "").startswith("Bearer"), headers
        status, body, _ = call(setup, "GET", "/models", token=setup.token())
        assert status == 200 and body == {"object": "list", "data": []}, body
    finally:
        fleet.close()
        issuer.stop()
