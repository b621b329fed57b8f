"""`modelgw apply|get|delete` and `modelgw registry serve` as real subprocesses, against a
real etcd directly (--etcd) and through the RegistryService (--server)."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
import yaml
from conftest import REPO, modelgw_command, spawn

from modelgw.net import free_port, wait_for_port
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

FILE = """\
kind: Model
spec:
  name: resnet
  versions:
    - {version: 1, uri: /models/resnet/1, format: torchscript, runtime: torch}
    - {version: 2, uri: "file:///models/resnet/2", format: torchscript, runtime: torch}
  traffic: {1: 90, 2: 10}
---
kind: Runtime
spec:
  name: torch
  kind: pytorch
  model_formats: [torchscript]
  replicas: 2
  resources: {cpu: 500m, memory: 1Gi}
"""


def modelgw(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        modelgw_command(*args), input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def direct(etcd_server, etcd_prefix) -> list[str]:
    return ["--etcd", etcd_server.endpoint, "--prefix", etcd_prefix]


@pytest.fixture
def server(etcd_server, etcd_prefix, tmp_path):
    port = free_port()
    process = spawn(
        "registry", "serve", "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix, "--port", str(port),
        log=tmp_path / "serve.log",
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield ["--server", f"127.0.0.1:{port}"]
    finally:
        process.terminate()
        assert process.wait(15) == 0  # a graceful stop on SIGTERM


def test_apply_get_delete_directly_on_etcd(direct, tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text(FILE)
    applied = modelgw("apply", "-f", str(path), *direct)
    assert applied.returncode == 0, applied.stderr
    # the runtime goes first although the file lists it second: the model needs it
    assert applied.stdout.splitlines() == ["runtime/torch created", "model/resnet created"]
    again = modelgw("apply", "-f", str(path), *direct)
    assert again.stdout.splitlines() == ["runtime/torch unchanged", "model/resnet unchanged"]

    table = modelgw("get", "models", *direct)
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "VERSIONS", "RUNTIMES", "TRAFFIC", "REVISION", "STATE"]
    assert row.split()[:4] == ["resnet", "1,2", "torch", "1:90,2:10"]
    pending = "PENDING: runtime torch has no replicas registered"
    assert row.endswith(f"1: {pending}; 2: {pending}")  # each version's state, from the endpoints

    out = modelgw("get", "model", "resnet", "-o", "yaml", *direct)
    document = yaml.safe_load(out.stdout)
    assert document["kind"] == "Model" and document["revision"] > 0
    assert document["spec"]["versions"][1]["uri"] == "file:///models/resnet/2"
    assert document["spec"]["traffic"] == {"1": 90, "2": 10}

    listed = json.loads(modelgw("get", "runtimes", "-o", "json", *direct).stdout)
    assert listed["kind"] == "List" and listed["items"][0]["spec"]["resources"] == {"cpu": "500m", "memory": "1Gi"}

    refused = modelgw("delete", "runtime", "torch", *direct)
    assert_one_line_error(refused, "runtimes/torch is used by models/resnet", "force")
    deleted = modelgw("delete", "model", "resnet", *direct)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "model/resnet deleted"
    assert modelgw("delete", "runtime", "torch", *direct).returncode == 0

    empty = modelgw("get", "models", *direct)
    assert empty.returncode == 0 and empty.stdout == "" and empty.stderr.strip() == "No models found."


def test_through_the_registry_service(server, direct, tmp_path, etcd_server, etcd_prefix):
    documents = [
        {"kind": "Runtime", "spec": {"name": "torch", "kind": "pytorch", "model_formats": ["torchscript"]}},
        {"kind": "Model", "spec": {"name": "resnet", "versions": [
            {"version": "1", "uri": "/m/1", "format": "torchscript", "runtime": "torch"}]}},
    ]
    applied = modelgw("apply", "-f", "-", *server, stdin=json.dumps(documents))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["runtime/torch created", "model/resnet created"]

    # the same records are visible directly in etcd
    assert "resnet" in modelgw("get", "models", *direct).stdout

    # get, edit, apply: optimistic concurrency through the file's revision
    saved = tmp_path / "resnet.yaml"
    saved.write_text(modelgw("get", "model", "resnet", "-o", "yaml", *server).stdout)
    edited = yaml.safe_load(saved.read_text())
    edited["spec"]["description"] = "edited"
    saved.write_text(yaml.safe_dump(edited))
    meanwhile = dict(edited, spec=dict(edited["spec"], description="someone else"))
    assert modelgw("apply", "-f", "-", *server, stdin=yaml.safe_dump(meanwhile)).returncode == 0
    stale = modelgw("apply", "-f", str(saved), *server)
    assert_one_line_error(stale, str(saved), "models/resnet was changed by someone else")
    description = yaml.safe_load(modelgw("get", "model", "resnet", "-o", "yaml", *server).stdout)["spec"]["description"]
    assert description == "someone else"

    async def register_endpoint():
        async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
            lease = await store.grant_lease(ttl=30, keep_alive=False)
            endpoint = rpb.Endpoint(
                runtime="torch",
                instance="torch-0",
                address="127.0.0.1:9100",
                ready=True,
                models=[rpb.LoadedModel(name="resnet", version="1", state=rpb.LoadedModel.READY)],
            )
            await store.put_endpoint(endpoint, lease)
            return lease.id

    lease_id = asyncio.run(register_endpoint())
    endpoints = modelgw("get", "endpoints", *server)
    assert endpoints.stdout.splitlines()[1].split() == ["torch", "torch-0", "127.0.0.1:9100", "true", "resnet:1:READY", "-"]
    only_onnx = modelgw("get", "endpoints", "onnx", *server)
    assert only_onnx.returncode == 0 and only_onnx.stderr.strip() == "No endpoints found."

    deleted = modelgw("delete", "model", "resnet", *server)
    assert deleted.returncode == 0, deleted.stderr
    missing = modelgw("get", "model", "resnet", *server)
    assert_one_line_error(missing, "models/resnet does not exist")

    async def revoke():
        async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
            await store.revoke_lease(lease_id)

    asyncio.run(revoke())


def test_apply_reports_each_bad_document_and_applies_the_rest(direct):
    text = FILE + """\
---
kind: Model
spec:
  name: broken
  versions: [{version: 1, uri: "s3://bucket/x", format: torchscript, runtime: torch}]
"""
    result = modelgw("apply", "-f", "-", *direct, stdin=text)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["runtime/torch created", "model/resnet created"]
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]  # /models/... is not here
    assert errors == [
        "error: stdin#3: models/broken: versions[0].uri: scheme 's3' is not supported "
        "(use an absolute local path, file:///path or pvc://CLAIM/PATH)"
    ]


@pytest.mark.parametrize(
    ("args", "stdin", "fragments"),
    [
        (["apply", "-f", "/nonexistent.yaml"], None, ["cannot read /nonexistent.yaml"]),
        (["apply", "-f", "-"], "kind: Model\nspec: [", ["stdin: invalid YAML at line"]),
        (["apply", "-f", "-"], "kind: Model\nspec: {name: m, versions: [], bogus: 1}", ["models/m: bogus: unknown field"]),
        (["get", "runtime", "Bad_Name"], None, ["runtimes/Bad_Name: name:", "not a DNS label"]),
        (["delete", "model", "nope"], None, ["models/nope does not exist"]),
    ],
)
def test_errors_are_one_line(direct, args, stdin, fragments):
    assert_one_line_error(modelgw(*args, *direct, stdin=stdin), *fragments)


def test_unreachable_registry_is_one_line():
    assert_one_line_error(
        modelgw("get", "models", "--server", "127.0.0.1:1", "--timeout", "3"),
        "registry service at 127.0.0.1:1 is unreachable",
    )
    assert_one_line_error(
        modelgw("get", "models", "--etcd", "127.0.0.1:1", "--timeout", "3"), "etcd at 127.0.0.1:1 is unreachable"
    )


def test_apply_a_directory(direct, tmp_path):
    model_doc, runtime_doc = FILE.split("---\n")
    (tmp_path / "a-model.yaml").write_text(model_doc)
    (tmp_path / "b-runtime.yml").write_text(runtime_doc)
    (tmp_path / "notes.txt").write_text("not a registry file")
    applied = modelgw("apply", "-f", str(tmp_path), *direct)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["runtime/torch created", "model/resnet created"]


STATE_FILE = """\
kind: Runtime
spec: {{name: py, kind: python, model_formats: [python], replicas: 2}}
---
kind: Model
spec:
  name: good
  versions: [{{version: 1, uri: "modelgw.runtimes.examples.scale:Scale", format: python, runtime: py}}]
---
kind: Model
spec:
  name: broken
  versions: [{{version: 1, uri: "file://{missing}:Model", format: python, runtime: py}}]
---
kind: Model
spec:
  name: local
  versions: [{{version: 1, uri: "{present}:Scale", format: python, runtime: py}}]
"""


def model_states(direct: list[str]) -> dict[str, str]:
    """{model: its STATE cell} from `modelgw get models`."""
    result = modelgw("get", "models", *direct)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    state_at = header.index("STATE")
    return {row.split()[0]: row[state_at:] for row in rows}


def test_get_models_shows_each_versions_state_from_the_endpoints(direct, tmp_path, etcd_server, etcd_prefix):
    from gateway_helpers import Fleet, wait_until

    missing = tmp_path / "nowhere" / "models.py"
    present = tmp_path / "models.py"
    present.write_text("from modelgw.runtimes.examples.scale import Scale\n")
    applied = modelgw("apply", "-f", "-", *direct, stdin=STATE_FILE.format(missing=missing, present=present))
    # a local path that does not exist here is applied (the runtime's machine may have
    # it), with a warning naming the record, the field and the path
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["runtime/py created", "model/good created", "model/broken created",
                                           "model/local created"]
    assert applied.stderr.splitlines() == [
        f"warning: stdin#3: models/broken: versions[0].uri: {missing} does not exist on this machine "
        "(applied: it may exist where the runtime runs)"
    ]
    # no replica yet: said so, instead of nothing
    assert model_states(direct)["good"] == "PENDING: runtime py has no replicas registered"

    fleet = Fleet(etcd_server.endpoint, etcd_prefix, tmp_path)
    try:
        fleet.replica("py", "python")
        fleet.replica("py", "python")

        def settled() -> dict[str, str] | None:
            states = model_states(direct)
            return states if states["good"] == "READY 2/2" and states["broken"].startswith("FAILED") else None

        states = wait_until(settled, 90, "good READY 2/2 and broken FAILED in `get models`", interval=0.5)
        assert states["broken"].startswith("FAILED 0/2: "), states
        assert f"'{missing}': no such python file" in states["broken"], states
        assert states["local"] == "READY 2/2"
    finally:
        fleet.close()
