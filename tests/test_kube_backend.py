"""The kubernetes backend against kmock's KubernetesEmulator (an in-memory API server over
real HTTP, spoken to by the official client): create, scale 2 -> 1 -> 3, a rolling spec
change, delete, orphans, the Deployment watch (and its 410 relist), and a crash-looping
pod's reason reaching `modelgw get runtimes`, with the real reconciler core on a real etcd.

What the emulator lacks, and the stand-ins used here:
- no server-side apply (apply to a missing object is a 404): the backend creates on 404
  (see KubernetesBackend._apply_one); nothing stands in for it;
- no uids: Emulator gives each created object one, as an API server does, so that the
  Service and PDB can be owned by their Deployment;
- no kubelet, no controllers, no status: a test puts a pod with the status a kubelet would
  write (CrashLoopBackOff) into the emulator itself;
- no resourceVersions, so no real 410: Emulator ends one watch with a 410 ERROR event;
- no label selectors: the backend filters by label itself; no garbage collection: the
  backend deletes the Service and PDB itself.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import kmock
import pytest
import yaml
from kubernetes import client as k8s
from reconciler_helpers import REPO, Processes, until

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.core import Reconciler
from modelgw.reconciler.kube_objects import SPEC_HASH_ANNOTATION, KubeSettings, default_runtime_images
from modelgw.reconciler.kubernetes import KubernetesBackend
from modelgw.registry.store import RegistryStore

NAMESPACE = "models"
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PDBS = kmock.resource("policy", "v1", "poddisruptionbudgets")
PODS = kmock.resource("", "v1", "pods")
JOBS = kmock.resource("batch", "v1", "jobs")  # the core's passes read jobs too (test_kube_jobs_streams)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """The emulator with two stand-ins: uids on create; and one watch ended by 410 Gone."""

    expire_next_watch: bool = False
    # object name -> the message of a 403 its writes get (as from an RBAC rule)
    forbidden: dict[str, str] = attrs.field(factory=dict)

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data if isinstance(request.data, dict) else {}
        name = request.name or data.get("metadata", {}).get("name")
        if request.method in ("PATCH", "POST") and name in self.forbidden:
            raise kmock.KubernetesError(status=403, reason="Forbidden", message=self.forbidden[name])
        if request.action == kmock.action.CREATE and data:
            data.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
        return await super()._handle(request)

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        if self.expire_next_watch:
            self.expire_next_watch = False
            yield b""
            gone = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410, "reason": "Expired",
                    "message": "too old resource version"}
            yield {"type": "ERROR", "object": gone}
            return
        async for event in super()._serve_watch(request):
            yield event


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[Emulator, k8s.ApiClient]]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        for resource in (DEPLOYMENTS, SERVICES, PDBS, PODS, JOBS):
            emulator.resources[resource] = {}
        api = k8s.ApiClient(k8s.Configuration(host=str(server.url).rstrip("/")))
        try:
            yield emulator, api
        finally:
            api.close()


SETTINGS = KubeSettings(namespace=NAMESPACE, etcd_endpoints="etcd.modelgw.svc:2379", registry_prefix="/modelgw/v1/",
                        default_images=default_runtime_images())


def backend_of(api: k8s.ApiClient) -> KubernetesBackend:
    return KubernetesBackend(SETTINGS, api, watch_seconds=30)


def runtime(name: str = "py", replicas: int = 2) -> rpb.RuntimeSpec:
    return rpb.RuntimeSpec(name=name, kind="python", model_formats=["python"], replicas=replicas)


def stored(emulator: Emulator, resource: kmock.resource, name: str) -> dict | None:
    key = (resource, NAMESPACE, name)
    if key not in emulator.objects or emulator.objects[key].deleted:
        return None
    return emulator.objects[key].raw


async def ensure(backend: KubernetesBackend, spec: rpb.RuntimeSpec) -> str:
    wanted = backend.workload_hash(spec, [])
    await backend.ensure(spec, wanted, [], frozenset())
    return wanted


async def test_create_scale_2_1_3_and_delete(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    spec = runtime(replicas=2)
    wanted = await ensure(backend, spec)

    deployment = stored(emu, DEPLOYMENTS, "runtime-py")
    service = stored(emu, SERVICES, "runtime-py")
    pdb = stored(emu, PDBS, "runtime-py")
    assert deployment is not None and service is not None and pdb is not None
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == wanted
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "modelgw"
    # the Service and the PDB go with their Deployment
    for owned in (service, pdb):
        (owner,) = owned["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Deployment", "runtime-py", deployment["metadata"]["uid"])
    # applied server-side, under our field manager, forcing
    applies = [r for r in emu if r.method == "PATCH"]
    assert applies and all(r.headers["Content-Type"] == "application/apply-patch+yaml" for r in applies)
    assert all(r.params == {"fieldManager": "modelgw-reconciler", "force": "true"} for r in applies)

    observed = await backend.observe()
    assert set(observed) == {"py"}
    assert (observed["py"].spec_hash, observed["py"].replicas, observed["py"].problems) == (wanted, 2, [])

    spec.replicas = 1
    await ensure(backend, spec)
    assert stored(emu, DEPLOYMENTS, "runtime-py")["spec"]["replicas"] == 1
    assert stored(emu, PDBS, "runtime-py") is None  # one replica: no disruption budget
    assert (await backend.observe())["py"].replicas == 1

    spec.replicas = 3
    await ensure(backend, spec)
    assert stored(emu, DEPLOYMENTS, "runtime-py")["spec"]["replicas"] == 3
    assert stored(emu, PDBS, "runtime-py")["spec"]["maxUnavailable"] == 1
    assert (await backend.observe())["py"].replicas == 3

    await backend.remove("py")
    assert [stored(emu, r, "runtime-py") for r in (DEPLOYMENTS, SERVICES, PDBS)] == [None, None, None]
    assert await backend.observe() == {}
    await backend.remove("py")  # removing what is gone is no error


async def test_a_spec_change_rolls_the_deployment(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    spec = runtime(replicas=2)
    first = await ensure(backend, spec)
    before = stored(emu, DEPLOYMENTS, "runtime-py")

    spec.options["factor"] = "5"
    second = await ensure(backend, spec)
    after = stored(emu, DEPLOYMENTS, "runtime-py")
    assert second != first
    assert after["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == second
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # the same Deployment, updated
    # a new pod template is what makes the Deployment controller roll, one pod at a time
    assert after["spec"]["template"] != before["spec"]["template"]
    (container,) = after["spec"]["template"]["spec"]["containers"]
    assert container["command"][-2:] == ["--option", "factor=5"]
    assert after["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert (await backend.observe())["py"].spec_hash == second


async def test_a_model_on_a_new_claim_rolls_pods_that_mount_it(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    spec = runtime()
    before = await ensure(backend, spec)
    model = rpb.ModelSpec(name="llama")
    model.versions.add(version="1", uri="pvc://weights/llama/v1", format="python", runtime="py")
    wanted = backend.workload_hash(spec, [model])
    assert wanted != before  # the pods must change to mount it
    await backend.ensure(spec, wanted, [model], frozenset())
    pod = stored(emu, DEPLOYMENTS, "runtime-py")["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "weights", "readOnly": True}]
    assert (await backend.observe())["py"].spec_hash == wanted
    model.versions.add(version="2", uri="pvc://weights/llama/v2", format="python", runtime="py")
    assert backend.workload_hash(spec, [model]) == wanted  # the same claim: the pods stay


async def test_a_runtime_that_cannot_work_is_refused_with_its_reason(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    spec = runtime()
    model = rpb.ModelSpec(name="m")
    model.versions.add(version="1", uri="file:///models/m.py", format="python", runtime="py")
    wanted = backend.workload_hash(spec, [model])
    assert wanted != backend.workload_hash(spec, [])  # a new problem is a change to act on
    await backend.ensure(spec, wanted, [model], frozenset())
    assert stored(emu, DEPLOYMENTS, "runtime-py") is None
    workload = (await backend.observe())["py"]
    assert workload.spec_hash == wanted  # not retried every pass
    assert any("models/m: version 1" in p and "pvc://" in p for p in workload.problems), workload.problems


async def test_a_rejected_apply_is_a_problem_and_is_tried_again(emulator) -> None:
    emu, api = emulator
    backend = backend_of(api)
    emu.forbidden["runtime-py"] = ('deployments.apps "runtime-py" is forbidden: User "system:serviceaccount:m:r" '
                                   'cannot patch resource "deployments"')
    wanted = await ensure(backend, runtime())  # no exception: other runtimes' passes go on
    workload = (await backend.observe())["py"]
    assert workload.spec_hash != wanted  # so the core applies again on the next pass
    assert workload.problems == [
        "the API server refused runtime py's objects: 403 Forbidden: " + emu.forbidden["runtime-py"]
    ], workload.problems
    del emu.forbidden["runtime-py"]  # the Role is fixed
    await ensure(backend, runtime())
    workload = (await backend.observe())["py"]
    assert (workload.spec_hash, workload.problems) == (wanted, [])
    assert stored(emu, DEPLOYMENTS, "runtime-py") is not None


def crash_looping_pod(runtime_name: str) -> dict:
    """A pod as the kubelet leaves one whose container keeps exiting (the stand-in for a kubelet)."""
    labels = {"app.kubernetes.io/name": "modelgw-runtime", "app.kubernetes.io/instance": runtime_name,
              "app.kubernetes.io/component": "runtime", "app.kubernetes.io/managed-by": "modelgw"}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"runtime-{runtime_name}-7d9f8-abcde", "namespace": NAMESPACE, "labels": labels},
        "spec": {"containers": [{"name": "runtime", "image": "modelgw-runtime:0.1.0"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            "containerStatuses": [{
                "name": "runtime", "image": "modelgw-runtime:0.1.0", "imageID": "", "ready": False,
                "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                                      "message": "back-off 1m20s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 2, "reason": "Error",
                                             "message": "error: unknown runtime kind 'pyhton'"}},
            }],
        },
    }


def unschedulable_pod(runtime_name: str) -> dict:
    pod = crash_looping_pod(runtime_name)
    pod["metadata"]["name"] = f"runtime-{runtime_name}-7d9f8-fghij"
    pod["status"] = {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }]}
    return pod


async def test_pod_problems_reach_the_workload(emulator) -> None:
    _, api = emulator
    backend = backend_of(api)
    await ensure(backend, runtime())
    pull = crash_looping_pod("py")
    pull["metadata"]["name"] = "runtime-py-7d9f8-pull1"
    pull["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "modelgw-runtime:0.1.0"'}
    }
    for pod in (crash_looping_pod("py"), unschedulable_pod("py"), pull):
        await asyncio.to_thread(k8s.CoreV1Api(api).create_namespaced_pod, NAMESPACE, pod)
    problems = (await backend.observe())["py"].problems
    text = "\n".join(problems)
    assert "keeps crashing (4 restarts); last exit code 2: error: unknown runtime kind 'pyhton'" in text, text
    assert "unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in text, text
    assert "image 'modelgw-runtime:0.1.0' cannot be pulled (ImagePullBackOff)" in text, text


async def run_reconciler(store: RegistryStore, backend: KubernetesBackend, resync: float) -> asyncio.Task:
    reconciler = Reconciler(store, backend, f"test-{uuid.uuid4().hex[:6]}", resync_seconds=resync, lease_ttl=3)
    return asyncio.ensure_future(reconciler.run())


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_reconciler_removes_orphans_and_shows_a_crash_loop_in_get_runtimes(
    emulator, etcd_server, etcd_prefix
) -> None:
    emu, api = emulator
    apps = k8s.AppsV1Api(api)
    backend = backend_of(api)
    # a runtime deleted from the registry while no reconciler ran: its Deployment is an orphan
    await ensure(backend, runtime("gone", replicas=2))
    # a Deployment someone else manages in the same namespace is left alone
    foreign = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": NAMESPACE, "labels": {"app.kubernetes.io/name": "web"}},
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}
    await asyncio.to_thread(apps.create_namespaced_deployment, NAMESPACE, foreign)

    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await store.apply_runtime(runtime("crashy", replicas=1))
        task = await run_reconciler(store, backend, resync=0.5)
        try:
            await until(lambda: stored(emu, DEPLOYMENTS, "runtime-crashy") is not None, "runtime-crashy applied")
            await until(lambda: stored(emu, DEPLOYMENTS, "runtime-gone") is None, "the orphan deleted")
            assert stored(emu, SERVICES, "runtime-gone") is None and stored(emu, PDBS, "runtime-gone") is None
            assert stored(emu, DEPLOYMENTS, "web") is not None

            await asyncio.to_thread(k8s.CoreV1Api(api).create_namespaced_pod, NAMESPACE, crash_looping_pod("crashy"))

            async def degraded() -> rpb.RuntimeStatus | None:
                status = await store.get_runtime_status("crashy")
                conditions = {c.type: c for c in status.conditions} if status else {}
                return status if "Degraded" in conditions and conditions["Degraded"].status == "True" else None

            status = await until(degraded, "the crash loop in the runtime's status")
            assert status.backend == "kubernetes"
        finally:
            await stop(task)

    async def get_runtimes(*args: str) -> str:
        shown = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "modelgw", "get", "runtimes", *args,
             "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        return shown.stdout

    reason = "keeps crashing (4 restarts); last exit code 2: error: unknown runtime kind 'pyhton'"
    header, row = (await get_runtimes()).splitlines()
    assert header.split()[-1] == "PROBLEMS" and row.split()[:4] == ["crashy", "python", "1", "0/1"], row
    assert f"pod runtime-crashy-7d9f8-abcde: runtime {reason}" in row, row
    (document,) = list(yaml.safe_load_all(await get_runtimes("crashy", "-o", "yaml")))
    conditions = {c["type"]: c for c in document["status"]["conditions"]}
    assert conditions["Degraded"]["reason"] == "ReplicaFailures"
    assert reason in conditions["Degraded"]["message"], conditions


async def test_the_watch_wakes_the_reconciler_and_relists_after_410(emulator, etcd_server, etcd_prefix, caplog) -> None:
    caplog.set_level(logging.INFO, logger="modelgw.reconciler.kubernetes")
    emu, api = emulator
    apps = k8s.AppsV1Api(api)
    backend = backend_of(api)
    emu.expire_next_watch = True  # the first watch ends with 410 Gone
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await store.apply_runtime(runtime("py", replicas=2))
        # resync so rare that only the watch can explain a pass
        task = await run_reconciler(store, backend, resync=3600)
        try:
            await until(lambda: stored(emu, DEPLOYMENTS, "runtime-py") is not None, "runtime-py applied")

            def deployment_gets(watching: bool) -> int:
                return sum(1 for r in emu if r.method == "GET" and r.resource == DEPLOYMENTS
                           and (r.params.get("watch") == "true") == watching)

            # watched, expired, relisted, watched again
            await until(lambda: deployment_gets(watching=True) >= 2, "a second watch after the 410")
            assert deployment_gets(watching=False) >= 2
            watch_logs = [r for r in caplog.records if "watch" in r.getMessage()]
            assert [r.getMessage() for r in watch_logs] == ["the Deployment watch expired (410 Gone): relisting"]

            # someone scales the Deployment by hand: the watch wakes a pass, which puts it back
            await asyncio.to_thread(apps.patch_namespaced_deployment, "runtime-py", NAMESPACE, {"spec": {"replicas": 5}})
            await until(lambda: stored(emu, DEPLOYMENTS, "runtime-py")["spec"]["replicas"] == 2,
                        "the registry's replica count restored")
        finally:
            await stop(task)


async def test_modelgw_reconcile_with_a_kubeconfig_applies_and_deletes(emulator, etcd_server, etcd_prefix, tmp_path) -> None:
    """`modelgw reconcile --backend kubernetes --kubeconfig F`, a real process, on this emulator."""
    emu, api = emulator
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": api.configuration.host}}],
        "users": [{"name": "reconciler", "user": {"token": "unused"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "reconciler"}}],
    }))
    processes = Processes(tmp_path)
    try:
        async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
            await store.apply_runtime(runtime("cli", replicas=2))
            reconciler = processes.start(
                "reconciler", "reconcile", "--backend", "kubernetes", "--namespace", NAMESPACE,
                "--kubeconfig", str(kubeconfig), "--pod-etcd", "etcd.modelgw.svc:2379",
                "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix, "--identity", "cli", "--lease-ttl", "3",
            )
            # the Deployment is applied before its PodDisruptionBudget: wait for both, not
            # for the first and then look at the second (a fast machine looked in between)
            await until(lambda: stored(emu, DEPLOYMENTS, "runtime-cli") is not None
                        and stored(emu, PDBS, "runtime-cli") is not None, "runtime-cli applied", logs=processes.logs)
            (container,) = stored(emu, DEPLOYMENTS, "runtime-cli")["spec"]["template"]["spec"]["containers"]
            assert "etcd.modelgw.svc:2379" in container["command"]

            await store.apply_runtime(runtime("stays", replicas=1))
            await store.delete_runtime("cli")
            await until(lambda: stored(emu, DEPLOYMENTS, "runtime-cli") is None, "runtime-cli deleted",
                        logs=processes.logs)
            await until(lambda: stored(emu, DEPLOYMENTS, "runtime-stays") is not None, "runtime-stays applied",
                        logs=processes.logs)
            # in a thread: the emulator serves from this event loop, and the reconciler's
            # last calls to it while stopping must be answered
            assert await asyncio.to_thread(reconciler.terminate) == 0, processes.logs()
            # a stopping reconciler leaves its Deployments running: the next leader takes them over
            assert stored(emu, DEPLOYMENTS, "runtime-stays") is not None
    finally:
        processes.cleanup()
