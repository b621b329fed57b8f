"""`modelgw gateway`: run the front door."""

from __future__ import annotations

import argparse
import asyncio
import sys

from modelgw.gateway.auth.cli import add_gateway_arguments, gateway_auth_config
from modelgw.gateway.proxy import ProxyLimits
from modelgw.oip.protocol import MAX_MESSAGE_BYTES
from modelgw.registry.keys import DEFAULT_PREFIX


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gateway",
        help="run the gateway (gRPC + HTTP front door routed by the etcd registry)",
        description="Serve every registered model over gRPC (KServe OIP v2 / Triton) and HTTP "
        "(OIP v2 REST, admin API, /metrics), routed by the registry in etcd.",
    )
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoint HOST:PORT (default %(default)s)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="registry key prefix (default %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default %(default)s)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                   help=f"largest request or response (default {MAX_MESSAGE_BYTES >> 20} MiB)")
    p.add_argument("--max-in-flight", type=int, default=4096,
                   help="requests in flight across the gateway before 429 / RESOURCE_EXHAUSTED")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--llm-replica-choice", choices=("load", "outstanding"), default="load",
                   help="LLM models: pick replicas by their reported load (queue, running, KV cache) and this "
                   "gateway's counts, or by outstanding requests alone (default %(default)s)")
    p.add_argument("--data-plane", choices=("python", "envoy"), default="python",
                   help="who serves gRPC inference: this process, or an Envoy it starts and programs "
                   "(modelgw[envoy]; README: choosing a data plane) (default %(default)s)")
    p.add_argument("--envoy-workers", type=int, default=1, help="Envoy worker threads (--data-plane envoy)")
    add_gateway_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modelgw.gateway.app import GatewayConfig, run_gateway
    from modelgw.gateway.auth.config import AuthConfigError, check_auth_choice

    try:
        auth = gateway_auth_config(args)
        check_auth_choice(auth, args.insecure_no_auth)
    except AuthConfigError as err:
        print(f"modelgw gateway: error: {err}", file=sys.stderr)
        return 2
    if args.data_plane == "envoy":
        from modelgw.gateway.envoy.config import EnvoyConfigError
        from modelgw.gateway.envoy.supervisor import find_envoy

        try:
            find_envoy()
        except EnvoyConfigError as err:
            print(f"modelgw gateway: error: {err}", file=sys.stderr)
            return 2

    config = GatewayConfig(
        etcd=args.etcd,
        prefix=args.prefix,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        max_message_bytes=args.max_message_bytes,
        drain_seconds=args.drain_seconds,
        limits=ProxyLimits(max_in_flight=args.max_in_flight),
        auth=auth,
        insecure_no_auth=args.insecure_no_auth,
        llm_load_aware=args.llm_replica_choice == "load",
        data_plane=args.data_plane,
        envoy_workers=args.envoy_workers,
    )
    return asyncio.run(run_gateway(config))
