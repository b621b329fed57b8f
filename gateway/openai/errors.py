"""Errors of the OpenAI API in OpenAI's format: {"error": {"message", "type", "param", "code"}}.

Every failure is a GatewayError (a gRPC status and its HTTP equivalent); here it gets
OpenAI's `type` and `code` for its status, and a `param` when one parameter is to blame.
`openai_error_body` is the /v1 surface's body for the gateway's error middleware
(gateway/errors.py), which answers whatever a route raises.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from aiohttp import web

from modelgw.errors import split_stream_message
from modelgw.gateway.errors import Failure, GatewayError

# HTTP status -> (OpenAI error type, default code)
_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    501: ("invalid_request_error", "unsupported"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


class InvalidRequest(GatewayError):
    """A request the OpenAI API refuses (400), naming the parameter to blame."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.param = param
        self.openai_code = code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    default_kind, default_code = _KINDS.get(status, ("server_error", "internal_error"))
    return {"error": {"message": message, "type": kind or default_kind, "param": param, "code": code or default_code}}


# The runtime's messages start with the parameter they refuse ("temperature must be >= 0,
# got -1.0"): name it as OpenAI's `param`.
_LEADING_PARAM = re.compile(r"^(max_tokens|temperature|top_p|top_k|seed|stop|stop_token_ids|logprobs|ignore_eos)\b")
_CONTEXT_EXCEEDED = "beyond the model's context"


def describe(err: GatewayError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) of an error."""
    status = err.http_status
    param = getattr(err, "param", None)
    code = getattr(err, "openai_code", None)
    if status == 400 and param is None:
        if _CONTEXT_EXCEEDED in err.message:
            code = "context_length_exceeded"  # OpenAI's code for it; prompt or max_tokens to blame
        elif match := _LEADING_PARAM.match(err.message):
            param = match.group(1)
    if status == 404:
        param = param or "model"
    # a per-tenant limit (gateway/limits.py) names what ran out, "requests" or "tokens", as
    # OpenAI's own 429s do
    return status, error_body(status, err.message, param, code, getattr(err, "openai_type", None))


def openai_error_body(request: web.Request, failure: Failure) -> web.Response:
    """The /v1 surface's error body (the error middleware's ErrorBody)."""
    error = failure.error
    if isinstance(error, GatewayError):
        status, body = describe(error)
        if failure.message != error.message:  # cut to size by the middleware
            body["error"]["message"] = failure.message
    else:
        # aiohttp's own (unknown URL, method, body over the limit) or a bug of ours (500)
        status = failure.status
        unknown_url = status == 404 and failure.code is None
        body = error_body(status, failure.message, code="unknown_url" if unknown_url else None)
    return web.json_response(body, status=status, headers=failure.headers)


# -- errors that arrive on a ModelStreamInfer stream ------------------------------------

_UNAVAILABLE_HINTS = (
    "not ready", "shutting down", "failed to load", "is not loaded", "not served here", "has no version",
)


def stream_error(message: str) -> GatewayError:
    """A GatewayError for a stream response's error_message.

    Triton's stream protocol carries a message without a status code, so modelgw's
    runtimes and gateway start it with the code's name ("UNAVAILABLE: ...",
    modelgw.errors.stream_message): that name is the status."""
    code, rest = split_stream_message(message)
    if code is not None:
        return GatewayError(code, rest)
    return _guessed_stream_error(message)


def _guessed_stream_error(message: str) -> GatewayError:
    """FALLBACK, for runtimes that are not ours (e.g. Triton itself), whose stream errors
    name no status: guessed from the words, "internal error" / "failed:" (a bug, 500),
    "retry later" (a full queue, 429), a model that is not loaded or not ready (503), and
    otherwise a refused request (400), by far the most common."""
    lowered = message.lower()
    if lowered.startswith("internal error") or "' failed: " in lowered:
        return GatewayError(grpc.StatusCode.INTERNAL, message)
    if "retry later" in lowered:
        return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    if any(hint in lowered for hint in _UNAVAILABLE_HINTS):
        return GatewayError(grpc.StatusCode.UNAVAILABLE, message)
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)
