"""The Kubernetes objects of a runtime, a job and a stream: pure builders, no cluster and no client.

    settings = KubeSettings(namespace="modelgw", etcd_endpoints="etcd.modelgw.svc:2379",
                            registry_prefix=DEFAULT_PREFIX, default_images=default_runtime_images())
    problems = object_problems(runtime, models, settings)   # refuse these, as the status
    deployment, service, *pdb = runtime_objects(runtime, models, settings)
    # once the Deployment exists, the rest again, owned by it (deleting it takes them along):
    runtime_objects(runtime, models, settings, owner_uid=created["metadata"]["uid"])

Per RuntimeSpec: a Deployment (rolling, maxUnavailable 0 / maxSurge 1), a headless Service
(the gateway dials pod addresses from the registry; the Service gives them DNS names and a
selector for NetworkPolicies) and, when replicas > 1, a PodDisruptionBudget. The objects are
plain dicts as the API takes them (server-side apply, or YAML for `--dry-run`).

An ownerReference needs the owner's uid, which exists only once the Deployment is created:
without `owner_uid` the Service and PDB carry none (dry runs, a first apply); the backend
applies them again with it.

The pod runs `modelgw runtime serve` with the registry's models of its runtime; it learns
POD_NAME and POD_IP from the downward API and registers POD_IP:9000 under POD_NAME
(runtimes.cli reads both). Model storage in a pod:
- pvc://CLAIM/PATH: the claim is mounted read-only at /mnt/models/CLAIM (one volume per
  claim, whatever the number of models on it); the runtime reads /mnt/models/CLAIM/PATH.
- file:///PATH (or /PATH): a path inside the container: in the image itself (a custom
  `image` that holds its models) or in a volume mounted there. The default images hold no
  models, so such a URI with the default image is refused (object_problems).
The root filesystem is read-only: /tmp and the cache directory (XDG_CACHE_HOME: torch hub,
compiled kernels, TensorRT plans) are emptyDir volumes.

Jobs and streams: job_object (a batch/v1 Job) and stream_object (a Deployment), refused by
pipeline_problems; see the section at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from modelgw import __version__
from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import JOB_EXIT_FAILED, backoff_limit, custom_command, spec_hash, stream_replicas
from modelgw.registry.validation import EXTERNAL_KIND, external_port, parse_pvc_uri, pvc_mount_path

MANAGED_BY = "modelgw"
FIELD_MANAGER = "modelgw-reconciler"
SPEC_HASH_ANNOTATION = "modelgw.io/spec-hash"
APP_NAME = "modelgw-runtime"          # app.kubernetes.io/name of every runtime's objects
COMPONENT = "runtime"
OBJECT_PREFIX = "runtime-"            # object name = prefix + runtime name
MAX_RUNTIME_NAME = 63 - len(OBJECT_PREFIX)  # a Service name is a DNS label
CONTAINER_NAME = "runtime"
GRPC_PORT_NAME = "grpc"
GRPC_PORT = 9000
TMP_DIR = "/tmp"
CACHE_DIR = "/var/cache/modelgw"
RUN_AS_USER = 65532  # the modelgw user of deploy/images; a number, so runAsNonRoot can be checked
GPU_RESOURCE = "nvidia.com/gpu"
# the taint GPU node pools carry (GKE, EKS, AKS and the NVIDIA GPU operator's docs)
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

RUNTIME_IMAGE = "modelgw-runtime"
LLM_RUNTIME_IMAGE = "modelgw-runtime-llm"
_IMAGE_OF_KIND = {"pytorch": RUNTIME_IMAGE, "onnx": RUNTIME_IMAGE, "python": RUNTIME_IMAGE, "llm": LLM_RUNTIME_IMAGE}


def container_security() -> dict[str, Any]:
    """Every container we run: no privilege escalation, a read-only root, not root, no capabilities."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def default_runtime_images(repository: str = "", tag: str = __version__) -> dict[str, str]:
    """kind -> image of the built-in kinds, as deploy/images names them:
    `repository` is the registry path they were pushed to ("" for a local name)."""
    base = f"{repository.rstrip('/')}/" if repository else ""
    return {kind: f"{base}{image}:{tag}" for kind, image in _IMAGE_OF_KIND.items()}


@dataclass
class KubeSettings:
    """What the objects take from the installation rather than from the runtime spec."""

    namespace: str
    etcd_endpoints: str              # HOST:PORT the runtimes register at (one endpoint)
    registry_prefix: str
    default_images: dict[str, str]   # kind -> image, for specs without an image
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    # a startup probe passes once the models are loaded: big ones (an LLM, TensorRT
    # plans built on first start) take minutes, so the budget is generous
    startup_seconds: int = 1800
    drain_seconds: int = 30          # in-flight requests' time to finish on shutdown
    pre_stop_seconds: int = 5        # before SIGTERM: gateways stop picking a leaving pod
    extra_labels: dict[str, str] = field(default_factory=dict)


def object_name(runtime: str) -> str:
    """The name of a runtime's Deployment, Service and PDB."""
    return f"{OBJECT_PREFIX}{runtime}"


def selector_labels(runtime: str) -> dict[str, str]:
    """The labels that select a runtime's pods (a Deployment's selector is immutable)."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": runtime}


def object_labels(runtime: str) -> dict[str, str]:
    return {
        **selector_labels(runtime),
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def runtime_models(runtime: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec]) -> list[tuple[str, rpb.ModelVersion]]:
    """(model name, version) of every model version the runtime serves."""
    return [(m.name, v) for m in models for v in m.versions if v.runtime == runtime.name]


def model_claims(runtime: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec]) -> list[str]:
    """The claims the runtime's pvc:// models live on, sorted, each once."""
    claims = set()
    for _, version in runtime_models(runtime, models):
        if version.uri.startswith("pvc://"):
            try:
                claims.add(parse_pvc_uri(version.uri)[0])
            except ValueError:
                continue  # object_problems reports it
    return sorted(claims)


def workload_hash(
    runtime: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec], settings: KubeSettings | None = None
) -> str:
    """The spec-hash annotation: backend.spec_hash of the runtime, and the claims its pods
    mount (a model moving to another claim needs new pods as much as a spec change) and,
    given `settings`, the problems that refuse it (so that fixing one is acted on)."""
    extra = model_claims(runtime, models) + (object_problems(runtime, models, settings) if settings else [])
    if not extra:
        return spec_hash(runtime)  # the same as the local backend's for the same spec
    return hashlib.sha256("\n".join([spec_hash(runtime), *extra]).encode()).hexdigest()[:16]


def runtime_image(runtime: rpb.RuntimeSpec, settings: KubeSettings) -> str | None:
    return runtime.image or settings.default_images.get(runtime.kind)


def object_problems(
    runtime: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec], settings: KubeSettings | None = None
) -> list[str]:
    """What cannot work in a cluster, one message per problem naming the record and field
    (for status/runtimes/NAME). Given `settings`, a kind without an image is checked too."""
    record = f"runtimes/{runtime.name}"
    problems = []
    if len(runtime.name) > MAX_RUNTIME_NAME:
        problems.append(
            f"{record}: name: {len(runtime.name)} characters; the kubernetes backend takes at most "
            f"{MAX_RUNTIME_NAME} (its Service is named {OBJECT_PREFIX}NAME, a DNS label)"
        )
    if runtime.command:
        try:
            runtime_command(runtime, settings or KubeSettings("", "", "", {}))
        except ValueError as exc:
            problems.append(str(exc))
    if settings is not None and runtime_image(runtime, settings) is None:
        kinds = ", ".join(sorted(settings.default_images)) or "none"
        problems.append(f"{record}: image: required for kind {runtime.kind!r} (default images exist for: {kinds})")
    for model, version in runtime_models(runtime, models):
        where = f"models/{model}: version {version.version}: uri {version.uri!r}"
        scheme = urlsplit(version.uri).scheme
        if scheme == "pvc":
            try:
                parse_pvc_uri(version.uri)
            except ValueError as exc:
                problems.append(f"models/{model}: version {version.version}: {exc}")
        elif scheme == "file" or version.uri.startswith("/"):
            path = unquote(urlsplit(version.uri).path)
            if path == TMP_DIR or path.startswith((f"{TMP_DIR}/", f"{CACHE_DIR}/")):
                problems.append(f"{where}: {path} is an empty scratch volume in the pod; use pvc://CLAIM/PATH")
            elif not runtime.image:
                problems.append(
                    f"{where}: a file path in a pod names a file in the container image, and runtime "
                    f"{runtime.name!r} runs the default image, which holds no models; use pvc://CLAIM/PATH "
                    "or set the runtime's image to one that contains the file"
                )
    return problems


def runtime_objects(
    runtime: rpb.RuntimeSpec,
    models: Sequence[rpb.ModelSpec],
    settings: KubeSettings,
    *,
    owner_uid: str | None = None,
    hash_of_spec: str | None = None,
) -> list[dict[str, Any]]:
    """The Deployment, the headless Service and, when replicas > 1, the PDB of a runtime.
    `owner_uid`: the Deployment's uid, making the Service and PDB owned by it.
    `hash_of_spec`: the spec-hash annotation (default: workload_hash(runtime, models)).
    Raises ValueError with object_problems' messages when the runtime cannot work."""
    problems = object_problems(runtime, models, settings)
    if problems:
        raise ValueError("; ".join(problems))
    name = object_name(runtime.name)
    labels = {**settings.extra_labels, **dict(runtime.labels), **object_labels(runtime.name)}
    annotations = {SPEC_HASH_ANNOTATION: hash_of_spec or workload_hash(runtime, models)}

    # every object gets copies, none shares a dict with another: callers may change one,
    # and YAML would print shared ones as anchors (&id001), unreadable in a review
    def metadata(owned: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": settings.namespace, "labels": dict(labels),
                                "annotations": dict(annotations)}
        if owned and owner_uid:
            meta["ownerReferences"] = [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": owner_uid,
                "controller": True, "blockOwnerDeletion": True,
            }]
        return meta

    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owned=False),
        "spec": {
            "replicas": runtime.replicas,
            "selector": {"matchLabels": selector_labels(runtime.name)},
            # a new pod serves before an old one goes: the registry keeps routing to the old
            # replicas until the new ones have registered ready
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            # a rollout waiting on a long model load is not stuck
            "progressDeadlineSeconds": settings.startup_seconds + 600,
            "template": {"metadata": {"labels": dict(labels)}, "spec": _pod_spec(runtime, models, settings)},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owned=True),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(runtime.name),
            "ports": [{"name": GRPC_PORT_NAME, "port": GRPC_PORT, "targetPort": GRPC_PORT_NAME,
                       "protocol": "TCP", "appProtocol": "grpc"}],
        },
    }
    objects = [deployment, service]
    if runtime.replicas > 1:
        objects.append({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(owned=True),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(runtime.name)}},
        })
    return objects


def container_resources(resources: rpb.Resources) -> dict[str, Any]:
    """A container's requests and limits from a spec's Resources."""
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if resources.cpu:
        requests["cpu"] = resources.cpu  # no cpu limit: throttling stalls batches
    if resources.memory:
        requests["memory"] = limits["memory"] = resources.memory
    if resources.gpu:
        limits[GPU_RESOURCE] = str(resources.gpu)  # an extended resource: requests follow limits
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def claim_volume_name(claim: str) -> str:
    """A volume name (a DNS label) for a claim, stable as long as the claim is named so."""
    name = f"pvc-{claim}"
    if len(name) <= 63 and "." not in name:
        return name
    return f"pvc-{hashlib.sha256(claim.encode()).hexdigest()[:16]}"


def runtime_command(runtime: rpb.RuntimeSpec, settings: KubeSettings) -> list[str]:
    """The container's command line: the spec's own `command` with the local backend's
    placeholders ({python} {host} {port} {etcd} {prefix} {runtime} {instance} {kind}) filled
    in as they are in a pod ({instance}: $(POD_NAME), which the kubelet expands), else
    `modelgw runtime serve`."""
    if runtime.command:
        values = dict(
            python="python3", host="0.0.0.0", port=GRPC_PORT, etcd=settings.etcd_endpoints,
            prefix=settings.registry_prefix, runtime=runtime.name, instance="$(POD_NAME)", kind=runtime.kind,
        )
        return custom_command(runtime, values)
    command = [
        "modelgw", "runtime", "serve",
        "--kind", runtime.kind,
        "--runtime", runtime.name,
        "--registry", settings.etcd_endpoints,
        "--prefix", settings.registry_prefix,
        # every interface: the kubelet's probes dial the pod IP, which it registers
        "--host", "0.0.0.0",
        "--port", str(GRPC_PORT),
        "--drain-timeout", str(settings.drain_seconds),
    ]
    for key, value in sorted(runtime.options.items()):
        command += ["--option", f"{key}={value}"]
    return command


def _pod_spec(runtime: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec], settings: KubeSettings) -> dict[str, Any]:
    claims = model_claims(runtime, models)
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "cache", "mountPath": CACHE_DIR}]
    for claim in claims:
        volume = claim_volume_name(claim)
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": volume, "mountPath": pvc_mount_path(claim), "readOnly": True})

    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    ours = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(runtime.env.items()) if k not in ours]

    resources = container_resources(runtime.resources)

    def grpc_probe(period: int, failures: int) -> dict[str, Any]:
        # grpc.health.v1 service "": SERVING once the assigned models are loaded, and not
        # while the replica drains
        return {"grpc": {"port": GRPC_PORT, "service": ""}, "periodSeconds": period, "timeoutSeconds": 5,
                "failureThreshold": failures}

    startup_period = 10
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": runtime_image(runtime, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": runtime_command(runtime, settings),
        "ports": [{"name": GRPC_PORT_NAME, "containerPort": GRPC_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        "startupProbe": grpc_probe(startup_period, max(1, -(-settings.startup_seconds // startup_period))),
        "readinessProbe": grpc_probe(5, 2),
        "livenessProbe": grpc_probe(10, 6),
        # on SIGTERM the runtime leaves the registry (gateways stop sending), then drains
        # in-flight requests; the pause before it is for clients that find pods through
        # the headless Service's DNS, which drops a terminating pod concurrently
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(settings.pre_stop_seconds)]}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",  # a crash's last lines reach the status
        "securityContext": container_security(),
    }
    pod: dict[str, Any] = {
        "containers": external_containers(runtime, settings, container) if runtime.kind == EXTERNAL_KIND else [container],
        "volumes": volumes,
        # preStop pause + drain + time to leave the registry, before SIGKILL
        "terminationGracePeriodSeconds": settings.pre_stop_seconds + settings.drain_seconds + 10,
        "automountServiceAccountToken": False,  # a runtime never calls the API server
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if runtime.node_selector:
        pod["nodeSelector"] = dict(sorted(runtime.node_selector.items()))
    if runtime.resources.gpu:
        pod["tolerations"] = [dict(GPU_TOLERATION)]
    return pod


# ---------------------------------------------------------------- jobs and streams (issue 13)
#
# A job is a batch/v1 Job (one pod at a time, restartPolicy Never: the Job controller
# retries a failed pod up to backoffLimit, then marks the Job Failed; the pod's resources
# are released as it ends, the Job object stays ttlSecondsAfterFinished for its logs). A
# stream is a Deployment of consumers (no Service: nothing dials them). Their pods run
# `modelgw job run` / `modelgw stream run` with the registry's address; volumes:
# - pvc:// input (read-only, unless the output is on the same claim), output (read-write)
#   and, for mode IN_PROCESS, the model's versions (read-only), each claim mounted once at
#   registry.validation.pvc_mount_path(claim), as for runtimes;
# - model.token_secret "<secret>/<key>": that key of the Secret as the file TOKEN_FILE,
#   which MODELGW_TOKEN_FILE names (the process reads it as model.token_file: the registry
#   refuses both set, so a pod's token_file comes from here).

JOB_APP_NAME = "modelgw-job"
STREAM_APP_NAME = "modelgw-stream"
JOB_PREFIX = "job-"
STREAM_PREFIX = "stream-"
ATTEMPTS_ANNOTATION = "modelgw.io/attempts-before"  # the starts counted before this Job object
TOKEN_DIR = "/var/run/secrets/modelgw"
TOKEN_FILE = f"{TOKEN_DIR}/token"
TOKEN_FILE_ENV = "MODELGW_TOKEN_FILE"
DEFAULT_TTL_SECONDS = 3600   # JobSpec.ttl_seconds_after_finished 0
PIPELINE_IMAGE_KIND = "python"  # the default image of jobs and streams: the runtime image's


def pipeline_labels(app: str, name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _claims_of(spec: rpb.JobSpec | rpb.StreamSpec, models: Sequence[rpb.ModelSpec]) -> dict[str, bool]:
    """claim -> mounted read-only, of every pvc:// URI the pod reads or writes."""
    claims: dict[str, bool] = {}

    def add(uri: str, read_only: bool) -> None:
        try:
            claim = parse_pvc_uri(uri)[0]
        except ValueError:
            return  # not pvc://, or reported by pipeline_problems
        claims[claim] = claims.get(claim, True) and read_only

    if isinstance(spec, rpb.JobSpec):
        add(spec.input_uri, True)
        add(spec.output_uri, False)
    if spec.model.mode == rpb.ModelCall.IN_PROCESS:
        for model in models:
            if model.name == spec.model.model:
                for version in model.versions:
                    if not spec.model.version or version.version == spec.model.version:
                        add(version.uri, True)
    return claims


def pipeline_problems(
    spec: rpb.JobSpec | rpb.StreamSpec, models: Sequence[rpb.ModelSpec], settings: KubeSettings
) -> list[str]:
    """What cannot work in a cluster, one message per problem naming the record and field."""
    is_job = isinstance(spec, rpb.JobSpec)
    record = f"{'jobs' if is_job else 'streams'}/{spec.name}"
    prefix = JOB_PREFIX if is_job else STREAM_PREFIX
    problems = []
    if len(prefix) + len(spec.name) > 63:
        problems.append(f"{record}: name: {len(spec.name)} characters; the kubernetes backend takes at most "
                        f"{63 - len(prefix)} (its objects are named {prefix}NAME, a label value)")
    if not pipeline_image(spec, settings):
        problems.append(f"{record}: image: required (no default image for jobs and streams here)")
    uris = [("input_uri", spec.input_uri), ("output_uri", spec.output_uri)] if isinstance(spec, rpb.JobSpec) else []
    for field_name, uri in uris:
        if uri.startswith("pvc://"):
            try:
                parse_pvc_uri(uri)
            except ValueError as exc:
                problems.append(f"{record}: {field_name}: {exc}")
        elif field_name == "output_uri":
            problems.append(f"{record}: output_uri: {uri!r} is a path inside the pod, lost when it ends; "
                            "use pvc://CLAIM/PATH")
        elif not spec.image:
            problems.append(f"{record}: input_uri: {uri!r} names a file in the container image, and the default "
                            "image holds no data; use pvc://CLAIM/PATH or an image of your own that contains it")
    return problems


def pipeline_image(spec: rpb.JobSpec | rpb.StreamSpec, settings: KubeSettings) -> str | None:
    return spec.image or settings.default_images.get(PIPELINE_IMAGE_KIND)


STREAM_METRICS_PORT = 9090  # a stream consumer's /metrics and /healthz


def _pipeline_pod(
    spec: rpb.JobSpec | rpb.StreamSpec, models: Sequence[rpb.ModelSpec], settings: KubeSettings,
    command: list[str], grace: int,
) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "cache", "mountPath": CACHE_DIR}]
    for claim, read_only in sorted(_claims_of(spec, models).items()):
        volume = claim_volume_name(claim)
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": volume, "mountPath": pvc_mount_path(claim), "readOnly": read_only})
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.model.token_secret:
        secret, _, key = spec.model.token_secret.partition("/")
        volumes.append({"name": "token", "secret": {"secretName": secret, "items": [{"key": key, "path": "token"}],
                                                    "defaultMode": 0o440}})
        mounts.append({"name": "token", "mountPath": TOKEN_DIR, "readOnly": True})
        env.append({"name": TOKEN_FILE_ENV, "value": TOKEN_FILE})
    ours = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items()) if k not in ours]
    container: dict[str, Any] = {
        "name": "job" if isinstance(spec, rpb.JobSpec) else "stream",
        "image": pipeline_image(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": env,
        "resources": container_resources(spec.resources),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",  # a crash's last lines reach the status
        "securityContext": container_security(),
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,  # it talks to etcd and the gateway, never the API server
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            # the token Secret's file is group-readable (0440): the pod's group reads it
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if spec.resources.gpu:
        pod["tolerations"] = [dict(GPU_TOLERATION)]
    return pod


def job_object(
    job: rpb.JobSpec, models: Sequence[rpb.ModelSpec], settings: KubeSettings, hash_of_spec: str,
    attempts_before: int = 0,
) -> dict[str, Any]:
    """The batch/v1 Job of a job. Raises ValueError with pipeline_problems' messages when
    it cannot work."""
    problems = pipeline_problems(job, models, settings)
    if problems:
        raise ValueError("; ".join(problems))
    labels = {**settings.extra_labels, **pipeline_labels(JOB_APP_NAME, job.name, "job")}
    command = ["modelgw", "job", "run", "--name", job.name, "--etcd", settings.etcd_endpoints,
               "--prefix", settings.registry_prefix]
    pod = _pipeline_pod(job, models, settings, command, grace=settings.drain_seconds + 10)
    pod["restartPolicy"] = "Never"  # a failed pod is replaced by the Job controller, counted
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{JOB_PREFIX}{job.name}", "namespace": settings.namespace, "labels": dict(labels),
            "annotations": {SPEC_HASH_ANNOTATION: hash_of_spec, ATTEMPTS_ANNOTATION: str(attempts_before)},
        },
        "spec": {
            "backoffLimit": backoff_limit(job),
            "ttlSecondsAfterFinished": job.ttl_seconds_after_finished or DEFAULT_TTL_SECONDS,
            "podFailurePolicy": {"rules": [
                # the job process gave up by itself (phase FAILED written): retrying is pointless
                {"action": "FailJob", "onExitCodes": {"containerName": "job", "operator": "In",
                                                      "values": [JOB_EXIT_FAILED]}},
                # a pod evicted or preempted did not fail: not counted against backoffLimit
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }


def stream_object(
    stream: rpb.StreamSpec, models: Sequence[rpb.ModelSpec], settings: KubeSettings, hash_of_spec: str | None = None
) -> dict[str, Any]:
    """The Deployment of a stream's consumers (rolled one at a time, none unavailable).
    Raises ValueError with pipeline_problems' messages when it cannot work."""
    problems = pipeline_problems(stream, models, settings)
    if problems:
        raise ValueError("; ".join(problems))
    labels = {**settings.extra_labels, **pipeline_labels(STREAM_APP_NAME, stream.name, "stream")}
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}
    # no --replica: it is a number (a client id's suffix), and a Deployment's pods have none
    # (the local backend passes each replica's slot)
    command = ["modelgw", "stream", "run", "--name", stream.name, "--etcd", settings.etcd_endpoints,
               "--prefix", settings.registry_prefix, "--metrics-port", str(STREAM_METRICS_PORT)]
    pod = _pipeline_pod(stream, models, settings, command, grace=settings.drain_seconds + 10)
    # lag and throughput on /metrics (scraped by port name); /healthz answers 200 once it
    # consumes: a readiness probe only, so a rollout waits for it and a slow group join (Kafka)
    # never gets a consumer killed
    consumer = pod["containers"][0]
    consumer["ports"] = [{"name": "metrics", "containerPort": STREAM_METRICS_PORT, "protocol": "TCP"}]
    health = {"httpGet": {"path": "/healthz", "port": "metrics"}}
    consumer["readinessProbe"] = {**health, "periodSeconds": 5, "failureThreshold": 2}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{STREAM_PREFIX}{stream.name}", "namespace": settings.namespace, "labels": dict(labels),
            "annotations": {SPEC_HASH_ANNOTATION: hash_of_spec or spec_hash(stream)},
        },
        "spec": {
            "replicas": stream_replicas(stream),
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": dict(labels)},
                # on SIGTERM a consumer drains: finishes what it read, commits, leaves
                "spec": pod,
            },
        },
    }


ATTACH_CONTAINER_NAME = "attach"


def external_containers(runtime: rpb.RuntimeSpec, settings: KubeSettings, server: dict[str, Any]) -> list[dict[str, Any]]:
    """Kind external: the pod's containers are the server (the spec's image; its command if
    given, else the image's own entrypoint) on options.port, and `modelgw runtime attach`
    beside it, which registers POD_IP:port under POD_NAME and withdraws it on SIGTERM.

    `server` is the container _pod_spec built for our runtimes, adjusted: the server's
    health protocol is not ours (grpc.health.v1 may be missing), so its probes are TCP on
    its port, and its root filesystem stays writable (a third-party image writes where it
    likes). Both containers get SIGTERM together; the server's preStop pause keeps it
    serving while the adapter withdraws, so gateways stop sending before it stops."""
    port = external_port(runtime) or GRPC_PORT
    server = {**server, "ports": [{"name": GRPC_PORT_NAME, "containerPort": port, "protocol": "TCP"}]}
    if runtime.command:
        server["command"] = custom_command(runtime, dict(
            python="python3", host="0.0.0.0", port=port, etcd=settings.etcd_endpoints,
            prefix=settings.registry_prefix, runtime=runtime.name, instance="$(POD_NAME)", kind=runtime.kind,
        ))
    else:
        del server["command"]

    def tcp_probe(period: int, failures: int) -> dict[str, Any]:
        return {"tcpSocket": {"port": GRPC_PORT_NAME}, "periodSeconds": period, "timeoutSeconds": 5,
                "failureThreshold": failures}

    startup_period = 10
    server["startupProbe"] = tcp_probe(startup_period, max(1, -(-settings.startup_seconds // startup_period)))
    server["readinessProbe"] = tcp_probe(5, 2)
    server["livenessProbe"] = tcp_probe(10, 6)
    server["securityContext"] = {**server["securityContext"], "readOnlyRootFilesystem": False}
    adapter = {
        "name": ATTACH_CONTAINER_NAME,
        "image": settings.default_images.get("python") or default_runtime_images()["python"],
        "imagePullPolicy": settings.image_pull_policy,
        "command": [
            "modelgw", "runtime", "attach",
            "--target", f"127.0.0.1:{port}",
            "--runtime", runtime.name,
            "--etcd", settings.etcd_endpoints,
            "--prefix", settings.registry_prefix,
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HOME", "value": TMP_DIR},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_DIR}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
    }
    return [server, adapter]
