"""The gateway's errors, and the one HTTP error middleware of its three HTTP surfaces.

A handler raises; the middleware answers. What it raises says its status: a GatewayError
(or a registry error) by its gRPC `code` (the table in modelgw/errors.py), aiohttp's own
errors (unknown route, method, body over the limit) by their HTTP status, anything else
is a 500 logged with its traceback. Each surface only declares the body of its errors:

    app = web.Application(middlewares=[error_middleware])
    set_error_body(app, "/v1", openai_error_body)           # OpenAI's {"error": {...}}
    set_error_body(app, "/admin/v1", admin_error_body)      # {"error", "problems", ...}
    # everything else: oip_error_body, {"error": "..."}

A client that goes away while sending its body is its own doing: one INFO line.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from aiohttp import web

from modelgw.errors import bounded, http_status, status_code

log = logging.getLogger(__name__)

# HTTP has no metadata limit, but a body echoing a 100 KB name helps nobody either
MAX_HTTP_MESSAGE_BYTES = 8192
INTERNAL_MESSAGE = "internal error; see the gateway log"


class GatewayError(Exception):
    """A request failed with a status a client can act on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return http_status(self.code)


@dataclass
class Failure:
    """What went wrong, as every surface's body needs it."""

    status: int                      # HTTP status
    message: str                     # bounded, for a person
    error: BaseException             # what was raised
    code: grpc.StatusCode | None     # None for aiohttp's own errors (route, method, size)
    headers: dict[str, str] | None   # e.g. an auth refusal's WWW-Authenticate


# (request, failure) -> the response
ErrorBody = Callable[[web.Request, Failure], web.StreamResponse]
ERROR_BODIES = web.AppKey("modelgw_error_bodies", list)  # [(path prefix, ErrorBody)], longest first
MAX_BODY_BYTES = web.AppKey("modelgw_max_body_bytes", int)


def oip_error_body(request: web.Request, failure: Failure) -> web.StreamResponse:
    """OIP REST (KServe v2): {"error": "..."}."""
    return web.json_response({"error": failure.message}, status=failure.status, headers=failure.headers)


def set_error_body(app: web.Application, prefix: str, body: ErrorBody) -> None:
    """Errors of requests under `prefix` (e.g. "/v1") get `body`; the rest the OIP body."""
    bodies = app.get(ERROR_BODIES) or []
    bodies = [(p, b) for p, b in bodies if p != prefix] + [(prefix.rstrip("/"), body)]
    app[ERROR_BODIES] = sorted(bodies, key=lambda item: -len(item[0]))


def _body_for(request: web.Request) -> ErrorBody:
    path = request.path
    for prefix, body in request.config_dict.get(ERROR_BODIES) or ():
        if path == prefix or path.startswith(prefix + "/"):
            return body
    return oip_error_body


def _http_failure(request: web.Request, exc: web.HTTPException) -> Failure:
    if exc.status == 404:
        message = f"no such endpoint: {request.method} {request.path}"
    elif exc.status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    elif exc.status == 413:
        message = f"the request body is larger than the limit of {request.config_dict.get(MAX_BODY_BYTES, 0)} bytes"
    else:
        message = exc.text or exc.reason
    return Failure(exc.status, bounded(message, MAX_HTTP_MESSAGE_BYTES), exc, None, None)


def failure_of(request: web.Request, error: Exception) -> Failure:
    """The Failure for what a handler raised (logging the ones that are bugs of ours)."""
    if isinstance(error, web.HTTPException):
        return _http_failure(request, error)
    code = status_code(error)
    if code is None:
        log.exception("unhandled error for %s %s", request.method, request.path, exc_info=error)
        return Failure(500, INTERNAL_MESSAGE, error, grpc.StatusCode.INTERNAL, None)
    message = error.message if isinstance(error, GatewayError) else str(error)
    headers = getattr(error, "headers", None)  # auth refusals' challenge (gateway/auth/guard.py)
    return Failure(http_status(code), bounded(message, MAX_HTTP_MESSAGE_BYTES), error, code, headers)


def _client_went_away(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error of every HTTP route, in its surface's body format."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        failure = _http_failure(request, exc)
    except ConnectionResetError as exc:  # aiohttp's "Connection lost" while reading the body
        if not _client_went_away(request):
            failure = failure_of(request, exc)
        else:
            log.info("%s %s: the client went away before sending the whole request", request.method, request.path)
            # nobody reads this answer; returning it keeps aiohttp from logging the error
            return web.Response(status=400)
    except Exception as exc:
        failure = failure_of(request, exc)
    return _body_for(request)(request, failure)
