"""The gateway process: registry view -> routing table, gRPC and HTTP frontends, drain.

    gateway = Gateway(GatewayConfig(etcd="127.0.0.1:2379"))
    await gateway.start()
    ...
    await gateway.stop()     # stop accepting, finish in-flight requests, close

etcd is read only by the registry view's watch; requests read the routing table.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelgw.errors import ErrorInterceptor
from modelgw.gateway import metrics
from modelgw.gateway.admin import AdminApi
from modelgw.gateway.auth import AuthConfig, admin_guard, build_authenticator
from modelgw.gateway.envoy.supervisor import EnvoyDataPlane
from modelgw.gateway.grpc_frontend import InferenceFrontend
from modelgw.gateway.http_server import HttpRunner
from modelgw.gateway.openai import OpenAIApi
from modelgw.gateway.proxy import Proxy, ProxyLimits
from modelgw.gateway.rest_frontend import RestFrontend, make_app
from modelgw.gateway.routing import RoutingTable
from modelgw.gateway.triton import TritonExtensions
from modelgw.gateway.upstream import UpstreamPool
from modelgw.oip.protocol import MAX_MESSAGE_BYTES
from modelgw.registry import service as registry_service
from modelgw.registry.keys import DEFAULT_PREFIX, Section
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import Change, RegistryView

log = logging.getLogger(__name__)


# the record kinds the routing table (and the tenant limiter's defaults) is built from
ROUTING_SECTIONS = frozenset({Section.MODEL, Section.RUNTIME, Section.ENDPOINT, Section.GATEWAY_DEFAULTS})


@dataclass
class GatewayConfig:
    etcd: str = "127.0.0.1:2379"
    prefix: str = DEFAULT_PREFIX
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    max_message_bytes: int = MAX_MESSAGE_BYTES
    drain_seconds: float = 30.0
    limits: ProxyLimits = field(default_factory=ProxyLimits)
    # who may call: trusted token issuers; none is an error unless insecure_no_auth is
    # set explicitly (then every caller may use every model and the admin API)
    auth: AuthConfig = field(default_factory=AuthConfig)
    insecure_no_auth: bool = False
    # LLM replicas picked by their load figures (False: by outstanding requests, as before)
    llm_load_aware: bool = True
    # "envoy": an Envoy process owns the public ports and serves ModelInfer (gateway/envoy)
    data_plane: str = "python"
    envoy_workers: int = 1


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.store = RegistryStore(config.etcd, prefix=config.prefix)
        self.view = RegistryView(self.store)
        self.table = RoutingTable(load_aware=config.llm_load_aware)
        self.pool = UpstreamPool(config.max_message_bytes)
        self.proxy = Proxy(self.table, self.pool, config.limits)
        # Triton's statistics and model repository extensions (the registry is the repository)
        self.triton = TritonExtensions(self.proxy, self.store, lambda: self.view.snapshot.models)
        self.auth = build_authenticator(config.auth, self.table, insecure=config.insecure_no_auth)
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._unsubscribe = None
        self._draining = False
        self.envoy: EnvoyDataPlane | None = None
        if config.data_plane == "envoy":  # takes the public ports; the listeners below move to loopback
            self.envoy = EnvoyDataPlane(self, config.envoy_workers)

    def is_ready(self) -> bool:
        """Ready once the registry has been read at least once; stays ready when etcd
        goes away later, since known routes keep being served. Not ready while draining."""
        return self.view.synced.is_set() and not self._draining

    def _on_registry_change(self, changes: list[Change] | None = None) -> None:
        if changes is not None:
            # jobs, streams and every status (progress reports several times a second) do not route
            changes = [c for c in changes if c.section in ROUTING_SECTIONS]
            if not changes:
                return
        if changes is not None and not any(
            c.section != Section.ENDPOINT or RoutingTable.affects_routing(c.old, c.new) for c in changes
        ):
            # only load figures moved: the replicas take them (LLM replica choice)
            self.table.report_loads((c.name, c.new) for c in changes if c.new is not None)
            return
        snapshot = self.view.snapshot
        # the deleted records as they last were (routing.py: which replicas stay routed)
        deleted = {c.name: c.old for c in changes or () if c.section == Section.ENDPOINT and c.new is None}
        self.table.update(snapshot.models.values(), snapshot.endpoints, deleted, runtimes=snapshot.runtimes)
        self.proxy.limiter.set_defaults(snapshot.gateway_defaults)
        self.proxy.forget_replicas()
        self.pool.retain(replica.address for replica in self.table.replicas.values())  # orphans too
        metrics.ROUTES.set(len(self.table.routes))
        metrics.REPLICAS.set(len(self.table.replicas))

    def _grpc_server(self) -> grpc.aio.Server:
        size = self.config.max_message_bytes
        server = grpc.aio.server(
            # errors -> status codes (outermost, so it answers the admin check's refusals too)
            interceptors=[ErrorInterceptor(), admin_guard(self.auth)],
            options=[
                ("grpc.max_send_message_length", size),
                ("grpc.max_receive_message_length", size),
                ("grpc.so_reuseport", 0),
                # room for the largest bearer token accepted plus the usual headers, so that
                # a big token is judged by the auth config, not cut off by gRPC's 8 KiB default.
                # The hard limit equals the soft one: between the two gRPC refuses at random
                # (RESOURCE_EXHAUSTED one try, the auth's UNAUTHENTICATED the next)
                ("grpc.max_metadata_size", self.config.auth.max_header_bytes),
                ("grpc.absolute_max_metadata_size", self.config.auth.max_header_bytes),
            ]
        )
        frontend = InferenceFrontend(
            self.proxy, self.is_ready, self.auth.authorize_grpc, self.triton, self.auth.authorize_admin_grpc
        )
        server.add_generic_rpc_handlers((frontend.generic_handler(),))
        registry_service.add_to_server(server, self.store)  # behind admin_guard: needs the admin scope
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    async def start(self) -> None:
        self._unsubscribe = self.view.subscribe(self._on_registry_change)
        metrics.REGISTRY_CONNECTED.set_function(lambda: float(self.view.connected))
        metrics.REGISTRY_FULL_READS.set_function(lambda: float(self.view.resyncs))
        metrics.REGISTRY_REVISION.set_function(lambda: float(self.view.revision))
        await self.auth.start()  # issuers' keys are fetched in the background
        await self.view.start(wait=False)

        self._grpc = self._grpc_server()
        self.grpc_port = self._grpc.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        if not self.grpc_port:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.grpc_port} for gRPC")
        await self._grpc.start()

        app = make_app(self.config.max_message_bytes)
        RestFrontend(
            self.proxy, self.is_ready, self.auth.authorize_rest, self.triton, self.auth.authorize_admin_rest
        ).add_routes(app)
        AdminApi(self.store, self.auth.authorize_admin_rest).add_routes(app)
        OpenAIApi(self.proxy, lambda: self.view.runtimes, self.auth.authorize_rest).add_routes(app)  # /v1
        self._http = HttpRunner(
            app, max_header_bytes=self.config.auth.max_header_bytes,  # the token limit decides, as on gRPC
            access_log=None, handle_signals=False, shutdown_timeout=self.config.drain_seconds,
        )
        await self._http.setup()
        site = web.TCPSite(self._http, self.config.host, self.config.http_port, reuse_port=False)
        await site.start()
        self.http_port = self._http.addresses[0][1]  # the real port when 0 was asked
        if self.envoy is not None:
            await self.envoy.start()  # the ports below are Envoy's from here on
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gateway listening: gRPC %s:%d, HTTP %s:%d; registry etcd %s prefix %s",
            self.config.host, self.grpc_port, self.config.host, self.http_port, self.config.etcd, self.config.prefix,
        )

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.view.synced.wait(), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new requests on both ports at once, let in-flight ones finish (up
        to `grace`, default config.drain_seconds), then close."""
        grace = self.config.drain_seconds if grace is None else grace
        self._draining = True
        if self.envoy is not None:  # first: requests through Envoy need the Python side
            await self.envoy.stop(grace)
        await self.health.enter_graceful_shutdown()
        stops = []
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace))
        if self._http is not None:
            # cleanup() closes the listener first, then waits up to the runner's
            # shutdown_timeout for requests in flight
            self._http._shutdown_timeout = grace
            stops.append(self._http.cleanup())
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("while draining: %r", result)
        if self._unsubscribe:
            self._unsubscribe()
        await self.view.stop()
        await self.pool.close()
        await self.store.close()
        await self.auth.close()
        log.info("gateway stopped")


async def run_gateway(config: GatewayConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain and exit 0."""
    gateway = Gateway(config)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"modelgw gateway ready: grpc={gateway.grpc_port} http={gateway.http_port}", flush=True)
    await stop.wait()
    log.info("draining (up to %.0fs)", config.drain_seconds)
    await gateway.stop()
    return 0
