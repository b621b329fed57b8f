"""Triton's repository and statistics extensions with authentication on: load and unload
need the admin scope (on gRPC and HTTP alike), and the repository index and the all-model
statistics leave out models the caller may not use.

Real: an etcd, a token issuer on loopback, a python-kind runtime replica and a
`modelgw gateway` process with authentication; unmodified tritonclient."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from auth_helpers import ADMIN_SCOPE, AUDIENCE, AuthGateway, Issuer, Key
from gateway_helpers import Fleet, GatewayProcess, model_spec, runtime_spec, wait_until
from tritonclient.utils import InferenceServerException

from modelgw.protos import registry_pb2 as rpb

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

OPEN, SECRET = "simple", "secret_model"
QA = str(Path(__file__).with_name("triton_qa_models.py"))


class Setup:
    def __init__(self, gateway: GatewayProcess, issuer: Issuer, key: Key) -> None:
        self.gateway = gateway
        self.issuer = issuer
        self.key = key
        self.grpc = triton.InferenceServerClient(gateway.grpc_url)
        self.http = triton_http.InferenceServerClient(gateway.http_url)

    def bearer(self, **claims) -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(self.key, **claims)}"}


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("triton-repository-auth")
    issuer = Issuer().start()
    key = issuer.new_key("RS256")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        secret = model_spec(SECRET, "py", "python", {"1": f"{QA}:Simple"})
        secret.access.CopyFrom(rpb.AccessPolicy(scopes=["secret:read"]))
        fleet.apply(runtime_spec("py", "python", ["python"]), model_spec(OPEN, "py", "python", {"1": f"{QA}:Simple"}), secret)
        fleet.replica("py", "python")
        config = root / "auth.yaml"
        config.write_text(f"issuers:\n  - issuer: {issuer.url}\n    audiences: [{AUDIENCE}]\n")
        gateway = AuthGateway.in_fleet(fleet, "--auth-config", str(config))
        setup = Setup(gateway, issuer, key)
        everything = setup.bearer(scope="secret:read")
        for name in (OPEN, SECRET):
            wait_until(lambda name=name: ready(setup.grpc, name, everything), 90, f"{name} not ready (logs in {root})")
        yield setup
        setup.grpc.close()
        setup.http.close()
    finally:
        fleet.close()
        issuer.stop()


def ready(client: triton.InferenceServerClient, model: str, headers: dict[str, str]) -> bool:
    try:
        return client.is_model_ready(model, headers=headers)
    except InferenceServerException:
        return False


def refused(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), info.value.message()


def test_load_and_unload_need_the_admin_scope(setup: Setup) -> None:
    user = setup.bearer(scope="secret:read")
    for call in (
        lambda: setup.grpc.unload_model(OPEN, headers=user),
        lambda: setup.grpc.load_model(OPEN, headers=user),
    ):
        status, message = refused(call)
        assert status == "StatusCode.PERMISSION_DENIED", (status, message)
    status, _ = refused(lambda: setup.grpc.unload_model(OPEN))
    assert status == "StatusCode.UNAUTHENTICATED"
    status, _ = refused(lambda: setup.http.unload_model(OPEN, headers=user))
    assert status == "403"
    status, _ = refused(lambda: setup.http.load_model(OPEN))
    assert status == "401"
    assert setup.grpc.is_model_ready(OPEN, headers=user)  # nothing was unloaded

    admin = setup.bearer(scope=ADMIN_SCOPE)
    setup.http.unload_model(OPEN, headers=admin)
    assert not setup.grpc.is_model_ready(OPEN, headers=user)
    setup.grpc.load_model(OPEN, headers=admin)
    assert setup.grpc.is_model_ready(OPEN, headers=user)


def test_lists_leave_out_models_the_caller_may_not_use(setup: Setup) -> None:
    plain, allowed = setup.bearer(), setup.bearer(scope="secret:read")
    assert {m.name for m in setup.grpc.get_model_repository_index(headers=plain).models} == {OPEN}
    assert {m["name"] for m in setup.http.get_model_repository_index(headers=plain)} == {OPEN}
    assert {m.name for m in setup.grpc.get_model_repository_index(headers=allowed).models} == {OPEN, SECRET}
    assert {s.name for s in setup.grpc.get_inference_statistics(headers=plain).model_stats} == {OPEN}
    assert {s["name"] for s in setup.http.get_inference_statistics(headers=allowed)["model_stats"]} == {OPEN, SECRET}
    status, _ = refused(lambda: setup.grpc.get_inference_statistics(SECRET, headers=plain))
    assert status == "StatusCode.PERMISSION_DENIED"
    status, _ = refused(lambda: setup.http.get_model_config(SECRET, headers=plain))
    assert status == "403"
    assert setup.grpc.get_model_config(SECRET, headers=allowed).config.name == SECRET
