"""Rolling replacement in the local backend, on a real etcd with real processes: a spec
change starts one new replica, waits until it registers ready, stops one old one, and
repeats (maxSurge 1, maxUnavailable 0). Under steady requests through a real gateway no
request fails, and at every sampled moment at least `replicas` endpoints are ready."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from gateway_helpers import GatewayProcess
from reconciler_helpers import Processes, ready_endpoints, replica_processes, until
from runtime_helpers import infer_inputs

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import Change, RegistryView

REPLICAS = 2


class SteadyTraffic:
    """Requests one after another through the gateway, in a thread (tritonclient blocks):
    how many failed, and which factors the answers showed."""

    def __init__(self, grpc_url: str) -> None:
        self.grpc_url = grpc_url
        self.x = np.arange(6, dtype=np.float32).reshape(2, 3)
        self.sent = 0
        self.failures: list[str] = []
        self.factors: set[float] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with triton.InferenceServerClient(self.grpc_url) as client:
            while not self._stop.is_set():
                self.sent += 1
                try:
                    y = client.infer("triple", infer_inputs({"x": self.x}), client_timeout=30).as_numpy("y")
                except Exception as exc:  # every failure counts, whatever its kind
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.factors.add(float(y[0, 1] / self.x[0, 1]))


async def test_a_spec_change_rolls_one_replica_at_a_time_without_failures(etcd_server, tmp_path: Path) -> None:
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    processes = Processes(tmp_path)
    gateway = None
    try:
        processes.reconciler("reconciler", etcd_server.endpoint, prefix, lease_ttl=3, resync=1.0)
        gateway = GatewayProcess(etcd_server.endpoint, prefix, tmp_path / "gateway.log")
        async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
            runtime = rpb.RuntimeSpec(name="roll", kind="python", model_formats=["python"], replicas=REPLICAS)
            await store.apply_runtime(runtime)
            model = rpb.ModelSpec(name="triple")
            model.versions.add(version="1", uri="modelgw.runtimes.examples.scale:Scale", format="python",
                               runtime="roll")
            await store.apply_model(model)

            async def all_ready() -> dict:
                ready = await ready_endpoints(store, "roll", ("triple", "1"))
                return ready if len(ready) == REPLICAS else {}

            old = set(await until(all_ready, "2 ready replicas", timeout=90, logs=processes.logs))

            # the ready endpoints after every registry update, in etcd's order: every moment
            view = await RegistryView(store).start()
            ready_counts: list[int] = []

            def count_ready(changes: list[Change]) -> None:
                ready_counts.append(sum(1 for e in view.endpoints_of("roll") if e.ready))

            unsubscribe = view.subscribe(count_ready)
            with SteadyTraffic(gateway.grpc_url) as traffic:
                await until(lambda: traffic.factors == {2.0}, "traffic flows through the gateway",
                            logs=processes.logs)
                runtime.options["factor"] = "5"  # every model gets the option: new processes needed
                await store.apply_runtime(runtime)

                most_processes = 0

                async def rolled() -> bool:
                    nonlocal most_processes
                    ready = await ready_endpoints(store, "roll", ("triple", "1"))
                    most_processes = max(most_processes, len(replica_processes(prefix)))
                    return len(ready) == REPLICAS and not (set(ready) & old) and set(replica_processes(prefix)) == set(ready)

                await until(rolled, "every replica replaced", timeout=120, every=0.05, logs=processes.logs)
                await until(lambda: 5.0 in traffic.factors, "answers from the new replicas", logs=processes.logs)
                await asyncio.sleep(0.5)  # a little traffic after the last old replica left
            unsubscribe()
            await view.stop()
            fewest_ready = min(ready_counts)

            assert traffic.failures == [], (traffic.sent, traffic.failures[:5])
            # old ones stopping, new ones registering, loading, ready: every update counted
            assert len(ready_counts) >= 4, ready_counts
            assert fewest_ready >= REPLICAS, f"{fewest_ready} ready at one point: {ready_counts}\n{processes.logs()}"
            assert most_processes <= REPLICAS + 1, f"{most_processes} replicas at once (maxSurge is 1)"
            assert traffic.factors == {2.0, 5.0}
    finally:
        if gateway is not None:
            gateway.kill()
        processes.cleanup()
