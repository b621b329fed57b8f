"""Jobs and streams on the kubernetes backend (issue 13): the objects as data (a job's
batch/v1 Job: backoffLimit, TTL, restartPolicy Never, resources, the token Secret mounted
as the file MODELGW_TOKEN_FILE names, pvc:// input read-only and output read-write; a
stream's Deployment with its replicas and no Service), each valid against Kubernetes
1.30's own schemas (kubernetes-validate --strict, offline); what cannot work in a pod
refused with a message; and the backend against kmock's emulator (see test_kube_backend
for what it lacks): the Job created, its phase read back from its status conditions, a
changed job's Job replaced, a stream's Deployment applied and scaled, and neither ever
taken for a runtime's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import kmock
import kubernetes_validate
import pytest
from kubernetes import client as k8s
from reconciler_helpers import until
from test_kube_backend import DEPLOYMENTS, JOBS, NAMESPACE, PODS, SERVICES, Emulator, run_reconciler, stop, stored

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import job_hash, spec_hash
from modelgw.reconciler.kube_objects import (
    SPEC_HASH_ANNOTATION,
    TOKEN_FILE,
    KubeSettings,
    default_runtime_images,
    job_object,
    pipeline_problems,
    stream_object,
)
from modelgw.reconciler.kubernetes import KubernetesBackend
from modelgw.registry import codec
from modelgw.registry.store import RegistryStore

KUBERNETES_VERSION = "1.30.0"
SETTINGS = KubeSettings(namespace=NAMESPACE, etcd_endpoints="etcd.modelgw.svc:2379", registry_prefix="/modelgw/v1/",
                        default_images=default_runtime_images("registry.example.com/ml", "0.1.0"))


def job(**fields) -> rpb.JobSpec:
    base = {"name": "nightly", "model": {"model": "resnet", "gateway": "gateway.modelgw.svc:8001",
                                         "token_secret": "scoring-token/token"},
            "input_uri": "pvc://tables/in/day.parquet", "output_uri": "pvc://scores/out/day",
            "resources": {"cpu": "2", "memory": "4Gi"}, "env": {"OMP_NUM_THREADS": "2"}}
    return codec.from_dict({**base, **fields}, rpb.JobSpec, "test")


def stream(**fields) -> rpb.StreamSpec:
    base = {"name": "clicks", "replicas": 3,
            "source": {"broker": "KAFKA", "servers": ["kafka:9092"], "topic": "clicks", "group": "scorer"},
            "sink": {"topic": "scores"}, "model": {"model": "resnet", "token_secret": "scoring-token/token"},
            "resources": {"cpu": "1", "memory": "1Gi", "gpu": 1}}
    return codec.from_dict({**base, **fields}, rpb.StreamSpec, "test")


def pod_of(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def test_a_job_is_a_batch_job_that_passes_strict_validation() -> None:
    spec = job(backoff_limit=2, ttl_seconds_after_finished=600)
    obj = job_object(spec, [], SETTINGS, job_hash(spec, 10), attempts_before=3)
    assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == "1.30"
    assert (obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]) == ("Job", "job-nightly", NAMESPACE)
    assert obj["metadata"]["labels"] == {
        "app.kubernetes.io/name": "modelgw-job", "app.kubernetes.io/instance": "nightly",
        "app.kubernetes.io/component": "job", "app.kubernetes.io/managed-by": "modelgw",
    }
    assert obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == job_hash(spec, 10)
    assert (obj["spec"]["backoffLimit"], obj["spec"]["ttlSecondsAfterFinished"]) == (2, 600)
    pod = pod_of(obj)
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["modelgw", "job", "run", "--name", "nightly", "--etcd", "etcd.modelgw.svc:2379",
                                    "--prefix", "/modelgw/v1/"]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert container["image"] == "registry.example.com/ml/modelgw-runtime:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODELGW_TOKEN_FILE"] == TOKEN_FILE and env["OMP_NUM_THREADS"] == "2"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["token"]["secret"] == {"secretName": "scoring-token", "items": [{"key": "token", "path": "token"}],
                                          "defaultMode": 0o440}
    assert f"{mounts['token']['mountPath']}/token" == TOKEN_FILE and mounts["token"]["readOnly"]
    assert volumes["pvc-tables"]["persistentVolumeClaim"] == {"claimName": "tables", "readOnly": True}
    assert volumes["pvc-scores"]["persistentVolumeClaim"] == {"claimName": "scores", "readOnly": False}
    assert (mounts["pvc-tables"]["mountPath"], mounts["pvc-scores"]["mountPath"]) == ("/mnt/models/tables",
                                                                                      "/mnt/models/scores")
    assert "tolerations" not in pod


def test_defaults_and_a_claim_read_and_written_is_mounted_once_read_write() -> None:
    spec = job(input_uri="pvc://work/in.jsonl", output_uri="pvc://work/out", model={"model": "m"})
    obj = job_object(spec, [], SETTINGS, "h")
    assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == "1.30"
    assert (obj["spec"]["backoffLimit"], obj["spec"]["ttlSecondsAfterFinished"]) == (6, 3600)
    claims = [v["persistentVolumeClaim"] for v in pod_of(obj)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "work", "readOnly": False}]
    assert "token" not in {v["name"] for v in pod_of(obj)["volumes"]}
    # the job process's "failed for good" exit is not retried; an evicted pod is not a failure
    rules = obj["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "job", "operator": "In", "values": [1]}}


def test_an_in_process_job_mounts_its_model_versions() -> None:
    spec = job(model={"model": "resnet", "version": "2", "mode": "IN_PROCESS"})
    model = codec.from_dict({"name": "resnet", "versions": [
        {"version": "1", "uri": "pvc://weights/resnet/1", "format": "onnx", "runtime": "vision"},
        {"version": "2", "uri": "pvc://weights2/resnet/2", "format": "onnx", "runtime": "vision"}]},
        rpb.ModelSpec, "test")
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod_of(job_object(spec, [model], SETTINGS, "h"))["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"tables": True, "scores": False, "weights2": True}  # only the version it calls
    # a model read from the claim the output is written to: that claim stays read-write
    model.versions[1].uri = "pvc://scores/models/resnet/2"
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod_of(job_object(spec, [model], SETTINGS, "h"))["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"tables": True, "scores": False}


def test_a_stream_is_a_deployment_of_consumers_that_passes_strict_validation() -> None:
    spec = stream()
    obj = stream_object(spec, [], SETTINGS)
    assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == "1.30"
    assert (obj["kind"], obj["metadata"]["name"]) == ("Deployment", "stream-clicks")
    assert obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(spec)
    assert obj["spec"]["replicas"] == 3
    assert obj["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert obj["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "modelgw-stream",
                                                      "app.kubernetes.io/instance": "clicks"}
    pod = pod_of(obj)
    (container,) = pod["containers"]
    assert container["command"] == ["modelgw", "stream", "run", "--name", "clicks", "--etcd", "etcd.modelgw.svc:2379",
                                    "--prefix", "/modelgw/v1/", "--metrics-port", "9090"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # lag and throughput are scraped from the consumer's /metrics; a rollout waits for /healthz
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert "livenessProbe" not in container  # a Kafka group join may take long: never killed for it
    assert stream_object(stream(replicas=0), [], SETTINGS)["spec"]["replicas"] == 1  # 0: one


def test_what_cannot_work_in_a_pod_is_refused_with_a_message() -> None:
    problems = pipeline_problems(job(output_uri="/data/out", input_uri="file:///data/in.parquet"), [], SETTINGS)
    assert any("output_uri" in p and "lost when it ends" in p for p in problems), problems
    assert any("input_uri" in p and "pvc://CLAIM/PATH" in p for p in problems), problems
    assert pipeline_problems(job(input_uri="file:///data/in.parquet", image="example.com/with-data:1"), [], SETTINGS) == []
    (long_name,) = pipeline_problems(stream(name="s" * 60), [], SETTINGS)
    assert long_name.startswith("streams/" + "s" * 60 + ": name: 60 characters") and "at most 56" in long_name
    with pytest.raises(ValueError, match="output_uri"):
        job_object(job(output_uri="/data/out"), [], SETTINGS, "h")
    bare = KubeSettings(namespace=NAMESPACE, etcd_endpoints="e:2379", registry_prefix="/p/", default_images={})
    assert pipeline_problems(stream(), [], bare) == ["streams/clicks: image: required (no default image for jobs "
                                                     "and streams here)"]


# ---------------------------------------------------------------- the backend against the emulator


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[Emulator, k8s.ApiClient]]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        for resource in (DEPLOYMENTS, SERVICES, PODS, JOBS):
            emulator.resources[resource] = {}
        api = k8s.ApiClient(k8s.Configuration(host=str(server.url).rstrip("/")))
        try:
            yield emulator, api
        finally:
            api.close()


def backend_of(api: k8s.ApiClient) -> KubernetesBackend:
    return KubernetesBackend(SETTINGS, api, watch_seconds=30)


async def set_job_status(api: k8s.ApiClient, name: str, status: dict) -> None:
    """What the Job controller would write (the emulator has none)."""
    await asyncio.to_thread(k8s.BatchV1Api(api).patch_namespaced_job, name, NAMESPACE, {"status": status})


async def test_a_job_becomes_a_job_whose_status_is_read_back(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    spec = job(backoff_limit=2)
    wanted = job_hash(spec, 10)
    await backend.ensure_job(spec, wanted, 1, [])
    created = stored(emu, JOBS, "job-nightly")
    assert created is not None and created["spec"]["backoffLimit"] == 2
    assert created["metadata"]["annotations"]["modelgw.io/attempts-before"] == "1"
    assert [r for r in emu if r.method == "PATCH"]  # server-side apply first, as for runtimes

    await set_job_status(api, "job-nightly", {"active": 1, "failed": 1})
    (workload,) = (await backend.observe_jobs()).values()
    assert (workload.job, workload.spec_hash, workload.attempts, workload.active, workload.outcome) == (
        "nightly", wanted, 3, True, 0)  # 1 counted before + this Job's 2 pods
    assert "1 pod(s) failed so far (backoffLimit 2)" in workload.message

    # a pod that cannot start: its reason reaches the workload (and the status message)
    labels = created["spec"]["template"]["metadata"]["labels"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job-nightly-x1", "namespace": NAMESPACE,
                                                          "labels": labels},
           "spec": {"containers": [{"name": "job", "image": "nope:1"}]},
           "status": {"phase": "Pending", "containerStatuses": [{
               "name": "job", "image": "nope:1", "imageID": "", "ready": False, "restartCount": 0,
               "state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}}}]}}
    await asyncio.to_thread(k8s.CoreV1Api(api).create_namespaced_pod, NAMESPACE, pod)
    (problem,) = (await backend.observe_jobs())["nightly"].problems
    assert "job-nightly-x1" in problem and "cannot be pulled (ImagePullBackOff): manifest unknown" in problem

    await set_job_status(api, "job-nightly", {"active": 0, "failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]})
    workload = (await backend.observe_jobs())["nightly"]
    assert (workload.outcome, workload.active, workload.attempts) == (rpb.JobStatus.FAILED, False, 4)
    assert workload.problems == []  # it ended: its pods' troubles are history
    assert workload.message == "Job job-nightly: BackoffLimitExceeded: Job has reached the specified backoff limit"

    await set_job_status(api, "job-nightly", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    assert (await backend.observe_jobs())["nightly"].outcome == rpb.JobStatus.SUCCEEDED
    assert await backend.observe() == {} and await backend.observe_streams() == {}  # not a runtime, not a stream

    await backend.remove_job("nightly")
    assert stored(emu, JOBS, "job-nightly") is None
    assert await backend.observe_jobs() == {}
    await backend.remove_job("nightly")  # removing what is gone is no error


async def test_a_changed_job_is_a_new_job_object(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    spec = job()
    await backend.ensure_job(spec, job_hash(spec, 10), 0, [])
    first = stored(emu, JOBS, "job-nightly")["metadata"]["uid"]
    await backend.ensure_job(spec, job_hash(spec, 10), 0, [])  # the same: left as it is
    assert stored(emu, JOBS, "job-nightly")["metadata"]["uid"] == first
    changed = job(batch_size=64)
    await backend.ensure_job(changed, job_hash(changed, 10), 2, [])
    replaced = stored(emu, JOBS, "job-nightly")
    assert replaced["metadata"]["uid"] != first  # deleted and created: a Job's pod template is immutable
    assert replaced["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == job_hash(changed, 10)


async def test_a_job_that_cannot_work_is_refused_until_its_spec_changes(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    bad = job(output_uri="/data/out")
    await backend.ensure_job(bad, "h1", 0, [])
    assert stored(emu, JOBS, "job-nightly") is None
    workload = (await backend.observe_jobs())["nightly"]
    assert workload.spec_hash == "h1" and "output_uri" in workload.problems[0]
    await backend.ensure_job(job(), "h2", 0, [])
    assert stored(emu, JOBS, "job-nightly") is not None
    assert (await backend.observe_jobs())["nightly"].problems == []


async def test_a_stream_is_a_deployment_without_a_service(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    spec = stream()
    await backend.ensure_stream(spec, spec_hash(spec), [])
    deployment = stored(emu, DEPLOYMENTS, "stream-clicks")
    assert deployment is not None and deployment["spec"]["replicas"] == 3
    assert stored(emu, SERVICES, "stream-clicks") is None
    assert await backend.observe() == {}  # the runtimes' reads never see it (nor remove it as an orphan)
    workload = (await backend.observe_streams())["clicks"]
    assert (workload.spec_hash, workload.replicas, workload.instances) == (spec_hash(spec), 3, frozenset())

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name, phase in (("stream-clicks-a", "Running"), ("stream-clicks-b", "Pending")):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
               "spec": {"containers": [{"name": "stream", "image": "x"}]}, "status": {"phase": phase}}
        await asyncio.to_thread(k8s.CoreV1Api(api).create_namespaced_pod, NAMESPACE, pod)
    workload = (await backend.observe_streams())["clicks"]
    assert (workload.instances, workload.running) == (frozenset({"stream-clicks-a"}), 1)

    spec.replicas = 1
    await backend.ensure_stream(spec, spec_hash(spec), [])
    assert stored(emu, DEPLOYMENTS, "stream-clicks")["spec"]["replicas"] == 1
    await backend.remove_stream("clicks")
    assert stored(emu, DEPLOYMENTS, "stream-clicks") is None
    assert await backend.observe_streams() == {}


async def test_the_reconciler_runs_jobs_and_streams_as_jobs_and_deployments(emulator, etcd_server, etcd_prefix) -> None:
    """The real core on a real etcd with this backend: a job's Job is created, its phase
    read back into the JobStatus when the Job controller (here: the test) says it failed,
    and then left alone; a stream's Deployment follows the record, and goes with it."""
    emu, api = emulator
    backend = backend_of(api)
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name="vision", kind="onnx", model_formats=["onnx"], replicas=0))
        await store.apply_model(codec.from_dict({"name": "resnet", "versions": [
            {"version": "1", "uri": "pvc://weights/resnet/1", "format": "onnx", "runtime": "vision"}]},
            rpb.ModelSpec, "test"))
        await store.apply_job(job(backoff_limit=1))
        await store.apply_stream(stream(replicas=2))
        task = await run_reconciler(store, backend, resync=0.5)
        try:
            await until(lambda: stored(emu, JOBS, "job-nightly") is not None, "the Job created")
            await until(lambda: stored(emu, DEPLOYMENTS, "stream-clicks") is not None, "the stream's Deployment")

            async def phase_is(phase: int) -> rpb.JobStatus | None:
                status = (await store.get_job("nightly")).status
                return status if status.phase == phase else None

            pending = await until(lambda: phase_is(rpb.JobStatus.PENDING), "the job pending")
            assert (pending.backend, pending.attempts) == ("kubernetes", 0)
            await set_job_status(api, "job-nightly", {"failed": 2, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}]})
            failed = await until(lambda: phase_is(rpb.JobStatus.FAILED), "the job failed, as its Job says")
            assert failed.attempts == 2 and "BackoffLimitExceeded" in failed.message
            assert failed.HasField("finished_at")
            uid = stored(emu, JOBS, "job-nightly")["metadata"]["uid"]

            # finished is final: a changed spec is not run again, its Job is left for its TTL
            changed = job(backoff_limit=1, batch_size=99)
            await store.apply_job(changed)
            scaled = stream(replicas=4)
            await store.apply_stream(scaled)
            await until(lambda: stored(emu, DEPLOYMENTS, "stream-clicks")["spec"]["replicas"] == 4, "scaled to 4")
            assert stored(emu, JOBS, "job-nightly")["metadata"]["uid"] == uid
            assert (await store.get_job("nightly")).status.phase == rpb.JobStatus.FAILED

            await store.delete_stream("clicks")
            await store.delete_job("nightly")
            await until(lambda: stored(emu, DEPLOYMENTS, "stream-clicks") is None, "the stream's Deployment deleted")
            await until(lambda: stored(emu, JOBS, "job-nightly") is None, "the deleted job's Job deleted")
        finally:
            await stop(task)
