"""A runtime started as a Kubernetes pod starts it: the container command that
reconciler.kube_objects builds, run as a real process with the environment the pod gets
(POD_NAME, POD_IP from the downward API) against a real etcd. It registers POD_IP:port
under the pod's name, and the address it registers answers inference. A replica that
listens on one address only (the local backend's, run inside a pod) keeps advertising it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from reconciler_helpers import REPO, endpoints, model_states, until
from runtime_helpers import infer_inputs

from modelgw.net import free_port
from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.kube_objects import GRPC_PORT, KubeSettings, default_runtime_images, runtime_command
from modelgw.registry.store import RegistryStore

SCALE = "modelgw.runtimes.examples.scale:Scale"


def start_pod(argv: list[str], pod_env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                env={**os.environ, **pod_env})


async def wait_ready(store: RegistryStore, process: subprocess.Popen, log: Path) -> rpb.Endpoint:
    async def ready() -> rpb.Endpoint | None:
        assert process.poll() is None, output(log)
        endpoint = next(iter((await endpoints(store, "pods")).values()), None)
        if endpoint and endpoint.ready and model_states(endpoint).get(("scale", "1")) == "READY":
            return endpoint
        return None

    return await until(ready, "the pod's endpoint ready", logs=log.read_text)


def output(log: Path) -> str:
    return log.read_text(errors="replace")


def stop(process: subprocess.Popen, log: Path) -> None:
    process.terminate()
    try:
        assert process.wait(60) == 0, log.read_text()
    finally:
        process.kill()


async def register_scale(store: RegistryStore, runtime: rpb.RuntimeSpec) -> None:
    await store.apply_runtime(runtime)
    model = rpb.ModelSpec(name="scale")
    model.versions.add(version="1", uri=SCALE, format="python", runtime=runtime.name)
    await store.apply_model(model)


async def test_a_pod_registers_its_pod_ip_under_its_pod_name(etcd_server, tmp_path: Path) -> None:
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    runtime = rpb.RuntimeSpec(name="pods", kind="python", model_formats=["python"], replicas=1)
    settings = KubeSettings(namespace="ns", etcd_endpoints=etcd_server.endpoint, registry_prefix=prefix,
                            default_images=default_runtime_images())
    command = runtime_command(runtime, settings)
    assert command[:3] == ["modelgw", "runtime", "serve"]
    # the pod's port is fixed (9000); here any free one, as several tests share the machine
    port = free_port("127.0.0.1")
    argv = [sys.executable, "-m", "modelgw", *command[1:]]
    argv[argv.index(str(GRPC_PORT))] = str(port)
    # 127.0.0.2 is loopback too but not the listen address: the registered address must
    # come from POD_IP, not from --host or the host name
    pod_env = {"POD_NAME": "runtime-pods-7d9f8c6b5-x2k4q", "POD_IP": "127.0.0.2", "POD_NAMESPACE": "ns"}
    log = tmp_path / "pod.log"
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await register_scale(store, runtime)
        process = start_pod(argv, pod_env, log)
        try:
            endpoint = await wait_ready(store, process, log)
            assert endpoint.instance == pod_env["POD_NAME"]
            assert endpoint.address == f"127.0.0.2:{port}"
            assert list(await endpoints(store, "pods")) == [pod_env["POD_NAME"]]
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            with triton.InferenceServerClient(endpoint.address) as client:
                y = client.infer("scale", infer_inputs({"x": x})).as_numpy("y")
            np.testing.assert_array_equal(y, x * 2)
        finally:
            stop(process, log)


async def test_a_replica_bound_to_one_address_in_a_pod_advertises_that_address(etcd_server, tmp_path: Path) -> None:
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    log = tmp_path / "replica.log"
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await register_scale(store, rpb.RuntimeSpec(name="pods", kind="python", model_formats=["python"], replicas=1))
        # as the local backend starts one: --host 127.0.0.1 and its own --instance
        argv = [sys.executable, "-m", "modelgw", "runtime", "serve", "--kind", "python", "--host", "127.0.0.1",
                "--port", "0", "--registry", etcd_server.endpoint, "--prefix", prefix, "--runtime", "pods",
                "--instance", "pods-0"]
        process = start_pod(argv, {"POD_NAME": "modelgw-up-5c7d8-abcde", "POD_IP": "10.1.2.3"}, log)
        try:
            endpoint = await wait_ready(store, process, log)
            assert endpoint.instance == "pods-0"
            assert endpoint.address.startswith("127.0.0.1:"), endpoint.address
        finally:
            stop(process, log)
