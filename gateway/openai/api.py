"""The OpenAI API's HTTP routes, a sub-application mounted at /v1 of the gateway's HTTP app.

    OpenAIApi(proxy, view, authorize).add_routes(app)

GET /v1/models and /v1/models/{id} list the models served by runtimes of kind `llm`.
POST /v1/completions and /v1/chat/completions: non-streaming answers go through ModelInfer
(the proxy's unary path: retries, limits, metrics), `stream: true` answers through one
ModelStreamInfer stream per request, relayed as server-sent events ending in
`data: [DONE]`. Each request is authorized by the same hook as the other REST routes.

A client that goes away cancels its upstream call, so the runtime aborts the sequence and
frees its KV cache: the stream's writes fail at the next token, and a watcher notices a
closed connection while the runtime has not answered yet (queueing, prefill, or a whole
non-streaming generation). aiohttp does not cancel handlers on disconnect by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web

from modelgw.gateway.errors import GatewayError, set_error_body
from modelgw.gateway.forwarding import forwarded_headers, http_timeout, outbound_metadata, request_timeout
from modelgw.gateway.openai.errors import InvalidRequest, error_body, openai_error_body, stream_error
from modelgw.gateway.openai.parsing import (
    GenerationCall,
    infer_request,
    model_of,
    parse_body,
    parse_chat,
    parse_completion,
)
from modelgw.gateway.openai.rendering import CallInfo, ChunkRenderer, Piece, completion_body, read_piece
from modelgw.gateway.proxy import Admission, Proxy
from modelgw.gateway.rest_frontend import RestAuthorizer
from modelgw.gateway.routing import ModelRoute
from modelgw.oip.protocol import REQUEST_ID_HEADER, SESSION_HEADER
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import registry_pb2 as rpb

log = logging.getLogger(__name__)

LLM_KIND = "llm"
PROTOCOL = "openai"  # the `protocol` label of modelgw_requests_total
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies in front of the gateway must not buffer the stream
}
DISCONNECT_POLL_SECONDS = 0.2

RuntimeSpecs = Callable[[], "dict[str, rpb.RuntimeSpec]"]


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def _watch_disconnect(request: web.Request, on_disconnect: Callable[[], Any]) -> None:
    """Call `on_disconnect` once the client's connection is closed."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        transport = request.transport
        if transport is None or transport.is_closing():
            on_disconnect()
            return


class OpenAIApi:
    """/v1/models, /v1/completions and /v1/chat/completions over the gateway's proxy."""

    def __init__(self, proxy: Proxy, runtimes: RuntimeSpecs, authorize: RestAuthorizer | None = None) -> None:
        self.proxy = proxy
        self.runtimes = runtimes  # name -> RuntimeSpec, from the registry view
        self.authorize = authorize
        self._first_seen: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/models", self.list_models)
        app.router.add_get("/models/{model:.+}", self.get_model)
        app.router.add_post("/completions", self.completions)
        app.router.add_post("/chat/completions", self.chat_completions)
        return app

    def add_routes(self, app: web.Application) -> None:
        app.add_subapp("/v1", self.app())
        set_error_body(app, "/v1", openai_error_body)  # every error under /v1 in OpenAI's format

    # -- models ----------------------------------------------------------------------------

    def _kinds(self, route: ModelRoute) -> set[str | None]:
        """The runtime kinds of a model's versions (None: a runtime the registry lacks)."""
        runtimes = self.runtimes()
        return {(runtimes[v.runtime].kind if v.runtime in runtimes else None) for v in route.spec.versions}

    def _card(self, name: str) -> dict[str, Any]:
        # the registry keeps no creation time: `created` is when this gateway first showed it
        if len(self._first_seen) > 2 * len(self.proxy.table.routes) + 64:
            self._first_seen = {k: v for k, v in self._first_seen.items() if k in self.proxy.table.routes}
        created = self._first_seen.setdefault(name, int(time.time()))
        return {"id": name, "object": "model", "created": created, "owned_by": "modelgw"}

    async def list_models(self, request: web.Request) -> web.Response:
        names = sorted(name for name, route in self.proxy.table.routes.items() if LLM_KIND in self._kinds(route))
        if self.authorize is not None:
            # the models this caller may use; a caller that may use none and could not
            # authenticate hears why (401), one that is only refused some sees the rest
            allowed, unauthenticated = [], None
            for name in names:
                try:
                    await self.authorize(request, name)
                    allowed.append(name)
                except GatewayError as err:
                    if err.code == grpc.StatusCode.UNAUTHENTICATED:
                        unauthenticated = unauthenticated or err
            if not allowed and unauthenticated is not None:
                raise unauthenticated
            if not names:
                # nothing to filter, yet who asks is still checked: a missing or forged
                # token must not hear 200 just because no LLM is registered
                await self.authorize(request, "")
            names = allowed
        return web.json_response({"object": "list", "data": [self._card(name) for name in names]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if self.authorize is not None:
            await self.authorize(request, name)  # who asks, before saying what exists
        route = self.proxy.table.routes.get(name)
        if route is None or LLM_KIND not in self._kinds(route):
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND, f"the model '{name}' does not exist (no LLM model of that name)"
            )
        return web.json_response(self._card(name))

    def _check_llm(self, model: str) -> None:
        """NOT_FOUND for an unknown model; 400 for one served only by other kinds of runtime."""
        route = self.proxy.table.route(model)
        kinds = self._kinds(route)
        if LLM_KIND not in kinds and None not in kinds:
            raise InvalidRequest(
                f"model '{model}' is served by runtime kind(s) {', '.join(sorted(k for k in kinds if k))}; "
                f"the OpenAI API serves models of kind '{LLM_KIND}' (use /v2/models/{model}/infer for it)",
                "model", "model_not_supported",
            )

    # -- generation ------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = parse_body(await request.read())
        # who asks and for what, before the rest of the body is judged
        subject = await self.authorize(request, model_of(body)) if self.authorize else None
        call = parse_chat(body) if chat else parse_completion(body)
        self._check_llm(call.model)
        metadata, request_id = outbound_metadata(forwarded_headers(request), subject)
        info = CallInfo(
            chat=chat,
            id=("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
            created=int(time.time()),
            model=call.model,
            logprobs=call.logprobs,
        )
        message = infer_request(call, info.id)
        if call.stream:
            return await self._stream(request, call, info, message, metadata, request_id)
        return await self._complete(request, call, info, message, metadata, request_id)

    async def _complete(
        self, request: web.Request, call: GenerationCall, info: CallInfo, message: pb.ModelInferRequest,
        metadata: list[tuple[str, str]], request_id: str,
    ) -> web.Response:
        """A whole answer via ModelInfer; cancelled (upstream too) if the client goes away."""
        forward = asyncio.ensure_future(
            self.proxy.unary(
                "model_infer", message.SerializeToString(), call.model, "", metadata=metadata,
                timeout=http_timeout(request), sticky_key=request.headers.get(SESSION_HEADER), protocol=PROTOCOL,
            )
        )
        watcher = asyncio.create_task(_watch_disconnect(request, forward.cancel))
        try:
            raw = await forward  # CancelledError when the client left: aiohttp drops the connection
        finally:
            watcher.cancel()
        piece = read_piece(pb.ModelInferResponse.FromString(raw), final=True)
        return web.json_response(completion_body(info, piece), headers={REQUEST_ID_HEADER: request_id})

    async def _stream(
        self, request: web.Request, call: GenerationCall, info: CallInfo, message: pb.ModelInferRequest,
        metadata: list[tuple[str, str]], request_id: str,
    ) -> web.StreamResponse:
        """A streamed answer over one ModelStreamInfer stream, relayed as SSE chunks."""
        model = call.model
        # the model's timeout and the client's, if any: a stream has no default deadline
        # (the client ends it by going away)
        timeout = request_timeout(self.proxy.table.routes.get(model), http_timeout(request))
        response: web.StreamResponse | None = None
        with self.proxy.stream(
            model, "", metadata=metadata, sticky_key=request.headers.get(SESSION_HEADER), timeout=timeout,
            protocol=PROTOCOL,
        ) as stream:
            upstream = stream.call  # cancelled when the stream is released: the runtime aborts
            message.model_version = stream.version  # the version the traffic split chose
            watcher = asyncio.create_task(_watch_disconnect(request, upstream.cancel))
            try:
                try:
                    stream.request_sent(message.id)
                    await upstream.write(message.SerializeToString())
                    await upstream.done_writing()
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    pass  # the call failed already: reading it below says how
                # the first piece before the headers: a refused request is still a plain HTTP error
                piece = await _next_piece(stream)
                response = web.StreamResponse(headers={**SSE_HEADERS, REQUEST_ID_HEADER: request_id})
                await response.prepare(request)
                chunks = ChunkRenderer(info, call.include_usage)
                await _send(response, chunks.start())
                while not piece.final:
                    await _send(response, chunks.delta(piece))
                    piece = await _next_piece(stream)
                await _send(response, chunks.finish(piece))
                await _send(response, chunks.usage(piece))
                await response.write(DONE)
                return response
            except GatewayError as err:
                if response is None:
                    raise  # rendered by the error middleware; counted with its status on release
                stream.status = err.code.name
                # the status line is gone: the error travels as an event (the openai SDK raises it)
                try:
                    await response.write(_sse(error_body(err.http_status, err.message)))
                    await response.write(DONE)
                except ConnectionError:
                    pass
                return response
            except ConnectionError:
                if response is None:
                    raise
                stream.status = "CANCELLED"  # the client went away while we wrote to it
                return response
            finally:
                # a CancelledError (the watcher saw the client leave, or the gateway stops)
                # goes on to the release, which counts it as CANCELLED
                watcher.cancel()


async def _send(response: web.StreamResponse, chunk: dict[str, Any] | None) -> None:
    if chunk is not None:
        await response.write(_sse(chunk))


async def _next_piece(stream: Admission) -> Piece:
    """The next response of a one-request stream, or the GatewayError it carries; counted
    by the admission (tokens, TTFT, inter-token latency, usage)."""
    call = stream.call
    try:
        raw = await call.read()
    except grpc.aio.AioRpcError as err:
        raise GatewayError(err.code(), err.details() or err.code().name) from None
    if raw is grpc.aio.EOF:
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the runtime ended the stream before the answer was complete")
    response = pb.ModelStreamInferResponse.FromString(raw)
    if response.error_message:
        stream.generation_piece(response.infer_response.id, 0, True, 0, 0)
        raise stream_error(response.error_message)
    piece = read_piece(response.infer_response)
    stream.generation_piece(
        response.infer_response.id, len(piece.token_ids), piece.final, piece.prompt_tokens or 0,
        piece.completion_tokens or 0,
    )
    return piece
