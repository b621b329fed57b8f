"""Endpoint registration of a real `modelgw runtime serve --registry` process (no
reconciler): a model that fails to load is reported with its reason; SIGTERM revokes the
lease at once and exits 0; an etcd outage longer than the lease TTL, a lease that expired
while the replica was frozen, and an etcd that is not up yet are all survived without a
restart: the replica registers (again) by itself and keeps following its models."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from reconciler_helpers import REPO, Processes, endpoints, key_info, model_states, until
from runtime_helpers import expect_error, infer_inputs

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

SCALE = "modelgw.runtimes.examples.scale:Scale"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


def new_prefix() -> str:
    return f"/modelgw-test/{uuid.uuid4().hex[:12]}/"


async def setup_registry(store: RegistryStore, *models: tuple[str, str, str]) -> None:
    """Runtime `rr` (no reconciler runs here: replicas are started by hand) and models
    given as (name, version, uri)."""
    await store.apply_runtime(rpb.RuntimeSpec(name="rr", kind="python", model_formats=["python"], replicas=1))
    specs: dict[str, rpb.ModelSpec] = {}
    for name, version, uri in models:
        spec = specs.setdefault(name, rpb.ModelSpec(name=name))
        spec.versions.add(version=version, uri=uri, format="python", runtime="rr")
    for spec in specs.values():
        await store.apply_model(spec)


async def serving(store: RegistryStore, instance: str, *models: tuple[str, str]) -> rpb.Endpoint | None:
    """The endpoint of `instance` once it is ready with `models` READY."""
    endpoint = (await endpoints(store, "rr")).get(instance)
    if endpoint is not None and endpoint.ready and all(model_states(endpoint).get(m) == "READY" for m in models):
        return endpoint
    return None


def infer(endpoint: rpb.Endpoint, model: str, x: np.ndarray, version: str = "") -> np.ndarray:
    with triton.InferenceServerClient(endpoint.address) as client:
        return client.infer(model, infer_inputs({"x": x}), model_version=version).as_numpy("y")


X = np.arange(6, dtype=np.float32).reshape(2, 3)


async def test_failed_load_is_reported_and_sigterm_deregisters_at_once(etcd_server, processes: Processes) -> None:
    prefix = new_prefix()
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await setup_registry(store, ("good", "1", SCALE), ("broken", "1", "modelgw.runtimes.examples.scale:Missing"))
        # a long TTL: only a revocation can make the record go at once
        runtime = processes.runtime("rr-0", etcd_server.endpoint, prefix, "rr", lease_ttl=60)

        async def reported() -> rpb.Endpoint | None:
            endpoint = await serving(store, "rr-0", ("good", "1"))
            return endpoint if endpoint and model_states(endpoint).get(("broken", "1")) == "FAILED" else None

        endpoint = await until(reported, "good READY, broken FAILED", logs=processes.logs)
        (failed,) = [m for m in endpoint.models if m.name == "broken"]
        assert "has no attribute 'Missing'" in failed.message, failed.message
        np.testing.assert_array_equal(infer(endpoint, "good", X), X * 2)
        message = expect_error(lambda: infer(endpoint, "broken", X), "UNAVAILABLE")
        assert "failed to load" in message and "Missing" in message

        # the failure stays until the spec changes; a fixed spec loads
        fixed = (await store.get_model("broken")).spec
        fixed.versions[0].uri = SCALE
        await store.apply_model(fixed)
        endpoint = await until(lambda: serving(store, "rr-0", ("good", "1"), ("broken", "1")), "broken fixed",
                               logs=processes.logs)
        assert all(not m.message for m in endpoint.models)
        np.testing.assert_array_equal(infer(endpoint, "broken", X), X * 2)

        key = store.keys.endpoint("rr", "rr-0")
        info = await key_info(store, key)
        lease = info.lease
        assert await store.etcd.time_to_live(lease) > 0
        runtime.signal(signal.SIGTERM)
        assert runtime.wait(60) == 0, runtime.output()
        assert await key_info(store, key) is None, "the record outlived the process"
        assert await store.etcd.time_to_live(lease) == -1, "the lease was not revoked"
        assert "deregistered" in runtime.output()
        # leaving, it wrote itself not ready before the record went: a gateway tells that
        # from a record etcd expired in an outage (gateway.routing)
        last = await asyncio.wait_for(_last_write_before_delete(store, key.decode(), info.mod_revision + 1), 30)
        assert last is not None and not last.ready, last


async def _last_write_before_delete(store: RegistryStore, key: str, revision: int) -> rpb.Endpoint | None:
    """The record `key` was last written with before it was deleted, from the history."""
    last = None
    events = store.watch(start_revision=revision)
    try:
        async for event in events:
            if event.key != key:
                continue
            if event.type == rpb.WatchEvent.DELETE:
                return last
            last = event.endpoint
    finally:
        await events.aclose()
    return last


async def test_survives_an_etcd_outage_longer_than_the_lease_ttl(etcd, processes: Processes) -> None:
    ttl = 3
    prefix = new_prefix()
    async with RegistryStore(etcd.endpoint, prefix=prefix) as store:
        await setup_registry(store, ("scale", "1", SCALE))
        runtime = processes.runtime("rr-1", etcd.endpoint, prefix, "rr", lease_ttl=ttl)
        endpoint = await until(lambda: serving(store, "rr-1", ("scale", "1")), "registered", logs=processes.logs)
        key = store.keys.endpoint("rr", "rr-1")
        lease = (await key_info(store, key)).lease

        etcd.stop()
        await asyncio.sleep(ttl * 2 + 1)  # the outage (a condition to create, not a measurement)
        assert runtime.alive(), runtime.output()
        np.testing.assert_array_equal(infer(endpoint, "scale", X), X * 2)  # serving needs no etcd
        etcd.start()

        async def record() -> rpb.Endpoint | None:
            try:
                return await serving(store, "rr-1", ("scale", "1"))
            except Exception:  # etcd still starting
                return None

        assert await until(record, "the record after the outage", logs=processes.logs)
        # still there after more than a TTL: the lease is being kept alive again (a
        # replica that stopped refreshing would lose it here)
        await asyncio.sleep(ttl * 2)
        info = await key_info(store, key)
        assert info is not None, runtime.output()
        assert await store.etcd.time_to_live(info.lease) > 0
        assert info.lease == lease  # etcd keeps leases across its restarts (with a fresh TTL)

        # and the replica still follows its models: a new version loads
        spec = (await store.get_model("scale")).spec
        spec.versions.add(version="2", uri=SCALE, format="python", runtime="rr")
        await store.apply_model(spec)
        endpoint = await until(lambda: serving(store, "rr-1", ("scale", "1"), ("scale", "2")), "scale:2 loaded",
                               logs=processes.logs)
        np.testing.assert_array_equal(infer(endpoint, "scale", X, "2"), X * 2)
        assert runtime.alive() and runtime.output().count("registered under lease") == 1


async def test_reregisters_after_its_lease_expired(etcd_server, processes: Processes) -> None:
    """Frozen (SIGSTOP) for longer than the TTL, as in a long pause or a partition: etcd
    expires the lease and drops the record; thawed, the replica registers again under the
    same instance name, without a restart."""
    ttl = 3
    prefix = new_prefix()
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await setup_registry(store, ("scale", "1", SCALE))
        runtime = processes.runtime("rr-2", etcd_server.endpoint, prefix, "rr", lease_ttl=ttl)
        await until(lambda: serving(store, "rr-2", ("scale", "1")), "registered", logs=processes.logs)
        key = store.keys.endpoint("rr", "rr-2")
        lease = (await key_info(store, key)).lease

        runtime.signal(signal.SIGSTOP)
        try:
            await until(lambda: _gone(store, key), "the frozen replica's record expired", timeout=ttl * 10)
        finally:
            runtime.signal(signal.SIGCONT)

        endpoint = await until(lambda: serving(store, "rr-2", ("scale", "1")), "registered again", logs=processes.logs)
        info = await key_info(store, key)
        assert info.lease != lease
        assert runtime.alive()
        np.testing.assert_array_equal(infer(endpoint, "scale", X), X * 2)
        assert "registering again" in runtime.output()


async def test_registers_once_etcd_comes_up(etcd, processes: Processes) -> None:
    prefix = new_prefix()
    async with RegistryStore(etcd.endpoint, prefix=prefix) as store:
        await setup_registry(store, ("scale", "1", SCALE))
        etcd.stop()
        runtime = processes.runtime("rr-3", etcd.endpoint, prefix, "rr", lease_ttl=3)
        await until(lambda: "cannot register yet" in runtime.output(), "the runtime tried", logs=processes.logs)
        assert runtime.alive()
        etcd.start()

        async def record() -> rpb.Endpoint | None:
            try:
                return await serving(store, "rr-3", ("scale", "1"))
            except Exception:  # etcd still starting
                return None

        endpoint = await until(record, "registered after etcd came up", logs=processes.logs)
        np.testing.assert_array_equal(infer(endpoint, "scale", X), X * 2)


async def test_not_ready_until_the_assigned_models_are_loaded(etcd_server, processes: Processes, tmp_path: Path) -> None:
    """Registered at once, but ready (in its record and to ServerReady) only once the
    models its runtime is assigned have loaded: a gateway never routes to a replica that
    would answer UNAVAILABLE."""
    gate = tmp_path / "gate"
    models = tmp_path / "gated.py"
    models.write_text(f"""
import time
from pathlib import Path
from modelgw.runtimes.examples.scale import Scale

class Gated(Scale):
    def load(self):
        while not Path({str(gate)!r}).exists():  # the test opens the gate
            time.sleep(0.05)
        super().load()
""")
    prefix = new_prefix()
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await setup_registry(store, ("gated", "1", f"{models}:Gated"))
        processes.runtime("rr-4", etcd_server.endpoint, prefix, "rr", lease_ttl=3)

        async def loading() -> rpb.Endpoint | None:
            endpoint = (await endpoints(store, "rr")).get("rr-4")
            return endpoint if endpoint and model_states(endpoint) == {("gated", "1"): "LOADING"} else None

        endpoint = await until(loading, "registered with the model loading", logs=processes.logs)
        assert not endpoint.ready
        with triton.InferenceServerClient(endpoint.address) as client:
            assert client.is_server_live() and not client.is_server_ready()
        gate.touch()
        endpoint = await until(lambda: serving(store, "rr-4", ("gated", "1")), "ready", logs=processes.logs)
        with triton.InferenceServerClient(endpoint.address) as client:
            assert client.is_server_ready()
        np.testing.assert_array_equal(infer(endpoint, "gated", X), X * 2)


async def _gone(store: RegistryStore, key: bytes) -> bool:
    return await key_info(store, key) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["runtime", "serve", "--kind", "python", "--port", "0", "--registry", "nohost", "--runtime", "rr"],
         "argument --registry: 'nohost' is not HOST:PORT"),
        (["runtime", "serve", "--kind", "python", "--port", "0", "--registry", "127.0.0.1:2379", "--runtime", "Bad_Name"],
         "argument --runtime: 'Bad_Name' is not a runtime name"),
        (["runtime", "serve", "--kind", "python", "--port", "0", "--registry", "127.0.0.1:2379", "--runtime", "rr",
          "--lease-ttl", "0"], "argument --lease-ttl: '0' is not a whole number of seconds, at least 1"),
        (["reconcile", "--etcd", "127.0.0.1:2379", "--resync-seconds", "0"],
         "argument --resync-seconds: '0' is not a positive number"),
    ],
)
def test_bad_registry_arguments_are_one_clear_error(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "modelgw", *args], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
