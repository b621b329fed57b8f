"""The local reconciler end to end, on a real etcd with real processes: runtimes and
models applied from YAML with `modelgw apply`, replicas started by `modelgw reconcile`
(the local backend), models loaded from the registry and served to unmodified tritonclient;
new versions, deleted models, scaling, a SIGKILLed replica, and the status it writes.

One reconciler serves the whole module (its own key prefix); each test uses runtimes of
its own and deletes them when done."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from reconciler_helpers import (
    REPO,
    Process,
    Processes,
    affine,
    endpoints,
    key_info,
    model_states,
    parent_pid,
    pid_alive,
    ready_endpoints,
    replica_processes,
    until,
    write_affine_models,
)
from runtime_helpers import expect_error, infer_inputs

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

LEASE_TTL = 3


@dataclass
class Cluster:
    etcd: str
    prefix: str
    reconciler: Process
    processes: Processes

    def store(self) -> RegistryStore:
        return RegistryStore(self.etcd, prefix=self.prefix)

    def cli(self, *args: str) -> str:
        """Run a registry command (`modelgw apply/delete ... --etcd`); its output."""
        done = subprocess.run(
            [sys.executable, "-m", "modelgw", *args, "--etcd", self.etcd, "--prefix", self.prefix],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
        assert done.returncode == 0, f"modelgw {' '.join(args)}: {done.stderr}"
        return done.stdout

    def apply(self, path: Path, text: str) -> str:
        path.write_text(text)
        return self.cli("apply", "-f", str(path))

    def replicas(self) -> dict[str, int]:
        return replica_processes(self.prefix)

    def replicas_of(self, runtime: str) -> dict[str, int]:
        return {i: p for i, p in self.replicas().items() if i.startswith(f"{runtime}-")}

    def logs(self) -> str:
        return self.processes.logs()


@pytest.fixture(scope="module")
def cluster(etcd_server, tmp_path_factory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("reconciler")
    processes = Processes(directory)
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    try:
        reconciler = processes.reconciler("reconciler", etcd_server.endpoint, prefix, lease_ttl=LEASE_TTL, resync=1.0)
        yield Cluster(etcd_server.endpoint, prefix, reconciler, processes)
        # a clean stop takes the replicas down with it
        assert reconciler.terminate() == 0, processes.logs()
        assert replica_processes(prefix) == {}, processes.logs()
    finally:
        processes.cleanup()


def client(endpoint: rpb.Endpoint) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(endpoint.address)


def infer(endpoint: rpb.Endpoint, model: str, x: np.ndarray, version: str = "") -> np.ndarray:
    with client(endpoint) as c:
        return c.infer(model, infer_inputs({"x": x}), model_version=version).as_numpy("y")


async def converged(store: RegistryStore, runtime: str, replicas: int, model: tuple[str, str] | None) -> dict:
    """Exactly `replicas` endpoints, all ready (with `model` READY), and the status says so."""
    eps = await endpoints(store, runtime)
    ready = await ready_endpoints(store, runtime, model)
    status = await store.get_runtime_status(runtime)
    if len(eps) == len(ready) == replicas and status is not None and status.replicas_ready == replicas \
            and status.replicas_desired == replicas:
        return ready
    return {}


async def delete_runtime(cluster: Cluster, store: RegistryStore, runtime: str, *models: str) -> None:
    for model in models:
        cluster.cli("delete", "model", model)
    cluster.cli("delete", "runtime", runtime)
    await until(lambda: _no_endpoints(store, runtime), f"{runtime}'s endpoints gone", logs=cluster.logs)
    await until(lambda: not cluster.replicas_of(runtime), f"{runtime}'s replicas exited", logs=cluster.logs)


async def _no_endpoints(store: RegistryStore, runtime: str) -> bool:
    return not await endpoints(store, runtime)


RUNTIME_YAML = """\
kind: Runtime
spec:
  name: {name}
  kind: python
  model_formats: [python]
  replicas: {replicas}
"""

MODEL_YAML = """\
kind: Model
spec:
  name: affine
  versions:
{versions}
"""


def versions_yaml(models: Path, versions: list[str]) -> str:
    return "\n".join(
        f'    - {{version: "{v}", uri: "{models}:V{v}", format: python, runtime: py}}' for v in versions
    )


async def test_apply_serve_new_version_scale_and_delete(cluster: Cluster, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    weights = {"V1": affine(rng), "V2": affine(rng)}
    models = write_affine_models(tmp_path / "affine.py", weights)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    expected = {v: x @ weights[f"V{v}"][0] + weights[f"V{v}"][1] for v in ("1", "2")}
    files = tmp_path / "registry.yaml"

    out = cluster.apply(files, RUNTIME_YAML.format(name="py", replicas=2) + "---\n"
                        + MODEL_YAML.format(versions=versions_yaml(models, ["1"])))
    assert "runtime/py created" in out and "model/affine created" in out

    async with cluster.store() as store:
        # the reconciler starts 2 replicas; each loads the model and registers as ready
        ready = await until(lambda: converged(store, "py", 2, ("affine", "1")), "2 ready replicas serving affine:1",
                            timeout=90, logs=cluster.logs)
        processes = cluster.replicas()
        assert set(processes) == set(ready), (processes, list(ready))
        assert {parent_pid(pid) for pid in processes.values()} == {cluster.reconciler.pid}
        for endpoint in ready.values():
            np.testing.assert_allclose(infer(endpoint, "affine", x), expected["1"], rtol=1e-5, atol=1e-5)
        status = await store.get_runtime_status("py")
        assert {c.type: c.status for c in status.conditions} == {
            "Available": "True", "Progressing": "False", "Degraded": "False",
        }
        assert status.backend == "local"
        assert status.observed_revision == (await store.get_runtime("py")).revision

        # a new version: loaded next to the first one by every replica
        cluster.apply(files, MODEL_YAML.format(versions=versions_yaml(models, ["1", "2"])))
        ready = await until(lambda: converged(store, "py", 2, ("affine", "2")), "affine:2 loaded everywhere",
                            logs=cluster.logs)
        for endpoint in ready.values():
            assert model_states(endpoint) == {("affine", "1"): "READY", ("affine", "2"): "READY"}
            np.testing.assert_allclose(infer(endpoint, "affine", x, "2"), expected["2"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(infer(endpoint, "affine", x, "1"), expected["1"], rtol=1e-5, atol=1e-5)
        assert set(cluster.replicas()) == set(processes)  # loading versions restarts nothing

        # version 1 dropped from the spec: unloaded everywhere
        cluster.apply(files, MODEL_YAML.format(versions=versions_yaml(models, ["2"])))

        async def only_version_2() -> dict:
            eps = await endpoints(store, "py")
            return eps if eps and all(model_states(e) == {("affine", "2"): "READY"} for e in eps.values()) else {}

        for endpoint in (await until(only_version_2, "affine:1 unloaded", logs=cluster.logs)).values():
            expect_error(lambda endpoint=endpoint: infer(endpoint, "affine", x, "1"), "NOT_FOUND")
            np.testing.assert_allclose(infer(endpoint, "affine", x), expected["2"], rtol=1e-5, atol=1e-5)

        # scale 2 -> 1 -> 3: endpoints, processes and status follow
        async def scaled(replicas: int) -> dict:
            ready = await converged(store, "py", replicas, ("affine", "2"))
            return ready if set(ready) == set(cluster.replicas()) else {}

        for replicas in (1, 3):
            cluster.apply(files, RUNTIME_YAML.format(name="py", replicas=replicas))
            ready = await until(lambda replicas=replicas: scaled(replicas), f"scaled to {replicas}", timeout=90, logs=cluster.logs)
            for endpoint in ready.values():
                np.testing.assert_allclose(infer(endpoint, "affine", x), expected["2"], rtol=1e-5, atol=1e-5)
        survivors = set(ready) & set(processes)
        assert len(survivors) == 1, "scaling down to 1 keeps a replica; scaling up adds new ones"

        # the model deleted: unloaded everywhere, and NOT_FOUND from every replica
        assert "model/affine deleted" in cluster.cli("delete", "model", "affine")

        async def unloaded() -> dict:
            eps = await endpoints(store, "py")
            return eps if len(eps) == 3 and all(not e.models for e in eps.values()) else {}

        for endpoint in (await until(unloaded, "affine unloaded everywhere", logs=cluster.logs)).values():
            message = expect_error(lambda endpoint=endpoint: infer(endpoint, "affine", x), "NOT_FOUND")
            assert "affine" in message

        # the runtime deleted: its replicas stop and deregister
        pids = list(cluster.replicas_of("py").values())
        await delete_runtime(cluster, store, "py")
        assert not any(pid_alive(p) for p in pids)
        assert await store.get_runtime_status("py") is None


async def test_sigkilled_replica_expires_and_is_restarted(cluster: Cluster, tmp_path: Path) -> None:
    files = tmp_path / "solo.yaml"
    cluster.apply(files, RUNTIME_YAML.format(name="solo", replicas=1) + """\
---
kind: Model
spec:
  name: triple
  versions:
    - {version: "1", uri: "modelgw.runtimes.examples.scale:Scale", format: python, runtime: solo}
""")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    async with cluster.store() as store:
        ready = await until(lambda: converged(store, "solo", 1, ("triple", "1")), "solo ready", timeout=90,
                            logs=cluster.logs)
        (first,) = ready.values()
        np.testing.assert_array_equal(infer(first, "triple", x), x * 2)
        pid = cluster.replicas()[first.instance]
        key = store.keys.endpoint("solo", first.instance)
        assert (await key_info(store, key)).lease != 0

        os.kill(pid, signal.SIGKILL)  # no chance to deregister: only the lease can remove its record
        await until(lambda: not pid_alive(pid), "the killed replica is gone")

        async def record_gone() -> bool:
            return await key_info(store, key) is None

        await until(record_gone, "the dead replica's endpoint expired with its lease", timeout=LEASE_TTL * 10,
                    every=0.1, logs=cluster.logs)

        # restarted under a new instance name, loads the model again, and serves
        ready = await until(lambda: converged(store, "solo", 1, ("triple", "1")), "solo restarted and ready",
                            timeout=90, logs=cluster.logs)
        (second,) = ready.values()
        assert second.instance != first.instance
        second_pid = cluster.replicas()[second.instance]
        assert parent_pid(second_pid) == cluster.reconciler.pid
        np.testing.assert_array_equal(infer(second, "triple", x), x * 2)

        async def restart_counted() -> rpb.RuntimeStatus | None:
            status = await store.get_runtime_status("solo")
            degraded = {c.type: c for c in status.conditions}["Degraded"] if status else None
            return status if degraded is not None and degraded.message == "1 restart so far" else None

        status = await until(restart_counted, "status counts the restart", logs=cluster.logs)
        assert status.replicas_ready == 1

        # a changed spec (the option every model gets) needs new processes: replaced
        spec = (await store.get_runtime("solo")).spec
        spec.options["factor"] = "5"
        await store.apply_runtime(spec)

        async def replaced() -> dict:
            ready = await converged(store, "solo", 1, ("triple", "1"))
            return ready if ready and second.instance not in ready else {}

        (third,) = (await until(replaced, "solo replaced", timeout=90, logs=cluster.logs)).values()
        np.testing.assert_array_equal(infer(third, "triple", x), x * 5)
        # rolled: the old replica is stopped once the new one is ready, and drains first
        await until(lambda: not pid_alive(second_pid), "the replaced replica exited", logs=cluster.logs)
        await delete_runtime(cluster, store, "solo", "triple")


async def test_a_crash_loop_backs_off_shows_as_degraded_and_ends_with_its_runtime(cluster: Cluster) -> None:
    spec = rpb.RuntimeSpec(name="crashy", kind="python", model_formats=["python"], replicas=1)
    # a custom command that dies at once (named like a replica, so that it can be found)
    spec.command.extend(["{python}", "-c", "import sys, time; time.sleep(0.1); sys.exit(3)",
                         "serve", "--prefix", "{prefix}", "--instance", "{instance}"])

    async with cluster.store() as store:
        await store.apply_runtime(spec)

        async def degraded() -> rpb.RuntimeStatus | None:
            status = await store.get_runtime_status("crashy")
            condition = {c.type: c for c in status.conditions}.get("Degraded") if status else None
            return status if condition is not None and condition.status == "True" else None

        status = await until(degraded, "crashy reported as degraded", timeout=90, logs=cluster.logs)
        conditions = {c.type: c for c in status.conditions}
        assert conditions["Degraded"].reason == "ReplicaFailures"
        assert "keeps crashing (last exit code 3" in conditions["Degraded"].message
        assert ".log" in conditions["Degraded"].message  # where to look
        assert conditions["Available"].status == "False" and status.replicas_ready == 0

        # deleted in the middle of its crash loop (running, or waiting to restart): the
        # replica is stopped for good, and no restart slips through afterwards
        await store.delete_runtime("crashy")
        await until(lambda: not cluster.replicas_of("crashy"), "crashy's processes gone", logs=cluster.logs)
        await asyncio.sleep(3)  # longer than the backoff it was in
        assert cluster.replicas_of("crashy") == {}, cluster.logs()
        assert await store.get_runtime_status("crashy") is None


async def test_status_is_written_once_and_left_alone_while_nothing_changes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.apply(tmp_path / "idle.yaml", RUNTIME_YAML.format(name="idle", replicas=1) + """\
---
kind: Model
spec:
  name: idle-scale
  versions:
    - {version: "1", uri: "modelgw.runtimes.examples.scale:Scale", format: python, runtime: idle}
""")
    async with cluster.store() as store:
        await until(lambda: converged(store, "idle", 1, ("idle-scale", "1")), "idle ready", timeout=90,
                    logs=cluster.logs)
        status = await store.get_runtime_status("idle")
        assert (status.replicas_desired, status.replicas_ready) == (1, 1)
        assert status.HasField("updated_at")
        assert all(c.HasField("last_transition_time") for c in status.conditions)

        async def revisions() -> dict[bytes, int]:
            """Every key under the module's prefix and its mod_revision."""
            response = await store.etcd.range_prefix(store.keys.root)
            return {kv.key: kv.mod_revision for kv in response.kvs}

        await asyncio.sleep(2)  # let any write still due land (the status follows the endpoint's)
        before = await revisions()
        assert store.keys.runtime_status("idle") in before
        # several resync periods (1 s) and lease keep-alives (1 s) with nothing changing:
        # no status, endpoint or election key is written again, and neither the
        # reconciler nor the replica spins (a busy loop would use the whole window's CPU)
        pids = [cluster.reconciler.pid, *cluster.replicas_of("idle").values()]
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        window = 5.0
        await asyncio.sleep(window)
        assert await revisions() == before, cluster.logs()
        for pid in pids:
            used = cpu_seconds(pid) - cpu_before[pid]
            assert used < window / 2, f"pid {pid} used {used:.1f}s of CPU in {window:.0f}s of idling"

        # a status removed behind the reconciler's back is written again (it checks what
        # etcd holds, not only what it wrote last)
        await store.etcd.delete(store.keys.runtime_status("idle"))
        status = await until(lambda: store.get_runtime_status("idle"), "the status written again", logs=cluster.logs)
        assert (status.replicas_desired, status.replicas_ready) == (1, 1)
        await delete_runtime(cluster, store, "idle", "idle-scale")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_torchscript(directory: Path) -> tuple[Path, object]:
    import torch

    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()).eval()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pt"
    torch.jit.script(module).save(str(path))
    (directory / "model.json").write_text(json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        "max_batch_size": 8,
    }))
    return path, module


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
async def test_pytorch_runtime_serves_a_torchscript_model(cluster: Cluster, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path, module = make_torchscript(tmp_path / "tanh" / "1")
    cluster.apply(tmp_path / "torch.yaml", f"""\
kind: Runtime
spec:
  name: torch
  kind: pytorch
  model_formats: [torchscript]
  replicas: 1
  options: {{threads: "1"}}
---
kind: Model
spec:
  name: tanh
  versions:
    - {{version: "1", uri: "file://{path}", format: torchscript, runtime: torch}}
""")
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    async with cluster.store() as store:
        ready = await until(lambda: converged(store, "torch", 1, ("tanh", "1")), "torch ready", timeout=120,
                            logs=cluster.logs)
        (endpoint,) = ready.values()
        np.testing.assert_allclose(infer(endpoint, "tanh", x), expected, rtol=1e-5, atol=1e-6)
        await delete_runtime(cluster, store, "torch", "tanh")
