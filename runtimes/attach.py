"""`modelgw runtime attach`: an OIP v2 gRPC server we did not write, as a runtime replica.

    modelgw runtime attach --target 127.0.0.1:8001 --runtime triton --etcd etcd:2379
    modelgw runtime attach --target 127.0.0.1:{port} --runtime ks --etcd etcd:2379 \
        -- python my_server.py --grpc-port {port}          # run the server too (local backend)

A small process beside the server (a sidecar in its pod, or the local backend's replica,
which then runs the server as its child). It waits until the server's ServerReady says
ready, then registers the server's endpoint under a lease exactly as our replicas do
(runtimes.registration.EndpointRegistration: the same record, lease keeper and
re-registration after etcd lost the lease), with the models the registry assigns to the
runtime. While registered it polls the server every --poll-interval: ServerReady, and
ModelReady for every assigned model version, whose answers are the states in the record.
After --failures polls in a row in which the server did not answer ready, the endpoint is
withdrawn (written not ready, lease revoked: the gateway drops it at once) and the adapter
waits for the server to be ready again, then registers anew. SIGTERM: the same withdrawal,
then (when it runs the server) the server gets SIGTERM too.

Models, by what the server offers (its ServerMetadata extensions):
- "model_repository" (Triton's model repository extension): assigned models are loaded with
  RepositoryModelLoad by name, as the server's own repository holds them (the registry's
  URI is not sent: Triton loads from its --model-repository), and unloaded with
  RepositoryModelUnload once no version of them is assigned any more. Triton loads and
  unloads a model with all the versions its version policy picks, so the registry's
  version must be one of those.
- anything else, KServe's ModelServer included: the models are what the server was started
  with. An assigned model version the server does not have is FAILED in the record with
  "not served by the server". KServe lists "model_repository_extension", which is not
  Triton's: its messages number their fields otherwise, and KServe 0.21's gRPC
  RepositoryModelLoad answers INTERNAL even when the model is there, so it is not used.

Load figures: the record's queue_depth is the server's pending requests per model where it
exports Triton's Prometheus gauge `nv_inference_pending_request_count` (--metrics-url, e.g.
http://127.0.0.1:8002/metrics); in_flight stays 0 (no OIP server reports it). Without them
the gateway balances on its own count of requests in flight to each replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.repository import ModelLoad, ModelState, ModelStatus
from modelgw.tasks import OutageLog, stop_tasks

if TYPE_CHECKING:
    from modelgw.registry.store import RegistryStore

log = logging.getLogger("modelgw.attach")

TRITON_REPOSITORY_EXTENSION = "model_repository"
_REPOSITORY_LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
_REPOSITORY_UNLOAD = "/inference.GRPCInferenceService/RepositoryModelUnload"
# a dead server is noticed by the next poll, and one that comes back within a second or
# two of it: gRPC's default reconnect backoff grows to 120 s
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_PENDING = re.compile(r'^nv_inference_pending_request_count\{([^}]*)\}\s+(\S+)', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def pending_requests(metrics_text: str) -> dict[tuple[str, str], int]:
    """{(model, version): pending requests} from Triton's Prometheus text."""
    pending = {}
    for match in _PENDING.finditer(metrics_text):
        labels = dict(_LABEL.findall(match.group(1)))
        if "model" in labels:
            with contextlib.suppress(ValueError):
                pending[(labels["model"], labels.get("version", ""))] = int(float(match.group(2)))
    return pending


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


@dataclass
class _Tracked:
    status: ModelStatus
    busy: bool = False  # a load is under way: polls leave its state alone


class ServerModels:
    """The models of an OIP server as runtimes.registration sees a repository (its
    `Models` protocol): states from the server's ModelReady, loads through Triton's
    repository extension where the server has it."""

    def __init__(
        self, stub: pb_grpc.GRPCInferenceServiceStub, channel: grpc.aio.Channel, target: str, *,
        repository_extension: bool, rpc_timeout: float, load_timeout: float,
    ) -> None:
        self.stub = stub
        self.channel = channel
        self.target = target
        self.repository_extension = repository_extension
        self.rpc_timeout = rpc_timeout
        self.load_timeout = load_timeout
        self.pending: dict[tuple[str, str], int] = {}
        self._models: dict[tuple[str, str], _Tracked] = {}
        self._watchers: set[asyncio.Queue[ModelStatus]] = set()
        self._load = channel.unary_unary(
            _REPOSITORY_LOAD, request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
            response_deserializer=pb.RepositoryModelLoadResponse.FromString,
        )
        self._unload = channel.unary_unary(
            _REPOSITORY_UNLOAD, request_serializer=pb.RepositoryModelUnloadRequest.SerializeToString,
            response_deserializer=pb.RepositoryModelUnloadResponse.FromString,
        )

    # -- what registration reads

    def statuses(self) -> list[ModelStatus]:
        return [t.status for t in self._models.values()]

    def load_figures(self) -> list[ModelLoad]:
        return [
            ModelLoad(name, version, self.pending.get((name, version), 0), 0, 0)
            for (name, version), t in self._models.items() if t.status.state is ModelState.READY
        ]

    async def watch(self) -> AsyncIterator[ModelStatus]:
        """Every current status, then every change, until the consumer stops iterating."""
        queue: asyncio.Queue[ModelStatus] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            for tracked in list(self._models.values()):
                yield tracked.status
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    def _publish(self, status: ModelStatus) -> None:
        key = (status.name, status.version)
        tracked = self._models.get(key)
        if status.state is ModelState.UNLOADED:
            self._models.pop(key, None)
        elif tracked is None:
            self._models[key] = _Tracked(status)
        elif tracked.status == status:
            return  # a poll that changed nothing rewrites no record
        else:
            tracked.status = status
        for queue in self._watchers:
            queue.put_nowait(status)

    # -- what registration drives

    async def load(
        self, name: str, version: str, uri: str, *, max_batch_size: int | None = None,
        max_queue_delay: float | None = None,
    ) -> None:
        """Make the assigned version known; with Triton's repository extension, load it.
        ModelLoadError (the version is then FAILED, with the reason) when it cannot serve."""
        self._publish(ModelStatus(name, version, ModelState.LOADING, uri=uri))
        tracked = self._models[(name, version)]
        tracked.busy = True
        try:
            if self.repository_extension:
                try:
                    await self._load(pb.RepositoryModelLoadRequest(model_name=name), timeout=self.load_timeout)
                except grpc.aio.AioRpcError as exc:
                    message = f"the server at {self.target} did not load it: {_rpc_error(exc)}"
                    self._publish(ModelStatus(name, version, ModelState.FAILED, message, uri))
                    raise ModelLoadError(f"model '{name}' version '{version}': {message}") from exc
            status = await self._ready_status(name, version, uri)
            self._publish(status)
            if status.state is ModelState.FAILED:
                raise ModelLoadError(f"model '{name}' version '{version}': {status.message}")
        finally:
            tracked.busy = False

    async def unload(self, name: str, version: str) -> None:
        """No longer assigned. With the repository extension the model is unloaded once no
        other version of it is assigned (Triton unloads a model with all its versions)."""
        status = self._models.get((name, version))
        uri = status.status.uri if status else ""
        self._publish(ModelStatus(name, version, ModelState.UNLOADED, uri=uri))
        if self.repository_extension and not any(n == name for n, _ in self._models):
            try:
                await self._unload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=self.load_timeout)
            except grpc.aio.AioRpcError as exc:
                log.warning("model '%s': the server at %s did not unload it: %s", name, self.target, _rpc_error(exc))

    # -- polled

    async def _ready_status(self, name: str, version: str, uri: str) -> ModelStatus:
        what = f"model '{name}' version '{version}'"
        try:
            reply = await self.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=self.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return ModelStatus(name, version, ModelState.FAILED, self._not_served(exc), uri)
            return ModelStatus(name, version, ModelState.FAILED,
                               f"the server at {self.target} did not answer ModelReady for {what}: {_rpc_error(exc)}",
                               uri)
        if reply.ready:
            return ModelStatus(name, version, ModelState.READY, uri=uri)
        return ModelStatus(name, version, ModelState.FAILED, self._not_served(None), uri)

    def _not_served(self, exc: grpc.aio.AioRpcError | None) -> str:
        said = f" (it said {_rpc_error(exc)})" if exc is not None else " (ModelReady: not ready)"
        if self.repository_extension:
            return f"not ready on the server at {self.target}{said}"
        return (
            f"not served by the server at {self.target}{said}; it has no model repository extension that "
            "modelgw drives, so it serves the models it was started with"
        )

    async def poll(self) -> None:
        """Refresh every version's state from ModelReady (loads under way excepted)."""
        keys = [k for k, t in self._models.items() if not t.busy]
        results = await asyncio.gather(*(self._ready_status(n, v, self._models[(n, v)].status.uri) for n, v in keys))
        for key, status in zip(keys, results, strict=True):
            tracked = self._models.get(key)
            # a change of state only: a FAILED version keeps the reason its load gave
            # (Triton's own words), which a later "not ready" would only blur
            if tracked is not None and not tracked.busy and tracked.status.state is not status.state:
                self._publish(status)


class ExternalServer:
    """The server as runtimes.registration sees one of our servers (its `Registrant`)."""

    def __init__(self, models: ServerModels, address: str) -> None:
        self.repository = models
        self.address = address
        self.ready = False


# -- the process ---------------------------------------------------------------------------


def advertised_address(target: str, advertise: str | None) -> str:
    """What the gateway should dial: --advertise; else the target, but for a loopback or
    wildcard host, $POD_IP in a Kubernetes pod (a sidecar reaches the server on 127.0.0.1,
    the gateway on the pod's address) or the host name for a wildcard."""
    if advertise:
        return advertise
    host, _, port = target.rpartition(":")
    bare = host.strip("[]")
    loopback = bare in ("localhost", "::1") or bare.startswith("127.")
    wildcard = bare in ("0.0.0.0", "::")
    pod_ip = os.environ.get("POD_IP")
    if (loopback or wildcard) and pod_ip:
        return f"[{pod_ip}]:{port}" if ":" in pod_ip else f"{pod_ip}:{port}"
    if wildcard:
        return f"{socket.gethostname()}:{port}"
    return target


class Adapter:
    """One attach process: wait for the server, register, poll, withdraw; again."""

    def __init__(self, args: argparse.Namespace, stop: asyncio.Event) -> None:
        self.args = args
        self.stop = stop
        self.target: str = args.target
        self.instance: str = args.instance or os.environ.get("POD_NAME") or f"{args.runtime}-{secrets.token_hex(3)}"
        self.address = advertised_address(self.target, args.advertise)
        self.channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._waiting = OutageLog(log, f"the server at {self.target}: ServerReady")

    async def server_ready(self) -> bool:
        try:
            reply = await self.stub.ServerReady(pb.ServerReadyRequest(), timeout=self.args.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            self._waiting.failed(_rpc_error(exc), "waiting for it")
            return False
        if not reply.ready:
            self._waiting.failed("not ready", "waiting for it")
        return bool(reply.ready)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def wait_ready(self) -> bool:
        """Until the server says ready (True), or we are asked to stop (False)."""
        while not self.stop.is_set():
            if await self.server_ready():
                self._waiting.recovered("is ready")
                return True
            await self._sleep(self.args.poll_interval)
        return False

    async def repository_extension(self) -> bool:
        if self.args.repository_extension != "auto":
            return self.args.repository_extension == "triton"
        try:
            metadata = await self.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self.args.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            log.warning("the server at %s did not answer ServerMetadata (%s): models are what it serves",
                        self.target, _rpc_error(exc))
            return False
        found = TRITON_REPOSITORY_EXTENSION in metadata.extensions
        log.info("the server at %s is %s %s; extensions: %s; %s", self.target, metadata.name or "?",
                 metadata.version or "?", ", ".join(metadata.extensions) or "none",
                 "assigned models are loaded through Triton's model repository extension" if found
                 else "models are what it serves")
        return found

    async def run(self) -> int:
        """Register while the server answers; 0 once asked to stop."""
        from modelgw.registry.store import RegistryStore

        store = RegistryStore(self.args.etcd, prefix=self.args.prefix)
        try:
            while await self.wait_ready():
                await self._attached(store)
        finally:
            await store.close()
            await self.channel.close()
        return 0

    async def _attached(self, store: RegistryStore) -> None:
        from modelgw.runtimes.registration import EndpointRegistration

        models = ServerModels(
            self.stub, self.channel, self.target, repository_extension=await self.repository_extension(),
            rpc_timeout=self.args.rpc_timeout, load_timeout=self.args.load_timeout,
        )
        server = ExternalServer(models, self.address)
        registration = EndpointRegistration(store, server, runtime=self.args.runtime, instance=self.instance,
                                            lease_ttl=self.args.lease_ttl)
        log.info("registering %s as %s/%s in etcd %s (prefix %s)", self.address, self.args.runtime, self.instance,
                 self.args.etcd, self.args.prefix)
        await registration.start()
        metrics = asyncio.create_task(self._scrape(models)) if self.args.metrics_url else None
        try:
            # ready once the assigned models have been looked at, as our replicas are
            assigned = asyncio.ensure_future(registration.assigned.wait())
            stopping = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({assigned, stopping}, return_when=asyncio.FIRST_COMPLETED)
            assigned.cancel()
            stopping.cancel()
            failures = 0
            while not self.stop.is_set():
                ready = await self.server_ready()
                if ready:
                    self._waiting.recovered("is ready again")
                    await models.poll()
                failures = 0 if ready else failures + 1
                if server.ready != ready:
                    server.ready = ready
                    registration.mark_dirty()
                if failures >= self.args.failures:
                    log.warning("the server at %s did not answer ready %d times in a row: withdrawing %s/%s",
                                self.target, failures, self.args.runtime, self.instance)
                    return
                await self._sleep(self.args.poll_interval)
        finally:
            await stop_tasks(metrics)
            server.ready = False
            await registration.stop()

    async def _scrape(self, models: ServerModels) -> None:
        import aiohttp

        outage = OutageLog(log, f"load figures from {self.args.metrics_url}")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.args.rpc_timeout)) as session:
            while True:
                try:
                    async with session.get(self.args.metrics_url) as response:
                        response.raise_for_status()
                        models.pending = pending_requests(await response.text())
                    outage.recovered()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outage.failed(exc, "the record's queue depth stays as it was")
                await asyncio.sleep(self.args.poll_interval)


async def _run_server(command: Sequence[str], target: str) -> asyncio.subprocess.Process:
    from modelgw.process import tied_to_this_process

    if shutil.which(command[0]) is None:
        raise OSError(f"the server command {command[0]!r} is not found (not an executable file, nor on PATH)")
    # the server dies with us (a supervisor that SIGKILLs the adapter leaves no orphan
    # holding the port): it cannot arm the death signal itself, modelgw.process's shim does
    argv, env = tied_to_this_process(list(command), os.environ)
    log.info("starting the server for %s: %s", target, " ".join(command))
    return await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL)


async def attach(args: argparse.Namespace) -> int:
    """The attach process: 0 after SIGTERM/SIGINT; with a server command, the server's
    exit code when it exits by itself (a supervisor then restarts the pair)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await _run_server(args.command, args.target) if args.command else None
    adapter = Adapter(args, stop)
    exited: asyncio.Future[int] | None = None
    if server is not None:
        exited = asyncio.ensure_future(server.wait())
        exited.add_done_callback(lambda _: stop.set())
    code = await adapter.run()
    if server is None or exited is None:
        return code
    if exited.done():
        log.warning("the server exited with code %s", exited.result())
        return exited.result() or 1
    # withdrawn first (adapter.run returned), so no gateway sends it requests while it stops
    with contextlib.suppress(ProcessLookupError):
        server.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(exited), args.stop_grace)
    except TimeoutError:
        log.warning("the server did not stop within %.0fs; killing it", args.stop_grace)
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        await exited
    return 0
