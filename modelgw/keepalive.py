"""gRPC keepalive: one policy for modelgw's channels and for the servers they ping.

The gateway keeps a channel open to every runtime replica and pings it while idle, to
notice a dead peer before a request does. A gRPC server refuses pings it has not been told
to expect: with its defaults (no pings without calls, at most one per 5 minutes) it counts
each idle ping as a strike and, after two, closes the connection with GOAWAY
ENHANCE_YOUR_CALM "too_many_pings" (gRPC core, doc/keepalive.md). So both ends take their
options from the same Keepalive:

    grpc.aio.insecure_channel(address, options=[*KEEPALIVE.channel_options(), ...])   # the pinger
    grpc.aio.server(options=[*KEEPALIVE.server_options(), ...])                          # the pinged

Tests pass a Keepalive with short intervals to both ends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keepalive:
    """How often an idle channel pings its server, and how long it waits for the answer."""

    interval_ms: int = 10_000
    timeout_ms: int = 5_000

    def channel_options(self) -> list[tuple[str, int]]:
        """Options for a channel that pings, with calls in flight or none."""
        return [
            ("grpc.keepalive_time_ms", self.interval_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # no cap on pings while idle
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """Options for a server that such channels ping: pings without calls are allowed,
        as often as every half interval (two pings can arrive closer together than they
        were sent); a peer that pings faster still gets the usual two strikes."""
        return [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", self.interval_ms // 2),
            ("grpc.http2.max_ping_strikes", 2),
        ]


KEEPALIVE = Keepalive()
