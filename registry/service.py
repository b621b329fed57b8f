"""RegistryService: the registry's gRPC admin API over a RegistryStore.

Mount it in any grpc.aio server with `add_to_server(server, store)` (the gateway does, on
its gRPC port), or run it alone with `modelgw registry serve --etcd HOST:PORT`.

Errors map to status codes a client can act on:
    ValidationError     INVALID_ARGUMENT   the message names the record and field
    NotFoundError       NOT_FOUND
    ConflictError       ABORTED            current revision in the message and in the
                                           trailing metadata `modelgw-current-revision`
    IntegrityError      FAILED_PRECONDITION  missing runtime / runtime still in use
    CompactedError      OUT_OF_RANGE       Watch from a compacted revision: list again
    UnavailableError    UNAVAILABLE        etcd cannot be reached
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from modelgw.protos import registry_pb2 as rpb
from modelgw.protos import registry_pb2_grpc as rpb_grpc
from modelgw.registry.errors import (
    CompactedError,
    ConflictError,
    CorruptRecordError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    UnavailableError,
    ValidationError,
)
from modelgw.registry.store import RegistryStore

log = logging.getLogger(__name__)

CURRENT_REVISION_METADATA = "modelgw-current-revision"

STATUS_CODES: dict[type[RegistryError], grpc.StatusCode] = {
    ValidationError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ConflictError: grpc.StatusCode.ABORTED,
    IntegrityError: grpc.StatusCode.FAILED_PRECONDITION,
    CompactedError: grpc.StatusCode.OUT_OF_RANGE,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    CorruptRecordError: grpc.StatusCode.DATA_LOSS,
}


def status_code(error: RegistryError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, error: RegistryError) -> None:
    metadata: tuple[tuple[str, str], ...] = ()
    if isinstance(error, ConflictError):
        metadata = ((CURRENT_REVISION_METADATA, str(error.current_revision)),)
    await context.abort(status_code(error), str(error), trailing_metadata=metadata)


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
        try:
            _require_spec(request, "models")
            return await self.store.apply_model(request.spec, self._expected(request))
        except RegistryError as error:
            await _abort(context, error)

    async def GetModel(self, request, context):
        try:
            return await self.store.get_model(request.name)
        except RegistryError as error:
            await _abort(context, error)

    async def ListModels(self, request, context):
        try:
            return await self.store.list_models()
        except RegistryError as error:
            await _abort(context, error)

    async def DeleteModel(self, request, context):
        try:
            revision = await self.store.delete_model(request.name, self._expected(request))
            return rpb.DeleteResponse(revision=revision)
        except RegistryError as error:
            await _abort(context, error)

    async def ApplyRuntime(self, request, context):
        try:
            _require_spec(request, "runtimes")
            return await self.store.apply_runtime(request.spec, self._expected(request))
        except RegistryError as error:
            await _abort(context, error)

    async def GetRuntime(self, request, context):
        try:
            return await self.store.get_runtime(request.name)
        except RegistryError as error:
            await _abort(context, error)

    async def ListRuntimes(self, request, context):
        try:
            return await self.store.list_runtimes()
        except RegistryError as error:
            await _abort(context, error)

    async def DeleteRuntime(self, request, context):
        try:
            revision = await self.store.delete_runtime(request.name, self._expected(request), force=request.force)
            return rpb.DeleteResponse(revision=revision)
        except RegistryError as error:
            await _abort(context, error)

    async def ListEndpoints(self, request, context):
        try:
            return await self.store.list_endpoints(request.runtime)
        except RegistryError as error:
            await _abort(context, error)

    async def Watch(self, request, context) -> AsyncIterator[rpb.WatchEvent]:
        if request.start_revision < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start_revision: must be 0 or more")
        try:
            async for event in self.store.watch(request.start_revision):
                yield event
        except RegistryError as error:
            await _abort(context, error)


def add_to_server(server: grpc.aio.Server, store: RegistryStore) -> RegistryServicer:
    """Mount the RegistryService on a grpc.aio server (before it starts)."""
    servicer = RegistryServicer(store)
    rpb_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    return servicer


async def start_server(store: RegistryStore, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server with only the RegistryService, and its port (for tests
    and `modelgw registry serve`). Stop it with `await server.stop(grace)`."""
    server = grpc.aio.server()
    add_to_server(server, store)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
