"""The gateway's HTTP frontend (aiohttp): OIP v2 REST, /metrics, and mounted sub-apps.

REST requests are translated to the gRPC messages the runtimes speak and forwarded by the
same proxy as gRPC requests. Errors are JSON `{"error": "..."}` with the HTTP status
that matches the gRPC one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelgw import __version__
from modelgw.gateway import metrics, rest_codec
from modelgw.gateway.errors import GatewayError
from modelgw.gateway.grpc_frontend import EXTENSIONS
from modelgw.gateway.proxy import PROPAGATED, STICKY_HEADER, Proxy
from modelgw.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"

# (request, model name) -> verified subject; raises GatewayError when refused
RestAuthorizer = Callable[[web.Request, str], Awaitable[str | None]]
_ASK = object()  # _forward's subject when the request has not been authorized yet


def error_response(err: GatewayError) -> web.Response:
    # auth refusals carry their WWW-Authenticate challenge (gateway/auth/guard.py)
    return web.json_response({"error": err.message}, status=err.http_status, headers=getattr(err, "headers", None))


# grpc-timeout units (the gRPC over HTTP/2 spec): hours, minutes, seconds, milli-, micro-, nanoseconds
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _timeout(request: web.Request) -> float | None:
    """The client's deadline in seconds: `x-modelgw-timeout: 2.5` or, as gRPC writes it,
    `grpc-timeout: 2500m`. A value that is neither is ignored (the model's timeout applies)."""
    value = request.headers.get("x-modelgw-timeout")
    if value:
        try:
            seconds = float(value)
            return seconds if seconds > 0 else None
        except ValueError:
            return None
    value = request.headers.get("grpc-timeout", "")
    if 2 <= len(value) <= 9 and value[:-1].isdigit() and value[-1] in _GRPC_TIMEOUT_UNITS:
        return int(value[:-1]) * _GRPC_TIMEOUT_UNITS[value[-1]] or None
    return None


def forwarded_headers(request: web.Request) -> list[tuple[str, str]]:
    """The request's headers that travel on to the runtime (Proxy.outbound_metadata)."""
    return [(key, value) for key in PROPAGATED for value in request.headers.getall(key, ())]


class RestFrontend:
    def __init__(self, proxy: Proxy, is_ready: Callable[[], bool], authorize: RestAuthorizer | None = None) -> None:
        self.proxy = proxy
        self.is_ready = is_ready
        self.authorize = authorize

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/metrics", self.metrics)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_post(prefix + "/infer", self.infer)

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
        metadata, _ = Proxy.outbound_metadata(forwarded_headers(request), subject)
        return await self.proxy.unary(
            method,
            message,
            model,
            version,
            metadata=metadata,
            timeout=_timeout(request),
            sticky_key=request.headers.get(STICKY_HEADER),
            protocol="rest",
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        try:
            payload = pb.ModelMetadataRequest(name=model, version=version).SerializeToString()
            raw = await self._forward(request, "model_metadata", payload, model, version)
            return web.json_response(rest_codec.model_metadata_to_json(pb.ModelMetadataResponse.FromString(raw)))
        except GatewayError as err:
            return error_response(err)

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        try:
            payload = pb.ModelReadyRequest(name=model, version=version).SerializeToString()
            ready = pb.ModelReadyResponse.FromString(
                await self._forward(request, "model_ready", payload, model, version)
            ).ready
        except GatewayError as err:
            if err.code != grpc.StatusCode.UNAVAILABLE:
                return error_response(err)
            ready = False
        return web.json_response({"name": model, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        try:
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
        except GatewayError as err:
            return error_response(err)
        if header_length is None:
            return web.Response(body=out, content_type="application/json")
        return web.Response(
            body=out,
            headers={HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"},
        )


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """aiohttp's own errors (404 route, 405, 413 body too large) as JSON too; never a 500
    with a traceback for a client's mistake."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text or exc.reason
        if exc.status == 413:
            message = f"the request body is larger than the limit of {request.app['max_body_bytes']} bytes"
        elif exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        return web.json_response({"error": message}, status=exc.status)
    except GatewayError as err:
        return error_response(err)
    except Exception:
        log.exception("unhandled error for %s %s", request.method, request.path)
        return web.json_response({"error": "internal error; see the gateway log"}, status=500)


class _ClientProtocolErrors(logging.Filter):
    """aiohttp logs every unparsable HTTP request (a bad header, garbage on the port) as
    an ERROR with a traceback: the client's mistake, and a way to flood the log. Keep one
    INFO line for those."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            record.msg, record.args = "bad HTTP request: %s", (str(exc.message).splitlines()[0] if exc.message else exc,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_aiohttp_server_log = logging.getLogger("aiohttp.server")
if not any(isinstance(f, _ClientProtocolErrors) for f in _aiohttp_server_log.filters):
    _aiohttp_server_log.addFilter(_ClientProtocolErrors())


def make_app(max_body_bytes: int = 64 * 1024 * 1024) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[json_errors])
    app["max_body_bytes"] = max_body_bytes
    return app
