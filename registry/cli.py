"""kubectl-like registry commands:

    modelgw apply -f FILE|DIR        apply runtimes, models, jobs, streams and gateway defaults
                                     from YAML or JSON (-f - : stdin)
    modelgw get models|runtimes|endpoints|jobs|streams|gateway-defaults [NAME] [-o table|yaml|json]
    modelgw delete model|runtime|job|stream|gateway-defaults NAME [--force] [--revision N]
    modelgw registry serve --etcd HOST:PORT [--port 8001]

`get jobs` shows each job's phase and progress (rows done/total, failed, rows/s) from its
status, `get streams` its replicas ready, messages processed and failed, and consumer lag.
`get models` shows each version's state as the endpoints of its runtime report it (READY 2/2,
LOADING 1/2, FAILED 0/2: reason, PENDING); `apply` warns when a local path or file:// URI
does not exist on this machine, and applies it anyway (the runtime's machine may have it).
The file format is described in modelgw.registry.files. The commands talk to the
RegistryService (`--server HOST:PORT`, default 127.0.0.1:8001 where the gateway mounts
it), or straight to etcd with `--etcd HOST:PORT` (to bootstrap before a gateway runs;
--etcd wins when both are given).
The gateway's RegistryService needs a bearer token with the admin scope: --token TOKEN
or $MODELGW_TOKEN (e.g. `export MODELGW_TOKEN=$(modelgw token --sub me --scope modelgw:admin)`
with `modelgw up`). $MODELGW_SERVER, $MODELGW_ETCD and $MODELGW_PREFIX set the defaults. A failure prints one
line on stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import files
from modelgw.registry.errors import NotFoundError, RegistryError, UnavailableError
from modelgw.registry.keys import DEFAULT_PREFIX

log = logging.getLogger(__name__)

DEFAULT_SERVER = "127.0.0.1:8001"

# resource words accepted by get/delete -> canonical kind
RESOURCES = {
    "model": "Model", "models": "Model", "mo": "Model",
    "runtime": "Runtime", "runtimes": "Runtime", "rt": "Runtime",
    "endpoint": "Endpoint", "endpoints": "Endpoint", "ep": "Endpoint",
    "job": "Job", "jobs": "Job",
    "stream": "Stream", "streams": "Stream",
    "gateway-defaults": "GatewayDefaults", "gateway-default": "GatewayDefaults",
}
# the order `apply` writes documents in: what a record depends on first (models need their
# runtimes, jobs and streams their models)
APPLY_ORDER = {"Runtime": 0, "Model": 1}
OUTCOMES = {rpb.CREATED: "created", rpb.UPDATED: "configured", rpb.UNCHANGED: "unchanged"}


def register(subparsers: argparse._SubParsersAction) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    where = connection.add_argument_group("registry connection")
    where.add_argument(
        "--server",
        default=os.environ.get("MODELGW_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"RegistryService address (default: $MODELGW_SERVER or {DEFAULT_SERVER})",
    )
    where.add_argument(
        "--etcd",
        default=os.environ.get("MODELGW_ETCD"),
        metavar="HOST:PORT",
        help="talk to etcd directly instead of the RegistryService (default: $MODELGW_ETCD)",
    )
    where.add_argument(
        "--prefix",
        default=os.environ.get("MODELGW_PREFIX", DEFAULT_PREFIX),
        help=f"registry key prefix in etcd, with --etcd (default: {DEFAULT_PREFIX})",
    )
    where.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: 10)")
    where.add_argument(
        "--token",
        default=os.environ.get("MODELGW_TOKEN"),
        help="bearer token for the RegistryService, with the admin scope (default: $MODELGW_TOKEN)",
    )

    apply = subparsers.add_parser(
        "apply",
        parents=[connection],
        help="create or update runtimes, models, jobs, streams and gateway defaults from files",
        description="Create or update registry records from YAML or JSON files (documents with "
        "kind: Runtime|Model|Job|Stream|GatewayDefaults and spec:; see modelgw.registry.files).",
    )
    apply.add_argument(
        "-f", "--filename", action="append", required=True, metavar="FILE",
        help="a file, a directory (its *.yaml, *.yml, *.json) or - for stdin; repeatable",
    )
    apply.set_defaults(func=lambda args: _run(_apply, args))

    get = subparsers.add_parser(
        "get", parents=[connection], help="show models, runtimes, endpoints, jobs, streams or gateway defaults"
    )
    get.add_argument("resource", choices=sorted(RESOURCES), metavar="models|runtimes|endpoints|jobs|streams|gateway-defaults")
    get.add_argument("name", nargs="?", help="one record by name (endpoints: a runtime's endpoints)")
    get.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    get.set_defaults(func=lambda args: _run(_get, args))

    delete = subparsers.add_parser("delete", parents=[connection], help="delete a model, runtime, job or stream")
    delete.add_argument("resource", choices=sorted(k for k, v in RESOURCES.items() if v != "Endpoint"),
                        metavar="model|runtime|job|stream|gateway-defaults")
    delete.add_argument("name", nargs="?", help="the record's name (gateway-defaults: default)")
    delete.add_argument(
        "--force", action="store_true",
        help="runtimes: delete even while models use it; models: even while jobs or streams call it",
    )
    delete.add_argument("--revision", type=int, help="delete only if the record is still at this revision")
    delete.set_defaults(func=lambda args: _run(_delete, args))

    registry = subparsers.add_parser("registry", help="run the registry service")
    registry_commands = registry.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)
    serve = registry_commands.add_parser("serve", help="serve the RegistryService over gRPC on its own")
    serve.add_argument("--etcd", default=os.environ.get("MODELGW_ETCD", "127.0.0.1:2379"), metavar="HOST:PORT")
    serve.add_argument("--prefix", default=os.environ.get("MODELGW_PREFIX", DEFAULT_PREFIX))
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8001, help="port to listen on (default: 8001; 0: any free)")
    serve.set_defaults(func=lambda args: _run(_serve, args))


# ---------------------------------------------------------------- plumbing


def _run(command: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    try:
        return asyncio.run(command(args)) or 0
    except (RegistryError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _registry(args: argparse.Namespace):
    """The store (with --etcd) or a RegistryService client: both have the same methods."""
    if args.etcd:
        from modelgw.registry.store import RegistryStore

        return RegistryStore(args.etcd, prefix=args.prefix, timeout=args.timeout)
    from modelgw.registry.client import RegistryClient

    return RegistryClient(args.server, timeout=args.timeout, token=args.token)


def _expand(paths: list[str]) -> list[str]:
    """Files as given; a directory stands for its *.yaml, *.yml and *.json files, sorted."""
    expanded = []
    for path in paths:
        if path != "-" and os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith((".yaml", ".yml", ".json")))
            expanded += [os.path.join(path, n) for n in names]
        else:
            expanded.append(path)
    return expanded


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------- apply


async def _apply(args: argparse.Namespace) -> int:
    documents: list[files.Document] = []
    for path in _expand(args.filename):
        try:
            text = _read(path)
        except OSError as exc:
            raise OSError(f"cannot read {path}: {exc.strerror or exc}") from None
        documents += files.parse_documents(text, "stdin" if path == "-" else path)
    documents.sort(key=lambda d: APPLY_ORDER.get(d.kind, len(APPLY_ORDER)))  # stable: file order within a kind
    failed = 0
    async with _registry(args) as registry:
        appliers = {
            "Runtime": registry.apply_runtime, "Model": registry.apply_model, "Job": registry.apply_job,
            "Stream": registry.apply_stream, "GatewayDefaults": registry.apply_gateway_defaults,
        }
        for doc in documents:
            apply = appliers[doc.kind]
            try:
                result = await apply(doc.spec, doc.revision)
            except RegistryError as exc:
                if isinstance(exc, UnavailableError):
                    raise
                print(f"error: {doc.source}: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{doc.kind.lower()}/{doc.spec.name} {OUTCOMES.get(result.outcome, 'applied')}")
            if doc.kind == "Model":
                for warning in _missing_local_files(doc.spec):
                    print(f"warning: {doc.source}: {warning}", file=sys.stderr)
    return 1 if failed else 0


def _missing_local_files(spec: rpb.ModelSpec) -> list[str]:
    """A warning for each version whose local path (or file:// URI) does not exist on this
    machine. Only a warning: the runtime may run on another machine that has it."""
    warnings = []
    for i, version in enumerate(spec.versions):
        path = _local_path(version.uri)
        if path is None or os.path.exists(path):
            continue
        module, sep, _ = path.rpartition(":")
        is_class_reference = bool(sep) and module.endswith(".py")  # the python kind's 'file.py:Class'
        if is_class_reference and os.path.exists(module):
            continue
        warnings.append(
            f"models/{spec.name}: versions[{i}].uri: {module if is_class_reference else path} does not exist "
            "on this machine (applied: it may exist where the runtime runs)"
        )
    return warnings


def _local_path(uri: str) -> str | None:
    """The path an absolute path or file:// URI names; None for anything else."""
    if uri.startswith("/"):
        return uri
    parts = urlsplit(uri)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path.startswith("/"):
        return unquote(parts.path)
    return None


# ---------------------------------------------------------------- get


async def _get(args: argparse.Namespace) -> int:
    kind = RESOURCES[args.resource]
    rows: list[tuple[str, ...]] = []
    header: tuple[str, ...]
    async with _registry(args) as registry:
        if kind == "Model":
            records = [await registry.get_model(args.name)] if args.name else list((await registry.list_models()).models)
            documents = [files.model_document(r) for r in records]
            if args.output == "table" and records:  # the state comes from the endpoints
                replicas = _replicas_by_runtime((await registry.list_endpoints()).endpoints)
                rows = [_model_row(r, replicas) for r in records]
            header = ("NAME", "VERSIONS", "RUNTIMES", "TRAFFIC", "REVISION", "STATE")
        elif kind == "Runtime":
            if args.name:
                runtimes = [await registry.get_runtime(args.name)]
            else:
                runtimes = list((await registry.list_runtimes()).runtimes)
            documents = [files.runtime_document(r) for r in runtimes]
            rows = [_runtime_row(r) for r in runtimes]
            header = ("NAME", "KIND", "REPLICAS", "READY", "FORMATS", "REVISION", "PROBLEMS")
        elif kind == "Job":
            jobs = [await registry.get_job(args.name)] if args.name else list((await registry.list_jobs()).jobs)
            documents = [files.job_document(r) for r in jobs]
            now = time.time()
            rows = [_job_row(r, now) for r in jobs]
            header = ("NAME", "MODEL", "PHASE", "ROWS", "FAILED", "ROWS/S", "AGE")
        elif kind == "Stream":
            if args.name:
                streams = [await registry.get_stream(args.name)]
            else:
                streams = list((await registry.list_streams()).streams)
            documents = [files.stream_document(r) for r in streams]
            rows = [_stream_row(r) for r in streams]
            header = ("NAME", "MODEL", "SOURCE", "SINK", "READY", "PROCESSED", "FAILED", "LAG")
        elif kind == "GatewayDefaults":
            try:
                defaults = [await registry.get_gateway_defaults(args.name or "")]
            except NotFoundError:
                if args.name:
                    raise
                defaults = []  # a listing of none, as for the other kinds
            documents = [files.gateway_defaults_document(r) for r in defaults]
            rows = [_defaults_row(r) for r in defaults]
            header = ("NAME", "REQUESTS/S", "TOKENS/MIN", "BURST (S)", "TENANT CLAIM", "REVISION")
        else:
            endpoints = list((await registry.list_endpoints(args.name or "")).endpoints)
            documents = [files.endpoint_document(e) for e in endpoints]
            rows = [_endpoint_row(e) for e in endpoints]
            header = ("RUNTIME", "INSTANCE", "ADDRESS", "READY", "MODELS", "NOTES")
    if args.output == "yaml":
        if documents:
            sys.stdout.write(files.dump_yaml(documents))
    elif args.output == "json":
        sys.stdout.write(files.dump_json(documents, single=bool(args.name) and kind != "Endpoint"))
    elif rows:
        sys.stdout.write(_table(header, rows))
    if not documents:
        print(f"No {files.PLURAL[kind]} found.", file=sys.stderr)
    return 0


def _model_row(record: rpb.ModelRecord, replicas: dict[str, list[rpb.Endpoint]]) -> tuple[str, ...]:
    spec = record.spec
    versions = [v.version for v in spec.versions]
    runtimes = dict.fromkeys(v.runtime for v in spec.versions)
    if spec.traffic:
        traffic = ",".join(f"{v}:{spec.traffic[v]}" for v in versions if v in spec.traffic)
    else:
        traffic = f"{versions[-1]}:100" if versions else "-"
    states = [(v.version, _version_state(spec.name, v, replicas.get(v.runtime, []))) for v in spec.versions]
    # one version: its state; several: each one's, named (last column: a reason has spaces)
    state = states[0][1] if len(states) == 1 else "; ".join(f"{v}: {s}" for v, s in states)
    return (spec.name, ",".join(versions) or "-", ",".join(runtimes) or "-", traffic, str(record.revision),
            state or "-")


def _replicas_by_runtime(endpoints: Iterable[rpb.Endpoint]) -> dict[str, list[rpb.Endpoint]]:
    replicas: dict[str, list[rpb.Endpoint]] = {}
    for endpoint in endpoints:
        replicas.setdefault(endpoint.runtime, []).append(endpoint)
    return replicas


def _version_state(model: str, version: rpb.ModelVersion, replicas: list[rpb.Endpoint]) -> str:
    """What the replicas of its runtime report for one version, counted as `kubectl get
    pods` counts containers: "READY 2/2", "LOADING 1/2", "FAILED 0/2: <the reason>", or
    "PENDING 1/2" while some replica has not picked it up yet."""
    if not replicas:
        return f"PENDING: runtime {version.runtime} has no replicas registered"
    reported = [
        next((m for m in e.models if m.name == model and m.version == version.version), None) for e in replicas
    ]
    ready = sum(
        1 for e, m in zip(replicas, reported, strict=True) if e.ready and m is not None and m.state == rpb.LoadedModel.READY
    )
    counts = f"{ready}/{len(replicas)}"
    failed = [m for m in reported if m is not None and m.state == rpb.LoadedModel.FAILED]
    if failed:
        reason = " ".join(failed[0].message.split())  # on one line, whatever the runtime wrote
        return f"FAILED {counts}: {reason}" if reason else f"FAILED {counts}"
    if ready == len(replicas):
        return f"READY {counts}"
    for state in (rpb.LoadedModel.LOADING, rpb.LoadedModel.UNLOADING):
        if any(m is not None and m.state == state for m in reported):
            return f"{rpb.LoadedModel.State.Name(state)} {counts}"
    return f"PENDING {counts}"


def _runtime_row(record: rpb.RuntimeRecord) -> tuple[str, ...]:
    spec = record.spec
    ready = f"{record.status.replicas_ready}/{spec.replicas}" if record.HasField("status") else "-"
    # what the reconciler saw go wrong (a crash loop, an image that cannot be pulled); last
    # column: it has spaces
    degraded = [c.message for c in record.status.conditions if c.type == "Degraded" and c.status == "True"]
    problems = "; ".join(degraded) or "-"
    return (spec.name, spec.kind, str(spec.replicas), ready, ",".join(spec.model_formats), str(record.revision),
            problems)


def _endpoint_row(endpoint: rpb.Endpoint) -> tuple[str, ...]:
    models = ",".join(
        f"{m.name}:{m.version or '-'}:{rpb.LoadedModel.State.Name(m.state)}" for m in endpoint.models
    )
    # what the models say (e.g. the LLM engine chosen and why); last column: it has spaces
    notes = "; ".join(f"{m.name}:{m.version or '-'} {m.message}" for m in endpoint.models if m.message)
    return (endpoint.runtime, endpoint.instance, endpoint.address, str(endpoint.ready).lower(), models or "-",
            notes or "-")


def _job_row(record: rpb.JobRecord, now: float) -> tuple[str, ...]:
    spec, status = record.spec, record.status
    model = f"{spec.model.model}:{spec.model.version}" if spec.model.version else spec.model.model
    if not record.HasField("status"):
        return (spec.name, model, "-", "-", "-", "-", "-")
    phase = rpb.JobStatus.Phase.Name(status.phase).removeprefix("PHASE_").capitalize()
    rows = f"{status.rows_done}/{status.rows_total}" if status.rows_total else f"{status.rows_done}/?"
    # AGE: since the job started (a record keeps no creation time, only its etcd revision)
    started = status.started_at.ToSeconds() if status.HasField("started_at") else None
    return (spec.name, model, phase, rows, str(status.rows_failed), f"{status.rows_per_second:.1f}",
            _age(now - started) if started is not None else "-")


def _age(seconds: float) -> str:
    """A duration as kubectl's AGE column writes it: 45s, 12m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _topic_name(topic: rpb.BrokerTopic, source: rpb.BrokerTopic) -> str:
    broker = topic.broker or source.broker  # a sink's unset broker is the source's
    return f"{rpb.BrokerTopic.Broker.Name(broker).lower()}:{topic.topic}" if topic.topic else "-"


def _stream_row(record: rpb.StreamRecord) -> tuple[str, ...]:
    spec, status = record.spec, record.status
    model = f"{spec.model.model}:{spec.model.version}" if spec.model.version else spec.model.model
    source, sink = _topic_name(spec.source, spec.source), _topic_name(spec.sink, spec.source)
    if not record.HasField("status"):
        return (spec.name, model, source, sink, f"-/{spec.replicas or 1}", "-", "-", "-")
    lag = str(status.consumer_lag) if status.consumer_lag >= 0 else "-"
    return (spec.name, model, source, sink, f"{status.replicas_ready}/{spec.replicas or 1}",
            str(status.messages_processed), str(status.messages_failed), lag)


def _defaults_row(record: rpb.GatewayDefaultsRecord) -> tuple[str, ...]:
    limit = record.spec.per_tenant
    return (record.spec.name, f"{limit.requests_per_second:g}" if limit.requests_per_second else "-",
            f"{limit.tokens_per_minute:g}" if limit.tokens_per_minute else "-",
            f"{limit.burst_seconds:g}" if limit.burst_seconds else "-", limit.tenant_claim or "sub",
            str(record.revision))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- delete


async def _delete(args: argparse.Namespace) -> int:
    kind = RESOURCES[args.resource]
    if args.force and kind not in ("Model", "Runtime"):
        raise ValueError("--force only applies to models and runtimes")
    name = args.name or ("default" if kind == "GatewayDefaults" else "")
    if not name:
        raise ValueError(f"delete {args.resource}: NAME is required")
    async with _registry(args) as registry:
        if kind == "Model":
            await registry.delete_model(name, args.revision, force=args.force)
        elif kind == "Runtime":
            await registry.delete_runtime(name, args.revision, force=args.force)
        elif kind == "Job":
            await registry.delete_job(name, args.revision)
        elif kind == "Stream":
            await registry.delete_stream(name, args.revision)
        else:
            await registry.delete_gateway_defaults(name, args.revision)
    print(f"{kind.lower()}/{name} deleted")
    return 0


# ---------------------------------------------------------------- serve


async def _serve(args: argparse.Namespace) -> int:
    from modelgw.registry.service import start_server
    from modelgw.registry.store import RegistryStore

    async with RegistryStore(args.etcd, prefix=args.prefix) as store:
        server, port = await start_server(store, f"{args.host}:{args.port}")
        log.info("RegistryService on %s:%d (etcd %s, prefix %s)", args.host, port, args.etcd, store.keys.prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(grace=2)
    return 0
