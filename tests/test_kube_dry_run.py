"""`modelgw reconcile --backend kubernetes --dry-run` as a real process against a real
etcd: it prints, as multi-document YAML, the objects of every registered runtime, each of
which passes kubernetes-validate --strict for Kubernetes 1.30 (the API's own OpenAPI
schemas, offline: no cluster can be had here); a GPU runtime's pod limits nvidia.com/gpu
and tolerates the GPU taint; a pvc:// model is mounted read-only; a runtime that cannot
work is named on stderr with the reason and the exit status says so; nothing is written.
And the CLI's refusals: --dry-run without --backend kubernetes, no cluster to talk to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from reconciler_helpers import REPO

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry.store import RegistryStore

KUBERNETES_VERSION = "1.30.0"


def dry_run(etcd: str, prefix: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelgw", "reconcile", "--backend", "kubernetes", "--dry-run",
         "--etcd", etcd, "--prefix", prefix, "--namespace", "serving", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )


def validate_with_cli(cli: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(cli), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True, timeout=120)


async def register(store: RegistryStore, runtimes: list[dict], models: list[dict]) -> None:
    for spec in runtimes:
        await store.apply_runtime(codec.from_dict(spec, rpb.RuntimeSpec, "test"))
    for spec in models:
        await store.apply_model(codec.from_dict(spec, rpb.ModelSpec, "test"))


CPU = {"name": "vision", "kind": "onnx", "model_formats": ["onnx"], "replicas": 1,
       "resources": {"cpu": "2", "memory": "4Gi"}}
GPU = {"name": "chat", "kind": "llm", "model_formats": ["llama"], "replicas": 2,
       "image": "registry.example.com/ml/modelgw-runtime-llm:0.1.0",
       "resources": {"cpu": "8", "memory": "64Gi", "gpu": 1},
       "node_selector": {"nvidia.com/gpu.present": "true"}, "env": {"NCCL_DEBUG": "WARN"},
       "options": {"engine": "tensorrt"}}
RESNET = {"name": "resnet", "versions": [{"version": "1", "uri": "pvc://models/resnet/1/model.onnx", "format": "onnx",
                                          "runtime": "vision"}]}
LLAMA = {"name": "llama", "versions": [{"version": "1", "uri": "pvc://llm-weights/llama-3-8b", "format": "llama",
                                        "runtime": "chat"}]}


def by_kind_and_name(documents: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


async def test_dry_run_prints_valid_objects_for_every_runtime(etcd_server, etcd_prefix: str) -> None:
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await register(store, [CPU, GPU], [RESNET, LLAMA])
        revision_before = (await store.list_runtimes()).revision
        result = dry_run(etcd_server.endpoint, etcd_prefix, "--pod-etcd", "etcd.serving.svc:2379")
        assert result.returncode == 0, result.stderr
        assert "&id" not in result.stdout, "shared dicts printed as YAML anchors"
        documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
        assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [
            ("Deployment", "runtime-chat"), ("Service", "runtime-chat"), ("PodDisruptionBudget", "runtime-chat"),
            ("Deployment", "runtime-vision"), ("Service", "runtime-vision"),
        ]
        for document in documents:
            assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == "1.30"
            assert document["metadata"]["namespace"] == "serving"
        objects = by_kind_and_name(documents)

        chat = objects["Deployment", "runtime-chat"]["spec"]["template"]["spec"]
        (container,) = chat["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in chat["tolerations"]
        assert chat["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert container["image"] == GPU["image"]
        command = container["command"]
        assert command[command.index("--registry") + 1] == "etcd.serving.svc:2379"
        assert command[command.index("--prefix") + 1] == etcd_prefix
        assert command[command.index("--option"):][:2] == ["--option", "engine=tensorrt"]

        vision = objects["Deployment", "runtime-vision"]["spec"]["template"]["spec"]
        (claim,) = [v for v in vision["volumes"] if "persistentVolumeClaim" in v]
        assert claim["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        (mount,) = [m for m in vision["containers"][0]["volumeMounts"] if m["name"] == claim["name"]]
        assert mount == {"name": claim["name"], "mountPath": "/mnt/models/models", "readOnly": True}
        assert "tolerations" not in vision
        assert vision["containers"][0]["image"].startswith("modelgw-runtime:")

        # changes nothing: no status written, no record touched
        assert (await store.list_runtimes()).revision == revision_before


async def test_kubernetes_validate_cli_accepts_the_whole_output(etcd_server, etcd_prefix: str, tmp_path: Path) -> None:
    """The acceptance as an operator runs it: the printed file through the tool's own CLI."""
    cli = Path(sys.executable).parent / "kubernetes-validate"
    if not cli.exists():
        pytest.skip(f"{cli} is not installed (the package is in the dev extra; is this the project's venv?)")
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await register(store, [CPU, GPU], [RESNET, LLAMA])
    result = dry_run(etcd_server.endpoint, etcd_prefix)
    assert result.returncode == 0, result.stderr
    output = tmp_path / "objects.yaml"
    output.write_text(result.stdout)
    checked = validate_with_cli(cli, output)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("INFO") == 5, checked.stdout


async def test_a_runtime_that_cannot_work_is_named_and_the_rest_is_printed(etcd_server, etcd_prefix: str) -> None:
    baked = {"name": "baked", "versions": [{"version": "1", "uri": "file:///models/baked.onnx", "format": "onnx",
                                            "runtime": "vision"}]}
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await register(store, [CPU, GPU], [baked, LLAMA])
    result = dry_run(etcd_server.endpoint, etcd_prefix)
    assert result.returncode == 1, result.stderr
    assert "models/baked" in result.stderr and "pvc://CLAIM/PATH" in result.stderr, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert {d["metadata"]["name"] for d in documents} == {"runtime-chat"}


def test_an_empty_registry_prints_nothing_and_succeeds(etcd_server, etcd_prefix: str) -> None:
    result = dry_run(etcd_server.endpoint, etcd_prefix)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_dry_run_is_for_the_kubernetes_backend() -> None:
    result = subprocess.run([sys.executable, "-m", "modelgw", "reconcile", "--dry-run"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert "--dry-run prints Kubernetes objects: give --backend kubernetes" in result.stderr


def test_no_cluster_to_talk_to_is_one_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    result = subprocess.run(
        [sys.executable, "-m", "modelgw", "reconcile", "--backend", "kubernetes", "--namespace", "serving",
         "--etcd", "127.0.0.1:1", "--pod-etcd", "etcd.serving.svc:2379"],
        capture_output=True, text=True, cwd=REPO, timeout=60, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "modelgw reconcile: error: no Kubernetes API to talk to" in result.stderr
    assert "Traceback" not in result.stderr


NIGHTLY = {"name": "nightly", "model": {"model": "resnet", "gateway": "gateway.serving.svc:8001",
                                        "token_secret": "scoring-token/token"},
           "input_uri": "pvc://tables/in/day.parquet", "output_uri": "pvc://scores/out/day", "backoff_limit": 3,
           "resources": {"cpu": "2", "memory": "4Gi"}}
CLICKS = {"name": "clicks", "replicas": 2, "model": {"model": "resnet", "token_secret": "scoring-token/token"},
          "source": {"broker": "KAFKA", "servers": ["kafka.data.svc:9092"], "topic": "clicks", "group": "scorer"},
          "sink": {"topic": "scores"}, "dead_letter": {"topic": "clicks-dead"}}


async def test_dry_run_prints_a_job_and_a_deployment_for_jobs_and_streams(etcd_server, etcd_prefix: str,
                                                                          tmp_path: Path) -> None:
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await register(store, [CPU], [RESNET])
        await store.apply_job(codec.from_dict(NIGHTLY, rpb.JobSpec, "test"))
        await store.apply_stream(codec.from_dict(CLICKS, rpb.StreamSpec, "test"))
        # a finished job is left alone by the backend: nothing of it is printed
        done = codec.from_dict({**NIGHTLY, "name": "yesterday"}, rpb.JobSpec, "test")
        await store.apply_job(done)
        await store.update_job_status("yesterday", lambda s: setattr(s, "phase", rpb.JobStatus.SUCCEEDED))
        revision_before = (await store.list_jobs()).revision
        result = dry_run(etcd_server.endpoint, etcd_prefix, "--pod-etcd", "etcd.serving.svc:2379")
        assert result.returncode == 0, result.stderr
        documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
        assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [
            ("Deployment", "runtime-vision"), ("Service", "runtime-vision"),
            ("Job", "job-nightly"), ("Deployment", "stream-clicks"),
        ]
        for document in documents:
            assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == "1.30"
        objects = by_kind_and_name(documents)
        nightly = objects["Job", "job-nightly"]
        assert nightly["spec"]["backoffLimit"] == 3 and nightly["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        command = nightly["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--etcd") + 1] == "etcd.serving.svc:2379"
        assert objects["Deployment", "stream-clicks"]["spec"]["replicas"] == 2
        assert (await store.list_jobs()).revision == revision_before  # nothing written

        # the operator's check: the whole output through kubernetes-validate's own CLI
        cli = Path(sys.executable).parent / "kubernetes-validate"
        if cli.exists():
            output = tmp_path / "objects.yaml"
            output.write_text(result.stdout)
            checked = validate_with_cli(cli, output)
            assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_job_that_cannot_run_in_a_pod_is_named(etcd_server, etcd_prefix: str) -> None:
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await register(store, [CPU], [RESNET])
        await store.apply_job(codec.from_dict({**NIGHTLY, "output_uri": "/data/out"}, rpb.JobSpec, "test"))
        await store.apply_stream(codec.from_dict(CLICKS, rpb.StreamSpec, "test"))
    result = dry_run(etcd_server.endpoint, etcd_prefix)
    assert result.returncode == 1, result.stderr
    assert "jobs/nightly cannot run" in result.stderr and "output_uri" in result.stderr, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert {d["metadata"]["name"] for d in documents} == {"runtime-vision", "stream-clicks"}
