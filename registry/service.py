"""RegistryService: the registry's gRPC admin API over a RegistryStore.

Mount it in any grpc.aio server with `add_to_server(server, store)` (the gateway does, on
its gRPC port), or run it alone with `modelgw registry serve --etcd HOST:PORT`.

Each error declares its status code (registry/errors.py); the server's ErrorInterceptor
(modelgw/errors.py) answers with it, so the handlers only raise. ConflictError carries the
current revision in the trailing metadata `modelgw-current-revision` too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from modelgw.errors import ErrorInterceptor
from modelgw.protos import registry_pb2 as rpb
from modelgw.protos import registry_pb2_grpc as rpb_grpc
from modelgw.registry.errors import CURRENT_REVISION_METADATA, ValidationError
from modelgw.registry.store import RegistryStore

__all__ = ["CURRENT_REVISION_METADATA", "RegistryServicer", "add_to_server", "start_server"]


def _require_spec(request, what: str) -> None:
    if not request.HasField("spec"):
        raise ValidationError(f"{what}: spec: required")


class RegistryServicer(rpb_grpc.RegistryServiceServicer):
    def __init__(self, store: RegistryStore) -> None:
        self.store = store

    @staticmethod
    def _expected(request) -> int | None:
        return request.expected_revision if request.HasField("expected_revision") else None

    async def ApplyModel(self, request, context):
        _require_spec(request, "models")
        return await self.store.apply_model(request.spec, self._expected(request))

    async def GetModel(self, request, context):
        return await self.store.get_model(request.name)

    async def ListModels(self, request, context):
        return await self.store.list_models()

    async def DeleteModel(self, request, context):
        revision = await self.store.delete_model(request.name, self._expected(request), force=request.force)
        return rpb.DeleteResponse(revision=revision)

    async def ApplyRuntime(self, request, context):
        _require_spec(request, "runtimes")
        return await self.store.apply_runtime(request.spec, self._expected(request))

    async def GetRuntime(self, request, context):
        return await self.store.get_runtime(request.name)

    async def ListRuntimes(self, request, context):
        return await self.store.list_runtimes()

    async def DeleteRuntime(self, request, context):
        revision = await self.store.delete_runtime(request.name, self._expected(request), force=request.force)
        return rpb.DeleteResponse(revision=revision)

    async def ApplyJob(self, request, context):
        _require_spec(request, "jobs")
        return await self.store.apply_job(request.spec, self._expected(request))

    async def GetJob(self, request, context):
        return await self.store.get_job(request.name)

    async def ListJobs(self, request, context):
        return await self.store.list_jobs()

    async def DeleteJob(self, request, context):
        return rpb.DeleteResponse(revision=await self.store.delete_job(request.name, self._expected(request)))

    async def ApplyStream(self, request, context):
        _require_spec(request, "streams")
        return await self.store.apply_stream(request.spec, self._expected(request))

    async def GetStream(self, request, context):
        return await self.store.get_stream(request.name)

    async def ListStreams(self, request, context):
        return await self.store.list_streams()

    async def DeleteStream(self, request, context):
        return rpb.DeleteResponse(revision=await self.store.delete_stream(request.name, self._expected(request)))

    async def ApplyGatewayDefaults(self, request, context):
        _require_spec(request, "gateway-defaults")
        return await self.store.apply_gateway_defaults(request.spec, self._expected(request))

    async def GetGatewayDefaults(self, request, context):
        return await self.store.get_gateway_defaults(request.name)  # "" is the one record, "default"

    async def DeleteGatewayDefaults(self, request, context):
        revision = await self.store.delete_gateway_defaults(request.name, self._expected(request))
        return rpb.DeleteResponse(revision=revision)

    async def ListEndpoints(self, request, context):
        return await self.store.list_endpoints(request.runtime)

    async def Watch(self, request, context) -> AsyncIterator[rpb.WatchEvent]:
        if request.start_revision < 0:
            raise ValidationError("start_revision: must be 0 or more")
        async for event in self.store.watch(request.start_revision):
            yield event


def add_to_server(server: grpc.aio.Server, store: RegistryStore) -> RegistryServicer:
    """Mount the RegistryService on a grpc.aio server (before it starts), one made with
    `interceptors=[ErrorInterceptor(), ...]` so that the registry's errors get their codes."""
    servicer = RegistryServicer(store)
    rpb_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    return servicer


async def start_server(store: RegistryStore, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server with only the RegistryService, and its port (for tests
    and `modelgw registry serve`). Stop it with `await server.stop(grace)`."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    add_to_server(server, store)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
