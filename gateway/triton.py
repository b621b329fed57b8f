"""Triton's protocol extensions at the gateway, for the gRPC and REST frontends alike:
model statistics summed over replicas, and the model repository (index, load, unload)
acting on the registry. (Model configuration is routed like metadata, by the proxy.)

    ext = TritonExtensions(proxy, store, models=lambda: view.snapshot.models)
    await ext.statistics("simple", "", metadata=..., timeout=5.0)   # pb.ModelStatisticsResponse
    ext.index(ready_only=False)                                      # pb.RepositoryIndexResponse
    await ext.load("simple", {"config": '{"max_batch_size": 16}'})   # admin callers only
    await ext.unload("simple")

What load and unload mean here. The registry is the repository: a model is in it or not
(`modelgw apply` / `modelgw delete`), and the runtimes load what it assigns them.
- Unload marks the model's registry record with the label `modelgw.io/unloaded: "true"`:
  every runtime unloads all its versions, and the call returns once the gateway routes
  to no replica of it (the record, its versions and its policy stay).
- Load takes that label off, applies a config override if one is given (Triton's
  `config` parameter: only `max_batch_size` and `dynamic_batching.max_queue_delay_microseconds`,
  which are the record's batching limits), and returns once every version has a ready
  replica (serving the override, when one was given). A model not in the registry cannot
  be loaded: it has no URI. File overrides (`file:` parameters) are refused: the gateway
  holds no model files.
Both need the admin scope (the frontends check it) and are conditional writes of the record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from modelgw.errors import unknown_model_message
from modelgw.gateway.errors import GatewayError
from modelgw.gateway.proxy import Proxy
from modelgw.gateway.routing import Replica
from modelgw.oip.protocol import UNLOADED_LABEL
from modelgw.oip.triton import add_statistics
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.errors import ConflictError, NotFoundError
from modelgw.registry.store import RegistryStore

log = logging.getLogger(__name__)

# how long load / unload wait for the runtimes when the client set no deadline
DEFAULT_WAIT_SECONDS = 120.0
_POLL_SECONDS = 0.1

SHARED_MEMORY_MESSAGE = (
    "shared memory cannot work through a network gateway: the gateway and the runtimes run on other "
    "machines than the client, so they cannot map its memory regions; send tensors in the request "
    "(raw or binary tensor data) instead"
)


# refusals that make a list leave a model out (an unauthenticated caller sees public models)
_HIDDEN = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)


async def allowed(check: Awaitable[Any]) -> bool:
    """Whether an authorization check (a frontend's, for one model) lets the caller see
    the model in a list: False where it refuses, its other errors raised."""
    try:
        await check
    except GatewayError as err:
        if err.code in _HIDDEN:
            return False
        raise
    return True


def _unavailable(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAVAILABLE, message)


class TritonExtensions:
    def __init__(self, proxy: Proxy, store: RegistryStore, models: Callable[[], Mapping[str, rpb.ModelSpec]]) -> None:
        self.proxy = proxy
        self.store = store
        self.models = models

    # -- statistics ----------------------------------------------------------------------

    async def statistics(
        self,
        model: str,
        version: str,
        *,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None = None,
        may_see: Callable[[str], Awaitable[bool]] | None = None,
    ) -> pb.ModelStatisticsResponse:
        """The figures of one model's versions (one version, when named), or of every model
        the caller may see (`may_see`), each version's summed over the replicas serving it.
        A request for one model asks only its replicas."""
        table = self.proxy.table
        targets: list[tuple[str, str, Replica]] = []
        if model:
            route = table.route(model)  # NOT_FOUND for an unknown model
            if version:
                table.pick(model, version)  # NOT_FOUND for an unknown version, UNAVAILABLE with no replica
            for v in [version] if version else route.versions:
                targets.extend((model, v, r) for r in route.replicas.get(v, ()))
        else:
            for name, route in sorted(table.routes.items()):
                if may_see is not None and not await may_see(name):
                    continue
                for v in route.versions:
                    targets.extend((name, v, r) for r in route.replicas.get(v, ()))
        deadline = timeout or self.proxy.limits.default_timeout

        async def ask(name: str, v: str, replica: Replica) -> pb.ModelStatistics | None:
            request = pb.ModelStatisticsRequest(name=name, version=v).SerializeToString()
            try:
                raw = await self.proxy.pool.get(replica.address).model_statistics(
                    request, timeout=deadline, metadata=metadata
                )
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    # a replica that died (its counts died with it) or just unloaded the version
                    log.info("statistics of %s/%s from %s: %s", name, v, replica.address, err.code().name)
                    return None
                raise GatewayError(err.code(), err.details() or err.code().name) from None
            figures = pb.ModelStatisticsResponse.FromString(raw).model_stats
            return figures[0] if figures else None

        answers = await asyncio.gather(*(ask(*target) for target in targets))
        totals: dict[tuple[str, str], pb.ModelStatistics] = {}
        for (name, v, _), part in zip(targets, answers, strict=True):
            if part is None:
                continue
            total = totals.get((name, v))
            if total is None:
                total = totals[(name, v)] = pb.ModelStatistics(name=name, version=v)
                total.inference_stats.SetInParent()
            add_statistics(total, part)
        if model and version and not totals:
            raise _unavailable(f"model '{model}' version '{version}': no replica answered for its statistics")
        return pb.ModelStatisticsResponse(model_stats=list(totals.values()))

    # -- the repository ------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        """Every model of the registry and each of its versions with its state: READY
        (a replica serves it), UNAVAILABLE (with the reason; unloaded ones say so)."""
        table = self.proxy.table
        response = pb.RepositoryIndexResponse()
        for name, spec in sorted(self.models().items()):
            unloaded = spec.labels.get(UNLOADED_LABEL) == "true"
            for version in spec.versions:
                v = version.version
                if unloaded:
                    state, reason = "UNAVAILABLE", "unloaded (RepositoryModelUnload); RepositoryModelLoad serves it again"
                else:
                    try:
                        table.pick(name, v)
                        state, reason = "READY", ""
                    except GatewayError as err:
                        state, reason = "UNAVAILABLE", err.message
                if ready_only and state != "READY":
                    continue
                response.models.add(name=name, version=v, state=state, reason=reason)
        return response

    async def _record(self, model: str, verb: str) -> rpb.ModelRecord:
        try:
            return await self.store.get_model(model)
        except NotFoundError:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND,
                f"failed to {verb} '{model}': "
                + unknown_model_message(model, f"models/{model} is not in the registry; register it with `modelgw apply`"),
            ) from None

    async def _update(self, model: str, verb: str, change: Callable[[rpb.ModelSpec], bool]) -> rpb.ModelSpec:
        """Apply `change` to the model's record (it says whether it changed anything),
        conditionally on the revision read; read again on a conflict."""
        for _ in range(5):
            record = await self._record(model, verb)
            spec = record.spec
            if not change(spec):
                return spec
            try:
                await self.store.apply_model(spec, record.revision)
                return spec
            except ConflictError:
                continue  # written meanwhile: read it again
        raise GatewayError(grpc.StatusCode.ABORTED, f"failed to {verb} '{model}': its record keeps changing; retry")

    async def _wait(self, model: str, verb: str, done: Callable[[], Awaitable[str]], timeout: float | None) -> None:
        """Poll `done` (what is still missing, "" once there) until the deadline."""
        deadline = time.monotonic() + (timeout or DEFAULT_WAIT_SECONDS)
        while True:
            missing = await done()
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise _unavailable(f"failed to {verb} '{model}': {missing}")
            await asyncio.sleep(_POLL_SECONDS)

    async def unload(self, model: str, timeout: float | None = None) -> None:
        def mark(spec: rpb.ModelSpec) -> bool:
            if spec.labels.get(UNLOADED_LABEL) == "true":
                return False
            spec.labels[UNLOADED_LABEL] = "true"
            return True

        await self._update(model, "unload", mark)

        async def gone() -> str:
            route = self.proxy.table.routes.get(model)
            serving = [v for v, replicas in (route.replicas.items() if route else ()) if replicas]
            return f"replicas still serve version(s) {', '.join(serving)}" if serving else ""

        await self._wait(model, "unload", gone, timeout)

    async def load(
        self, model: str, parameters: Mapping[str, Any], *, metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> None:
        files = [k for k in parameters if k.startswith("file:")]
        if files:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"failed to load '{model}': file overrides ('{files[0][:80]}') cannot be loaded through the gateway, "
                "which holds no model files: put them where the model version's uri points and load it",
            )
        override = _config_override(model, parameters.get("config"))

        def apply(spec: rpb.ModelSpec) -> bool:
            changed = spec.labels.pop(UNLOADED_LABEL, None) is not None
            if override.max_batch_size and spec.limits.max_batch_size != override.max_batch_size:
                spec.limits.max_batch_size = override.max_batch_size
                changed = True
            delay = override.dynamic_batching.max_queue_delay_microseconds / 1000.0
            if override.HasField("dynamic_batching") and spec.limits.max_queue_delay_ms != delay:
                spec.limits.max_queue_delay_ms = delay
                changed = True
            return changed

        spec = await self._update(model, "load", apply)
        versions = [v.version for v in spec.versions]

        async def serving() -> str:
            route = self.proxy.table.routes.get(model)
            if route is None:
                return "the gateway has not seen its record yet"
            for v in versions:
                replicas = route.replicas.get(v, ())
                if not replicas:
                    try:
                        self.proxy.table.pick(model, v)
                    except GatewayError as err:
                        return err.message
                    return f"version {v} has no ready replica"
                if override.max_batch_size or override.HasField("dynamic_batching"):
                    for replica in replicas:
                        if not await self._serves(replica, model, v, override, metadata):
                            return f"version {v} is not yet reloaded with the config override on {replica.address}"
            return ""

        await self._wait(model, "load", serving, timeout)

    async def _serves(
        self, replica: Replica, model: str, version: str, override: pb.ModelConfig, metadata: Sequence[tuple[str, str]]
    ) -> bool:
        """Whether the replica's configuration of the version shows the override."""
        request = pb.ModelConfigRequest(name=model, version=version).SerializeToString()
        try:
            raw = await self.proxy.pool.get(replica.address).model_config(request, timeout=5.0, metadata=metadata)
        except grpc.aio.AioRpcError:
            return False
        config = pb.ModelConfigResponse.FromString(raw).config
        if override.max_batch_size and config.max_batch_size != override.max_batch_size:
            return False
        wanted = override.dynamic_batching.max_queue_delay_microseconds
        return not override.HasField("dynamic_batching") or config.dynamic_batching.max_queue_delay_microseconds == wanted


def _config_override(model: str, config: Any) -> pb.ModelConfig:
    """Triton's `config` load parameter (a ModelConfig as JSON) as the fields it sets;
    INVALID_ARGUMENT for one that is not JSON or sets what the registry does not hold."""
    override = pb.ModelConfig()
    if config is None or config == "":
        return override
    if isinstance(config, bytes):
        config = config.decode("utf-8", errors="replace")
    if not isinstance(config, str):
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{model}': the config parameter must be a JSON string"
        )
    only = (
        "a config override may set only max_batch_size and dynamic_batching.max_queue_delay_microseconds "
        "here (the registry's batching limits)"
    )
    try:
        document = json.loads(config)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{model}': the config override is not a JSON object: {err}"
        ) from None
    try:
        json_format.ParseDict(document, override)
    except json_format.ParseError as err:  # a field modelgw does not hold, or a bad value
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{model}': {only}: {err}") from None
    allowed = {"max_batch_size", "dynamic_batching", "name"}
    extra = sorted(f.name for f, _ in override.ListFields() if f.name not in allowed)
    batching = {f.name for f, _ in override.dynamic_batching.ListFields()} - {"max_queue_delay_microseconds"}
    if extra or batching or (override.name and override.name != model):
        what = ", ".join(extra + [f"dynamic_batching.{b}" for b in sorted(batching)]) or f"name '{override.name}'"
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{model}': {only}, not {what}")
    if override.max_batch_size < 0:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{model}': max_batch_size must be >= 0")
    return override
