"""The one JSON body reader of the gateway's HTTP routes (OIP, OpenAI, admin):

    document = await read_json(request, "the request body")      # or
    document = parse_json(raw, "the request body", max_depth=None)

A body that is not JSON, or nests arrays/objects deeper than `max_depth`, is a BadBody
(INVALID_ARGUMENT / 400) whose message names `what`; a body over the app's size limit is
aiohttp's 413, answered by the error middleware (gateway/errors.py). Nesting is bounded
even without a `max_depth`: Python's parser recurses, and its RecursionError (about a
thousand levels down) is a 400 too, never a 500. The depth check costs two `bytes.count`
calls when the body has fewer brackets than the limit (nearly every body), and a scan of
its strings and brackets otherwise.
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
from aiohttp import web

from modelgw.gateway.errors import GatewayError

# deeper than any admin record or OpenAI request (messages -> content parts -> ...)
DEFAULT_MAX_DEPTH = 64

# a JSON string (skipped whole) or a bracket
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')


class BadBody(GatewayError):
    """The request body is not a JSON document the route can read."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_deep(raw: bytes, max_depth: int) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    depth = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def parse_json(
    raw: bytes | memoryview, what: str = "the request body", max_depth: int | None = DEFAULT_MAX_DEPTH,
    allow_constants: bool = False,
) -> Any:
    """The JSON document in `raw`; BadBody (400) naming `what` when it is not one, nests
    deeper than `max_depth` (None: only Python's own recursion bound), or uses NaN or
    Infinity (not JSON) without `allow_constants`."""
    data = bytes(raw)
    if max_depth is not None and _too_deep(data, max_depth):
        raise BadBody(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(data, parse_constant=None if allow_constants else _no_constants)
    except RecursionError:
        raise BadBody(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise BadBody(f"{what} is not valid JSON: {err}") from None


async def read_json(request: web.Request, what: str = "the request body", max_depth: int | None = DEFAULT_MAX_DEPTH) -> Any:
    """The request's body as JSON (see parse_json); aiohttp's 413 past the app's size limit."""
    return parse_json(await request.read(), what, max_depth)
