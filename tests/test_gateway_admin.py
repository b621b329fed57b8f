"""Models applied through the gateway's admin API (/admin/v1/, REST) or the CLI (`modelgw
apply --server <gateway gRPC port>`) become routable with nothing restarted; once deleted,
requests get 404 / NOT_FOUND. Conflicts and invalid bodies get clear 409 / 400 answers."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from conftest import REPO, modelgw_command
from gateway_helpers import Fleet, GatewayProcess, RuntimeReplica, http_json, http_request, wait_model_ready, wait_until
from tritonclient.utils import InferenceServerException

ECHO = "tests.gateway_models:Echo"


class Setup:
    def __init__(self, fleet: Fleet, gateway: GatewayProcess, replica: RuntimeReplica, root: Path) -> None:
        self.fleet = fleet
        self.gateway = gateway
        self.replica = replica
        self.root = root
        self.admin = f"{gateway.base}/admin/v1"
        self.client = triton.InferenceServerClient(gateway.grpc_url)

    def still_the_same_processes(self) -> None:
        """Nothing was restarted to pick the change up."""
        assert self.gateway.process.poll() is None, self.gateway.output()
        assert self.replica.process.poll() is None, self.replica.output()


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("gateway-admin")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        gateway = fleet.gateway()
        # the runtime record itself goes through the admin API too
        status, body = http_json(
            "POST", f"{gateway.base}/admin/v1/runtimes",
            {"kind": "Runtime", "spec": {"name": "py", "kind": "python", "model_formats": ["python"], "replicas": 1}},
        )
        assert status == 201, body
        replica = fleet.replica("py", "python")  # serves nothing until a model names its runtime
        setup = Setup(fleet, gateway, replica, root)
        yield setup
        setup.client.close()
    finally:
        fleet.close()


def echo_model(name: str, versions: tuple[str, ...] = ("1",)) -> dict:
    return {
        "name": name,
        "versions": [{"version": v, "uri": ECHO, "format": "python", "runtime": "py"} for v in versions],
    }


def infer(client: triton.InferenceServerClient, model: str, version: str = "") -> triton.InferResult:
    x = triton.InferInput("x", [3], "FP32")
    x.set_data_from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    return client.infer(model, [x], model_version=version)


def rest_infer(setup: Setup, model: str) -> tuple[int, dict]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0]}]}
    return http_json("POST", f"{setup.gateway.base}/v2/models/{model}/infer", body)


def grpc_code(client: triton.InferenceServerClient, model: str) -> str:
    try:
        infer(client, model)
        return "OK"
    except InferenceServerException as err:
        return str(err.status())


def assert_routable(setup: Setup, model: str) -> None:
    wait_model_ready(setup.gateway.grpc_url, model, what=f"(logs in {setup.root})")
    result = infer(setup.client, model)
    np.testing.assert_array_equal(result.as_numpy("y"), [2.0, 3.0, 4.0])
    status, body = rest_infer(setup, model)
    assert status == 200, body
    assert body["outputs"][0]["data"] == [2.0, 3.0, 4.0]


def assert_gone(setup: Setup, model: str) -> None:
    wait_until(
        lambda: grpc_code(setup.client, model) == "StatusCode.NOT_FOUND",
        30, f"model '{model}' still routed after its deletion",
    )
    with pytest.raises(InferenceServerException) as info:
        infer(setup.client, model)
    assert info.value.status() == "StatusCode.NOT_FOUND" and model in info.value.message()
    status, body = rest_infer(setup, model)
    assert status == 404 and model in body["error"], body
    status, body = http_json("GET", f"{setup.gateway.base}/v2/models/{model}")
    assert status == 404 and model in body["error"], body


def test_model_applied_through_the_admin_api_routes_then_404s_after_delete(setup: Setup) -> None:
    status, body = http_json("POST", f"{setup.admin}/models", echo_model("via-rest"))
    assert status == 201, body
    assert body["spec"]["name"] == "via-rest" and int(body["revision"]) > 0
    assert_routable(setup, "via-rest")

    status, body = http_json("GET", f"{setup.admin}/models/via-rest")
    assert status == 200 and body["spec"]["versions"][0]["uri"] == ECHO, body
    status, body = http_json("GET", f"{setup.admin}/models")
    assert "via-rest" in [m["spec"]["name"] for m in body["models"]], body

    status, body = http_json("DELETE", f"{setup.admin}/models/via-rest")
    assert status == 200, body
    assert_gone(setup, "via-rest")
    setup.still_the_same_processes()


def test_model_update_through_the_admin_api_adds_a_version(setup: Setup) -> None:
    status, created = http_json("PUT", f"{setup.admin}/models/grows", echo_model("grows"))
    assert status == 201, created
    assert_routable(setup, "grows")
    # a second version, pinned to the revision just read, with all traffic on it
    spec = {**echo_model("grows", ("1", "2")), "traffic": {"2": 100}}
    status, body = http_json(
        "PUT", f"{setup.admin}/models/grows", spec, headers={"If-Match": f'"{created["revision"]}"'}
    )
    assert status == 200, body
    wait_model_ready(setup.gateway.grpc_url, "grows", version="2")
    wait_until(
        lambda: infer(setup.client, "grows").get_response().model_version == "2",
        30, "unversioned requests not routed to version 2",
    )
    assert infer(setup.client, "grows", version="1").get_response().model_version == "1"
    setup.still_the_same_processes()


def test_stale_revision_is_a_conflict(setup: Setup) -> None:
    status, created = http_json("POST", f"{setup.admin}/models", echo_model("contended"))
    assert status == 201, created
    revision = int(created["revision"])
    status, body = http_json("PUT", f"{setup.admin}/models/contended", echo_model("contended", ("1", "2")),
                             headers={"If-Match": f'"{revision}"'})
    assert status == 200, body
    current = int(body["revision"])
    # a second writer still holding the first revision
    status, body, headers = http_request(
        "PUT", f"{setup.admin}/models/contended", json.dumps(echo_model("contended", ("1", "3"))).encode(),
        {"If-Match": f'"{revision}"', "Content-Type": "application/json"},
    )
    body = json.loads(body)
    assert status == 409, body
    assert int(body["current_revision"]) == current > revision and headers["ETag"] == f'"{current}"'
    assert f"revision {current}" in body["error"], body
    # create-only on an existing record is a conflict too
    status, body = http_json("POST", f"{setup.admin}/models", echo_model("contended"), headers={"If-None-Match": "*"})
    assert status == 409, body


def test_invalid_admin_requests_get_clear_errors(setup: Setup) -> None:
    status, body = http_json("POST", f"{setup.admin}/models", {"name": "Bad Name", "versions": []})
    assert status == 400 and body["problems"], body
    assert any("name" in p for p in body["problems"]) and any("versions" in p for p in body["problems"])
    status, body = http_json("POST", f"{setup.admin}/models", {**echo_model("orphan"), "versions": [
        {"version": "1", "uri": ECHO, "format": "python", "runtime": "no-such-runtime"}]})
    assert status == 400 and "no-such-runtime" in body["error"], body
    status, body = http_json("GET", f"{setup.admin}/models/never-applied")
    assert status == 404 and "never-applied" in body["error"], body
    status, body = http_json("PUT", f"{setup.admin}/models/one", echo_model("another"))
    assert status == 400 and "another" in body["error"], body


def test_model_applied_through_the_cli_routes_then_not_found_after_delete(setup: Setup, tmp_path: Path) -> None:
    manifest = tmp_path / "model.yaml"
    manifest.write_text(
        "kind: Model\n"
        "spec:\n"
        "  name: via-cli\n"
        f"  versions: [{{version: '1', uri: '{ECHO}', format: python, runtime: py}}]\n"
    )
    server = ["--server", setup.gateway.grpc_url]
    result = subprocess.run(modelgw_command("apply", "-f", str(manifest), *server),
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "model/via-cli created"
    assert_routable(setup, "via-cli")

    result = subprocess.run(modelgw_command("delete", "model", "via-cli", *server),
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert_gone(setup, "via-cli")
    setup.still_the_same_processes()


def test_body_revision_means_what_it_means_to_the_cli(setup: Setup, tmp_path: Path) -> None:
    """A document's `revision` (what `modelgw get -o json` writes) is an expected revision
    on REST as in the CLI: stale is 409 with the current revision, never an overwrite."""
    server = ["--server", setup.gateway.grpc_url]
    status, created = http_json("POST", f"{setup.admin}/models", echo_model("doc-rev"))
    assert status == 201, created
    first = int(created["revision"])
    got = subprocess.run(modelgw_command("get", "model", "doc-rev", "-o", "json", *server),
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert got.returncode == 0, got.stderr
    document = json.loads(got.stdout)
    assert document["revision"] == first, document
    # someone else changes the record after that read
    status, body = http_json("PUT", f"{setup.admin}/models/doc-rev", echo_model("doc-rev", ("1", "2")))
    assert status == 200, body
    current = int(body["revision"])

    stale = {**document, "spec": echo_model("doc-rev", ("1", "3"))}
    for method, url in (("PUT", f"{setup.admin}/models/doc-rev"), ("POST", f"{setup.admin}/models")):
        status, body = http_json(method, url, stale)
        assert status == 409, body
        assert int(body["current_revision"]) == current and f"revision {current}" in body["error"], body
    # the CLI reads the same document the same way
    stale_file = tmp_path / "stale.json"
    stale_file.write_text(json.dumps(stale))
    applied = subprocess.run(modelgw_command("apply", "-f", str(stale_file), *server),
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert applied.returncode == 1 and f"revision {current}" in applied.stderr, applied
    status, body = http_json("GET", f"{setup.admin}/models/doc-rev")
    assert [v["version"] for v in body["spec"]["versions"]] == ["1", "2"], body

    # body and If-Match that disagree: which one was meant is unknowable
    fresh = {**stale, "revision": current}
    status, body = http_json("PUT", f"{setup.admin}/models/doc-rev", fresh, headers={"If-Match": f'"{first}"'})
    assert status == 400 and "If-Match" in body["error"] and "revision" in body["error"], body
    # agreeing: applied; a GET body (a ModelRecord, int64 revision as a string) is a document too
    status, body = http_json("PUT", f"{setup.admin}/models/doc-rev", fresh, headers={"If-Match": f'"{current}"'})
    assert status == 200 and [v["version"] for v in body["spec"]["versions"]] == ["1", "3"], body
    status, record = http_json("GET", f"{setup.admin}/models/doc-rev")
    assert isinstance(record["revision"], str), record
    status, body = http_json("PUT", f"{setup.admin}/models/doc-rev", {**record, "revision": str(current)})
    assert status == 409 and int(body["current_revision"]) == int(record["revision"]), body
    status, body = http_json("PUT", f"{setup.admin}/models/doc-rev", record)
    assert status == 200 and body["revision"] == record["revision"], body  # unchanged


@pytest.mark.parametrize("name, via", [("simple_string", "cli"), ("resnet50.v1", "admin")])
def test_triton_style_model_names_are_applied_and_served(setup: Setup, tmp_path: Path, name: str, via: str) -> None:
    """Triton's model names (underscores, dots) are model names here too; runtimes keep DNS labels."""
    if via == "cli":
        manifest = tmp_path / "model.yaml"
        manifest.write_text(
            f"kind: Model\nspec:\n  name: {name}\n"
            f"  versions: [{{version: '1', uri: '{ECHO}', format: python, runtime: py}}]\n"
        )
        result = subprocess.run(modelgw_command("apply", "-f", str(manifest), "--server", setup.gateway.grpc_url),
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
    else:
        status, body = http_json("PUT", f"{setup.admin}/models/{name}", echo_model(name))
        assert status == 201, body
    assert_routable(setup, name)
    rest = triton_http.InferenceServerClient(setup.gateway.http_url)
    try:
        x = triton_http.InferInput("x", [3], "FP32")
        x.set_data_from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
        np.testing.assert_array_equal(rest.infer(name, [x]).as_numpy("y"), [2.0, 3.0, 4.0])
        assert rest.get_model_metadata(name)["name"] == name
    finally:
        rest.close()
    assert setup.client.get_model_metadata(name).name == name


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "m" * 200, "with space"])
def test_unusable_model_names_are_refused_naming_the_field(setup: Setup, tmp_path: Path, name: str) -> None:
    status, body = http_json("POST", f"{setup.admin}/models", echo_model(name))
    assert status == 400, body
    assert any(": name: " in p and "model name" in p for p in body["problems"]), body
    manifest = tmp_path / "model.yaml"
    manifest.write_text(json.dumps({"kind": "Model", "spec": echo_model(name)}))
    result = subprocess.run(modelgw_command("apply", "-f", str(manifest), "--server", setup.gateway.grpc_url),
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode != 0 and ": name: " in result.stderr and "model name" in result.stderr, result.stderr


def test_runtime_names_stay_dns_labels(setup: Setup) -> None:
    status, body = http_json(
        "POST", f"{setup.admin}/runtimes",
        {"kind": "Runtime", "spec": {"name": "py_under", "kind": "python", "model_formats": ["python"]}},
    )
    assert status == 400 and any("not a DNS label" in p for p in body["problems"]), body
