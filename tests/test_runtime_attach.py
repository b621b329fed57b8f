"""KServe's Python ModelServer, a real third-party OIP server, behind the gateway through
`modelgw runtime attach`, next to one of our own runtimes.

- A traffic split across runtimes: model `double` version 1 on the attached KServe server
  (runtime kind external), version 2 on our python runtime, 50/50; unmodified tritonclient
  through the gateway with authentication on gets answers from both. A model assigned to
  the KServe runtime that the server does not serve is FAILED in the record, saying so.
- Stopping the KServe server: its endpoint goes within the lease TTL (the adapter
  withdraws it); what remains of the model answers, and version 1 is UNAVAILABLE naming
  its runtime.
- The KServe server as a second replica of our runtime (one runtime, two servers): killed
  under load, no request fails, and every answer then comes from our replica.
- The adapter's registration survives an etcd restart like our replicas' do, and a frozen
  etcd that expires its lease: it registers again under a new one.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from auth_helpers import AUDIENCE, AuthGateway, Issuer
from gateway_helpers import Fleet, endpoints, model_spec, runtime_spec, wait_model_ready, wait_until
from kserve_helpers import KSERVE, KSERVE_SERVER, AttachProcess, KServeServer, third_party_venv
from reconciler_helpers import Processes, until
from tritonclient.utils import InferenceServerException

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry.errors import RegistryError
from modelgw.registry.store import RegistryStore

pytestmark = pytest.mark.slow

ECHO = "tests.gateway_models:Echo"  # ours: y = x + 1
LEASE_TTL = 5


@pytest.fixture(scope="module")
def kserve_python() -> Path:
    return third_party_venv(KSERVE)


def external_runtime(name: str) -> rpb.RuntimeSpec:
    spec = runtime_spec(name, "external", ["kserve"])
    spec.command[:] = ["python", "tests/kserve_server.py", "--grpc-port", "{port}", "--http-port", "0",
                       "--model", "double"]
    spec.options["port"] = "8081"
    return spec


def infer(client: triton.InferenceServerClient, model: str, x: float, version: str = "",
          headers: dict[str, str] | None = None) -> tuple[float, int]:
    """(y, pid) of one request."""
    tensor = triton.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.array([x], dtype=np.float32))
    result = client.infer(model, [tensor], model_version=version, headers=headers)
    return float(result.as_numpy("y")[0]), int(result.as_numpy("pid")[0])


def stream_once(client: triton.InferenceServerClient, model: str, x: float, version: str = "",
                headers: dict[str, str] | None = None) -> float | str:
    """y of one request over ModelStreamInfer, or the error the stream gave."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error if error is not None else result),
                        headers=headers)
    try:
        tensor = triton.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.array([x], dtype=np.float32))
        client.async_stream_infer(model, [tensor], model_version=version)
        answer = answers.get(timeout=30)
    finally:
        client.stop_stream()
    return str(answer) if isinstance(answer, InferenceServerException) else float(answer.as_numpy("y")[0])


def record(etcd: str, prefix: str, runtime: str) -> rpb.Endpoint | None:
    found = [e for e in endpoints(etcd, prefix) if e.runtime == runtime]
    return found[0] if found else None


def states(endpoint: rpb.Endpoint | None) -> dict[str, tuple[str, str]]:
    if endpoint is None:
        return {}
    return {f"{m.name}:{m.version}": (rpb.LoadedModel.State.Name(m.state), m.message) for m in endpoint.models}


@pytest.fixture
def fleet(etcd_server, etcd_prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    started = Fleet(etcd_server.endpoint, etcd_prefix, tmp_path)
    try:
        yield started
    finally:
        started.close()


def test_kserve_and_our_runtime_share_a_model_through_the_gateway(
    fleet: Fleet, kserve_python: Path, tmp_path: Path
) -> None:
    access = rpb.AccessPolicy(scopes=["infer"])
    split = model_spec("double", "ks", "kserve", {"1": "/models/double"})
    split.versions.add(version="2", uri=ECHO, format="python", runtime="py")
    split.traffic.update({"1": 50, "2": 50})
    split.access.CopyFrom(access)
    missing = model_spec("missing", "ks", "kserve", {"1": "/models/missing"})
    fleet.apply(external_runtime("ks"), runtime_spec("py", "python", ["python"]), split, missing)

    server = KServeServer(kserve_python, ["double"], tmp_path / "kserve.log")
    adapter = AttachProcess(fleet.etcd, fleet.prefix, "ks", server.grpc_url, tmp_path / "attach.log",
                            lease_ttl=LEASE_TTL)
    try:
        fleet.replica("py", "python")
        with Issuer() as issuer:
            key = issuer.new_key("RS256")
            headers = {"authorization": f"Bearer {issuer.token(key, scope='infer')}"}
            gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)

            # the record: the server's address, what it serves, and what it does not
            logs = f"(logs in {tmp_path})"
            ep = wait_until(lambda: (e := record(fleet.etcd, fleet.prefix, "ks")) and e.ready and e,
                            30, f"no ready endpoint of runtime ks {logs}")
            assert ep.address == server.grpc_url and ep.instance == adapter.instance
            found = states(ep)
            assert found["double:1"] == ("READY", ""), found
            assert found["missing:1"][0] == "FAILED" and "not served by the server" in found["missing:1"][1], found

            client = triton.InferenceServerClient(gateway.grpc_url)
            try:
                for version in ("1", "2"):
                    wait_until(lambda v=version: _ready(client, "double", v, headers), 60,
                               f"double:{version} not ready through the gateway {logs}")
                # authentication holds for the attached server's model as for ours
                with pytest.raises(InferenceServerException) as refused:
                    infer(client, "double", 5.0)
                assert "UNAUTHENTICATED" in str(refused.value.status()), refused.value

                answers = Counter(infer(client, "double", 5.0, headers=headers) for _ in range(200))
                by_server = {y: n for (y, _), n in answers.items()}
                assert set(by_server) == {10.0, 6.0}, answers  # KServe: 2x; ours: x + 1
                assert min(by_server.values()) >= 40, answers  # 50/50 of 200
                assert (10.0, server.process.pid) in answers  # the KServe process answered
                assert infer(client, "double", 5.0, "1", headers)[0] == 10.0
                # what differs for a server that is not ours: its own metadata, and no
                # streaming where it has none (KServe's ModelServer)
                metadata = client.get_model_metadata("double", "1", headers=headers)
                assert metadata.name == "double" and not metadata.inputs, metadata
                assert len(client.get_model_metadata("double", "2", headers=headers).inputs) == 1
                assert stream_once(client, "double", 5.0, "2", headers) == 6.0
                assert "UNIMPLEMENTED" in str(stream_once(client, "double", 5.0, "1", headers))

                # stopped: the adapter withdraws the endpoint, well within the lease TTL
                server.stop()
                wait_until(lambda: record(fleet.etcd, fleet.prefix, "ks") is None, LEASE_TTL,
                           f"the stopped server's endpoint is still registered {logs}")
                assert adapter.process.poll() is None  # waiting for the server to come back
                wait_until(lambda: not _ready(client, "double", "1", headers), 10, "double:1 still ready")
                assert all(infer(client, "double", 5.0, "2", headers)[0] == 6.0 for _ in range(20))
                with pytest.raises(InferenceServerException) as gone:
                    infer(client, "double", 5.0, "1", headers)
                assert "UNAVAILABLE" in str(gone.value.status()) and "'ks'" in gone.value.message(), gone.value
            finally:
                client.close()
    finally:
        adapter.stop()
        server.kill()


def _ready(client: triton.InferenceServerClient, model: str, version: str, headers: dict[str, str]) -> bool:
    try:
        return client.is_model_ready(model, version, headers=headers)
    except InferenceServerException:
        return False


def test_a_killed_kserve_replica_leaves_its_traffic_to_the_one_that_remains(
    fleet: Fleet, kserve_python: Path, tmp_path: Path
) -> None:
    # one runtime, two servers: ours and KServe's serve the same model version
    fleet.apply(runtime_spec("py", "python", ["python"]), model_spec("double", "py", "python", {"1": ECHO}))
    ours = fleet.replica("py", "python")
    server = KServeServer(kserve_python, ["double"], tmp_path / "kserve.log")
    adapter = AttachProcess(fleet.etcd, fleet.prefix, "py", server.grpc_url, tmp_path / "attach.log",
                            lease_ttl=LEASE_TTL)
    try:
        gateway = fleet.gateway()
        wait_model_ready(gateway.grpc_url, "double", what=f"(logs in {tmp_path})")
        wait_until(lambda: sum(e.ready for e in endpoints(fleet.etcd, fleet.prefix)) == 2, 30,
                   f"two ready replicas (logs in {tmp_path})")

        answers: list[float] = []
        errors: list[str] = []
        stop = threading.Event()

        def load() -> None:
            client = triton.InferenceServerClient(gateway.grpc_url)
            try:
                while not stop.is_set():
                    try:
                        answers.append(infer(client, "double", 5.0)[0])
                    except InferenceServerException as exc:
                        errors.append(str(exc))
                    time.sleep(0.005)
            finally:
                client.close()

        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: {6.0, 10.0} <= set(answers), 30, "both servers answering")
            server.process.send_signal(signal.SIGKILL)
            wait_until(lambda: [e.instance for e in endpoints(fleet.etcd, fleet.prefix)] == [ours.instance],
                       LEASE_TTL, "the killed server's endpoint is still registered")
            after = len(answers)
            wait_until(lambda: len(answers) > after + 100, 30, "requests after the kill")
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert errors == [], errors[:5]
        assert set(answers[after:]) == {6.0}, Counter(answers[after:])
    finally:
        adapter.stop()
        server.kill()


async def test_the_registration_survives_etcd_restarts_and_expired_leases(
    etcd, kserve_python: Path, tmp_path: Path
) -> None:
    prefix = "/modelgw/v1/"
    fleet = Fleet(etcd.endpoint, prefix, tmp_path)
    await asyncio.to_thread(fleet.apply, external_runtime("ks"), model_spec("double", "ks", "kserve", {"1": "/m"}))
    server = await asyncio.to_thread(KServeServer, kserve_python, ["double"], tmp_path / "kserve.log")
    adapter = AttachProcess(etcd.endpoint, prefix, "ks", server.grpc_url, tmp_path / "attach.log", lease_ttl=10)
    try:
        async with RegistryStore(etcd.endpoint, prefix=prefix) as store:
            key = store.keys.endpoint("ks", adapter.instance)

            async def registered() -> tuple[rpb.Endpoint, int] | None:
                """(the ready record, its lease); None while etcd comes back"""
                try:
                    kvs = (await store.etcd.range_prefix(key)).kvs
                except RegistryError:
                    return None
                if not kvs:
                    return None
                endpoint = codec.decode(kvs[0].value, rpb.Endpoint)
                return (endpoint, kvs[0].lease) if endpoint.ready else None

            first, lease = await until(registered, "never registered", logs=adapter.output)

            # a restart shorter than the TTL: etcd extends the lease, the record is still there
            await asyncio.to_thread(etcd.stop)
            await asyncio.sleep(5)
            await asyncio.to_thread(etcd.start)
            again, same_lease = await until(registered, "the record did not outlive the restart", logs=adapter.output)
            assert (again.instance, again.started_at, same_lease) == (first.instance, first.started_at, lease)

            # frozen for longer than the TTL: the lease expires; the adapter registers again
            etcd.pause()
            try:
                await asyncio.sleep(14)
            finally:
                etcd.resume()

            async def new_lease() -> bool:
                found = await registered()
                return found is not None and found[1] != lease

            await until(new_lease, "not registered again under a new lease", logs=adapter.output)
            assert adapter.process.poll() is None
    finally:
        adapter.stop()
        server.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_local_backend_runs_a_kserve_runtime_and_its_adapter(
    etcd_server, etcd_prefix: str, kserve_python: Path, tmp_path: Path
) -> None:
    runtime = external_runtime("ks")
    runtime.command[:] = [str(kserve_python), str(KSERVE_SERVER), "--grpc-port", "{port}", "--http-port", "0",
                          "--model", "double"]
    fleet = Fleet(etcd_server.endpoint, etcd_prefix, tmp_path)
    await asyncio.to_thread(fleet.apply, runtime, model_spec("double", "ks", "kserve", {"1": "/models/double"}))
    processes = Processes(tmp_path)
    try:
        processes.reconciler("rec", etcd_server.endpoint, etcd_prefix)
        gateway = await asyncio.to_thread(fleet.gateway)
        await asyncio.to_thread(wait_model_ready, gateway.grpc_url, "double", 120, "", f"(logs in {tmp_path})")
        client = triton.InferenceServerClient(gateway.grpc_url)
        try:
            y, pid = await asyncio.to_thread(infer, client, "double", 4.0)
            assert y == 8.0
            (first,) = await asyncio.to_thread(endpoints, fleet.etcd, fleet.prefix)

            # the server dies: the adapter withdraws and exits with it, the supervisor
            # starts the pair again under a new instance name
            os.kill(pid, signal.SIGKILL)

            async def replaced() -> bool:
                found = await asyncio.to_thread(endpoints, fleet.etcd, fleet.prefix)
                return bool(found) and found[0].instance != first.instance and found[0].ready

            await until(replaced, "the pair was not started again", logs=processes.logs)
            await asyncio.to_thread(wait_model_ready, gateway.grpc_url, "double", 60)
            y, second = await asyncio.to_thread(infer, client, "double", 4.0)
            assert y == 8.0 and second != pid
        finally:
            client.close()
        # the reconciler gone, its replicas go too: the adapter, and the server it ran
        processes.cleanup()
        await until(lambda: not _alive(second), "the server outlived its reconciler", timeout=30)
    finally:
        processes.cleanup()
        fleet.close()
