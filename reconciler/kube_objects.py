"""The Kubernetes objects of a runtime: pure builders, no cluster and no client.

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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from modelgw import __version__
from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import custom_command, spec_hash
from modelgw.registry.validation import parse_pvc_uri, pvc_mount_path

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

    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if runtime.resources.cpu:
        requests["cpu"] = runtime.resources.cpu  # no cpu limit: throttling stalls batches
    if runtime.resources.memory:
        requests["memory"] = limits["memory"] = runtime.resources.memory
    if runtime.resources.gpu:
        limits[GPU_RESOURCE] = str(runtime.resources.gpu)  # an extended resource: requests follow limits
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

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
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod: dict[str, Any] = {
        "containers": [container],
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
