"""Graceful drain: SIGTERM to a `modelgw gateway` process while slow requests are in flight
(one over gRPC, one over REST): the gateway stops accepting new requests on both ports,
the in-flight ones complete with their answers, and the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from gateway_helpers import Fleet, http_request, model_spec, runtime_spec, wait_model_ready, wait_until

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc

SLEEP_SECONDS = 5


@pytest.fixture
def fleet(etcd_server, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", tmp_path)
    try:
        fleet.apply(
            runtime_spec("py", "python", ["python"]),
            model_spec("slow", "py", "python", {"1": "tests.gateway_models:Slow"}),
        )
        fleet.replica("py", "python", "--max-concurrent-batches", "2")  # both slow requests at once
        yield fleet
    finally:
        fleet.close()


def refuses_new_grpc_calls(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=2)
            return False
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.UNAVAILABLE


def refuses_new_http_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def test_sigterm_finishes_in_flight_requests_then_exits_0(fleet: Fleet, tmp_path: Path) -> None:
    gateway = fleet.gateway("--drain-seconds", "30")
    wait_model_ready(gateway.grpc_url, "slow", what=f"(logs in {tmp_path})")
    results: dict[str, object] = {}

    def grpc_request() -> None:
        client = triton.InferenceServerClient(gateway.grpc_url)
        try:
            x = triton.InferInput("x", [2], "FP32")
            x.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
            params = {"marker": str(tmp_path / "grpc.started"), "seconds": SLEEP_SECONDS}  # int: tritonclient: no floats
            results["grpc"] = client.infer("slow", [x], parameters=params, request_id="g").as_numpy("y").tolist()
        except Exception as exc:  # reported by the assertions below
            results["grpc"] = exc
        finally:
            client.close()

    def rest_request() -> None:
        body = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [3.0, 4.0]}],
            "parameters": {"marker": str(tmp_path / "rest.started"), "seconds": SLEEP_SECONDS},
        }
        try:
            status, raw, _ = http_request("POST", f"{gateway.base}/v2/models/slow/infer", json.dumps(body).encode())
            results["rest"] = (status, json.loads(raw))
        except Exception as exc:
            results["rest"] = exc

    threads = [threading.Thread(target=grpc_request), threading.Thread(target=rest_request)]
    for thread in threads:
        thread.start()
    try:
        def both_started() -> bool:
            assert not results, f"a slow request ended before the SIGTERM: {results}"
            return (tmp_path / "grpc.started").exists() and (tmp_path / "rest.started").exists()

        wait_until(both_started, 30, "the slow requests never reached the model")
        gateway.process.send_signal(signal.SIGTERM)
        # new requests are refused on both ports while the slow ones are still running
        wait_until(lambda: refuses_new_http_connections(gateway.http_port), 10, "HTTP still accepting")
        wait_until(lambda: refuses_new_grpc_calls(gateway.grpc_url), 10, "gRPC still accepting")
        assert not results, f"a slow request ended before the gateway stopped accepting: {results}"
    finally:
        for thread in threads:
            thread.join(timeout=60)

    assert results["grpc"] == [2.0, 3.0], results["grpc"]
    status, answer = results["rest"]
    assert status == 200 and answer["outputs"][0]["data"] == [4.0, 5.0], answer
    assert gateway.process.wait(timeout=30) == 0, gateway.output()
    assert "Traceback" not in gateway.output(), gateway.output()
