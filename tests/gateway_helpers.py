"""Helpers for the gateway acceptance tests: a real `modelgw gateway` process, runtime
replicas that register themselves in etcd (`modelgw runtime serve --registry ...`, started
directly rather than by the reconciler), and registry writes done straight to etcd."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import tritonclient.grpc as triton
from conftest import spawn
from tritonclient.utils import InferenceServerException

from modelgw.net import free_port
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout:.0f}s: {what}")
        time.sleep(interval)


class GatewayProcess:
    """`modelgw gateway` on free loopback ports, ready once it has read the registry."""

    def __init__(
        self, etcd: str, prefix: str, log: Path, *extra: str, timeout: float = 60.0,
        grpc_port: int | None = None, http_port: int | None = None,
    ) -> None:
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.base = f"http://{self.http_url}"
        self.log = log
        self.process = spawn(
            "gateway", "--etcd", etcd, "--prefix", prefix, "--host", "127.0.0.1",
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--insecure-no-auth",  # authentication has tests of its own
            *extra,
            log=log,
        )
        try:
            wait_until(self._ready, timeout, f"gateway not ready:\n{self.output()}")
        except BaseException:
            self.kill()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.output()}")
        try:
            return http_get(self.base + "/v2/health/ready")[0] == 200
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        return stop_process(self.process)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def metrics(self) -> str:
        status, body = http_get(self.base + "/metrics")
        assert status == 200, body
        return body.decode()


class RuntimeReplica:
    """One runtime process that registers itself in etcd and loads what the registry
    assigns to its runtime. `--port 0`: the endpoint record carries the address."""

    def __init__(
        self, etcd: str, prefix: str, runtime: str, kind: str, log: Path, *extra: str, lease_ttl: int = 5
    ) -> None:
        self.instance = f"{runtime}-{uuid.uuid4().hex[:6]}"
        self.key = f"{runtime}/{self.instance}"
        self.log = log
        self.process = spawn(
            "runtime", "serve", "--kind", kind, "--registry", etcd, "--prefix", prefix,
            "--runtime", runtime, "--instance", self.instance, "--port", "0", "--host", "127.0.0.1",
            "--lease-ttl", str(lease_ttl), *extra,
            log=log,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        return stop_process(self.process)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Fleet:
    """The processes a test module starts against one registry; close() stops every one
    of them (also after a failure)."""

    def __init__(self, etcd: str, prefix: str, logs: Path) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.logs = logs
        self.replicas: list[RuntimeReplica] = []
        self.gateways: list[GatewayProcess] = []

    def replica(self, runtime: str, kind: str, *extra: str, lease_ttl: int = 5) -> RuntimeReplica:
        log = self.logs / f"runtime-{runtime}-{len(self.replicas)}.log"
        replica = RuntimeReplica(self.etcd, self.prefix, runtime, kind, log, *extra, lease_ttl=lease_ttl)
        self.replicas.append(replica)
        return replica

    def gateway(self, *extra: str, grpc_port: int | None = None, http_port: int | None = None) -> GatewayProcess:
        log = self.logs / f"gateway-{len(self.gateways)}.log"
        gateway = GatewayProcess(self.etcd, self.prefix, log, *extra, grpc_port=grpc_port, http_port=http_port)
        self.gateways.append(gateway)
        return gateway

    def apply(self, *specs: rpb.RuntimeSpec | rpb.ModelSpec) -> None:
        apply(self.etcd, self.prefix, *specs)

    def close(self) -> None:
        for gateway in self.gateways:
            gateway.kill()
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.stop()


# -- the registry, written straight to etcd (the admin API is under test elsewhere) -----


def runtime_spec(name: str, kind: str, formats: Iterable[str]) -> rpb.RuntimeSpec:
    return rpb.RuntimeSpec(name=name, kind=kind, model_formats=list(formats), replicas=1)


def model_spec(
    name: str, runtime: str, fmt: str, versions: dict[str, str], traffic: dict[str, int] | None = None
) -> rpb.ModelSpec:
    """versions: version -> uri."""
    spec = rpb.ModelSpec(name=name, traffic=traffic or {})
    for version, uri in versions.items():
        spec.versions.add(version=version, uri=uri, format=fmt, runtime=runtime)
    return spec


def apply(etcd: str, prefix: str, *specs: rpb.RuntimeSpec | rpb.ModelSpec) -> None:
    async def run() -> None:
        async with RegistryStore(etcd, prefix=prefix) as store:
            for spec in specs:
                if isinstance(spec, rpb.RuntimeSpec):
                    await store.apply_runtime(spec)
                else:
                    await store.apply_model(spec)

    asyncio.run(run())


def endpoints(etcd: str, prefix: str) -> list[rpb.Endpoint]:
    async def run() -> list[rpb.Endpoint]:
        async with RegistryStore(etcd, prefix=prefix) as store:
            return list((await store.list_endpoints()).endpoints)

    return asyncio.run(run())


# -- clients -----------------------------------------------------------------------------


def http_request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of a plain HTTP request; error statuses are returned too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    status, body, _ = http_request("GET", url, timeout=timeout)
    return status, body


def http_json(method: str, url: str, document: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body = None if document is None else json.dumps(document).encode()
    status, raw, _ = http_request(method, url, body, {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(raw) if raw else None


def wait_model_ready(grpc_url: str, model: str, timeout: float = 90.0, version: str = "", what: str = "") -> None:
    """Until the gateway says the model (version) is ready: registry read, a replica up
    with it loaded and its endpoint record seen by the gateway."""
    client = triton.InferenceServerClient(grpc_url)

    def ready() -> bool:
        try:
            return client.is_model_ready(model, version)
        except InferenceServerException:
            return False

    try:
        wait_until(ready, timeout, f"model '{model}' not ready through the gateway {what}")
    finally:
        client.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total
