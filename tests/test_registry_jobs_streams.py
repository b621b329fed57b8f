"""Jobs, streams, their status and the gateway defaults in the registry, on a real etcd:
the store, the RegistryService over gRPC, the REST admin API (behind a real issuer's admin
scope), the watch-backed view and the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from auth_helpers import ADMIN_SCOPE, AUDIENCE, Issuer
from conftest import REPO, modelgw_command
from google.protobuf import json_format

from modelgw.gateway.admin import AdminApi
from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
from modelgw.gateway.auth.guard import Authenticator
from modelgw.gateway.errors import error_middleware
from modelgw.gateway.routing import RoutingTable
from modelgw.protos import registry_pb2 as rpb
from modelgw.protos import registry_pb2_grpc as rpb_grpc
from modelgw.registry.errors import IntegrityError, NotFoundError, ValidationError
from modelgw.registry.service import CURRENT_REVISION_METADATA, start_server
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import RegistryView

# ---------------------------------------------------------------- records


def runtime() -> rpb.RuntimeSpec:
    return rpb.RuntimeSpec(name="torch", kind="pytorch", model_formats=["torchscript"], replicas=1)


def model(name: str = "scorer", versions: tuple[str, ...] = ("1", "2")) -> rpb.ModelSpec:
    return rpb.ModelSpec(
        name=name,
        versions=[rpb.ModelVersion(version=v, uri=f"/m/{v}", format="torchscript", runtime="torch") for v in versions],
        traffic={versions[-1]: 100},
    )


def job(name: str = "nightly", **fields: Any) -> rpb.JobSpec:
    spec = rpb.JobSpec(
        name=name, model=rpb.ModelCall(model="scorer"), input_uri="/data/rows.parquet", output_uri="/data/out",
        batch_size=512, parallelism=8,
    )
    json_format.ParseDict(fields, spec)
    return spec


def stream(name: str = "clicks", **fields: Any) -> rpb.StreamSpec:
    spec = rpb.StreamSpec(
        name=name,
        source=rpb.BrokerTopic(broker=rpb.BrokerTopic.KAFKA, servers=["127.0.0.1:9092"], topic="clicks", group="scorers"),
        model=rpb.ModelCall(model="scorer"),
        sink=rpb.BrokerTopic(topic="scores"),
        dead_letter=rpb.BrokerTopic(topic="clicks-dead"),
        replicas=2,
        max_batch_delay_ms=5,
    )
    json_format.ParseDict(fields, spec)
    return spec


def defaults(**limit: Any) -> rpb.GatewayDefaults:
    return rpb.GatewayDefaults(name="default", per_tenant=rpb.TenantLimit(**(limit or {"requests_per_second": 50})))


@pytest.fixture
async def store(etcd_server, etcd_prefix) -> AsyncIterator[RegistryStore]:
    """A store with the runtime and the model the jobs and streams call."""
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await store.apply_runtime(runtime())
        await store.apply_model(model())
        yield store


@pytest.fixture
async def stub(store) -> AsyncIterator[rpb_grpc.RegistryServiceStub]:
    server, port = await start_server(store)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield rpb_grpc.RegistryServiceStub(channel)
    await server.stop(0)


async def grpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# ---------------------------------------------------------------- store: apply, get, list, delete


async def test_job_apply_get_list_delete(store: RegistryStore) -> None:
    created = await store.apply_job(job())
    assert created.outcome == rpb.CREATED and created.record.spec == job()
    assert not created.record.HasField("status")
    assert (await store.apply_job(job())).outcome == rpb.UNCHANGED
    updated = await store.apply_job(job(batchSize=1024), expected_revision=created.record.revision)
    assert updated.outcome == rpb.UPDATED and updated.record.create_revision == created.record.create_revision

    await store.put_job_status(rpb.JobStatus(name="nightly", phase=rpb.JobStatus.RUNNING, rows_total=10))
    got = await store.get_job("nightly")
    assert got.spec.batch_size == 1024 and got.revision == updated.record.revision
    assert got.status.phase == rpb.JobStatus.RUNNING and got.status.rows_total == 10
    await store.apply_job(job("weekly"))
    listed = await store.list_jobs()
    assert [(r.spec.name, r.HasField("status")) for r in listed.jobs] == [("nightly", True), ("weekly", False)]

    await store.delete_job("nightly")
    with pytest.raises(NotFoundError, match="jobs/nightly does not exist"):
        await store.get_job("nightly")
    # its status went with it, and a late status write does not bring it back
    assert await store.get_job_status("nightly") is None
    with pytest.raises(NotFoundError, match="jobs/nightly does not exist; its status was not written"):
        await store.put_job_status(rpb.JobStatus(name="nightly", rows_done=10))
    with pytest.raises(NotFoundError):
        await store.update_job_status("nightly", lambda s: setattr(s, "rows_done", 10))
    assert await store.get_job_status("nightly") is None
    with pytest.raises(NotFoundError):
        await store.delete_job("nightly")


async def test_stream_and_gateway_defaults_apply_get_list_delete(store: RegistryStore) -> None:
    created = await store.apply_stream(stream())
    assert created.outcome == rpb.CREATED
    await store.put_stream_status(rpb.StreamStatus(name="clicks", messages_processed=7, consumer_lag=3))
    got = await store.get_stream("clicks")
    assert got.spec == stream() and got.status.messages_processed == 7
    assert [r.spec.name for r in (await store.list_streams()).streams] == ["clicks"]
    await store.delete_stream("clicks", expected_revision=got.revision)
    assert (await store.list_streams()).streams == [] and await store.get_stream_status("clicks") is None

    with pytest.raises(NotFoundError, match="gateway-defaults/default does not exist"):
        await store.get_gateway_defaults()
    applied = await store.apply_gateway_defaults(defaults(tokens_per_minute=6000, tenant_claim="tenant"))
    assert applied.outcome == rpb.CREATED
    record = await store.get_gateway_defaults()
    assert record.spec.per_tenant.tokens_per_minute == 6000 and record.revision == applied.record.revision
    await store.delete_gateway_defaults(expected_revision=record.revision)
    with pytest.raises(NotFoundError):
        await store.get_gateway_defaults("default")


# ---------------------------------------------------------------- validation and integrity

INVALID_JOBS: list[tuple[Callable[[rpb.JobSpec], Any], str]] = [
    (lambda s: setattr(s, "name", "Nightly_Run"), "jobs/Nightly_Run: name: 'Nightly_Run' is not a DNS label"),
    (lambda s: s.ClearField("model"), "jobs/nightly: model.model: required"),
    (lambda s: setattr(s.model, "model", "has space"), "jobs/nightly: model.model: 'has space' is not a model name"),
    (lambda s: setattr(s, "input_uri", ""), "jobs/nightly: input_uri: required"),
    (lambda s: setattr(s, "output_uri", "s3://bucket/out"), "jobs/nightly: output_uri: scheme 's3' is not supported"),
    (lambda s: setattr(s, "format", rpb.JobSpec.JSONL),
     "jobs/nightly: format: JSONL contradicts input_uri's extension '.parquet' (PARQUET)"),
    (lambda s: setattr(s, "input_uri", "/data/rows.csv"),
     "jobs/nightly: format: required: input_uri does not end in .jsonl, .parquet"),
    (lambda s: setattr(s, "batch_size", 70000), "jobs/nightly: batch_size: 70000 is more than the maximum of 65536"),
    (lambda s: setattr(s, "parallelism", 1000), "jobs/nightly: parallelism: 1000 is more than the maximum of 256"),
    (lambda s: setattr(s.model, "mode", rpb.ModelCall.IN_PROCESS) or setattr(s.model, "token_file", "/t"),
     "jobs/nightly: model.token_file: only for mode GATEWAY"),
    (lambda s: setattr(s.model, "timeout_seconds", math.inf), "jobs/nightly: model.timeout_seconds: inf must be"),
]

INVALID_STREAMS: list[tuple[Callable[[rpb.StreamSpec], Any], str]] = [
    (lambda s: s.ClearField("source"), "streams/clicks: source: required"),
    (lambda s: setattr(s.source, "broker", rpb.BrokerTopic.BROKER_UNSPECIFIED),
     "streams/clicks: source.broker: required: KAFKA or NATS"),
    (lambda s: setattr(s.source, "topic", ""), "streams/clicks: source.topic: required: the topic to read"),
    (lambda s: setattr(s.source, "group", ""), "streams/clicks: source.group: required: the Kafka consumer group"),
    (lambda s: s.source.ClearField("servers"), "streams/clicks: source.servers: required"),
    (lambda s: s.ClearField("sink"), "streams/clicks: sink: required"),
    (lambda s: setattr(s.sink, "topic", "clicks"), "streams/clicks: sink.topic: 'clicks' is the source"),
    (lambda s: setattr(s, "max_batch_delay_ms", -1), "streams/clicks: max_batch_delay_ms: -1.0 must be a number of zero"),
    (lambda s: setattr(s, "max_batch_delay_ms", math.nan), "streams/clicks: max_batch_delay_ms: nan must be"),
    (lambda s: setattr(s, "max_batch_delay_ms", 61_000),
     "streams/clicks: max_batch_delay_ms: 61000 is more than the maximum of 60000"),
    (lambda s: setattr(s, "batch_size", 512), "streams/clicks: batch_size: 512 is more than max_in_flight (256)"),
    (lambda s: setattr(s, "replicas", 101), "streams/clicks: replicas: 101 is more than the maximum of 100"),
    (lambda s: setattr(s.dead_letter, "broker", rpb.BrokerTopic.NATS),
     "streams/clicks: dead_letter.servers: required: its broker is not the source's"),
]


@pytest.mark.parametrize("change, message", INVALID_JOBS, ids=[m.split(": ")[1] for _, m in INVALID_JOBS])
async def test_invalid_jobs_are_refused_naming_the_field(stub, change, message: str) -> None:
    spec = job()
    change(spec)
    error = await grpc_error(stub.ApplyJob(rpb.ApplyJobRequest(spec=spec)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), error.details()


@pytest.mark.parametrize("change, message", INVALID_STREAMS, ids=[m.split(": ")[1] for _, m in INVALID_STREAMS])
async def test_invalid_streams_are_refused_naming_the_field(stub, change, message: str) -> None:
    spec = stream()
    change(spec)
    error = await grpc_error(stub.ApplyStream(rpb.ApplyStreamRequest(spec=spec)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), error.details()


async def test_invalid_tenant_limits_and_defaults_name(stub, store: RegistryStore) -> None:
    for limit, message in (
        ({"requests_per_second": -1}, "per_tenant.requests_per_second: -1.0 must be a finite number of zero or more"),
        ({"tokens_per_minute": math.inf}, "per_tenant.tokens_per_minute: inf must be a finite number"),
        ({"burst_seconds": 7200}, "per_tenant.burst_seconds: 7200 is more than the maximum of 3600"),
    ):
        error = await grpc_error(stub.ApplyGatewayDefaults(rpb.ApplyGatewayDefaultsRequest(spec=defaults(**limit))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"gateway-defaults/default: {message}" in error.details(), error.details()
    error = await grpc_error(stub.ApplyGatewayDefaults(rpb.ApplyGatewayDefaultsRequest(
        spec=rpb.GatewayDefaults(name="eu"))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gateway-defaults/eu: name: 'eu' is not allowed: the one GatewayDefaults record is named 'default'" in error.details()
    # a model's own per-tenant limit is checked the same way
    bad = model()
    bad.limits.per_tenant.requests_per_second = math.nan
    with pytest.raises(ValidationError, match=r"models/scorer: limits.per_tenant.requests_per_second: nan must be"):
        await store.apply_model(bad)


async def test_the_model_must_exist_and_is_not_deleted_while_called(stub, store: RegistryStore) -> None:
    error = await grpc_error(stub.ApplyJob(rpb.ApplyJobRequest(spec=job(model={"model": "ghost"}))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "jobs/nightly: model.model: model 'ghost' does not exist (apply the model first)"
    error = await grpc_error(stub.ApplyStream(rpb.ApplyStreamRequest(spec=stream(model={"model": "scorer", "version": "9"}))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "streams/clicks: model.version: models/scorer has no version '9' (versions: 1, 2)" in error.details()

    await store.apply_job(job(model={"model": "scorer", "version": "1"}))
    await store.apply_stream(stream())
    error = await grpc_error(stub.DeleteModel(rpb.DeleteRequest(name="scorer")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "models/scorer is used by jobs/nightly, streams/clicks; delete or change those first, or delete with force" \
        in error.details()
    # dropping the version the job pins is refused too; another version may go
    with pytest.raises(IntegrityError, match="models/scorer: versions: version '1' is still called by jobs/nightly"):
        await store.apply_model(model(versions=("2",)))
    assert (await store.apply_model(model(versions=("1",)))).outcome == rpb.UPDATED
    await stub.DeleteModel(rpb.DeleteRequest(name="scorer", force=True))
    # force: the job stays, naming a model that no longer exists
    assert (await store.get_job("nightly")).spec.model.model == "scorer"


async def test_stale_revision_is_aborted_with_the_current_revision_over_grpc(stub) -> None:
    first = await stub.ApplyJob(rpb.ApplyJobRequest(spec=job(), expected_revision=0))
    second = await stub.ApplyJob(rpb.ApplyJobRequest(spec=job(batchSize=64), expected_revision=first.record.revision))
    for call in (
        stub.ApplyJob(rpb.ApplyJobRequest(spec=job(batchSize=32), expected_revision=first.record.revision)),
        stub.DeleteJob(rpb.DeleteRequest(name="nightly", expected_revision=first.record.revision)),
    ):
        error = await grpc_error(call)
        assert error.code() == grpc.StatusCode.ABORTED
        assert f"it is at revision {second.record.revision}, not {first.record.revision}" in error.details()
        assert dict(error.trailing_metadata())[CURRENT_REVISION_METADATA] == str(second.record.revision)
    error = await grpc_error(stub.ApplyJob(rpb.ApplyJobRequest(spec=job(), expected_revision=0)))
    assert error.code() == grpc.StatusCode.ABORTED and "jobs/nightly already exists" in error.details()

    stream_first = await stub.ApplyStream(rpb.ApplyStreamRequest(spec=stream()))
    await stub.ApplyStream(rpb.ApplyStreamRequest(spec=stream(replicas=3)))
    error = await grpc_error(stub.ApplyStream(rpb.ApplyStreamRequest(
        spec=stream(replicas=4), expected_revision=stream_first.record.revision)))
    assert error.code() == grpc.StatusCode.ABORTED
    got = await stub.GetStream(rpb.GetRequest(name="clicks"))
    assert got.spec.replicas == 3

    created = await stub.ApplyGatewayDefaults(rpb.ApplyGatewayDefaultsRequest(spec=defaults(), expected_revision=0))
    await stub.ApplyGatewayDefaults(rpb.ApplyGatewayDefaultsRequest(spec=defaults(requests_per_second=10)))
    error = await grpc_error(stub.DeleteGatewayDefaults(rpb.DeleteRequest(expected_revision=created.record.revision)))
    assert error.code() == grpc.StatusCode.ABORTED
    assert (await stub.GetGatewayDefaults(rpb.GetRequest())).spec.per_tenant.requests_per_second == 10


# ---------------------------------------------------------------- status: two writers


async def test_status_read_modify_write_keeps_both_writers_fields(store: RegistryStore) -> None:
    """The job process writes progress while the reconciler counts attempts: each update
    reads the status and writes it only if nobody wrote in between, so neither writer's
    fields are lost however their updates interleave."""
    await store.apply_job(job())
    rounds = 30

    async def progress() -> None:
        for i in range(1, rounds + 1):
            def report(s: rpb.JobStatus, i: int = i) -> None:
                s.rows_done = i * 100
                s.failures.append(rpb.RowFailure(row=i, error=f"row {i}: bad shape"))
            await store.update_job_status("nightly", report)

    async def reconciler() -> None:
        for _ in range(rounds):
            def attempt(s: rpb.JobStatus) -> None:
                s.attempts += 1  # from the status as read: right only if no write was lost
                s.phase = rpb.JobStatus.RUNNING
            await store.update_job_status("nightly", attempt)

    await asyncio.gather(progress(), reconciler())
    status = await store.get_job_status("nightly")
    assert status is not None
    assert (status.attempts, status.rows_done, status.phase) == (rounds, rounds * 100, rpb.JobStatus.RUNNING)
    assert [f.row for f in status.failures] == list(range(1, rounds + 1))

    # the same for streams; an update that changes nothing writes nothing
    await store.apply_stream(stream())

    async def processed() -> None:
        for _ in range(rounds):
            await store.update_stream_status("clicks", lambda s: setattr(s, "messages_processed", s.messages_processed + 1))

    async def ready() -> None:
        for i in range(rounds):
            await store.update_stream_status("clicks", lambda s, i=i: setattr(s, "replicas_ready", i % 3))

    await asyncio.gather(processed(), ready())
    stream_status = await store.get_stream_status("clicks")
    assert stream_status is not None and stream_status.messages_processed == rounds
    before = (await store.get_stream("clicks")).revision
    unchanged = await store.update_stream_status("clicks", lambda s: None)
    assert unchanged == stream_status and (await store.get_stream("clicks")).revision == before


# ---------------------------------------------------------------- watch and view


async def test_watch_and_view_see_jobs_streams_statuses_and_defaults(store: RegistryStore) -> None:
    async with RegistryView(store) as view:
        await store.apply_job(job())
        await store.put_job_status(rpb.JobStatus(name="nightly", rows_done=5))
        await store.apply_stream(stream())
        await store.put_stream_status(rpb.StreamStatus(name="clicks", replicas_ready=2))
        applied = await store.apply_gateway_defaults(defaults())
        await view.wait_for_revision(applied.record.revision, timeout=10)
        assert view.jobs["nightly"] == job() and view.job_statuses["nightly"].rows_done == 5
        assert view.streams["clicks"] == stream() and view.stream_statuses["clicks"].replicas_ready == 2
        assert view.gateway_defaults == defaults()

        revision = await store.delete_job("nightly")
        await view.wait_for_revision(revision, timeout=10)
        assert "nightly" not in view.jobs and "nightly" not in view.job_statuses
        assert view.snapshot.streams == view.streams

    events = store.watch()
    seen: dict[str, str] = {}
    async for event in events:
        seen[event.key.removeprefix(store.keys.prefix)] = event.WhichOneof("object") or ""
        if len(seen) == 5:  # runtime, model, stream, its status, the defaults
            break
    await events.aclose()
    assert {k: v for k, v in seen.items() if v not in ("runtime", "model")} == {
        "streams/clicks": "stream", "status/streams/clicks": "stream_status", "gateway-defaults/default": "gateway_defaults",
    }


# ---------------------------------------------------------------- REST admin API


@pytest.fixture
async def rest(store: RegistryStore) -> AsyncIterator[tuple[str, dict[str, dict[str, str]]]]:
    """(the admin API's base URL, {"admin" | "reader": headers}) of an AdminApi behind a
    real issuer's tokens and the admin scope, as the gateway mounts it."""
    issuer = Issuer().start()
    key = issuer.new_key("RS256")
    authenticator = Authenticator(AuthConfig(issuers=(IssuerConfig(issuer.url, (AUDIENCE,)),)), RoutingTable())
    await authenticator.start()
    app = web.Application(middlewares=[error_middleware])
    AdminApi(store, authenticator.authorize_admin_rest).add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    tokens = {
        "admin": {"Authorization": f"Bearer {issuer.token(key, scope=ADMIN_SCOPE)}"},
        "reader": {"Authorization": f"Bearer {issuer.token(key, scope='models:read')}"},
    }
    try:
        yield f"http://127.0.0.1:{port}/admin/v1", tokens
    finally:
        await runner.cleanup()
        await authenticator.close()
        issuer.stop()


async def call(method: str, url: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def test_rest_admin_jobs_streams_and_defaults_with_revisions(rest) -> None:
    base, tokens = rest
    admin = tokens["admin"]
    body = json_format.MessageToDict(job(), preserving_proto_field_name=True)
    status, created, headers = await call("POST", f"{base}/jobs", admin, body)
    assert status == 201 and headers["ETag"] == f'"{created["revision"]}"'
    status, got, _ = await call("GET", f"{base}/jobs/nightly", admin)
    assert status == 200 and got["spec"]["input_uri"] == "/data/rows.parquet"

    changed = {**body, "batch_size": 64}
    status, updated, _ = await call("PUT", f"{base}/jobs/nightly", {**admin, "If-Match": headers["ETag"]}, changed)
    assert status == 200 and updated["spec"]["batch_size"] == 64
    # the stale revision again, as a header and as the document's revision: 409 with the current one
    for stale_headers, stale_body in (
        ({**admin, "If-Match": headers["ETag"]}, {**body, "batch_size": 32}),
        (admin, {"kind": "Job", "revision": created["revision"], "spec": {**body, "batch_size": 32}}),
    ):
        status, error, error_headers = await call("PUT", f"{base}/jobs/nightly", stale_headers, stale_body)
        assert status == 409 and error["current_revision"] == updated["revision"]
        assert error_headers["ETag"] == f'"{updated["revision"]}"' and "read it again" in error["error"]
    status, error, _ = await call("DELETE", f"{base}/jobs/nightly", {**admin, "If-Match": headers["ETag"]})
    assert status == 409

    status, error, _ = await call("POST", f"{base}/jobs", admin, {**body, "name": "weekly", "parallelism": 1000})
    assert status == 400 and error["problems"] == ["jobs/weekly: parallelism: 1000 is more than the maximum of 256 "
                                                   "(0: 4 infer calls in flight)"]
    status, error, _ = await call("PUT", f"{base}/jobs/other", admin, body)
    assert status == 400 and "the body names 'nightly' but the URL names 'other'" in error["error"]
    status, listed, _ = await call("GET", f"{base}/jobs", admin)
    assert [j["spec"]["name"] for j in listed["jobs"]] == ["nightly"]
    status, _, _ = await call("DELETE", f"{base}/jobs/nightly", admin)
    assert status == 200
    status, error, _ = await call("GET", f"{base}/jobs/nightly", admin)
    assert status == 404 and error["error"] == "jobs/nightly does not exist"

    stream_body = json_format.MessageToDict(stream(), preserving_proto_field_name=True)
    status, created_stream, _ = await call("PUT", f"{base}/streams/clicks", admin, stream_body)
    assert status == 201
    status, error, _ = await call("PUT", f"{base}/streams/clicks", {**admin, "If-None-Match": "*"}, stream_body)
    assert status == 409 and error["current_revision"] == created_stream["revision"]
    status, error, _ = await call("POST", f"{base}/streams", admin, {**stream_body, "name": "x", "sink": {}})
    assert status == 400 and "streams/x: sink.topic: required" in error["problems"][0]

    # the one defaults record: its name may be left out
    status, created_defaults, _ = await call("PUT", f"{base}/gateway-defaults", admin,
                                             {"per_tenant": {"tokens_per_minute": 6000}})
    assert status == 201 and created_defaults["spec"]["name"] == "default"
    status, error, _ = await call("PUT", f"{base}/gateway-defaults",
                                  {**admin, "If-Match": '"1"'}, {"per_tenant": {"tokens_per_minute": 1}})
    assert status == 409 and error["current_revision"] == created_defaults["revision"]
    status, got_defaults, _ = await call("GET", f"{base}/gateway-defaults", admin)
    assert status == 200 and got_defaults["spec"]["per_tenant"] == {"tokens_per_minute": 6000.0}
    status, error, _ = await call("PUT", f"{base}/gateway-defaults", admin, {"per_tenant": {"requests_per_second": -1}})
    assert status == 400 and "gateway-defaults/default: per_tenant.requests_per_second" in error["problems"][0]
    status, _, _ = await call("DELETE", f"{base}/gateway-defaults/default", admin)
    assert status == 200


async def test_rest_admin_routes_need_the_admin_scope(rest) -> None:
    base, tokens = rest
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/streams/clicks"), ("DELETE", "/streams/clicks"),
                         ("GET", "/gateway-defaults"), ("PUT", "/gateway-defaults")):
        status, _, _ = await call(method, f"{base}{path}", {}, {} if method in ("POST", "PUT") else None)
        assert status == 401, (method, path)
        status, error, _ = await call(method, f"{base}{path}", tokens["reader"], {} if method in ("POST", "PUT") else None)
        assert status == 403 and ADMIN_SCOPE in error["error"], (method, path, error)


# ---------------------------------------------------------------- CLI

FILE = """\
kind: Stream
spec:
  name: clicks
  source: {broker: NATS, servers: ["nats://127.0.0.1:4222"], topic: events.clicks, group: scorers, stream: EVENTS}
  model: {model: scorer}
  sink: {topic: events.scores}
  dead_letter: {topic: events.dead}
---
kind: Job
spec:
  name: nightly
  model: {model: scorer, version: 1, mode: GATEWAY, token_file: /run/token}
  input_uri: /data/rows.jsonl
  output_uri: /data/out
  batch_size: 512
---
kind: GatewayDefaults
spec:
  name: default
  per_tenant: {requests_per_second: 20, tokens_per_minute: 6000, tenant_claim: tenant}
---
kind: Model
spec:
  name: scorer
  versions:
    - {version: 1, uri: /m/1, format: torchscript, runtime: torch}
---
kind: Runtime
spec: {name: torch, kind: pytorch, model_formats: [torchscript]}
"""


def modelgw(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(modelgw_command(*args), input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60)


async def test_cli_applies_gets_and_deletes_jobs_streams_and_defaults(etcd_server, etcd_prefix, tmp_path) -> None:
    direct = ["--etcd", etcd_server.endpoint, "--prefix", etcd_prefix]
    applied = await asyncio.to_thread(modelgw, "apply", "-f", "-", *direct, stdin=FILE)
    assert applied.returncode == 0, applied.stderr
    # what a record depends on first, whatever the file's order
    assert applied.stdout.splitlines() == [
        "runtime/torch created", "model/scorer created", "stream/clicks created", "job/nightly created",
        "gatewaydefaults/default created",
    ]

    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        started = rpb.JobStatus(name="nightly", phase=rpb.JobStatus.RUNNING, rows_done=2500, rows_total=10000,
                                rows_failed=3, rows_per_second=812.5)
        started.started_at.FromSeconds(int(time.time()) - 150)  # AGE 2m, with room to spare
        await store.put_job_status(started)
        await store.put_stream_status(rpb.StreamStatus(name="clicks", messages_processed=40, messages_failed=2,
                                                       consumer_lag=0, replicas_ready=1))

    jobs = await asyncio.to_thread(modelgw, "get", "jobs", *direct)
    assert jobs.returncode == 0, jobs.stderr
    assert [line.split() for line in jobs.stdout.splitlines()] == [
        ["NAME", "MODEL", "PHASE", "ROWS", "FAILED", "ROWS/S", "AGE"],
        ["nightly", "scorer:1", "Running", "2500/10000", "3", "812.5", "2m"],
    ]
    streams = await asyncio.to_thread(modelgw, "get", "streams", *direct)
    assert [line.split() for line in streams.stdout.splitlines()] == [
        ["NAME", "MODEL", "SOURCE", "SINK", "READY", "PROCESSED", "FAILED", "LAG"],
        ["clicks", "scorer", "nats:events.clicks", "nats:events.scores", "1/1", "40", "2", "0"],
    ]

    # get -o yaml, edit, apply: round-trips with the revision, and a stale one is refused
    as_yaml = await asyncio.to_thread(modelgw, "get", "job", "nightly", "-o", "yaml", *direct)
    document = yaml.safe_load(as_yaml.stdout)
    assert document["kind"] == "Job" and document["status"]["rows_done"] == "2500"
    document["spec"]["batch_size"] = 128
    edited = yaml.safe_dump(document)
    assert (await asyncio.to_thread(modelgw, "apply", "-f", "-", *direct, stdin=edited)).stdout == "job/nightly configured\n"
    stale = await asyncio.to_thread(modelgw, "apply", "-f", "-", *direct, stdin=edited)
    assert stale.returncode == 1 and "jobs/nightly was changed by someone else" in stale.stderr

    as_json = await asyncio.to_thread(modelgw, "get", "gateway-defaults", "-o", "json", *direct)
    assert json.loads(as_json.stdout)["items"][0]["spec"]["per_tenant"]["tenant_claim"] == "tenant"

    refused = await asyncio.to_thread(modelgw, "delete", "model", "scorer", *direct)
    assert refused.returncode == 1 and "models/scorer is used by jobs/nightly, streams/clicks" in refused.stderr
    for args, said in ((("job", "nightly"), "job/nightly deleted"), (("stream", "clicks"), "stream/clicks deleted"),
                       (("gateway-defaults",), "gatewaydefaults/default deleted"), (("model", "scorer"), "model/scorer deleted")):
        deleted = await asyncio.to_thread(modelgw, "delete", *args, *direct)
        assert deleted.returncode == 0 and deleted.stdout.strip() == said, deleted.stderr
    empty = await asyncio.to_thread(modelgw, "get", "jobs", *direct)
    assert empty.stdout == "" and empty.stderr.strip() == "No jobs found."

    bad = await asyncio.to_thread(modelgw, "apply", "-f", "-", *direct,
                                  stdin="kind: Job\nspec: {name: j, model: {model: scorer}, input_uri: /x.csv}\n")
    assert bad.returncode == 1
    assert "jobs/j: output_uri: required" in bad.stderr and "jobs/j: format: required" in bad.stderr
