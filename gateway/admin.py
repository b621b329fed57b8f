"""The registry admin API over REST: /admin/v1/{models,runtimes,jobs,streams,endpoints}
and /admin/v1/gateway-defaults (the one GatewayDefaults record, "default").

Each kind has GET (list) and POST on its collection, GET, PUT and DELETE on /<name>; the
gateway defaults answer GET, PUT, POST and DELETE on /gateway-defaults itself (and on
/gateway-defaults/default). A record's GET carries its status (runtimes, jobs, streams).
DELETE of a runtime or a model takes `?force=true` (a runtime used by models, a model
called by jobs or streams: refused with 400 without it, as FAILED_PRECONDITION on gRPC).

Bodies are the registry messages' JSON mapping (the same JSON as in etcd and in
`modelgw apply -f`): a bare spec, or a document read by registry.files.read_document as the
CLI reads its files. Optimistic concurrency: the document's `revision`, or the revision you
read as `If-Match: "<revision>"` (or `?expected_revision=`); `If-None-Match: *` creates only.
Both a body revision and a header that disagree are a 400.
A conflict is 409 with the current revision in the body (`current_revision`, a string as
every int64 of the JSON mapping) and in the ETag header. Handlers raise; the gateway's
error middleware answers with `admin_error_body` (`{"error", "problems", ...}`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from modelgw.errors import bounded
from modelgw.gateway.errors import MAX_HTTP_MESSAGE_BYTES, Failure, set_error_body
from modelgw.gateway.json_body import read_json
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import files
from modelgw.registry.errors import ConflictError, ValidationError
from modelgw.registry.store import RegistryStore
from modelgw.registry.validation import GATEWAY_DEFAULTS_NAME

# request -> None, raising GatewayError when the caller may not administer the registry
AdminAuthorizer = Callable[[web.Request], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


def _json(message: Any, status: int = 200, revision: int | None = None) -> web.Response:
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    headers = {"ETag": f'"{revision}"'} if revision else None
    return web.json_response(body, status=status, headers=headers)


def admin_error_body(request: web.Request, failure: Failure) -> web.Response:
    """The admin surface's error body (the error middleware's ErrorBody): the message,
    each problem of an invalid record, and a conflict's current revision."""
    err = failure.error
    body: dict[str, Any] = {"error": failure.message}
    headers = dict(failure.headers or {})
    if isinstance(err, ConflictError):
        # a string, like every int64 of the proto3 JSON mapping (e.g. a record's "revision")
        body["current_revision"] = str(err.current_revision)
        headers["ETag"] = f'"{err.current_revision}"'
    if isinstance(err, ValidationError):
        body["problems"] = [bounded(p, MAX_HTTP_MESSAGE_BYTES) for p in err.problems[:100]]
    elif failure.status == 400:
        body["problems"] = [failure.message]
    return web.json_response(body, status=failure.status, headers=headers or None)


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


def _force(request: web.Request) -> bool:
    return request.query.get("force", "").lower() in ("1", "true", "yes")


async def _body(request: web.Request, kind: str) -> files.Document:
    data = await read_json(request, f"{files.PLURAL[kind]}: the body")  # not JSON, too deep: 400
    # a bare spec, a document as `modelgw get -o json` writes it, or a record as GET answers
    # it: read as the CLI reads its files, so a `revision` in it is an expected revision
    return files.read_document(data, "request body", kind)


class AdminApi:
    def __init__(self, store: RegistryStore, authorize: AdminAuthorizer | None = None) -> None:
        self.store = store
        self.authorize = authorize

    def add_routes(self, app: web.Application, prefix: str = "/admin/v1") -> None:
        r = app.router
        r.add_get(f"{prefix}/models", self._admin_only(self.list_models))
        r.add_post(f"{prefix}/models", self._admin_only(self.apply_model))
        r.add_get(f"{prefix}/models/{{name}}", self._admin_only(self.get_model))
        r.add_put(f"{prefix}/models/{{name}}", self._admin_only(self.apply_model))
        r.add_delete(f"{prefix}/models/{{name}}", self._admin_only(self.delete_model))
        r.add_get(f"{prefix}/runtimes", self._admin_only(self.list_runtimes))
        r.add_post(f"{prefix}/runtimes", self._admin_only(self.apply_runtime))
        r.add_get(f"{prefix}/runtimes/{{name}}", self._admin_only(self.get_runtime))
        r.add_put(f"{prefix}/runtimes/{{name}}", self._admin_only(self.apply_runtime))
        r.add_delete(f"{prefix}/runtimes/{{name}}", self._admin_only(self.delete_runtime))
        for path, apply, get, listing, delete in (
            ("jobs", self.apply_job, self.get_job, self.list_jobs, self.delete_job),
            ("streams", self.apply_stream, self.get_stream, self.list_streams, self.delete_stream),
        ):
            r.add_get(f"{prefix}/{path}", self._admin_only(listing))
            r.add_post(f"{prefix}/{path}", self._admin_only(apply))
            r.add_get(f"{prefix}/{path}/{{name}}", self._admin_only(get))
            r.add_put(f"{prefix}/{path}/{{name}}", self._admin_only(apply))
            r.add_delete(f"{prefix}/{path}/{{name}}", self._admin_only(delete))
        for path in (f"{prefix}/gateway-defaults", f"{prefix}/gateway-defaults/{{name}}"):
            r.add_get(path, self._admin_only(self.get_gateway_defaults))
            r.add_post(path, self._admin_only(self.apply_gateway_defaults))
            r.add_put(path, self._admin_only(self.apply_gateway_defaults))
            r.add_delete(path, self._admin_only(self.delete_gateway_defaults))
        r.add_get(f"{prefix}/endpoints", self._admin_only(self.list_endpoints))
        set_error_body(app, prefix, admin_error_body)

    def _admin_only(self, handler: Handler) -> Handler:
        """`handler` behind the admin check (its refusal, like any error, is the middleware's to answer)."""
        if self.authorize is None:
            return handler
        authorize = self.authorize

        async def run(request: web.Request) -> web.Response:
            await authorize(request)
            return await handler(request)

        return run

    @staticmethod
    def _check_name(request: web.Request, spec: Any, what: str) -> None:
        name = request.match_info.get("name")
        if name is not None:
            if not spec.name:
                spec.name = name
            elif spec.name != name:
                raise ValidationError(f"{what}/{name}: name: the body names '{spec.name}' but the URL names '{name}'")

    async def _apply(
        self, request: web.Request, kind: str, apply: Callable[..., Awaitable[Any]], default_name: str = ""
    ) -> web.Response:
        """POST or PUT of a record: 201 when created, 200 otherwise; ETag = revision."""
        document = await _body(request, kind)
        self._check_name(request, document.spec, files.PLURAL[kind])
        if default_name and not document.spec.name:
            document.spec.name = default_name
        expected = document.expected_revision(_expected_revision(request), "If-Match (or If-None-Match, ?expected_revision)")
        result = await apply(document.spec, expected)
        status = 201 if result.outcome == rpb.CREATED else 200
        return _json(result.record, status, result.record.revision)

    async def apply_model(self, request: web.Request) -> web.Response:
        return await self._apply(request, "Model", self.store.apply_model)

    async def get_model(self, request: web.Request) -> web.Response:
        record = await self.store.get_model(request.match_info["name"])
        return _json(record, revision=record.revision)

    async def list_models(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_models())

    async def delete_model(self, request: web.Request) -> web.Response:
        name, expected = request.match_info["name"], _expected_revision(request)
        return _json(rpb.DeleteResponse(revision=await self.store.delete_model(name, expected, _force(request))))

    async def apply_runtime(self, request: web.Request) -> web.Response:
        return await self._apply(request, "Runtime", self.store.apply_runtime)

    async def get_runtime(self, request: web.Request) -> web.Response:
        record = await self.store.get_runtime(request.match_info["name"])
        return _json(record, revision=record.revision)

    async def list_runtimes(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_runtimes())

    async def delete_runtime(self, request: web.Request) -> web.Response:
        revision = await self.store.delete_runtime(request.match_info["name"], _expected_revision(request), _force(request))
        return _json(rpb.DeleteResponse(revision=revision))

    async def apply_job(self, request: web.Request) -> web.Response:
        return await self._apply(request, "Job", self.store.apply_job)

    async def get_job(self, request: web.Request) -> web.Response:
        record = await self.store.get_job(request.match_info["name"])
        return _json(record, revision=record.revision)

    async def list_jobs(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_jobs())

    async def delete_job(self, request: web.Request) -> web.Response:
        revision = await self.store.delete_job(request.match_info["name"], _expected_revision(request))
        return _json(rpb.DeleteResponse(revision=revision))

    async def apply_stream(self, request: web.Request) -> web.Response:
        return await self._apply(request, "Stream", self.store.apply_stream)

    async def get_stream(self, request: web.Request) -> web.Response:
        record = await self.store.get_stream(request.match_info["name"])
        return _json(record, revision=record.revision)

    async def list_streams(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_streams())

    async def delete_stream(self, request: web.Request) -> web.Response:
        revision = await self.store.delete_stream(request.match_info["name"], _expected_revision(request))
        return _json(rpb.DeleteResponse(revision=revision))

    async def apply_gateway_defaults(self, request: web.Request) -> web.Response:
        return await self._apply(request, "GatewayDefaults", self.store.apply_gateway_defaults, GATEWAY_DEFAULTS_NAME)

    async def get_gateway_defaults(self, request: web.Request) -> web.Response:
        record = await self.store.get_gateway_defaults(request.match_info.get("name", ""))
        return _json(record, revision=record.revision)

    async def delete_gateway_defaults(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        revision = await self.store.delete_gateway_defaults(name, _expected_revision(request))
        return _json(rpb.DeleteResponse(revision=revision))

    async def list_endpoints(self, request: web.Request) -> web.Response:
        return _json(await self.store.list_endpoints(request.query.get("runtime", "")))
