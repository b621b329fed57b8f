"""Pooled gRPC channels to runtime replicas, with byte-level stubs.

One channel per replica address, created on first use and kept for as long as the
replica is in the registry. The stubs move serialized protobuf bytes: the gateway
forwards a request as it arrived and a response as the runtime sent it. Idle channels
ping their replica as the shared keepalive policy says (modelgw/keepalive.py), which the
runtimes' servers are set to accept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import grpc

from modelgw.keepalive import KEEPALIVE, Keepalive
from modelgw.oip.protocol import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"


class Upstream:
    """Byte-passthrough calls to one runtime replica."""

    __slots__ = ("address", "channel", "model_config", "model_infer", "model_metadata", "model_ready",
                 "model_statistics", "model_stream_infer")

    def __init__(self, address: str, options: list[tuple[str, int]]) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=options)
        raw = dict(request_serializer=None, response_deserializer=None)
        self.model_infer = self.channel.unary_unary(SERVICE + "ModelInfer", **raw)
        self.model_metadata = self.channel.unary_unary(SERVICE + "ModelMetadata", **raw)
        self.model_ready = self.channel.unary_unary(SERVICE + "ModelReady", **raw)
        self.model_config = self.channel.unary_unary(SERVICE + "ModelConfig", **raw)
        self.model_statistics = self.channel.unary_unary(SERVICE + "ModelStatistics", **raw)
        self.model_stream_infer = self.channel.stream_stream(SERVICE + "ModelStreamInfer", **raw)


class UpstreamPool:
    """address -> Upstream, created lazily; `retain` closes those no longer needed."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES, keepalive: Keepalive = KEEPALIVE) -> None:
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # keep idle connections to replicas warm, detect dead peers quickly
            *keepalive.channel_options(),
            # a replica that died comes back under a new address; don't wait long for the old
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        self._upstreams: dict[str, Upstream] = {}
        # channels closing in the background: the loop keeps only weak references to tasks
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str) -> Upstream:
        upstream = self._upstreams.get(address)
        if upstream is None:
            upstream = self._upstreams[address] = Upstream(address, self._options)
        return upstream

    def retain(self, addresses: Iterable[str]) -> None:
        """Close the channels of addresses not in `addresses` (replicas that went away)."""
        keep = set(addresses)
        for address in [a for a in self._upstreams if a not in keep]:
            upstream = self._upstreams.pop(address)
            task = asyncio.ensure_future(upstream.channel.close(grace=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.debug("closed channel to %s", address)

    async def close(self) -> None:
        upstreams, self._upstreams = list(self._upstreams.values()), {}
        await asyncio.gather(*(u.channel.close(None) for u in upstreams), *self._closing, return_exceptions=True)
