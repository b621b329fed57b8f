"""Errors declared once, for every server of modelgw (gateway, runtimes, registry).

An error class says its gRPC status itself, as a `code` attribute (RegistryError
subclasses, the runtime SDK's InferenceError, the gateway's GatewayError); servers answer
with one interceptor instead of a try/except in every handler:

    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    ...
    raise NotFoundError("models/resnet: not found")      # -> NOT_FOUND, that message

`HTTP_STATUS` is the one gRPC code -> HTTP status table (the gateway's HTTP surfaces read
it). Every message that leaves is `bounded()`: gRPC carries it in the `grpc-message`
trailer, and a client drops trailers over its metadata limit (16 KiB hard, 8 KiB soft by
default) with RESOURCE_EXHAUSTED, so a 100 KB model name echoed in NOT_FOUND would hide
the real status. Stream responses (Triton's ModelStreamInfer) carry no status field: their
error_message starts with the status name, written by `stream_message()` and read back by
`split_stream_message()`. Errors Triton clients recognise by their text (an unknown model
or version) start with Triton's wording: `unknown_model_message()`, `unknown_version_message()`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

# gRPC status -> HTTP status, as in the gRPC-HTTP mapping Google APIs use.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# UTF-8 bytes of an error message; percent-encoded in grpc-message that is at most 3 KiB,
# well inside the 8 KiB a client accepts for all trailers together
MAX_ERROR_MESSAGE_BYTES = 1024


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status an error declares (its `code` attribute), None if it declares none."""
    code = getattr(error, "code", None)
    return code if isinstance(code, grpc.StatusCode) else None


def bounded(message: str, limit: int = MAX_ERROR_MESSAGE_BYTES) -> str:
    """`message` cut to `limit` UTF-8 bytes, saying how long it was."""
    if len(message) <= limit // 4:  # the common case: short enough whatever its characters
        return message
    raw = message.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return message
    suffix = f"... [cut; {len(raw)} bytes in all]"
    return raw[: limit - len(suffix)].decode("utf-8", errors="ignore") + suffix


def trailing_metadata(error: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailers an error asks to travel with its status (e.g. the registry's current revision)."""
    metadata = getattr(error, "trailing_metadata", None)
    return tuple(metadata()) if callable(metadata) else ()


def internal_message(error: BaseException) -> str:
    return f"internal error: {type(error).__name__}: {error}"


# -- Triton's wording, where clients match on it ---------------------------------------------
# Triton client code checks the text of a few errors (e.g. the official examples test
# `message().startswith("Request for unknown model")`): those messages start with Triton's
# words, ours follow in parentheses. The status codes stay ours (NOT_FOUND).


def unknown_model_message(model: str, detail: str = "") -> str:
    """The message for a model nobody serves (Triton: "Request for unknown model: 'x' is not found")."""
    text = f"Request for unknown model: '{model}' is not found"
    return f"{text} ({detail})" if detail else text


def unknown_version_message(model: str, version: str, detail: str = "") -> str:
    """The message for a version the model does not have. Triton's versions are integers:
    it says "... 'x' version 3 is not found" for a number and "failed to get model version
    from specified version string 'v'" for anything else."""
    if version.isdigit():
        text = f"Request for unknown model: '{model}' version {version} is not found"
    else:
        text = f"failed to get model version from specified version string '{version}'"
    return f"{text} ({detail})" if detail else text


# -- the status on a ModelStreamInfer stream ---------------------------------------------


def stream_message(code: grpc.StatusCode, message: str) -> str:
    """A stream response's error_message: "CODE_NAME: message", bounded."""
    return bounded(f"{code.name}: {message}")


def split_stream_message(text: str) -> tuple[grpc.StatusCode | None, str]:
    """(status, message) of an error_message written by `stream_message`; (None, text) for
    one that does not start with a status name (a runtime that is not ours)."""
    name, sep, rest = text.partition(": ")
    if sep and name in grpc.StatusCode.__members__:
        return grpc.StatusCode[name], rest
    return None, text


# -- the server interceptor ----------------------------------------------------------------


def _abort_args(error: BaseException, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    code = status_code(error)
    if code is not None:
        return code, bounded(str(error)), trailing_metadata(error)
    if isinstance(error, grpc.aio.AioRpcError):  # an upstream call's status, passed on
        return error.code(), bounded(error.details() or error.code().name), ()
    log.exception("%s failed", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, bounded(internal_message(error)), ()


# context.abort() was called: its status is set already. (CancelledError and GeneratorExit,
# a call or a stream's consumer ending, are BaseExceptions: they pass by themselves.)
_PASS_THROUGH = (grpc.aio.AbortError,)


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]
UnaryWrapper = Callable[[Behaviour, str], Behaviour]


class BehaviourInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps the behaviour of the handlers whose method starts
    with `prefix` (all by default): grpc.aio's intercept_service only finds a handler, so
    acting before a call or on what it raises means wrapping its behaviour. Subclasses say
    how, in wrap_unary (one response) and wrap_stream (streamed responses). Wrapped
    handlers are kept per method, so a call costs one extra frame."""

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap_unary(self, behaviour: Behaviour, method: str) -> Behaviour:
        raise NotImplementedError

    def wrap_stream(self, behaviour: Behaviour, method: str) -> Behaviour:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, wrap_handler(handler, method, self.wrap_unary, self.wrap_stream))
        return cached[1]


class ErrorInterceptor(BehaviourInterceptor):
    """Turns what a handler raises into its gRPC status: an error's `code` attribute, an
    upstream call's status, else INTERNAL (logged with its traceback); messages bounded."""

    def wrap_unary(self, behaviour: Behaviour, method: str) -> Behaviour:
        return _unary_guard(behaviour, method)

    def wrap_stream(self, behaviour: Behaviour, method: str) -> Behaviour:
        return _stream_guard(behaviour, method)


def wrap_handler(handler: Any, method: str, unary: UnaryWrapper, stream: UnaryWrapper) -> Any:
    """`handler` (a grpc.RpcMethodHandler, a namedtuple) with its behaviour wrapped:
    `unary(behaviour, method)` for the two kinds with one response, `stream(behaviour,
    method)` for the two that stream responses."""
    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary, method))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary, method))
    if handler.unary_stream:
        return handler._replace(unary_stream=stream(handler.unary_stream, method))
    if handler.stream_stream:
        return handler._replace(stream_stream=stream(handler.stream_stream, method))
    return handler


async def responses_of(behaviour: Behaviour, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """A response-streaming behaviour's responses, whether it is an async generator or a
    coroutine that writes with context.write()."""
    result = behaviour(request, context)
    if not hasattr(result, "__aiter__"):
        result = await result
    if result is None:
        return
    try:
        async for response in result:
            yield response
    finally:
        aclose = getattr(result, "aclose", None)
        if aclose is not None:
            await aclose()


def _unary_guard(behaviour: Behaviour, method: str) -> Behaviour:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except _PASS_THROUGH:
            raise
        except Exception as error:
            await context.abort(*_abort_args(error, method))

    return guarded


def _stream_guard(behaviour: Behaviour, method: str) -> Behaviour:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in responses_of(behaviour, request, context):
                yield response
        except _PASS_THROUGH:
            raise
        except Exception as error:
            await context.abort(*_abort_args(error, method))

    return guarded
