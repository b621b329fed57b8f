"""The Kubernetes objects of a runtime (reconciler.kube_objects), checked as data: labels
and owners, GPU limit and toleration, pvc:// mounts read-only, probes on the port the
container declares, the security context, the PDB only with replicas > 1, the spec hash;
what cannot work refused with a message; and pvc:// read by the runtime as the mount.
Pure functions: no cluster, no etcd."""

from __future__ import annotations

import pytest

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import spec_hash
from modelgw.reconciler.kube_objects import (
    SPEC_HASH_ANNOTATION,
    KubeSettings,
    default_runtime_images,
    object_problems,
    runtime_objects,
)
from modelgw.registry import codec
from modelgw.registry.validation import model_problems, runtime_problems
from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.storage import local_path

SETTINGS = KubeSettings(namespace="serving", etcd_endpoints="etcd.serving.svc:2379", registry_prefix="/modelgw/v1/",
                        default_images=default_runtime_images("registry.example.com/ml", "0.1.0"))


def runtime(**fields) -> rpb.RuntimeSpec:
    base = {"name": "torch", "kind": "pytorch", "model_formats": ["torchscript"], "replicas": 2}
    return codec.from_dict({**base, **fields}, rpb.RuntimeSpec, "test")


def model(name: str, *uris: str, runtime: str = "torch") -> rpb.ModelSpec:
    versions = [{"version": str(i + 1), "uri": uri, "format": "torchscript", "runtime": runtime} for i, uri in enumerate(uris)]
    return codec.from_dict({"name": name, "versions": versions}, rpb.ModelSpec, "test")


def objects(spec: rpb.RuntimeSpec, *models: rpb.ModelSpec, **kwargs) -> dict[str, dict]:
    built = runtime_objects(spec, list(models), SETTINGS, **kwargs)
    return {o["kind"]: o for o in built}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_objects_in_order_with_labels_names_and_namespace() -> None:
    built = runtime_objects(runtime(), [], SETTINGS)
    assert [o["kind"] for o in built] == ["Deployment", "Service", "PodDisruptionBudget"]
    for obj in built:
        meta = obj["metadata"]
        assert meta["name"] == "runtime-torch" and meta["namespace"] == "serving"
        assert meta["labels"] == {
            "app.kubernetes.io/name": "modelgw-runtime",
            "app.kubernetes.io/instance": "torch",
            "app.kubernetes.io/component": "runtime",
            "app.kubernetes.io/managed-by": "modelgw",
        }
        assert meta["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(runtime())
    deployment, service, pdb = built
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == service["spec"]["selector"] == pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["clusterIP"] == "None"
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert container(deployment)["image"] == "registry.example.com/ml/modelgw-runtime:0.1.0"
    llm = objects(runtime(name="chat", kind="llm", model_formats=["llama"]))["Deployment"]
    assert container(llm)["image"] == "registry.example.com/ml/modelgw-runtime-llm:0.1.0"
    own = objects(runtime(image="example.com/mine:2"))["Deployment"]
    assert container(own)["image"] == "example.com/mine:2"


def test_user_labels_cannot_take_over_the_managed_labels() -> None:
    spec = runtime(labels={"team": "vision", "app.kubernetes.io/managed-by": "someone-else"})
    for obj in objects(spec).values():
        assert obj["metadata"]["labels"]["team"] == "vision"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "modelgw"


def test_owner_references_only_with_the_deployment_uid() -> None:
    without = objects(runtime())
    assert all("ownerReferences" not in o["metadata"] for o in without.values())
    owned = objects(runtime(), owner_uid="0b4c7f3e-1111-2222-3333-444455556666")
    assert "ownerReferences" not in owned["Deployment"]["metadata"]
    for kind in ("Service", "PodDisruptionBudget"):
        (ref,) = owned[kind]["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "runtime-torch",
                       "uid": "0b4c7f3e-1111-2222-3333-444455556666", "controller": True, "blockOwnerDeletion": True}


def test_pdb_only_with_more_than_one_replica() -> None:
    assert "PodDisruptionBudget" not in objects(runtime(replicas=1))
    assert "PodDisruptionBudget" not in objects(runtime(replicas=0))
    pdb = objects(runtime(replicas=3))["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1


def test_gpu_is_a_limit_with_the_gpu_toleration_and_the_node_selector() -> None:
    spec = runtime(resources={"cpu": "4", "memory": "16Gi", "gpu": 1},
                   node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    pod = objects(spec)["Deployment"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "1"}
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    cpu_only = objects(runtime(resources={"cpu": "1"}))["Deployment"]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_only and "nodeSelector" not in cpu_only
    assert cpu_only["containers"][0]["resources"] == {"requests": {"cpu": "1"}}


def test_pvc_models_mount_each_claim_once_read_only() -> None:
    resnet = model("resnet", "pvc://models/resnet/1/model.pt", "pvc://models/resnet/2")
    bert = model("bert", "pvc://nlp-weights/bert")
    elsewhere = model("other", "pvc://not-ours/x", runtime="onnx")  # another runtime's model
    pod = objects(runtime(), resnet, bert, elsewhere)["Deployment"]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert sorted(claims) == ["models", "nlp-weights"]
    assert all(v["persistentVolumeClaim"]["readOnly"] is True for v in claims.values())
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    for claim, volume in claims.items():
        mount = mounts[volume["name"]]
        assert mount["mountPath"] == f"/mnt/models/{claim}" and mount["readOnly"] is True


def test_probes_use_grpc_health_on_the_declared_grpc_port() -> None:
    main = container(objects(runtime())["Deployment"])
    (port,) = main["ports"]
    assert port["name"] == "grpc"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        # a grpc probe takes a port number only: it must be the one named grpc
        assert main[probe]["grpc"] == {"port": port["containerPort"], "service": ""}
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= SETTINGS.startup_seconds
    command = main["command"]
    assert command[:3] == ["modelgw", "runtime", "serve"]
    assert command[command.index("--port") + 1] == str(port["containerPort"])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    service_port = objects(runtime())["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] == "grpc" and service_port["port"] == port["containerPort"]


def test_security_context_and_a_writable_tmp_on_a_read_only_root() -> None:
    pod = objects(runtime())["Deployment"]["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in main["volumeMounts"] if m["name"] in scratch}
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert "/tmp" in writable and env["XDG_CACHE_HOME"] in writable and env["HOME"] in writable


def test_downward_api_and_drain_time() -> None:
    spec = runtime(env={"POD_IP": "1.2.3.4", "OMP_NUM_THREADS": "4"})
    pod = objects(spec)["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POD_IP"] == {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert env["POD_NAME"] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert env["OMP_NUM_THREADS"]["value"] == "4"
    main = pod["containers"][0]
    assert main["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    drain = int(main["command"][main["command"].index("--drain-timeout") + 1])
    pause = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pause + drain


def test_spec_hash_changes_with_the_spec_not_with_the_replicas() -> None:
    def annotation(spec: rpb.RuntimeSpec, *models: rpb.ModelSpec) -> str:
        return objects(spec, *models)["Deployment"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION]

    base = annotation(runtime())
    assert annotation(runtime(replicas=5)) == base
    assert annotation(runtime(image="example.com/x:1")) != base
    assert annotation(runtime(resources={"gpu": 1})) != base
    assert annotation(runtime(options={"threads": "2"})) != base
    # the claims mounted are part of the pod: moving a model to another claim rolls too
    on_a, on_b = annotation(runtime(), model("m", "pvc://a/m")), annotation(runtime(), model("m", "pvc://b/m"))
    assert len({base, on_a, on_b}) == 3
    assert annotation(runtime(), model("m", "pvc://a/m"), model("n", "pvc://a/n")) == on_a
    assert objects(runtime(), hash_of_spec="abc")["Service"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == "abc"


def test_what_cannot_work_is_refused_with_a_message() -> None:
    assert object_problems(runtime(), [model("ok", "pvc://models/a")], SETTINGS) == []
    (problem,) = object_problems(runtime(), [model("baked", "file:///models/a.pt")], SETTINGS)
    assert "models/baked" in problem and "default image" in problem and "pvc://CLAIM/PATH" in problem
    # a file in an image of one's own is fine: the path is inside that image
    assert object_problems(runtime(image="example.com/with-models:1"), [model("baked", "/models/a.pt")], SETTINGS) == []
    (problem,) = object_problems(runtime(image="example.com/x:1"), [model("scratch", "/tmp/a.pt")], SETTINGS)
    assert "empty scratch volume" in problem
    (problem,) = object_problems(runtime(kind="custom", model_formats=["x"]), [], SETTINGS)
    assert "image: required for kind 'custom'" in problem
    (problem,) = object_problems(runtime(name="r" * 60), [])
    assert "at most 55" in problem
    (problem,) = object_problems(runtime(command=["serve", "{nope}"]), [], SETTINGS)
    assert "command: bad placeholder 'nope'" in problem
    with pytest.raises(ValueError, match="default image"):
        runtime_objects(runtime(), [model("baked", "file:///models/a.pt")], SETTINGS)


@pytest.mark.parametrize(("uri", "message"), [
    ("pvc://Models/a", "is not a claim name"),
    ("pvc:///a", "is not a claim name"),
    ("pvc://models/../etc/passwd", "must not contain '.' or '..'"),
    ("pvc://models/%2e%2e/etc/passwd", "must not contain '.' or '..'"),
    ("pvc://models/a?x=1", "take no '?' or '#'"),
])
def test_bad_pvc_uris_are_refused_by_the_registry(uri: str, message: str) -> None:
    (problem,) = model_problems(model("m", uri))
    assert "versions[0].uri" in problem and message in problem
    assert model_problems(model("m", "pvc://models/resnet/1")) == []
    assert model_problems(model("m", "pvc://models")) == []


def test_node_selector_is_validated_as_labels() -> None:
    assert runtime_problems(runtime(node_selector={"kubernetes.io/arch": "amd64"})) == []
    (problem,) = runtime_problems(runtime(node_selector={"bad key!": "x"}))
    assert "node_selector['bad key!']" in problem


def test_the_runtime_reads_a_pvc_uri_at_the_claims_mount() -> None:
    with pytest.raises(ModelLoadError) as failure:
        local_path("pvc://models/resnet/1/model.pt")
    assert "/mnt/models/models/resnet/1/model.pt" in str(failure.value)
    with pytest.raises(ModelLoadError, match="must not contain"):
        local_path("pvc://models/%2E%2E/%2E%2E/etc/passwd")


def test_the_llm_kind_reads_model_uris_the_same_way() -> None:
    """One path from a URI to a file: the llm kind's checkpoint goes through storage too."""
    from modelgw.runtimes.llm.runtime import LLMModel

    with pytest.raises(ModelLoadError) as failure:
        LLMModel("llama", "1", "pvc://llm-weights/llama-3-8b").load()
    assert "/mnt/models/llm-weights/llama-3-8b" in str(failure.value)


def test_a_command_of_the_spec_runs_with_the_placeholders_filled_as_in_a_pod() -> None:
    spec = runtime(command=["{python}", "-m", "team.server", "--port", "{port}", "--etcd", "{etcd}", "--name", "{instance}"])
    command = container(objects(spec)["Deployment"])["command"]
    assert command == ["python3", "-m", "team.server", "--port", "9000", "--etcd", "etcd.serving.svc:2379",
                       "--name", "$(POD_NAME)"]
