"""Triton Inference Server behind the gateway through `modelgw runtime attach`: the real
tritonserver (2.51, from the nvidia-pytriton wheel; CPU, python-backend models) in
--model-control-mode=explicit, so the adapter drives its model repository extension.

- Assigned models are loaded with RepositoryModelLoad (one the server did not start with),
  a model missing from Triton's repository is FAILED with Triton's own reason, and a model
  no longer assigned is unloaded with RepositoryModelUnload.
- Unmodified tritonclient through the gateway gets Triton's answers.
- The record's load figures come from Triton's nv_inference_pending_request_count gauge.
- Stopped, its endpoint goes within the lease TTL.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton
from gateway_helpers import Fleet, endpoints, model_spec, wait_model_ready, wait_until
from kserve_helpers import PYTRITON, AttachProcess, TritonServer, third_party_venv, triton_repository
from test_runtime_attach import LEASE_TTL, infer, record, states, stream_once

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.protos import registry_pb2 as rpb
from modelgw.runtimes.attach import pending_requests

pytestmark = pytest.mark.slow


def triton_runtime(name: str) -> rpb.RuntimeSpec:
    return rpb.RuntimeSpec(name=name, kind="external", model_formats=["python"], replicas=0, options={"port": "8001"})


def model_ready_on(server: str, model: str) -> bool:
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelReady(pb.ModelReadyRequest(name=model, version="1"), timeout=5).ready


def test_triton_models_are_loaded_unloaded_and_served_through_the_gateway(
    etcd_server, etcd_prefix: str, tmp_path: Path
) -> None:
    python = third_party_venv(PYTRITON)
    repository = triton_repository(tmp_path / "repository", {"triple": 3, "quad": 4})
    fleet = Fleet(etcd_server.endpoint, etcd_prefix, tmp_path)
    fleet.apply(
        triton_runtime("tr"),
        model_spec("triple", "tr", "python", {"1": "/models/triple"}),
        model_spec("quad", "tr", "python", {"1": "/models/quad"}),
        model_spec("nope", "tr", "python", {"1": "/models/nope"}),
    )
    server = TritonServer(python, repository, ["triple"], tmp_path, tmp_path / "triton.log")
    assert not model_ready_on(server.grpc_url, "quad")  # not loaded at start: the adapter loads it
    adapter = AttachProcess(fleet.etcd, fleet.prefix, "tr", server.grpc_url, tmp_path / "attach.log",
                            "--metrics-url", server.metrics_url, lease_ttl=LEASE_TTL)
    logs = f"(logs in {tmp_path})"
    try:
        gateway = fleet.gateway()
        ep = wait_until(lambda: (e := record(fleet.etcd, fleet.prefix, "tr")) and e.ready and e, 60,
                        f"no ready endpoint of runtime tr {logs}")
        found = states(ep)
        assert found["triple:1"] == ("READY", "") and found["quad:1"] == ("READY", ""), found
        assert found["nope:1"][0] == "FAILED" and "failed to load 'nope'" in found["nope:1"][1], found
        assert model_ready_on(server.grpc_url, "quad")

        client = triton.InferenceServerClient(gateway.grpc_url)
        try:
            for model, factor in (("triple", 3), ("quad", 4)):
                wait_model_ready(gateway.grpc_url, model, what=logs)
                assert infer(client, model, 5.0)[0] == 5.0 * factor
                assert infer(client, model, 2.0, "1")[0] == 2.0 * factor
                assert stream_once(client, model, 3.0) == 3.0 * factor  # Triton streams
            metadata = client.get_model_metadata("triple", "1")
            assert metadata.platform == "python" and [i.name for i in metadata.inputs] == ["x"], metadata
        finally:
            client.close()

        # the figures Triton exports, read as the adapter reads them
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            pending = pending_requests(response.read().decode())
        assert pending[("triple", "1")] == 0 and ("quad", "1") in pending, pending

        # no longer assigned: unloaded from Triton
        fleet_store_delete(fleet, "quad")
        wait_until(lambda: not model_ready_on(server.grpc_url, "quad"), 30, f"quad still loaded in Triton {logs}")
        wait_until(lambda: "quad:1" not in states(record(fleet.etcd, fleet.prefix, "tr")), 30, "quad still listed")
        assert model_ready_on(server.grpc_url, "triple")

        server.stop()
        wait_until(lambda: not endpoints(fleet.etcd, fleet.prefix), LEASE_TTL,
                   f"the stopped server's endpoint is still registered {logs}")
    finally:
        adapter.stop()
        server.kill()
        fleet.close()


def fleet_store_delete(fleet: Fleet, model: str) -> None:
    import asyncio

    from modelgw.registry.store import RegistryStore

    async def run() -> None:
        async with RegistryStore(fleet.etcd, prefix=fleet.prefix) as store:
            await store.delete_model(model)

    asyncio.run(run())
