"""An asyncio client of the RegistryService with the store's method names and errors, so
code written against RegistryStore (the CLI, scripts) works over gRPC unchanged:

    async with RegistryClient("127.0.0.1:8001", token=os.environ["MODELGW_TOKEN"]) as registry:
        result = await registry.apply_model(spec)          # ApplyModelResponse
        await registry.delete_model("resnet")

The gateway's RegistryService needs a bearer token with its admin scope (`token`, sent
as `authorization: Bearer ...` on every call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from modelgw.protos import registry_pb2 as rpb
from modelgw.protos import registry_pb2_grpc as rpb_grpc
from modelgw.registry.errors import (
    CURRENT_REVISION_METADATA,
    ERROR_OF_CODE,
    CompactedError,
    ConflictError,
    RegistryError,
    UnavailableError,
)


class RegistryClient:
    def __init__(self, target: str = "127.0.0.1:8001", *, timeout: float = 10.0, token: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = rpb_grpc.RegistryServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, exc: grpc.aio.AioRpcError) -> RegistryError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.ABORTED:
            metadata = dict(exc.trailing_metadata() or ())
            revision = metadata.get(CURRENT_REVISION_METADATA, "0")
            return ConflictError(details, int(revision) if str(revision).isdigit() else 0)
        if code == grpc.StatusCode.OUT_OF_RANGE:
            return CompactedError(0)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            hint = "" if self._metadata else "; pass --token or set $MODELGW_TOKEN"
            return RegistryError(f"the registry service at {self.target} refused the request: {details}{hint}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and "etcd" not in details:
            return UnavailableError(f"registry service at {self.target} is unreachable: {details}")
        return ERROR_OF_CODE.get(code, RegistryError)(details or code.name)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    async def apply_model(self, spec: rpb.ModelSpec, expected_revision: int | None = None) -> rpb.ApplyModelResponse:
        request = rpb.ApplyModelRequest(spec=spec, expected_revision=expected_revision)
        return await self._call(self._stub.ApplyModel, request)

    async def get_model(self, name: str) -> rpb.ModelRecord:
        return await self._call(self._stub.GetModel, rpb.GetRequest(name=name))

    async def list_models(self) -> rpb.ListModelsResponse:
        return await self._call(self._stub.ListModels, rpb.ListRequest())

    async def delete_model(self, name: str, expected_revision: int | None = None, force: bool = False) -> int:
        request = rpb.DeleteRequest(name=name, expected_revision=expected_revision, force=force)
        return (await self._call(self._stub.DeleteModel, request)).revision

    async def apply_runtime(
        self, spec: rpb.RuntimeSpec, expected_revision: int | None = None
    ) -> rpb.ApplyRuntimeResponse:
        request = rpb.ApplyRuntimeRequest(spec=spec, expected_revision=expected_revision)
        return await self._call(self._stub.ApplyRuntime, request)

    async def get_runtime(self, name: str) -> rpb.RuntimeRecord:
        return await self._call(self._stub.GetRuntime, rpb.GetRequest(name=name))

    async def list_runtimes(self) -> rpb.ListRuntimesResponse:
        return await self._call(self._stub.ListRuntimes, rpb.ListRequest())

    async def delete_runtime(self, name: str, expected_revision: int | None = None, force: bool = False) -> int:
        request = rpb.DeleteRequest(name=name, expected_revision=expected_revision, force=force)
        return (await self._call(self._stub.DeleteRuntime, request)).revision

    async def apply_job(self, spec: rpb.JobSpec, expected_revision: int | None = None) -> rpb.ApplyJobResponse:
        request = rpb.ApplyJobRequest(spec=spec, expected_revision=expected_revision)
        return await self._call(self._stub.ApplyJob, request)

    async def get_job(self, name: str) -> rpb.JobRecord:
        return await self._call(self._stub.GetJob, rpb.GetRequest(name=name))

    async def list_jobs(self) -> rpb.ListJobsResponse:
        return await self._call(self._stub.ListJobs, rpb.ListRequest())

    async def delete_job(self, name: str, expected_revision: int | None = None) -> int:
        request = rpb.DeleteRequest(name=name, expected_revision=expected_revision)
        return (await self._call(self._stub.DeleteJob, request)).revision

    async def apply_stream(self, spec: rpb.StreamSpec, expected_revision: int | None = None) -> rpb.ApplyStreamResponse:
        request = rpb.ApplyStreamRequest(spec=spec, expected_revision=expected_revision)
        return await self._call(self._stub.ApplyStream, request)

    async def get_stream(self, name: str) -> rpb.StreamRecord:
        return await self._call(self._stub.GetStream, rpb.GetRequest(name=name))

    async def list_streams(self) -> rpb.ListStreamsResponse:
        return await self._call(self._stub.ListStreams, rpb.ListRequest())

    async def delete_stream(self, name: str, expected_revision: int | None = None) -> int:
        request = rpb.DeleteRequest(name=name, expected_revision=expected_revision)
        return (await self._call(self._stub.DeleteStream, request)).revision

    async def apply_gateway_defaults(
        self, spec: rpb.GatewayDefaults, expected_revision: int | None = None
    ) -> rpb.ApplyGatewayDefaultsResponse:
        request = rpb.ApplyGatewayDefaultsRequest(spec=spec, expected_revision=expected_revision)
        return await self._call(self._stub.ApplyGatewayDefaults, request)

    async def get_gateway_defaults(self, name: str = "default") -> rpb.GatewayDefaultsRecord:
        return await self._call(self._stub.GetGatewayDefaults, rpb.GetRequest(name=name))

    async def delete_gateway_defaults(self, name: str = "default", expected_revision: int | None = None) -> int:
        request = rpb.DeleteRequest(name=name, expected_revision=expected_revision)
        return (await self._call(self._stub.DeleteGatewayDefaults, request)).revision

    async def list_endpoints(self, runtime: str = "") -> rpb.ListEndpointsResponse:
        return await self._call(self._stub.ListEndpoints, rpb.ListEndpointsRequest(runtime=runtime))

    async def watch(self, start_revision: int = 0) -> AsyncIterator[rpb.WatchEvent]:
        """WatchEvents until cancelled; raises the registry errors like the store's watch."""
        call = self._stub.Watch(rpb.WatchRequest(start_revision=start_revision), metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()
