"""The gateway's HTTP server: aiohttp's AppRunner with the header limit the auth config
sets, and the requests aiohttp's parser refuses answered in JSON like every other error.

    runner = HttpRunner(app, max_header_bytes=config.auth.max_header_bytes, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()

aiohttp refuses a request it cannot parse (a header line over max_field_size, a request line
over max_line_size, garbage on the port) itself, in RequestHandler.handle_error, before any
middleware runs, with a plain-text body that quotes the offending bytes
(aio-libs/aiohttp#3287 asks for a hook; there is none). Here the answer is
`{"error": "..."}`: 431 for a header too large, 414 for a request line too long, else
aiohttp's status; neither the answer nor the log repeats the bytes, which may be a token.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest

log = logging.getLogger(__name__)


class _JsonErrorsHandler(web.RequestHandler):
    """One connection's protocol, its own error answers in JSON."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            # a handler's failure (the middleware answers most): aiohttp logs the traceback
            super().handle_error(request, status, exc, message)
            text = "the request timed out" if status == 504 else "internal error; see the gateway log"
        else:
            if request.writer.output_size > 0:
                raise ConnectionError("a response was already sent; cannot send the error")
            status, text = self._client_error(exc)
            log.info("bad HTTP request from %s: %s", request.remote, text)
        response = web.json_response({"error": text}, status=status)
        response.force_close()
        return response

    def _client_error(self, exc: HttpProcessingError) -> tuple[int, str]:
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else "?"
            if limit == self.max_field_size:
                return 431, f"a request header is larger than the {limit} bytes accepted"
            return 414, f"the request line is longer than the {limit} bytes accepted"
        # the first line only: the lines below quote the request's bytes
        reason = (exc.message or "").splitlines()[0].rstrip(":") if exc.message else ""
        return exc.code or 400, f"bad HTTP request: {reason[:200] or 'it cannot be parsed'}"


class _JsonErrorsServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class HttpRunner(web.AppRunner):
    """An AppRunner whose connections take header lines up to `max_header_bytes` and answer
    what they cannot parse in JSON."""

    def __init__(self, app: web.Application, *, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(app, max_field_size=max_header_bytes, **kwargs)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _JsonErrorsServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
