"""The Kubernetes backend: each runtime is a Deployment (+ headless Service, + PDB when
replicas > 1) that the Deployment controller keeps at its replica count and rolls on a
spec change (maxSurge 1, maxUnavailable 0: see kube_objects). This module is thin on
purpose: the objects come from reconciler.kube_objects, the logic from reconciler.core;
here are only the API calls, and the reading of Deployment and pod status back.

    client = api_client(kubeconfig=None)   # in-cluster config in a pod, else ~/.kube/config
    backend = KubernetesBackend(settings, client)   # settings: kube_objects.KubeSettings
    Reconciler(store, backend, identity).run()

- ensure(): server-side apply (field manager `modelgw-reconciler`, force) of the
  Deployment, then of the Service and PDB owned by it (their ownerReference needs the
  Deployment's uid), and deletion of a PDB no longer wanted (replicas <= 1). A runtime
  that cannot work (kube_objects.object_problems) is not applied; its problems go into
  its status, and its Deployment, if one exists, is left as it was.
- remove(): deletes the Deployment, Service and PDB. Owner references would take the last
  two along, but deleting them is cheap and does not rely on the garbage collector.
- observe(): every Deployment labelled managed-by=modelgw (the core removes those whose
  runtime is no longer registered: orphans), with what its pods say a user must see:
  ImagePullBackOff, CrashLoopBackOff with the last termination message, Unschedulable.
- follow(): a watch on those Deployments wakes the core; a 410 Gone (the watch's
  resourceVersion is too old) relists and watches again.

The client is blocking: every call runs in a thread (asyncio.to_thread). Readiness is not
read here: a replica is ready when its pod's endpoint in the registry says so.

One namespace per modelgw installation: every managed Deployment in it whose runtime is not
in this registry is an orphan, and is deleted.

Jobs and streams (kube_objects.job_object / stream_object), labelled app.kubernetes.io/name
modelgw-job / modelgw-stream, so that the runtimes' reads never see them:
- ensure_job(): creates the Job; one of another spec hash is deleted and created again (a
  Job's pod template is immutable); observe_jobs() reads its phase back from the Job's
  status (the Complete or Failed condition, with the controller's reason, e.g.
  BackoffLimitExceeded) and its attempts from its pod counts. The Job controller retries
  failed pods (backoffLimit) and deletes the Job ttlSecondsAfterFinished after it ends.
- streams: a Deployment each, applied server-side like a runtime's (no Service, no PDB);
  a consumer counts as ready while its pod is Running.
Only the runtimes' Deployments are watched: a Job or stream that changes by itself is
seen by the next resync pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import JobWorkload, Workload
from modelgw.reconciler.kube_objects import (
    APP_NAME,
    ATTEMPTS_ANNOTATION,
    FIELD_MANAGER,
    JOB_APP_NAME,
    JOB_PREFIX,
    MANAGED_BY,
    SPEC_HASH_ANNOTATION,
    STREAM_APP_NAME,
    STREAM_PREFIX,
    KubeSettings,
    job_object,
    object_name,
    object_problems,
    pipeline_problems,
    runtime_objects,
    stream_object,
    workload_hash,
)
from modelgw.tasks import OutageLog

log = logging.getLogger(__name__)

APPLY = "application/apply-patch+yaml"
RUNTIME_LABEL = "app.kubernetes.io/instance"
MANAGED_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": APP_NAME}
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_LABELS.items())
# waiting reasons that are a step of a normal start, not a problem
STARTING = {"ContainerCreating", "PodInitializing"}
MAX_POD_PROBLEMS = 3  # per runtime: the status names a few pods, not hundreds


def api_client(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """An API client: from `kubeconfig` when given; else the pod's service account when
    running in a cluster; else the default kubeconfig (~/.kube/config, $KUBECONFIG)."""
    from kubernetes import config

    configuration = k8s.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return k8s.ApiClient(configuration)


def _managed(labels: dict[str, str] | None, app: str = APP_NAME) -> bool:
    # the emulator the tests run against ignores label selectors: filter here too
    labels = labels or {}
    wanted = {**MANAGED_LABELS, "app.kubernetes.io/name": app}
    return all(labels.get(k) == v for k, v in wanted.items()) and bool(labels.get(RUNTIME_LABEL))


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, settings: KubeSettings, api: k8s.ApiClient, *, watch_seconds: int = 300) -> None:
        self.settings = settings
        self.namespace = settings.namespace
        self.apps = k8s.AppsV1Api(api)
        self.core = k8s.CoreV1Api(api)
        self.policy = k8s.PolicyV1Api(api)
        self.batch = k8s.BatchV1Api(api)
        self.watch_seconds = watch_seconds
        # job / stream -> (hash, problems) refused, and -> the API server's refusal
        self._refused_jobs: dict[str, tuple[str, list[str]]] = {}
        self._rejected_jobs: dict[str, list[str]] = {}
        self._refused_streams: dict[str, tuple[str, list[str]]] = {}
        self._rejected_streams: dict[str, list[str]] = {}
        # runtime -> (workload hash, problems) of a spec that was refused, not applied
        self._refused: dict[str, tuple[str, list[str]]] = {}
        # runtime -> why the API server rejected its last apply
        self._rejected: dict[str, list[str]] = {}

    # -- the spec

    def workload_hash(self, spec: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec]) -> str:
        """The spec's hash, and the claims its pods mount (a model on a new claim needs
        new pods) and the problems that refuse it (a model that cannot work there)."""
        return workload_hash(spec, models, self.settings)

    # -- acting

    async def ensure(
        self, spec: rpb.RuntimeSpec, spec_hash: str, models: Sequence[rpb.ModelSpec], ready: frozenset[str]
    ) -> None:
        problems = object_problems(spec, models, self.settings)
        if not problems:
            try:
                objects = runtime_objects(spec, models, self.settings, hash_of_spec=spec_hash)
            except ValueError as exc:  # a bad command placeholder
                problems = [str(exc)]
        if problems:
            log.warning("runtime %s: not applied: %s", spec.name, "; ".join(problems))
            self._refused[spec.name] = (spec_hash, problems)
            return
        self._refused.pop(spec.name, None)
        try:
            await asyncio.to_thread(self._apply, spec, models, objects[0], spec_hash)
        except ApiException as exc:
            if not 400 <= (exc.status or 0) < 500 or exc.status in (409, 429):
                raise  # the server is away or busy: the pass fails and is retried
            # refused as it is (403: the reconciler's Role lacks a right; 422: an invalid
            # object): the user must see why; tried again every pass, the cause may go
            self._rejected[spec.name] = [f"the API server refused runtime {spec.name}'s objects: {_api_error(exc)}"]
            log.warning("runtime %s: %s", spec.name, self._rejected[spec.name][0])
        else:
            self._rejected.pop(spec.name, None)

    def _apply(self, spec: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec], deployment: dict, spec_hash: str) -> None:
        name = object_name(spec.name)
        applied = self._apply_one(
            self.apps.patch_namespaced_deployment, self.apps.create_namespaced_deployment, name, deployment
        )
        # again, owned by the Deployment now that it has a uid
        _, service, *pdb = runtime_objects(
            spec, models, self.settings, owner_uid=applied.metadata.uid, hash_of_spec=spec_hash
        )
        self._apply_one(self.core.patch_namespaced_service, self.core.create_namespaced_service, name, service)
        if pdb:
            self._apply_one(
                self.policy.patch_namespaced_pod_disruption_budget,
                self.policy.create_namespaced_pod_disruption_budget,
                name,
                pdb[0],
            )
        else:
            self._delete(self.policy.delete_namespaced_pod_disruption_budget, name)

    def _apply_one(self, patch: Callable[..., Any], create: Callable[..., Any], name: str, body: dict) -> Any:
        """Server-side apply. A real API server creates a missing object on apply; the
        emulator the tests use answers 404 instead (it has no apply semantics), so a 404
        creates it and a 409 (someone created it meanwhile) applies again. Against a real
        server the fallback never runs; it costs nothing there."""
        try:
            return patch(name, self.namespace, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY)
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            return create(self.namespace, body, field_manager=FIELD_MANAGER)
        except ApiException as exc:
            if exc.status != 409:
                raise
        return patch(name, self.namespace, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY)

    def _delete(self, delete: Callable[..., Any], name: str) -> None:
        try:
            delete(name, self.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def remove(self, runtime: str) -> None:
        self._refused.pop(runtime, None)
        self._rejected.pop(runtime, None)
        name = object_name(runtime)
        await asyncio.to_thread(self._delete, self.apps.delete_namespaced_deployment, name)
        await asyncio.to_thread(self._delete, self.core.delete_namespaced_service, name)
        await asyncio.to_thread(self._delete, self.policy.delete_namespaced_pod_disruption_budget, name)

    async def close(self) -> None:
        # the Deployments and Jobs keep running: the next leader takes them over as they are
        for kept in (self._refused, self._rejected, self._refused_jobs, self._rejected_jobs,
                     self._refused_streams, self._rejected_streams):
            kept.clear()

    # -- observing

    async def observe(self) -> dict[str, Workload]:
        deployments, pods = await asyncio.to_thread(self._read)
        pods_of: dict[str, list[k8s.V1Pod]] = {}
        for pod in pods:
            pods_of.setdefault(_labels(pod)[RUNTIME_LABEL], []).append(pod)
        workloads = {}
        for deployment in deployments:
            runtime = _labels(deployment)[RUNTIME_LABEL]
            workloads[runtime] = self._workload(runtime, deployment, pods_of.get(runtime, []))
        for runtime, (wanted, problems) in self._refused.items():
            workload = workloads.get(runtime)
            if workload is None:
                workload = workloads[runtime] = Workload(runtime=runtime, spec_hash=wanted, replicas=0)
            # reported as the refused hash, so that the core does not try again every
            # pass; a change of spec or models changes the hash and is tried
            workload.spec_hash = wanted
            workload.problems = problems + workload.problems
        for runtime, problems in self._rejected.items():
            # no hash of its own: the core applies again on the next pass
            workload = workloads.setdefault(runtime, Workload(runtime=runtime, spec_hash="", replicas=0))
            workload.problems = problems + workload.problems
        return workloads

    def _read(self) -> tuple[list[k8s.V1Deployment], list[k8s.V1Pod]]:
        deployments = self.apps.list_namespaced_deployment(self.namespace, label_selector=MANAGED_SELECTOR).items
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=MANAGED_SELECTOR).items
        return [d for d in deployments if _managed(_labels(d))], [p for p in pods if _managed(_labels(p))]

    def _workload(self, runtime: str, deployment: k8s.V1Deployment, pods: list[k8s.V1Pod]) -> Workload:
        annotations = _meta(deployment).annotations or {}
        live = [p for p in pods if _meta(p).deletion_timestamp is None and _phase(p) not in ("Succeeded", "Failed")]
        problems = _deployment_problems(deployment)
        pod_problems = [message for pod in live for message in _pod_problems(pod)]
        if len(pod_problems) > MAX_POD_PROBLEMS:
            more = len(pod_problems) - MAX_POD_PROBLEMS
            pod_problems = [*pod_problems[:MAX_POD_PROBLEMS], f"and {more} more like these"]
        return Workload(
            runtime=runtime,
            spec_hash=annotations.get(SPEC_HASH_ANNOTATION, ""),
            replicas=deployment.spec.replicas if deployment.spec and deployment.spec.replicas is not None else 1,
            running=sum(1 for p in live if _phase(p) == "Running"),
            restarts=sum(c.restart_count or 0 for p in pods for c in ((p.status and p.status.container_statuses) or [])),
            problems=problems + pod_problems,
            # pods register under their own name: an endpoint of a pod that is gone does
            # not count as ready while its lease runs out
            instances=frozenset(_meta(p).name or "" for p in live),
        )

    # -- jobs: batch/v1 Jobs

    async def observe_jobs(self) -> dict[str, JobWorkload]:
        jobs = await asyncio.to_thread(self._list_managed, self.batch.list_namespaced_job, JOB_APP_NAME)
        workloads = {_labels(job)[RUNTIME_LABEL]: _job_workload(job) for job in jobs}
        if any(w.active for w in workloads.values()):
            # why a running job's pod does not run (an image that cannot be pulled, no node
            # with the GPU it asks for): a user must see it, as for runtimes
            pods = await asyncio.to_thread(self._list_managed, self.core.list_namespaced_pod, JOB_APP_NAME)
            for pod in pods:
                workload = workloads.get(_labels(pod)[RUNTIME_LABEL])
                if workload is not None and workload.active and _meta(pod).deletion_timestamp is None:
                    workload.problems += _pod_problems(pod)[:MAX_POD_PROBLEMS]
        for name, (wanted, problems) in self._refused_jobs.items():
            # reported as the refused hash: not tried again until the spec changes
            workloads[name] = JobWorkload(job=name, spec_hash=wanted, problems=problems)
        for name, problems in self._rejected_jobs.items():
            workload = workloads.setdefault(name, JobWorkload(job=name, spec_hash=""))  # "": tried again
            workload.problems = problems + workload.problems
        return workloads

    async def ensure_job(
        self, spec: rpb.JobSpec, spec_hash: str, attempts: int, models: Sequence[rpb.ModelSpec]
    ) -> None:
        problems = pipeline_problems(spec, models, self.settings)
        if problems:
            log.warning("job %s: not applied: %s", spec.name, "; ".join(problems))
            self._refused_jobs[spec.name] = (spec_hash, problems)
            return
        self._refused_jobs.pop(spec.name, None)
        body = job_object(spec, models, self.settings, spec_hash, attempts)
        try:
            await asyncio.to_thread(self._replace_job, body, spec_hash)
        except ApiException as exc:
            if not 400 <= (exc.status or 0) < 500 or exc.status in (409, 429):
                raise  # away, busy, or the old Job still terminating: the next pass tries again
            self._rejected_jobs[spec.name] = [f"the API server refused job {spec.name}'s Job: {_api_error(exc)}"]
            log.warning("job %s: %s", spec.name, self._rejected_jobs[spec.name][0])
        else:
            self._rejected_jobs.pop(spec.name, None)

    def _replace_job(self, body: dict, spec_hash: str) -> None:
        """Create the Job; one of another spec hash is deleted first (a Job's pod template
        is immutable: a changed job is a new Job)."""
        name = body["metadata"]["name"]
        try:
            current = self.batch.read_namespaced_job(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        else:
            if (_meta(current).annotations or {}).get(SPEC_HASH_ANNOTATION) == spec_hash:
                return
            log.info("job %s: spec changed, deleting the outdated Job", name)
            self._delete(self.batch.delete_namespaced_job, name)
        self._apply_one(self.batch.patch_namespaced_job, self.batch.create_namespaced_job, name, body)

    async def remove_job(self, job: str) -> None:
        self._refused_jobs.pop(job, None)
        self._rejected_jobs.pop(job, None)
        # Background: its pods go with it (the garbage collector deletes them)
        await asyncio.to_thread(self._delete, self.batch.delete_namespaced_job, f"{JOB_PREFIX}{job}")

    # -- streams: Deployments without a Service

    async def observe_streams(self) -> dict[str, Workload]:
        deployments = await asyncio.to_thread(
            self._list_managed, self.apps.list_namespaced_deployment, STREAM_APP_NAME)
        pods = await asyncio.to_thread(self._list_managed, self.core.list_namespaced_pod, STREAM_APP_NAME)
        pods_of: dict[str, list[k8s.V1Pod]] = {}
        for pod in pods:
            pods_of.setdefault(_labels(pod)[RUNTIME_LABEL], []).append(pod)
        workloads = {}
        for deployment in deployments:
            name = _labels(deployment)[RUNTIME_LABEL]
            mine = pods_of.get(name, [])
            workload = self._workload(name, deployment, mine)
            # a consumer is ready while its pod runs (it has no probe: it serves nothing)
            workload.instances = frozenset(
                _meta(p).name or "" for p in mine if _phase(p) == "Running" and _meta(p).deletion_timestamp is None)
            workloads[name] = workload
        for name, (wanted, problems) in self._refused_streams.items():
            workload = workloads.setdefault(name, Workload(runtime=name, spec_hash=wanted, replicas=0))
            workload.spec_hash = wanted
            workload.problems = problems + workload.problems
        for name, problems in self._rejected_streams.items():
            workload = workloads.setdefault(name, Workload(runtime=name, spec_hash="", replicas=0))
            workload.problems = problems + workload.problems
        return workloads

    async def ensure_stream(self, spec: rpb.StreamSpec, spec_hash: str, models: Sequence[rpb.ModelSpec]) -> None:
        problems = pipeline_problems(spec, models, self.settings)
        if problems:
            log.warning("stream %s: not applied: %s", spec.name, "; ".join(problems))
            self._refused_streams[spec.name] = (spec_hash, problems)
            return
        self._refused_streams.pop(spec.name, None)
        body = stream_object(spec, models, self.settings, spec_hash)
        name = body["metadata"]["name"]
        try:
            await asyncio.to_thread(
                self._apply_one, self.apps.patch_namespaced_deployment, self.apps.create_namespaced_deployment,
                name, body)
        except ApiException as exc:
            if not 400 <= (exc.status or 0) < 500 or exc.status in (409, 429):
                raise
            self._rejected_streams[spec.name] = [
                f"the API server refused stream {spec.name}'s Deployment: {_api_error(exc)}"]
            log.warning("stream %s: %s", spec.name, self._rejected_streams[spec.name][0])
        else:
            self._rejected_streams.pop(spec.name, None)

    async def remove_stream(self, stream: str) -> None:
        self._refused_streams.pop(stream, None)
        self._rejected_streams.pop(stream, None)
        await asyncio.to_thread(self._delete, self.apps.delete_namespaced_deployment, f"{STREAM_PREFIX}{stream}")

    def _list_managed(self, list_namespaced: Callable[..., Any], app: str) -> list[Any]:
        """The objects of one app (modelgw-job, modelgw-stream) that modelgw manages here."""
        selector = f"app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/name={app}"
        items = list_namespaced(self.namespace, label_selector=selector).items
        return [item for item in items if _managed(_labels(item), app)]

    # -- following

    async def follow(self, wake: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def wake_threadsafe() -> None:
            loop.call_soon_threadsafe(wake)

        outage = OutageLog(log, "kubernetes watch of the runtime Deployments")
        stopping = threading.Event()
        watcher = watch.Watch()
        try:
            while True:
                try:
                    version = await asyncio.to_thread(self._list_version)
                    wake()  # relisted: whatever happened while not watching is seen by a pass
                    outage.recovered("watching again")
                    await _in_daemon_thread(self._watch, watcher, version, wake_threadsafe, stopping)
                except ApiException as exc:
                    if exc.status == 410:
                        log.info("the Deployment watch expired (410 Gone): relisting")
                        continue
                    outage.failed(f"{exc.status} {exc.reason}", "will retry")
                    await asyncio.sleep(2.0)
                except Exception as exc:  # connection refused, timeouts: the API server is away
                    outage.failed(exc, "will retry")
                    await asyncio.sleep(2.0)
        finally:
            # unblock the watching thread (it reads a socket); should it be still connecting,
            # it ends with its first event or its read timeout, and holds up no exit
            stopping.set()
            watcher.stop()

    def _list_version(self) -> str | None:
        listed = self.apps.list_namespaced_deployment(self.namespace, label_selector=MANAGED_SELECTOR)
        return listed.metadata.resource_version if listed.metadata else None

    def _watch(self, watcher: watch.Watch, version: str | None, wake: Callable[[], None], stopping: threading.Event) -> None:
        """Watch until the server ends the watch (timeout_seconds); ApiException 410 when
        `version` is too old."""
        kwargs: dict[str, Any] = {"label_selector": MANAGED_SELECTOR, "timeout_seconds": self.watch_seconds}
        if version:
            kwargs["resource_version"] = version
        for event in watcher.stream(
            self.apps.list_namespaced_deployment, self.namespace,
            # a read timeout past the server's: a dead connection does not hang the watch
            _request_timeout=(10, self.watch_seconds + 30), **kwargs,
        ):
            if stopping.is_set():
                return
            raw = event.get("raw_object") or {}
            if _managed((raw.get("metadata") or {}).get("labels")):
                wake()


async def _in_daemon_thread(function: Callable[..., None], *args: Any) -> None:
    """Run a blocking call in a daemon thread of its own and wait for it. Unlike
    asyncio.to_thread's executor, which the interpreter joins on exit, a watch that cannot
    be interrupted at once does not delay the process's exit."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if finished.done():  # cancelled meanwhile
            return
        if exc is None:
            finished.set_result(None)
        else:
            finished.set_exception(exc)

    def run() -> None:
        outcome: BaseException | None = None
        try:
            function(*args)
        except BaseException as exc:  # handed to the awaiting task, which decides
            outcome = exc
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    threading.Thread(target=run, name="kubernetes-watch", daemon=True).start()
    await finished


def _api_error(exc: ApiException) -> str:
    """An API error as a person reads it: the code and the Status's message."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{exc.status} {exc.reason}: {message or exc.body or 'no message'}"


def _meta(obj: k8s.V1Deployment | k8s.V1Pod | k8s.V1Job) -> k8s.V1ObjectMeta:
    return obj.metadata or k8s.V1ObjectMeta()


def _labels(obj: k8s.V1Deployment | k8s.V1Pod | k8s.V1Job) -> dict[str, str]:
    return _meta(obj).labels or {}


def _phase(pod: k8s.V1Pod) -> str:
    return (pod.status.phase if pod.status else None) or "Pending"


def _deployment_problems(deployment: k8s.V1Deployment) -> list[str]:
    """A rollout that failed (a quota, an admission webhook) or ran past its deadline."""
    problems = []
    for condition in (deployment.status.conditions if deployment.status else None) or []:
        failed = (condition.type, condition.status) in (("ReplicaFailure", "True"), ("Progressing", "False"))
        if failed:
            problems.append(f"deployment {_meta(deployment).name}: {condition.reason}: {condition.message}")
    return problems


def _pod_problems(pod: k8s.V1Pod) -> list[str]:
    """What a user must see about a pod: why it is not scheduled, not pulled, not running."""
    name = _meta(pod).name
    status = pod.status
    if status is None:
        return []
    problems = []
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            # e.g. "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
            problems.append(f"pod {name}: unschedulable: {condition.message or 'no node fits'}")
    for container in status.container_statuses or []:
        waiting = container.state.waiting if container.state else None
        if waiting is None or waiting.reason in STARTING:
            continue
        if waiting.reason == "CrashLoopBackOff":
            problems.append(f"pod {name}: {container.name} keeps crashing ({container.restart_count} restarts)"
                            f"{_last_termination(container)}")
        elif waiting.reason in ("ImagePullBackOff", "ErrImagePull"):
            problems.append(f"pod {name}: image {container.image!r} cannot be pulled ({waiting.reason}): "
                            f"{waiting.message or 'no message'}")
        else:  # CreateContainerConfigError, InvalidImageName, ...
            problems.append(f"pod {name}: {container.name}: {waiting.reason}: {waiting.message or 'no message'}")
    return problems


def _last_termination(container: k8s.V1ContainerStatus) -> str:
    terminated = container.last_state.terminated if container.last_state else None
    if terminated is None:
        return ""
    # the container's termination message, or its last log lines (FallbackToLogsOnError)
    why = (terminated.message or terminated.reason or "").strip()
    return f"; last exit code {terminated.exit_code}" + (f": {why}" if why else "")


def _job_workload(job: k8s.V1Job) -> JobWorkload:
    """What a Job's status says: its pods so far (and those counted before this Job object),
    and how it ended (the Complete or Failed condition, with the controller's reason)."""
    name = _labels(job)[RUNTIME_LABEL]
    annotations = _meta(job).annotations or {}
    before = annotations.get(ATTEMPTS_ANNOTATION, "0")
    status = job.status or k8s.V1JobStatus()
    pods = (status.active or 0) + (status.succeeded or 0) + (status.failed or 0)
    workload = JobWorkload(
        job=name, spec_hash=annotations.get(SPEC_HASH_ANNOTATION, ""),
        attempts=(int(before) if before.isdigit() else 0) + pods,
    )
    true = {c.type: c for c in status.conditions or [] if c.status == "True"}
    if "Complete" in true:
        workload.outcome = rpb.JobStatus.SUCCEEDED
    elif "Failed" in true:
        failed = true["Failed"]
        workload.outcome = rpb.JobStatus.FAILED
        workload.message = f"Job {_meta(job).name}: {failed.reason or 'Failed'}: {failed.message or 'no message'}"
    else:
        workload.active = True
        if status.failed:
            limit = job.spec.backoff_limit if job.spec else None
            workload.message = f"Job {_meta(job).name}: {status.failed} pod(s) failed so far (backoffLimit {limit})"
    return workload
