"""A thin asyncio layer over aetcd: one channel to etcd, raw KV/lease/watch calls, and
etcd failures turned into registry errors (UnavailableError when etcd cannot be reached).

aetcd gives us the channel, auth and generated stubs; transactions and watches go through
the stubs directly because we need what aetcd's helpers drop: the header revision of a
read-only transaction, range compares, and whole watch responses (all events of one
revision together, compaction and cancel notices, progress notifications).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

import aetcd
import grpc
from aetcd import rpc

from modelgw.registry.errors import CompactedError, LeaseNotFoundError, RegistryError, UnavailableError
from modelgw.registry.keys import prefix_end

# Reconnect fast after an etcd restart (grpc's default backoff grows to two minutes), and
# notice a silently dead connection. etcd refuses pings more often than every 5 s.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}


class HasLeaseId(Protocol):
    id: int


LeaseLike = int | HasLeaseId | None


def lease_id(lease: LeaseLike) -> int:
    if lease is None:
        return 0
    return lease if isinstance(lease, int) else int(lease.id)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"host:port" (an http:// prefix is tolerated, as etcdctl users type it) -> (host, port)."""
    text = endpoint.removeprefix("http://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- request builders


def get(key: bytes, range_end: bytes | None = None) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end or b""))


def get_prefix(prefix: bytes) -> rpc.RequestOp:
    return get(prefix, prefix_end(prefix))


def put(key: bytes, value: bytes, lease: LeaseLike = None) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease_id(lease)))


def delete(key: bytes, range_end: bytes | None = None) -> rpc.RequestOp:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=range_end or b""))


def mod_revision_is(key: bytes, revision: int) -> rpc.Compare:
    """The key's mod_revision equals `revision` (0: the key does not exist)."""
    return rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=revision)


def exists(key: bytes) -> rpc.Compare:
    return rpc.Compare(key=key, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0)


def unchanged_since(prefix: bytes, revision: int) -> rpc.Compare:
    """No key under prefix was created or modified after `revision` (deletes pass)."""
    return rpc.Compare(
        key=prefix,
        range_end=prefix_end(prefix),
        target=rpc.Compare.MOD,
        result=rpc.Compare.LESS,
        mod_revision=revision + 1,
    )


def value_is(key: bytes, value: bytes) -> rpc.Compare:
    return rpc.Compare(key=key, target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=value)


# ---------------------------------------------------------------- the connection


class Etcd:
    """One connection to etcd. Every call raises RegistryError subclasses only."""

    def __init__(self, endpoint: str = "127.0.0.1:2379", *, timeout: float = 5.0, **client_kwargs: Any) -> None:
        self.endpoint = endpoint
        host, port = parse_endpoint(endpoint)
        self.timeout = timeout
        self.client = aetcd.Client(host, port, timeout=timeout, options=dict(CHANNEL_OPTIONS), **client_kwargs)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc.code(), exc.details() or "") from None
        except aetcd.ClientError as exc:
            cause = exc.__cause__
            if isinstance(cause, grpc.aio.AioRpcError):
                raise self._translate(cause.code(), cause.details() or "") from None
            if isinstance(exc, (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError)):
                raise UnavailableError(f"etcd at {self.endpoint} is unreachable: {exc}") from None
            raise RegistryError(f"etcd at {self.endpoint}: {exc}") from None
        except TimeoutError:
            raise UnavailableError(f"etcd at {self.endpoint} did not answer within {self.timeout:g}s") from None

    def _translate(self, code: grpc.StatusCode, details: str) -> RegistryError:
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return UnavailableError(f"etcd at {self.endpoint} is unreachable: {details}")
        if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
            return LeaseNotFoundError(f"etcd lease not found ({details}): it expired or was revoked")
        return RegistryError(f"etcd at {self.endpoint}: {code.name}: {details}")

    async def _connected(self) -> aetcd.Client:
        with self._errors():
            await self.client.connect()
        return self.client

    def _call_args(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "metadata": self.client.metadata}

    # -- KV

    async def range(self, key: bytes, range_end: bytes | None = None) -> rpc.RangeResponse:
        client = await self._connected()
        with self._errors():
            return await client.kvstub.Range(rpc.RangeRequest(key=key, range_end=range_end or b""), **self._call_args())

    async def range_prefix(self, prefix: bytes) -> rpc.RangeResponse:
        return await self.range(prefix, prefix_end(prefix))

    async def txn(
        self,
        compare: Sequence[rpc.Compare] = (),
        success: Sequence[rpc.RequestOp] = (),
        failure: Sequence[rpc.RequestOp] = (),
    ) -> rpc.TxnResponse:
        """One etcd transaction; a read-only one (no compare) is a consistent multi-key read."""
        client = await self._connected()
        request = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        with self._errors():
            return await client.kvstub.Txn(request, **self._call_args())

    async def put(self, key: bytes, value: bytes, lease: LeaseLike = None) -> rpc.PutResponse:
        client = await self._connected()
        with self._errors():
            return await client.kvstub.Put(
                rpc.PutRequest(key=key, value=value, lease=lease_id(lease)), **self._call_args()
            )

    async def delete(self, key: bytes, range_end: bytes | None = None) -> rpc.DeleteRangeResponse:
        client = await self._connected()
        with self._errors():
            return await client.kvstub.DeleteRange(
                rpc.DeleteRangeRequest(key=key, range_end=range_end or b""), **self._call_args()
            )

    async def compact(self, revision: int) -> None:
        client = await self._connected()
        with self._errors():
            await client.kvstub.Compact(rpc.CompactionRequest(revision=revision, physical=True), **self._call_args())

    # -- leases

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; returns its id."""
        client = await self._connected()
        with self._errors():
            response = await client.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), **self._call_args())
        if response.error:
            raise RegistryError(f"etcd refused a lease: {response.error}")
        return response.ID

    async def revoke(self, lease: LeaseLike) -> None:
        """Revoke a lease, deleting its keys; revoking a lease that is gone is not an error."""
        client = await self._connected()
        try:
            with self._errors():
                await client.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id(lease)), **self._call_args())
        except LeaseNotFoundError:
            pass

    async def keep_alive_once(self, lease: LeaseLike) -> int:
        """Refresh a lease; returns its remaining TTL in seconds, 0 when it has expired."""
        client = await self._connected()
        call = client.leasestub.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease_id(lease))]), **self._call_args())
        try:
            with self._errors():
                async for reply in call:
                    return int(reply.TTL)
        finally:
            call.cancel()
        return 0

    async def time_to_live(self, lease: LeaseLike) -> int:
        """Remaining TTL of a lease in seconds; -1 when it has expired or never existed."""
        client = await self._connected()
        with self._errors():
            reply = await client.leasestub.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease_id(lease)), **self._call_args()
            )
        return int(reply.TTL)

    # -- watch

    async def watch(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_notify: bool = False,
    ) -> AsyncIterator[rpc.WatchResponse]:
        """The raw responses of one etcd watch (the first one has created=True). Raises
        CompactedError when start_revision is compacted, UnavailableError when the
        connection breaks; the caller resumes or resyncs. Each response holds whole
        revisions, so applying a response at once never shows half a transaction."""
        client = await self._connected()
        create = rpc.WatchCreateRequest(
            key=key,
            range_end=range_end or b"",
            start_revision=start_revision,
            prev_kv=prev_kv,
            progress_notify=progress_notify,
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[rpc.WatchRequest]:
            yield rpc.WatchRequest(create_request=create)
            await stop.wait()  # keep the request side open for as long as we watch

        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
        try:
            with self._errors():
                async for response in call:
                    if response.compact_revision:
                        raise CompactedError(response.compact_revision)
                    if response.canceled:
                        raise RegistryError(f"etcd canceled the watch: {response.cancel_reason or 'no reason given'}")
                    yield response
            raise UnavailableError(f"etcd at {self.endpoint} closed the watch stream")
        finally:
            stop.set()
            call.cancel()
