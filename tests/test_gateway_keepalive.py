"""The gateway's channels to runtimes and the runtimes' servers share one keepalive policy
(modelgw/keepalive.py): an idle channel that pings its runtime at the policy's interval is
never told GOAWAY "too_many_pings", so it stays connected however long traffic stops.

Short intervals here (200 ms): a runtime that refuses idle pings closes the connection
after the third one; this waits forty."""

from __future__ import annotations

import asyncio

import grpc

from modelgw.gateway.upstream import UpstreamPool
from modelgw.keepalive import Keepalive
from modelgw.protos import inference_pb2 as pb
from modelgw.runtimes.repository import ModelRepository
from modelgw.runtimes.server import RuntimeServer

POLICY = Keepalive(interval_ms=200, timeout_ms=5_000)
INTERVALS = 40


async def test_an_idle_channel_to_a_runtime_survives_many_keepalive_intervals() -> None:
    repository = ModelRepository("python")
    server = RuntimeServer(repository, keepalive=POLICY)
    await server.start()
    await server.set_ready(True)
    pool = UpstreamPool(keepalive=POLICY)
    try:
        upstream = pool.get(server.address)
        request = pb.ServerLiveRequest().SerializeToString()
        live = upstream.channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive", request_serializer=None, response_deserializer=None
        )
        assert pb.ServerLiveResponse.FromString(await live(request, timeout=10)).live
        # idle now: only keepalive pings cross the connection. A GOAWAY would take the
        # channel out of READY (to IDLE: gRPC reconnects only for the next call)
        states = []
        for _ in range(INTERVALS):
            await asyncio.sleep(POLICY.interval_ms / 1000)
            states.append(upstream.channel.get_state(try_to_connect=False))
        assert set(states) == {grpc.ChannelConnectivity.READY}, states
        assert pb.ServerLiveResponse.FromString(await live(request, timeout=10)).live
    finally:
        await pool.close()
        await server.stop(0)
