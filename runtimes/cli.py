"""`modelgw runtime serve`: one runtime process serving models of one kind.

    modelgw runtime serve --kind onnx --model resnet=/models/resnet.onnx --port 8001
    modelgw runtime serve --kind python --model scale:2=modelgw.runtimes.examples.scale:Scale \
        --port 8001 --option factor=3

--model NAME[:VERSION]=URI (version defaults to 1) may repeat. The process listens at once
(live, not ready), loads the models, logs one "ready" line with the port and serves until
SIGTERM/SIGINT, then drains in-flight requests and exits 0. A model that cannot load is
one error line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass

from modelgw.oip.protocol import MAX_MESSAGE_BYTES
from modelgw.runtimes.errors import ModelLoadError

log = logging.getLogger("modelgw.runtime")


@dataclass(frozen=True)
class ModelArg:
    name: str
    version: str
    uri: str


def parse_model(text: str) -> ModelArg:
    """NAME[:VERSION]=URI"""
    target, sep, uri = text.partition("=")
    name, _, version = target.partition(":")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME[:VERSION]=URI")
    return ModelArg(name, version or "1", uri)


def parse_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    return key, value


def parse_host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"'{text}' is not HOST:PORT")
    return text


def parse_prefix(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a key prefix (it starts with '/')")
    return text


def parse_runtime_name(text: str) -> str:
    from modelgw.registry.validation import DNS_LABEL_RULE, is_dns_label

    if not is_dns_label(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a runtime name ({DNS_LABEL_RULE})")
    return text


def parse_instance_name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "._-" for c in text) or not text.isascii():
        raise argparse.ArgumentTypeError(f"'{text}' is not an instance name (letters, digits, '.', '_', '-')")
    return text


def parse_lease_ttl(text: str) -> int:
    try:
        ttl = int(text)
    except ValueError:
        ttl = 0
    if ttl < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of seconds, at least 1")
    return ttl


class _InstalledKinds:
    """The kinds this machine can serve, listed when help is printed: looking up installed
    entry points costs every `modelgw runtime serve` start otherwise."""

    def __str__(self) -> str:
        from modelgw.runtimes.kinds import kind_names

        return ", ".join(kind_names())


def register(subparsers: argparse._SubParsersAction) -> None:
    runtime = subparsers.add_parser("runtime", help="run a model runtime of one kind (built in or installed)")
    commands = runtime.add_subparsers(dest="runtime_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve models over gRPC (KServe OIP v2 + Triton streaming)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kind = serve.add_argument("--kind", required=True, help="runtime kind, one of: %(installed_kinds)s")
    kind.installed_kinds = _InstalledKinds()  # read by argparse's %-formatting of the help
    serve.add_argument("--model", dest="models", type=parse_model, action="append", default=[],
                       metavar="NAME[:VERSION]=URI",
                       help="a model to serve (repeatable; needed unless --registry assigns models)")
    serve.add_argument("--port", type=int, required=True, help="gRPC port (0: any free port)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--max-batch-size", type=int, default=None,
                       help="dynamic batching: rows per predict call (0: off; default: what the model declares)")
    serve.add_argument("--max-queue-delay-ms", type=float, default=0.0,
                       help="dynamic batching: how long a request may wait for others (default 0)")
    serve.add_argument("--max-concurrent-batches", type=int, default=1,
                       help="dynamic batching: predict calls per model at once (default 1)")
    serve.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                       help=f"largest gRPC message in either direction (default {MAX_MESSAGE_BYTES >> 20} MiB)")
    serve.add_argument("--workers", type=int, default=None,
                       help="threads running predict calls (default: cores + 2, at most 8)")
    serve.add_argument("--inline-predict-us", type=float, default=200.0,
                       help="unbatched models whose predict takes less than this (moving average, "
                            "microseconds) run on the event loop instead of the thread pool; 0: never (default 200)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on shutdown (default 30)")
    serve.add_argument("--option", dest="options", type=parse_option, action="append", default=[],
                       metavar="KEY=VALUE", help="a kind/model option, given to every model (repeatable)")
    registry = serve.add_argument_group(
        "registry", "register this replica in etcd and load the models the registry assigns to --runtime"
    )
    registry.add_argument("--registry", metavar="HOST:PORT", type=parse_host_port, default=None,
                          help="etcd endpoint of the registry")
    registry.add_argument("--prefix", type=parse_prefix, default="/modelgw/v1/",
                          help="registry key prefix (default %(default)s)")
    registry.add_argument("--runtime", type=parse_runtime_name, default=None,
                          help="the registry runtime this replica belongs to")
    registry.add_argument("--instance", type=parse_instance_name, default=None,
                          help="this replica's name (default: $POD_NAME in a Kubernetes pod, else RUNTIME-<random>)")
    registry.add_argument("--advertise", type=parse_host_port, default=None, metavar="HOST:PORT",
                          help="address the gateway should dial (default: --host and the bound port; when --host "
                               "is 0.0.0.0 or ::, $POD_IP in a Kubernetes pod, else the host name)")
    registry.add_argument("--lease-ttl", type=parse_lease_ttl, default=10,
                          help="endpoint lease TTL in seconds (default 10)")
    serve.set_defaults(func=serve_command)
    _register_attach(commands)


def parse_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds above 0")
    return seconds


def parse_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number, at least 1")
    return int(text)


def _register_attach(commands: argparse._SubParsersAction) -> None:
    from modelgw.runtimes import attach

    parser = commands.add_parser(
        "attach",
        help="register an OIP v2 gRPC server that is not modelgw's (Triton, KServe, your own) as a runtime replica",
        description=attach.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, type=parse_host_port, metavar="HOST:PORT",
                        help="the server's OIP v2 gRPC address, as this process reaches it")
    parser.add_argument("--runtime", required=True, type=parse_runtime_name,
                        help="the registry runtime the server is a replica of (its models are assigned there)")
    parser.add_argument("--etcd", required=True, type=parse_host_port, metavar="HOST:PORT",
                        help="etcd endpoint of the registry")
    parser.add_argument("--prefix", type=parse_prefix, default="/modelgw/v1/",
                        help="registry key prefix (default %(default)s)")
    parser.add_argument("--instance", type=parse_instance_name, default=None,
                        help="the replica's name (default: $POD_NAME in a Kubernetes pod, else RUNTIME-<random>)")
    parser.add_argument("--advertise", type=parse_host_port, default=None, metavar="HOST:PORT",
                        help="address the gateway should dial (default: --target; for a loopback or wildcard "
                             "host, $POD_IP in a Kubernetes pod)")
    parser.add_argument("--lease-ttl", type=parse_lease_ttl, default=10,
                        help="endpoint lease TTL in seconds (default 10)")
    parser.add_argument("--poll-interval", type=parse_seconds, default=1.0,
                        help="seconds between ServerReady/ModelReady polls (default 1)")
    parser.add_argument("--failures", type=parse_count, default=3,
                        help="polls in a row without a ready answer before the endpoint is withdrawn (default 3)")
    parser.add_argument("--rpc-timeout", type=parse_seconds, default=2.0,
                        help="deadline of each poll (default 2 s)")
    parser.add_argument("--load-timeout", type=parse_seconds, default=600.0,
                        help="deadline of a RepositoryModelLoad/Unload (default 600 s)")
    parser.add_argument("--repository-extension", choices=("auto", "triton", "none"), default="auto",
                        help="load/unload assigned models with Triton's model repository extension: auto (when "
                             "ServerMetadata lists 'model_repository'), triton (always), none (never; default auto)")
    parser.add_argument("--metrics-url", default=None, metavar="URL",
                        help="Prometheus endpoint with Triton's nv_inference_pending_request_count, for the "
                             "record's queue depth (e.g. http://127.0.0.1:8002/metrics)")
    parser.add_argument("--stop-grace", type=parse_seconds, default=30.0,
                        help="with a server command: seconds it gets to exit after SIGTERM (default 30)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="run this server command as a child (the local backend does), ended with the adapter")
    parser.set_defaults(func=attach_command)


def attach_command(args: argparse.Namespace) -> int:
    from modelgw.process import exit_with_parent
    from modelgw.runtimes.attach import attach

    exit_with_parent()  # when a supervisor (the local reconciler) asked for it
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    try:
        return asyncio.run(attach(args))
    except OSError as exc:  # the server command cannot start
        print(f"modelgw runtime attach: error: {exc}", file=sys.stderr, flush=True)
        return 1


def serve_command(args: argparse.Namespace) -> int:
    from modelgw.process import exit_with_parent

    exit_with_parent()  # when a supervisor (the local reconciler) asked for it
    # Replicas start with -P (modelgw.process.python_module) so that a folder in the working
    # directory cannot shadow modelgw itself; now that modelgw is imported, the working
    # directory is searched too, last, for the python kind's `pkg.module:Class` models.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return asyncio.run(serve(args))
    except ModelLoadError as exc:
        print(f"modelgw runtime: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        print(f"modelgw runtime: error: {exc}", file=sys.stderr, flush=True)
        return 1


async def serve(args: argparse.Namespace) -> int:
    from modelgw.runtimes.kinds import resolve_kind
    from modelgw.runtimes.repository import ModelRepository
    from modelgw.runtimes.server import RuntimeServer

    resolve_kind(args.kind)  # an unknown kind fails before anything listens
    if not args.models and not args.registry:
        raise ModelLoadError("nothing to serve: give --model NAME=URI, or --registry and --runtime")
    if args.registry and not args.runtime:
        raise ModelLoadError("--registry needs --runtime: the registry runtime this replica belongs to")
    repository = ModelRepository(
        args.kind,
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        max_queue_delay=args.max_queue_delay_ms / 1000.0,
        max_concurrent_batches=args.max_concurrent_batches,
        options=dict(args.options),
        drain_timeout=args.drain_timeout,
        inline_predict_below=args.inline_predict_us / 1e6,
    )
    server = RuntimeServer(repository, host=args.host, port=args.port,
                           max_message_bytes=args.max_message_bytes)
    await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loading = asyncio.create_task(_load_all(repository, args.models))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # a signal while loading: give up cleanly
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await server.stop(grace=0)
        return 0
    failure = loading.exception()
    if failure is not None:
        stopping.cancel()
        await server.stop(grace=0)
        raise failure

    registration = None
    if args.registry:
        # registered at once (not ready), ready once the models the registry assigns are
        # loaded or failed: until then no gateway sends traffic here
        registration = await _register(args, server)
        assigned = asyncio.create_task(registration.assigned.wait())
        await asyncio.wait({assigned, stopping}, return_when=asyncio.FIRST_COMPLETED)
        assigned.cancel()
    if not stop.is_set():
        await server.set_ready(True)
        if registration is not None:
            registration.mark_dirty()
        names = ", ".join(f"{m.name}:{m.version}" for m in args.models) or "assigned by the registry"
        log.info("runtime ready on %s:%d (kind %s; models %s)", args.host, server.port, args.kind, names)
    await stopping
    log.info("shutting down: draining in-flight requests (up to %.0fs)", args.drain_timeout)
    if registration is not None:
        # leave the registry first, so the gateway stops sending before we stop serving
        await server.set_ready(False)
        await registration.stop()
        await registration.store.close()
    await server.stop(grace=args.drain_timeout)
    log.info("stopped")
    return 0


async def _register(args: argparse.Namespace, server):
    import secrets
    import socket

    from modelgw.registry.store import RegistryStore
    from modelgw.runtimes.registration import EndpointRegistration

    store = RegistryStore(args.registry, prefix=args.prefix)
    # in a pod the downward API gives POD_IP and POD_NAME (reconciler.kube_objects): the
    # pod's address is what the gateway dials, and its name says which pod a record is
    pod_ip, pod_name = os.environ.get("POD_IP"), os.environ.get("POD_NAME")
    address = args.advertise
    if address is None and args.host in ("0.0.0.0", "::", "[::]"):
        # a wildcard is no address to dial; one address bound (a replica of the local
        # backend run inside a pod) is advertised as it is
        if pod_ip:
            address = f"[{pod_ip}]:{server.port}" if ":" in pod_ip else f"{pod_ip}:{server.port}"
        else:
            address = f"{socket.gethostname()}:{server.port}"
    registration = EndpointRegistration(
        store,
        server,
        runtime=args.runtime,
        instance=args.instance or pod_name or f"{args.runtime}-{secrets.token_hex(3)}",
        address=address,
        lease_ttl=args.lease_ttl,
    )
    log.info("registering as %s/%s in etcd %s (prefix %s)", args.runtime, registration.instance, args.registry,
             args.prefix)
    await registration.start()
    return registration


async def _load_all(repository, models: list[ModelArg]) -> None:
    for model in models:
        await repository.load(model.name, model.version, model.uri)
