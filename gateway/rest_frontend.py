"""The gateway's HTTP frontend (aiohttp): OIP v2 REST, /metrics, and mounted sub-apps.

REST requests are translated to the gRPC messages the runtimes speak and forwarded by the
same proxy as gRPC requests. Handlers raise; the error middleware (gateway/errors.py)
answers every route with JSON `{"error": "..."}` and the HTTP status that matches the gRPC
one (the OpenAI and admin sub-surfaces declare bodies of their own).

Triton's extensions, as Triton's HTTP server writes them (tritonclient.http reads them):
GET /v2/models/{m}[/versions/{v}]/config (routed), GET /v2/models/stats and
/v2/models/{m}[/versions/{v}]/stats (summed over replicas), POST /v2/repository/index,
POST /v2/repository/models/{m}/load|unload (admin callers; see gateway/triton.py).
/v2/systemsharedmemory/... and /v2/cudasharedmemory/... answer 404 saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelgw import __version__
from modelgw.gateway import metrics, rest_codec
from modelgw.gateway.errors import MAX_BODY_BYTES, GatewayError, error_middleware
from modelgw.gateway.forwarding import forwarded_headers, http_timeout, outbound_metadata
from modelgw.gateway.json_body import read_json
from modelgw.gateway.proxy import Proxy
from modelgw.gateway.triton import SHARED_MEMORY_MESSAGE, TritonExtensions, allowed
from modelgw.oip.protocol import EXTENSIONS, MAX_MESSAGE_BYTES, SESSION_HEADER
from modelgw.oip.triton import message_json
from modelgw.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"

# (request, model name) -> verified subject; raises GatewayError when refused
RestAuthorizer = Callable[[web.Request, str], Awaitable[str | None]]
# request -> None; raises GatewayError when the caller is no admin
RestAdminAuthorizer = Callable[[web.Request], Awaitable[None]]
_ASK = object()  # _forward's subject when the request has not been authorized yet


class RestFrontend:
    def __init__(
        self,
        proxy: Proxy,
        is_ready: Callable[[], bool],
        authorize: RestAuthorizer | None = None,
        triton: TritonExtensions | None = None,
        authorize_admin: RestAdminAuthorizer | None = None,
    ) -> None:
        self.proxy = proxy
        self.is_ready = is_ready
        self.authorize = authorize
        self.triton = triton
        self.authorize_admin = authorize_admin

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/metrics", self.metrics)
        if self.triton is not None:
            app.router.add_get("/v2/models/stats", self.model_statistics)  # before /v2/models/{model}
            app.router.add_post("/v2/repository/index", self.repository_index)
            app.router.add_post("/v2/repository/models/{model}/load", self.repository_load)
            app.router.add_post("/v2/repository/models/{model}/unload", self.repository_unload)
        for kind in ("systemsharedmemory", "cudasharedmemory"):
            app.router.add_route("*", f"/v2/{kind}{{tail:(/.*)?}}", self.shared_memory)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_post(prefix + "/infer", self.infer)
            app.router.add_get(prefix + "/config", self.model_config)
            if self.triton is not None:
                app.router.add_get(prefix + "/stats", self.model_statistics)

    # -- answered here -------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "modelgw", "version": __version__, "extensions": EXTENSIONS})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- routed --------------------------------------------------------------------------

    async def _forward(
        self, request: web.Request, method: str, message: bytes, model: str, version: str, subject: object = _ASK
    ) -> bytes:
        if subject is _ASK:
            subject = await self.authorize(request, model) if self.authorize else None
        metadata, _ = outbound_metadata(forwarded_headers(request), subject)
        return await self.proxy.unary(
            method,
            message,
            model,
            version,
            metadata=metadata,
            timeout=http_timeout(request),
            sticky_key=request.headers.get(SESSION_HEADER),
            protocol="rest",
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        payload = pb.ModelMetadataRequest(name=model, version=version).SerializeToString()
        raw = await self._forward(request, "model_metadata", payload, model, version)
        return web.json_response(rest_codec.model_metadata_to_json(pb.ModelMetadataResponse.FromString(raw)))

    async def model_config(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        payload = pb.ModelConfigRequest(name=model, version=version).SerializeToString()
        raw = await self._forward(request, "model_config", payload, model, version)
        return web.json_response(message_json(pb.ModelConfigResponse.FromString(raw).config))

    async def shared_memory(self, request: web.Request) -> web.Response:
        raise GatewayError(grpc.StatusCode.NOT_FOUND, SHARED_MEMORY_MESSAGE)

    # -- Triton's extensions (gateway/triton.py) ----------------------------------------------

    def _extensions(self) -> TritonExtensions:
        if self.triton is None:  # the routes are not added then; never reached
            raise GatewayError(grpc.StatusCode.NOT_FOUND, "this gateway serves no Triton extensions")
        return self.triton

    async def _may_see(self, request: web.Request, model: str) -> bool:
        """Whether the caller may use `model` (lists leave out the others)."""
        return self.authorize is None or await allowed(self.authorize(request, model))

    async def model_statistics(self, request: web.Request) -> web.Response:
        model, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        subject = await self.authorize(request, model) if self.authorize and model else None
        metadata, _ = outbound_metadata(forwarded_headers(request), subject)
        response = await self._extensions().statistics(
            model, version, metadata=metadata, timeout=http_timeout(request),
            may_see=lambda name: self._may_see(request, name),
        )
        return web.json_response(message_json(response))

    async def _body(self, request: web.Request, what: str) -> dict:
        if not request.can_read_body:
            return {}
        document = await read_json(request, what)
        if not isinstance(document, dict):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be a JSON object")
        return document

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await self._body(request, "the repository index request")
        index = self._extensions().index(bool(body.get("ready", False)))
        visible = {name: await self._may_see(request, name) for name in {m.name for m in index.models}}
        entries = []
        for m in index.models:
            if not visible[m.name]:
                continue
            entry = {"name": m.name, "version": m.version, "state": m.state}
            if m.reason:
                entry["reason"] = m.reason
            entries.append(entry)
        return web.json_response(entries)

    async def _admin(self, request: web.Request) -> None:
        if self.authorize_admin is not None:
            await self.authorize_admin(request)

    async def repository_load(self, request: web.Request) -> web.Response:
        await self._admin(request)
        model = request.match_info["model"]
        parameters = (await self._body(request, "the load request")).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{model}': 'parameters' must be a JSON object")
        metadata, _ = outbound_metadata(forwarded_headers(request), None)
        await self._extensions().load(model, parameters, metadata=metadata, timeout=http_timeout(request))
        return web.Response(status=200)

    async def repository_unload(self, request: web.Request) -> web.Response:
        await self._admin(request)
        await self._body(request, "the unload request")  # Triton's unload_dependents: no dependents here
        await self._extensions().unload(request.match_info["model"], timeout=http_timeout(request))
        return web.Response(status=200)

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        try:
            payload = pb.ModelReadyRequest(name=model, version=version).SerializeToString()
            ready = pb.ModelReadyResponse.FromString(
                await self._forward(request, "model_ready", payload, model, version)
            ).ready
        except GatewayError as err:
            if err.code != grpc.StatusCode.UNAVAILABLE:
                raise
            ready = False
        return web.json_response({"name": model, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        # who asks, before the body is read and parsed: an unauthenticated caller gets a
        # 401 (not a parse error) and costs no body read
        subject = await self.authorize(request, model) if self.authorize else None
        body = await request.read()
        document, binary = rest_codec.split_body(body, request.headers.get(HEADER_LENGTH))
        message, binary_all, binary_outputs = rest_codec.infer_request_from_json(document, binary, model, version)
        raw = await self._forward(request, "model_infer", message.SerializeToString(), model, version, subject)
        out, header_length = rest_codec.infer_response_to_body(
            pb.ModelInferResponse.FromString(raw), binary_all, binary_outputs
        )
        if header_length is None:
            return web.Response(body=out, content_type="application/json")
        return web.Response(
            body=out,
            headers={HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"},
        )


def make_app(max_body_bytes: int = MAX_MESSAGE_BYTES) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[error_middleware])
    app[MAX_BODY_BYTES] = max_body_bytes
    return app
