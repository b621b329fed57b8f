"""Kind `external` from record to running shape, without a third-party server: the
registry's checks, the local backend's replica command, the Kubernetes pod (the adapter
as a sidecar, as `--dry-run` prints it, valid under kubernetes-validate --strict), and
`modelgw runtime attach` refusing bad flags."""

from __future__ import annotations

import subprocess

import kubernetes_validate
import pytest
import yaml
from conftest import REPO, modelgw_command
from test_kube_dry_run import KUBERNETES_VERSION, by_kind_and_name, dry_run, register

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.kube_objects import ATTACH_CONTAINER_NAME, KubeSettings, default_runtime_images, runtime_objects
from modelgw.reconciler.local import LocalBackend
from modelgw.registry.errors import ValidationError
from modelgw.registry.store import RegistryStore
from modelgw.registry.validation import runtime_problems

TRITON = {"name": "triton", "kind": "external", "model_formats": ["onnx"], "replicas": 2,
          "image": "nvcr.io/nvidia/tritonserver:24.10-py3",
          "command": ["tritonserver", "--model-repository=/mnt/models/repo", "--model-control-mode=explicit",
                      "--grpc-port={port}"],
          "options": {"port": "8001"}}
RESNET = {"name": "resnet", "versions": [{"version": "1", "uri": "pvc://repo/resnet", "format": "onnx",
                                          "runtime": "triton"}]}


def external(**fields) -> rpb.RuntimeSpec:
    spec = rpb.RuntimeSpec(name="ext", kind="external", model_formats=["onnx"], replicas=1,
                           command=["server", "--port", "{port}"], options={"port": "8001"})
    for key, value in fields.items():
        if key == "options":
            spec.options.clear()
            spec.options.update(value)
        elif key == "command":
            spec.command[:] = value
        else:
            setattr(spec, key, value)
    return spec


def test_the_registry_checks_an_external_runtime() -> None:
    assert runtime_problems(external()) == []
    assert runtime_problems(external(command=[], image="triton:1")) == []
    assert runtime_problems(external(command=[], replicas=0)) == []  # attached by hand
    (missing,) = runtime_problems(external(options={}))
    assert "options['port']" in missing and "required for kind 'external'" in missing, missing
    (bad,) = runtime_problems(external(options={"port": "80o1"}))
    assert "'80o1' is not a port" in bad, bad
    (nothing,) = runtime_problems(external(command=[]))
    assert nothing.startswith("runtimes/ext: command:") and "image" in nothing, nothing


async def test_the_store_refuses_an_external_runtime_without_a_port(etcd_server, etcd_prefix: str) -> None:
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        with pytest.raises(ValidationError) as refused:
            await store.apply_runtime(external(options={}))
        assert "options['port']" in str(refused.value)
        await store.apply_runtime(external())


def test_the_local_backend_runs_the_server_under_the_adapter(tmp_path) -> None:
    backend = LocalBackend("127.0.0.1:2379", "/p/", log_dir=tmp_path, lease_ttl=7)
    argv = backend.argv(external(), "ext-0-abc", 41234)
    attach = argv[argv.index("attach"):]
    split = attach.index("--")
    flags, server = attach[:split], attach[split + 1:]
    assert server == ["server", "--port", "41234"]
    assert flags[flags.index("--target") + 1] == "127.0.0.1:41234"
    assert flags[flags.index("--instance") + 1] == "ext-0-abc"
    assert flags[flags.index("--runtime") + 1] == "ext"
    assert flags[flags.index("--lease-ttl") + 1] == "7"
    # a command that does not take {port}: the server listens on options.port
    fixed = backend.argv(external(command=["server"]), "ext-0-abc", 41234)
    assert fixed[fixed.index("--target") + 1] == "127.0.0.1:8001" and fixed[-1] == "server"


def test_the_pod_runs_the_server_and_the_adapter_side_by_side() -> None:
    spec = external(image="registry.example.com/triton:1", command=["tritonserver", "--grpc-port={port}"])
    settings = KubeSettings("serving", "etcd.serving.svc:2379", "/modelgw/v1/", default_runtime_images())
    deployment = runtime_objects(spec, [], settings)[0]
    server, adapter = deployment["spec"]["template"]["spec"]["containers"]
    assert server["image"] == "registry.example.com/triton:1"
    assert server["command"] == ["tritonserver", "--grpc-port=8001"]
    assert server["ports"] == [{"name": "grpc", "containerPort": 8001, "protocol": "TCP"}]
    assert "grpc" not in server["readinessProbe"] and server["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert adapter["name"] == ATTACH_CONTAINER_NAME and adapter["image"].startswith("modelgw-runtime:")
    command = adapter["command"]
    assert command[:3] == ["modelgw", "runtime", "attach"]
    assert command[command.index("--target") + 1] == "127.0.0.1:8001"
    assert command[command.index("--etcd") + 1] == "etcd.serving.svc:2379"
    assert {e["name"] for e in adapter["env"]} >= {"POD_NAME", "POD_IP"}  # registers POD_IP:8001 as POD_NAME
    # without a command the image's own entrypoint runs
    plain = runtime_objects(external(image="registry.example.com/kserve:1", command=[]), [], settings)[0]
    assert "command" not in plain["spec"]["template"]["spec"]["containers"][0]


def test_an_external_runtime_needs_an_image_in_a_cluster() -> None:
    settings = KubeSettings("serving", "etcd:2379", "/modelgw/v1/", default_runtime_images())
    with pytest.raises(ValueError, match=r"runtimes/ext: image: required for kind 'external'"):
        runtime_objects(external(), [], settings)


async def test_dry_run_shows_the_sidecar_and_passes_strict_validation(etcd_server, etcd_prefix: str) -> None:
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await register(store, [TRITON], [RESNET])
    result = dry_run(etcd_server.endpoint, etcd_prefix, "--pod-etcd", "etcd.serving.svc:2379")
    assert result.returncode == 0, result.stderr
    assert "&id" not in result.stdout, "shared dicts printed as YAML anchors"
    documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    for document in documents:
        assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == "1.30"
    pod = by_kind_and_name(documents)["Deployment", "runtime-triton"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["runtime", ATTACH_CONTAINER_NAME]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/mnt/models/repo"]
    assert mount["readOnly"] is True  # the model repository on its claim, in the server's container


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target", "localhost", "--runtime", "r", "--etcd", "e:1"], "'localhost' is not HOST:PORT"),
        (["--target", "h:1", "--runtime", "Bad_Name", "--etcd", "e:1"], "'Bad_Name' is not a runtime name"),
        (["--target", "h:1", "--runtime", "r", "--etcd", "e:1", "--failures", "0"], "'0' is not a whole number"),
        (["--target", "h:1", "--runtime", "r"], "the following arguments are required: --etcd"),
    ],
)
def test_attach_refuses_bad_flags(flags: list[str], message: str) -> None:
    result = subprocess.run(modelgw_command("runtime", "attach", *flags), capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_attach_says_why_a_server_command_cannot_start() -> None:
    result = subprocess.run(
        modelgw_command("runtime", "attach", "--target", "127.0.0.1:1", "--runtime", "r", "--etcd", "127.0.0.1:1",
                        "--", "/nonexistent/server"),
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 1
    assert "error: the server command '/nonexistent/server' is not found" in result.stderr, result.stderr
