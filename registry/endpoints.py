"""Replicas' endpoint records and the leases they live under (part of RegistryStore).

    lease = await store.grant_lease(ttl=10)              # kept alive in the background
    await store.put_endpoint(endpoint, lease)            # endpoints/<runtime>/<instance>
    endpoints = (await store.list_endpoints("torch")).endpoints
    await store.revoke_lease(lease)                      # shutdown: the record goes at once

An endpoint is written by the one replica it names, on every load report, as a plain put
under its lease: no other writer competes for the key, so it needs no conditional write
(that would add a read to each report), and when the replica dies its lease takes the
record with it.
"""

from __future__ import annotations

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry import etcd as ops
from modelgw.registry.errors import ValidationError
from modelgw.registry.etcd import LeaseLike
from modelgw.registry.leases import Lease
from modelgw.registry.records import RecordStore, check_name, decode_all
from modelgw.registry.validation import check_endpoint


class EndpointStore(RecordStore):
    async def grant_lease(self, ttl: int = 10, *, keep_alive: bool = True) -> Lease:
        """A new lease of ttl seconds, refreshed in the background unless keep_alive=False.
        See leases.Lease: `lost` is set if etcd lets it expire; `revoke()` on shutdown."""
        if ttl < 1:
            raise ValidationError(f"lease ttl: {ttl} must be at least 1 second")
        lease = Lease(self.etcd, await self.etcd.grant(ttl), ttl)
        return lease.start() if keep_alive else lease

    async def revoke_lease(self, lease: LeaseLike) -> None:
        """Revoke a lease (by Lease or id): every key under it is deleted now."""
        if isinstance(lease, Lease):
            await lease.revoke()
        else:
            await self.etcd.revoke(lease)

    async def put_endpoint(self, endpoint: rpb.Endpoint, lease: LeaseLike) -> int:
        """Write a replica's endpoint record under its lease (create or replace); returns
        the revision. LeaseNotFoundError when the lease has expired: grant a new one."""
        check_endpoint(endpoint)
        if not ops.lease_id(lease):
            raise ValidationError(f"endpoints/{endpoint.runtime}/{endpoint.instance}: an endpoint needs a lease")
        response = await self.etcd.put(
            self.keys.endpoint(endpoint.runtime, endpoint.instance), codec.encode(endpoint), lease
        )
        return response.header.revision

    async def list_endpoints(self, runtime: str = "") -> rpb.ListEndpointsResponse:
        """Endpoints of every runtime, or of one."""
        if runtime:
            check_name("runtimes", runtime)
        prefix = self.keys.endpoints_of(runtime) if runtime else self.keys.endpoints
        response = await self.etcd.range_prefix(prefix)
        endpoints = [e for _, e in decode_all(response.kvs, rpb.Endpoint)]
        return rpb.ListEndpointsResponse(endpoints=endpoints, revision=response.header.revision)
