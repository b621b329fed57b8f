"""The registry admin API over REST: /admin/v1/{models,runtimes,endpoints}.

Bodies are the registry messages' JSON mapping (the same JSON as in etcd and in
`modelgw apply -f`). Optimistic concurrency: send the revision you read as
`If-Match: "<revision>"` (or `?expected_revision=`); `If-None-Match: *` creates only.
A conflict is 409 with the current revision in the body (`current_revision`, a string as
every int64 of the JSON mapping) and in the ETag header.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from modelgw.gateway.errors import http_status
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry.errors import ConflictError, RegistryError, ValidationError
from modelgw.registry.service import status_code
from modelgw.registry.store import RegistryStore

# request -> None, raising GatewayError when the caller may not administer the registry
AdminAuthorizer = Callable[[web.Request], Awaitable[None]]


def _json(message: Any, status: int = 200, revision: int | None = None) -> web.Response:
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    headers = {"ETag": f'"{revision}"'} if revision else None
    return web.json_response(body, status=status, headers=headers)


def _error(err: RegistryError) -> web.Response:
    body: dict[str, Any] = {"error": str(err)}
    headers = None
    if isinstance(err, ConflictError):
        # a string, like every int64 of the proto3 JSON mapping (e.g. a record's "revision")
        body["current_revision"] = str(err.current_revision)
        headers = {"ETag": f'"{err.current_revision}"'}
    if isinstance(err, ValidationError):
        body["problems"] = err.problems
    return web.json_response(body, status=http_status(status_code(err)), headers=headers)


def _expected_revision(request: web.Request) -> int | None:
    if request.headers.get("If-None-Match", "").strip() == "*":
        return 0
    raw = request.headers.get("If-Match") or request.query.get("expected_revision")
    if raw is None or raw.strip() == "*":
        return None
    try:
        return int(raw.strip().strip('"'))
    except ValueError:
        raise ValidationError(f"If-Match / expected_revision must be a revision number, got '{raw[:40]}'") from None


async def _body(request: web.Request, cls: type, what: str) -> Any:
    try:
        data = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValidationError(f"{what}: the body is not valid JSON: {err}") from None
    # accept both a bare spec and a kubectl-style {"kind": ..., "spec": {...}} document
    if isinstance(data, dict) and "spec" in data and isinstance(data["spec"], dict):
        data = data["spec"]
    return codec.from_dict(data, cls, what)


class AdminApi:
    def __init__(self, store: RegistryStore, authorize: AdminAuthorizer | None = None) -> None:
        self.store = store
        self.authorize = authorize

    def add_routes(self, app: web.Application, prefix: str = "/admin/v1") -> None:
        r = app.router
        r.add_get(f"{prefix}/models", self._wrap(self.list_models))
        r.add_post(f"{prefix}/models", self._wrap(self.apply_model))
        r.add_get(f"{prefix}/models/{{name}}", self._wrap(self.get_model))
        r.add_put(f"{prefix}/models/{{name}}", self._wrap(self.apply_model))
        r.add_delete(f"{prefix}/models/{{name}}", self._wrap(self.delete_model))
        r.add_get(f"{prefix}/runtimes", self._wrap(self.list_runtimes))
        r.add_post(f"{prefix}/runtimes", self._wrap(self.apply_runtime))
        r.add_get(f"{prefix}/runtimes/{{name}}", self._wrap(self.get_runtime))
        r.add_put(f"{prefix}/runtimes/{{name}}", self._wrap(self.apply_runtime))
        r.add_delete(f"{prefix}/runtimes/{{name}}", self._wrap(self.delete_runtime))
        r.add_get(f"{prefix}/endpoints", self._wrap(self.list_endpoints))

    def _wrap(self, handler: Callable[[web.Request], Awaitable[web.Response]]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            if self.authorize is not None:
                await self.authorize(request)
            try:
                return await handler(request)
            except RegistryError as err:
                return _error(err)

        return run

    @staticmethod
    def _check_name(request: web.Request, spec: Any, what: str) -> None:
        name = request.match_info.get("name")
        if name is not None:
            if not spec.name:
                spec.name = name
            elif spec.name != name:
                raise ValidationError(f"{what}/{name}: name: the body names '{spec.name}' but the URL names '{name}'")

    async def _apply(self, request: web.Request, cls: type, what: str, apply: Callable[..., Awaitable[Any]]) -> web.Response:
        """POST or PUT of a model or runtime: 201 when created, 200 otherwise; ETag = revision."""
        spec = await _body(request, cls, what)
        self._check_name(request, spec, what)
        result = await apply(spec, _expected_revision(request))
        status = 201 if result.outcome == rpb.CREATED else 200
        return _json(result.record, status, result.record.revision)

    async def apply_model(self, request: web.Request) -> web.Response:
        return await self._apply(request, rpb.ModelSpec, "models", self.store.apply_model)

    async def get_model(self, request: web.Request) -> web.Response:
        record = await self.store.get_model(request.match_info["name"])
        return _json(record, revision=record.revision)

    async def list_models(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_models())

    async def delete_model(self, request: web.Request) -> web.Response:
        revision = await self.store.delete_model(request.match_info["name"], _expected_revision(request))
        return _json(rpb.DeleteResponse(revision=revision))

    async def apply_runtime(self, request: web.Request) -> web.Response:
        return await self._apply(request, rpb.RuntimeSpec, "runtimes", self.store.apply_runtime)

    async def get_runtime(self, request: web.Request) -> web.Response:
        record = await self.store.get_runtime(request.match_info["name"])
        return _json(record, revision=record.revision)

    async def list_runtimes(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_runtimes())

    async def delete_runtime(self, request: web.Request) -> web.Response:
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        revision = await self.store.delete_runtime(request.match_info["name"], _expected_revision(request), force)
        return _json(rpb.DeleteResponse(revision=revision))

    async def list_endpoints(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_endpoints(request.query.get("runtime", "")))
