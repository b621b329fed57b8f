"""deploy/kubernetes, checked without a cluster (none can be had here).

Every overlay is rendered with `kubectl kustomize` and each object validated against the
Kubernetes 1.30 OpenAPI schemas with kubernetes-validate in strict mode (unknown fields
fail). Then what a schema cannot see: every modelgw container's command parses with
modelgw's own CLI parser (its $(VAR)s expanded as the kubelet would, from the env and the
rendered ConfigMaps); every probe names a port its container declares, and those ports are
the ones the process is told to listen on; Services, Ingresses, HPAs, PDBs and
NetworkPolicies point at things that exist; every image is one deploy/images/build.sh
builds, at modelgw's version, or the pinned etcd image; every container runs non-root with
a read-only root and limits. The example registry records parse with registry.files, pass
the registry's validation, and the reconciler's objects for them (reconciler.kube_objects)
fit the manifests: the NetworkPolicies let the gateway reach them and them reach etcd.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from modelgw import __version__
from modelgw.cli import build_parser
from modelgw.gateway.auth.config import AuthConfig
from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler import cli as reconciler_cli
from modelgw.reconciler import kube_objects
from modelgw.registry.etcd import parse_endpoint
from modelgw.registry.etcd_server import LocalEtcd
from modelgw.registry.files import parse_documents
from modelgw.registry.validation import check_model, check_runtime, parse_pvc_uri

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
EXAMPLE_RECORDS = sorted((KUBE / "examples" / "records").glob("*.yaml"))
KUBERNETES_VERSION = "1.30"
ETCD_IMAGE = "gcr.io/etcd-development/etcd:v3.5.21"  # the one image not built by deploy/images
POD_OWNERS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
# a sample for each downward-API field the manifests read (the namespace is the pod's own)
FIELD_SAMPLES = {"metadata.name": "pod-0", "status.podIP": "10.0.0.7"}

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="needs kubectl (>= 1.27, kustomize built in) to render deploy/kubernetes; Debian's "
    "kubernetes-client is too old: install kubectl from https://kubernetes.io/docs/tasks/tools/",
)
pytestmark = needs_kubectl


# ---------------------------------------------------------------- rendering


@functools.cache
def _render(directory: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(["kubectl", "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(overlay: str) -> list[dict[str, Any]]:
    return list(_render(str(KUBE / "overlays" / overlay)))


def render_external_etcd(tmp_path: Path) -> list[dict[str, Any]]:
    """production with components/external-etcd, as a user's overlay would use it."""
    up = os.path.relpath(KUBE, tmp_path)  # kustomize refuses absolute resource paths
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{up}/overlays/production]\ncomponents: [{up}/components/external-etcd]\n"
    )
    return list(_render(str(tmp_path)))


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind} {name!r} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def config_map(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return dict(named(docs, "ConfigMap", name).get("data") or {})


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, str], dict[str, Any]]]:
    """(owner "Kind/name", pod labels, pod spec) of every workload."""
    for d in docs:
        if d["kind"] in POD_OWNERS:
            template = d["spec"]["template"]
            yield f"{d['kind']}/{d['metadata']['name']}", template["metadata"].get("labels", {}), template["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """("Kind/name/container", pod spec, container) of every container; each container
    carries its pod's namespace under "_namespace" (for the downward API's samples)."""
    for d in docs:
        if d["kind"] in POD_OWNERS:
            spec = d["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield (f"{d['kind']}/{d['metadata']['name']}/{container['name']}", spec,
                       {**container, "_namespace": d["metadata"].get("namespace")})


def workload_container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(c for where, _, c in containers(docs) if where.startswith(f"{kind}/{name}/"))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def expand(text: str, env: dict[str, str], where: str) -> str:
    """$(VAR) as the kubelet expands it in command, args and env values ($$(VAR) escapes)."""

    def one(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return f"$({name})"
        assert name in env, f"{where}: $({name}) names no variable defined before it (it would stay literal)"
        return env[name]

    return re.sub(r"\$(\$?)\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def container_env(docs: list[dict[str, Any]], container: dict[str, Any], where: str) -> dict[str, str]:
    """The container's variables, in order, each value as the pod would see it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env, f"{where}: env {var['name']}")
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            data = config_map(docs, ref["name"])
            assert ref["key"] in data, f"{where}: env {var['name']}: ConfigMap {ref['name']} has no key {ref['key']!r}"
            env[var["name"]] = data[ref["key"]]
        elif "fieldRef" in var["valueFrom"]:
            field_path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = container["_namespace"] if field_path == "metadata.namespace" else FIELD_SAMPLES[field_path]
        else:
            env[var["name"]] = "sample"
    return env


def modelgw_argv(docs: list[dict[str, Any]], container: dict[str, Any], where: str) -> list[str] | None:
    """The arguments given to `modelgw` (None for a container running something else)."""
    command = container.get("command", [])
    if command[:1] != ["modelgw"]:
        return None
    env = container_env(docs, container, where)
    return [expand(a, env, where) for a in command[1:] + container.get("args", [])]


def parse_modelgw(argv: list[str], where: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """argv parsed by modelgw's own parser (modelgw.cli), without running anything."""
    command = next(a for a in argv if not a.startswith("-"))
    try:
        return build_parser(command).parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `modelgw {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def built_images() -> list[str]:
    """The image names deploy/images/build.sh builds (its IMAGES=(...) list)."""
    text = (REPO / "deploy" / "images" / "build.sh").read_text()
    match = re.search(r"^IMAGES=\(([^)]*)\)", text, re.M)
    assert match, "deploy/images/build.sh: no IMAGES=(...) list"
    return match.group(1).split()


def gpu_cluster() -> list[dict[str, Any]]:
    """The gpu overlay as a cluster would hold it once the reconciler has acted on the
    records its Job applies: the overlay's objects plus kube_objects' for each runtime."""
    docs = render("gpu")
    settings = kube_settings(docs)
    runtimes, models = records(example_records_map(docs)["data"].values())
    for runtime in runtimes:
        docs += kube_objects.runtime_objects(runtime, models, settings)
    return docs


def example_records_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap of example records (its name carries kustomize's content hash)."""
    [found] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("modelgw-example-records")]
    return found


def kube_settings(docs: list[dict[str, Any]]) -> kube_objects.KubeSettings:
    """What the overlay's reconciler would build runtime objects with: its own command
    line, parsed and turned into settings by reconciler.cli."""
    argv = modelgw_argv(docs, workload_container(docs, "Deployment", "modelgw-reconciler"), "reconciler")
    assert argv is not None
    return reconciler_cli.kube_settings(build_parser("reconcile").parse_args(argv))


def records(texts: Any) -> tuple[list[rpb.RuntimeSpec], list[rpb.ModelSpec]]:
    runtimes, models = [], []
    for i, text in enumerate(texts):
        for document in parse_documents(text, f"records#{i}.yaml"):
            (runtimes if document.kind == "Runtime" else models).append(document.spec)
    return runtimes, models


# ---------------------------------------------------------------- the tests


def test_the_overlays_the_issue_asks_for_exist() -> None:
    assert {"dev", "production", "gpu"} <= set(OVERLAYS)


def test_the_validator_is_strict() -> None:
    """A pass below means something: an unknown field fails, as a typo would."""
    deployment = named(render("dev"), "Deployment", "modelgw-gateway")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_passes_strict_validation(overlay: str) -> None:
    docs = render(overlay)
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    assert len(namespaces) == 1, f"{overlay}: expected its own Namespace, got {namespaces}"
    for d in docs:
        where = f"{overlay}: {d['kind']}/{d['metadata']['name']}"
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: not valid for Kubernetes {KUBERNETES_VERSION}: {str(exc).splitlines()[0]}")
        if d["kind"] not in CLUSTER_SCOPED:
            # an object without one lands wherever kubectl's context points
            assert d["metadata"].get("namespace") in namespaces, f"{where}: namespace {d['metadata'].get('namespace')!r}"
        # the reconciler deletes what carries this label and matches no registered runtime
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") != "modelgw", where


def test_external_etcd_component_points_modelgw_at_it(tmp_path: Path) -> None:
    docs = render_external_etcd(tmp_path)
    for d in docs:
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
    assert not [d for d in docs if d["metadata"]["name"].startswith("modelgw-etcd")]
    assert config_map(docs, "modelgw-config")["etcd"] == "etcd.example.internal:2379"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_modelgw_command_parses_with_modelgws_parser(overlay: str, capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(overlay)
    parsed = {}
    for where, _, container in containers(docs):
        argv = modelgw_argv(docs, container, f"{overlay}: {where}")
        if argv is None:
            assert container["image"] == ETCD_IMAGE, f"{overlay}: {where} runs neither modelgw nor etcd"
            continue
        args = parse_modelgw(argv, f"{overlay}: {where}", capsys)
        parsed[argv[0]] = args
        if getattr(args, "etcd", None):
            parse_endpoint(args.etcd)
    assert {"gateway", "reconcile"} <= set(parsed), f"{overlay}: {sorted(parsed)}"
    reconcile = parsed["reconcile"]
    namespace = named(docs, "Deployment", "modelgw-reconciler")["metadata"]["namespace"]
    assert (reconcile.backend, reconcile.namespace) == ("kubernetes", namespace)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_reads_the_issuers_file_it_is_given(overlay: str, capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(overlay)
    pod = named(docs, "Deployment", "modelgw-gateway")["spec"]["template"]["spec"]
    container = workload_container(docs, "Deployment", "modelgw-gateway")
    args = parse_modelgw(modelgw_argv(docs, container, "gateway") or [], "gateway", capsys)
    mount = next(m for m in container["volumeMounts"] if args.auth_config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    key = os.path.relpath(args.auth_config, mount["mountPath"])
    text = config_map(docs, volume["configMap"]["name"])[key]
    auth = AuthConfig.from_dict(yaml.safe_load(text), env={})
    assert auth.issuers, f"{overlay}: the issuers file trusts no issuer (the gateway would refuse to start)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_name_ports_their_container_listens_on(overlay: str, capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(overlay) if overlay != "gpu" else gpu_cluster()
    for where, _, container in containers(docs):
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            handler = next(probe[h] for h in ("httpGet", "tcpSocket", "grpc", "exec") if h in probe)
            port = handler.get("port")
            if port is None:
                continue
            assert port in (ports if isinstance(port, str) else ports.values()), (
                f"{overlay}: {where}: {kind} probes port {port!r}, declared: {ports}"
            )
        # the declared ports are the ones the process is told to listen on
        argv = modelgw_argv(docs, container, where)
        if argv and argv[0] == "gateway":
            args = parse_modelgw(argv, where, capsys)
            assert ports == {"http": args.http_port, "grpc": args.grpc_port}, f"{overlay}: {where}"
        elif argv and argv[:2] == ["runtime", "serve"]:
            assert list(ports.values()) == [parse_modelgw(argv, where, capsys).port], f"{overlay}: {where}"
        elif container["image"] == ETCD_IMAGE:
            env = container_env(docs, container, where)
            listens = {name: env[f"ETCD_LISTEN_{name.upper()}_URLS"] for name in ("client", "peer", "metrics")}
            for name, url in listens.items():
                assert url.endswith(f":{ports[name]}"), f"{overlay}: {where}: {name} port {ports[name]}, listens on {url}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_between_objects_resolve(overlay: str) -> None:
    docs = render(overlay)
    pods = list(pod_templates(docs))
    for service in (d for d in docs if d["kind"] == "Service"):
        where = f"{overlay}: Service/{service['metadata']['name']}"
        chosen = [spec for _, labels, spec in pods if selects(service["spec"]["selector"], labels)]
        assert chosen, f"{where} selects no pod"
        for port in service["spec"]["ports"]:
            declared = {p.get("name"): p["containerPort"] for spec in chosen for c in spec["containers"] for p in c["ports"]}
            assert port["targetPort"] in declared, f"{where}: targetPort {port['targetPort']!r} not in {declared}"
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = named(docs, "Service", backend["name"])
                assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}, ingress["metadata"]["name"]
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = named(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        resources = target["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert "cpu" in resources["requests"], "a CPU utilization target needs a CPU request"
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], labels) for _, labels, _ in pods), pdb["metadata"]["name"]
    for owner, _, spec in pods:
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                config_map(docs, volume["configMap"]["name"])
        if spec.get("serviceAccountName"):
            named(docs, "ServiceAccount", spec["serviceAccountName"])
        else:  # no API rights, so no token to steal
            assert spec.get("automountServiceAccountToken") is False, f"{overlay}: {owner} mounts a token it has no use for"
    endpoint = config_map(docs, "modelgw-config")["etcd"]
    host, port = parse_endpoint(endpoint)
    assert int(port) in {p["port"] for p in named(docs, "Service", host)["spec"]["ports"]}, endpoint


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_etcd_members_match_the_replicas(overlay: str) -> None:
    docs = render(overlay)
    etcd = named(docs, "StatefulSet", "modelgw-etcd")
    name, peers = etcd["metadata"]["name"], etcd["spec"]["serviceName"]
    assert named(docs, "Service", peers)["spec"]["clusterIP"] == "None"
    env = {e["name"]: e.get("value") for e in etcd["spec"]["template"]["spec"]["containers"][0]["env"]}
    members = env["ETCD_INITIAL_CLUSTER"].split(",")
    assert members == [f"{name}-{i}=http://{name}-{i}.{peers}:2380" for i in range(etcd["spec"]["replicas"])]
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"  # OrderedReady never reaches a quorum


def test_dev_runs_one_of_each_and_production_survives_a_node() -> None:
    dev, production = render("dev"), render("production")
    assert {d["metadata"]["name"]: d["spec"]["replicas"] for d in dev if d["kind"] in ("Deployment", "StatefulSet")} == {
        "modelgw-gateway": 1, "modelgw-reconciler": 1, "modelgw-etcd": 1,
    }
    assert not [d for d in dev if d["kind"] == "HorizontalPodAutoscaler"]
    assert named(production, "StatefulSet", "modelgw-etcd")["spec"]["replicas"] == 3
    assert named(production, "Deployment", "modelgw-reconciler")["spec"]["replicas"] == 2
    assert named(production, "HorizontalPodAutoscaler", "modelgw-gateway")["spec"]["minReplicas"] >= 2
    anti = named(production, "StatefulSet", "modelgw-etcd")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_and_bounded(overlay: str) -> None:
    docs = render(overlay) if overlay != "gpu" else gpu_cluster()
    for where, pod, container in containers(docs):
        security = container.get("securityContext", {})
        assert security.get("allowPrivilegeEscalation") is False, f"{overlay}: {where}"
        assert security.get("readOnlyRootFilesystem") is True, f"{overlay}: {where}"
        assert "ALL" in security.get("capabilities", {}).get("drop", []), f"{overlay}: {where}"
        non_root = security.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot"))
        assert non_root is True, f"{overlay}: {where} may run as root"
        seccomp = security.get("seccompProfile", pod.get("securityContext", {}).get("seccompProfile", {}))
        # the namespaces enforce the restricted Pod Security level, which asks for one
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), f"{overlay}: {where}: seccomp profile"
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{overlay}: {where}: requests"
        # runtime pods (the reconciler's) have no CPU limit on purpose: throttling stalls batches
        limited = {"memory"} if where.startswith("Deployment/" + kube_objects.OBJECT_PREFIX) else {"cpu", "memory"}
        assert limited <= set(resources.get("limits", {})), f"{overlay}: {where}: limits"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_built_by_deploy_images_or_is_the_pinned_etcd(overlay: str) -> None:
    docs = render(overlay) if overlay != "gpu" else gpu_cluster()
    images = built_images()
    assert {"modelgw", "modelgw-runtime", "modelgw-runtime-llm"} <= set(images)
    named_images = [(where, c["image"]) for where, _, c in containers(docs)]
    runtimes, _ = records(path.read_text() for path in EXAMPLE_RECORDS)
    named_images += [(f"examples: runtime {r.name}", r.image) for r in runtimes if r.image]
    for where, image in named_images:
        if image == ETCD_IMAGE:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository.rsplit("/", 1)[-1] in images, f"{overlay}: {where}: {image} is not built by deploy/images ({images})"
        assert tag == __version__, f"{overlay}: {where}: {image} is not tagged with modelgw's version {__version__}"


def test_runtime_pods_fit_the_network_policies() -> None:
    """Built by the reconciler's own builders: the gateway reaches the runtimes' gRPC port,
    nothing else is let in, and the runtimes reach etcd to register."""
    docs = gpu_cluster()
    pods = {owner: (labels, spec) for owner, labels, spec in pod_templates(docs)}
    runtime_pods = {o: p for o, p in pods.items() if p[0].get("app.kubernetes.io/managed-by") == "modelgw"}
    assert runtime_pods, "the gpu overlay's records make no runtime Deployment"
    runtimes = named(docs, "NetworkPolicy", "modelgw-runtimes")
    etcd = named(docs, "NetworkPolicy", "modelgw-etcd")
    gateway_labels = pods["Deployment/modelgw-gateway"][0]
    for owner, (labels, spec) in runtime_pods.items():
        assert selects(runtimes["spec"]["podSelector"]["matchLabels"], labels), owner
        [rule] = runtimes["spec"]["ingress"]
        assert any(selects(peer["podSelector"]["matchLabels"], gateway_labels) for peer in rule["from"])
        others = [o for o in pods if o != "Deployment/modelgw-gateway" and o not in runtime_pods]
        for other in others:
            assert not any(selects(peer["podSelector"]["matchLabels"], pods[other][0]) for peer in rule["from"]), other
        declared = {p["name"] for c in spec["containers"] for p in c["ports"]}
        assert {p["port"] for p in rule["ports"]} <= declared, owner
        client_rule = next(r for r in etcd["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {"client"})
        for pod_owner in [owner, "Deployment/modelgw-gateway", "Deployment/modelgw-reconciler", "Job/modelgw-apply-examples"]:
            assert any(selects(peer["podSelector"]["matchLabels"], pods[pod_owner][0]) for peer in client_rule["from"]), pod_owner


def test_example_records_parse_validate_and_make_valid_objects() -> None:
    assert EXAMPLE_RECORDS
    runtimes, models = records(path.read_text() for path in EXAMPLE_RECORDS)
    by_name = {r.name: r for r in runtimes}
    for runtime in runtimes:
        check_runtime(runtime)
    for model in models:
        check_model(model, by_name)
    settings = kube_settings(render("production"))
    gpu_runtimes = [r for r in runtimes if r.resources.gpu]
    pvc_models = [m for m in models if any(v.uri.startswith("pvc://") for v in m.versions)]
    assert gpu_runtimes and [r for r in gpu_runtimes if r.image], "an example runtime with an image and a GPU"
    assert pvc_models, "an example model on a PVC"
    for runtime in runtimes:
        assert kube_objects.object_problems(runtime, models, settings) == [], runtime.name
        objects = kube_objects.runtime_objects(runtime, models, settings)
        for obj in objects:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        pod = objects[0]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        if runtime.resources.gpu:
            assert container["resources"]["limits"]["nvidia.com/gpu"] in (runtime.resources.gpu, str(runtime.resources.gpu))
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        assert pod.get("nodeSelector", {}) == dict(runtime.node_selector), runtime.name
        claims = {parse_pvc_uri(v.uri)[0] for m in models for v in m.versions
                  if v.runtime == runtime.name and v.uri.startswith("pvc://")}
        mounted = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert claims == mounted, runtime.name
        read_only = {m["name"] for m in container["volumeMounts"] if m.get("readOnly")}
        assert {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v} <= read_only, runtime.name


def test_the_gpu_overlay_applies_the_example_records_on_the_claim_they_name() -> None:
    docs = render("gpu")
    records_map = example_records_map(docs)
    for key, text in records_map["data"].items():
        assert text == (KUBE / "examples" / "records" / key).read_text(), key
    _, models = records(records_map["data"].values())
    claims = {parse_pvc_uri(v.uri)[0] for m in models for v in m.versions if v.uri.startswith("pvc://")}
    assert claims <= {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    job = named(docs, "Job", "modelgw-apply-examples")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in job["containers"][0]["volumeMounts"]}
    volume = next(v for v in job["volumes"] if v.get("configMap", {}).get("name") == records_map["metadata"]["name"])
    assert mounts[volume["name"]] in job["containers"][0]["args"]


def test_the_gpu_overlays_commands_work_against_a_real_etcd(etcd_server: LocalEtcd, etcd_prefix: str, tmp_path: Path) -> None:
    """The apply Job's and the reconciler's command lines, exactly as the gpu overlay gives
    them (only the etcd in modelgw-config pointed at a real one here), run as processes:
    the Job registers the example records, and the reconciler's --dry-run prints, for
    them, objects valid for Kubernetes 1.30 with the GPU limit and the claim mounted."""
    docs = copy.deepcopy(render("gpu"))
    config = named(docs, "ConfigMap", "modelgw-config")
    config["data"] = {"etcd": etcd_server.endpoint, "prefix": etcd_prefix}
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    for key, text in example_records_map(docs)["data"].items():
        (records_dir / key).write_text(text)
    job = workload_container(docs, "Job", "modelgw-apply-examples")
    apply = [str(records_dir) if a == "/records" else a for a in modelgw_argv(docs, job, "apply job") or []]

    def modelgw(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelgw", *argv], capture_output=True, text=True, timeout=120)

    applied = modelgw(apply)
    assert applied.returncode == 0, applied.stderr
    reconcile = modelgw_argv(docs, workload_container(docs, "Deployment", "modelgw-reconciler"), "reconciler") or []
    planned = modelgw([*reconcile, "--dry-run"])
    assert planned.returncode == 0, planned.stderr
    objects = [d for d in yaml.safe_load_all(planned.stdout) if d]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    deployment = named(objects, "Deployment", kube_objects.object_name("llm-gpu"))
    assert deployment["metadata"]["namespace"] == "modelgw"
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/modelgw/modelgw-runtime-llm:" + __version__
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = [v["persistentVolumeClaim"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "models", "readOnly": True}]
