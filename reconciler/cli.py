"""`modelgw reconcile`: keep runtime workloads in line with the registry.

    modelgw reconcile --etcd 127.0.0.1:2379                      # local processes
    modelgw reconcile --backend kubernetes --namespace serving [--kubeconfig F]
    modelgw reconcile --backend kubernetes --namespace serving --dry-run > objects.yaml

The backends it can run are the entries of BACKENDS (name -> a factory taking the parsed
arguments), chosen with --backend (reconciler.backend.Backend is what one implements); the
core, the election and the status writes do not change. The kubernetes backend
(reconciler.kubernetes) is imported only when it runs: it needs the `kubernetes` extra.
`--dry-run` reads the registry once and prints, as multi-document YAML, the objects the
kubernetes backend would apply (reconciler.kube_objects: the runtimes', then a Job for each
job not finished and a Deployment for each stream), for review and GitOps: it needs no
cluster and changes nothing; a record that cannot work is named on stderr (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from modelgw.registry.keys import DEFAULT_PREFIX

if TYPE_CHECKING:
    from modelgw.protos import registry_pb2 as rpb
    from modelgw.reconciler.backend import Backend
    from modelgw.reconciler.kube_objects import KubeSettings

log = logging.getLogger(__name__)


def _positive(number: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = number(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"'{text}' is not a positive {'whole ' if number is int else ''}number")
        return value

    return parse


def _etcd_endpoint(text: str) -> str:
    from modelgw.registry.etcd import parse_endpoint

    try:
        parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _prefix(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a key prefix (it starts with '/')")
    return text


def _dns_label(text: str) -> str:
    from modelgw.registry.validation import DNS_LABEL_RULE, is_dns_label

    if not is_dns_label(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a namespace name ({DNS_LABEL_RULE})")
    return text


def _kind_image(text: str) -> tuple[str, str]:
    kind, sep, image = text.partition("=")
    if not sep or not kind or not image or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"'{text}' is not KIND=IMAGE")
    return kind, image


# where a pod's service account finds its namespace
_IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class BackendUnavailable(Exception):
    """A backend that cannot run here, with what to do about it."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reconcile",
        help="run the reconciler (registry runtimes -> running replicas)",
        description="Start, scale, restart and remove runtime replicas so that they match the "
        "runtimes in the registry. Several reconcilers may run: one leads, the others stand by.",
    )
    p.add_argument("--etcd", type=_etcd_endpoint, default="127.0.0.1:2379", help="etcd endpoint HOST:PORT (default %(default)s)")
    p.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX, help="registry key prefix (default %(default)s)")
    p.add_argument("--identity", default=None, help="this reconciler's name in the election (default host-pid)")
    p.add_argument("--lease-ttl", type=_positive(int), default=10,
                   help="leader and endpoint lease TTL in seconds: a standby takes over, and a dead "
                        "replica's endpoint goes, within about this long (default %(default)s)")
    p.add_argument("--resync-seconds", type=_positive(float), default=5.0,
                   help="reconcile at least this often, changes or not (default %(default)s)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="local",
                   help="where replicas run: local processes or Kubernetes Deployments (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="local backend: where replica logs go")
    p.add_argument("--host", default="127.0.0.1", help="local backend: address replicas listen on")
    kube = p.add_argument_group("kubernetes backend")
    kube.add_argument("--namespace", type=_dns_label, default=None,
                      help="namespace of the runtimes' objects (default: this pod's namespace in a cluster, else 'default')")
    kube.add_argument("--kubeconfig", default=None,
                      help="kubeconfig file (default: the in-cluster service account in a pod, else ~/.kube/config)")
    kube.add_argument("--pod-etcd", type=_etcd_endpoint, default=None, metavar="HOST:PORT",
                      help="etcd endpoint the runtime pods register at (default: --etcd)")
    kube.add_argument("--image-repository", default="",
                      help="registry path the modelgw images were pushed to, e.g. registry.example.com/ml "
                           "(default: local names)")
    kube.add_argument("--runtime-image", dest="runtime_images", type=_kind_image, action="append", default=[],
                      metavar="KIND=IMAGE", help="the image of runtimes of KIND without an image of their own (repeatable)")
    kube.add_argument("--image-pull-policy", choices=("Always", "IfNotPresent", "Never"), default="IfNotPresent",
                      help="the runtime containers' imagePullPolicy (default %(default)s)")
    kube.add_argument("--service-account", default=None, help="service account of the runtime pods (default: the namespace's)")
    kube.add_argument("--dry-run", action="store_true",
                      help="print the objects as YAML and change nothing (needs neither a cluster nor the leadership)")
    p.set_defaults(func=run)


def _local_backend(args: argparse.Namespace) -> Backend:
    """Replicas as supervised processes on this machine, logs in DATA_DIR/logs."""
    from modelgw.reconciler.local import LocalBackend

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="modelgw-reconciler-")
    log.info("replica logs in %s", os.path.join(data_dir, "logs"))
    return LocalBackend(
        args.etcd, args.prefix, log_dir=os.path.join(data_dir, "logs"), host=args.host, lease_ttl=args.lease_ttl
    )


def kube_settings(args: argparse.Namespace) -> KubeSettings:
    """The installation's side of the runtimes' objects, from the command line."""
    from modelgw.reconciler.kube_objects import KubeSettings, default_runtime_images

    namespace = args.namespace
    if namespace is None:
        try:
            with open(_IN_CLUSTER_NAMESPACE) as namespace_file:
                namespace = namespace_file.read().strip() or "default"
        except OSError:
            namespace = "default"
    pod_etcd = args.pod_etcd or args.etcd
    if pod_etcd.rpartition(":")[0] in ("127.0.0.1", "localhost", "[::1]", "::1"):
        log.warning("runtime pods would register at %s, their own loopback: give --pod-etcd, the etcd "
                    "address pods reach (e.g. etcd.%s.svc:2379)", pod_etcd, namespace)
    images = {**default_runtime_images(args.image_repository), **dict(args.runtime_images)}
    return KubeSettings(
        namespace=namespace,
        etcd_endpoints=pod_etcd,
        registry_prefix=args.prefix,
        default_images=images,
        image_pull_policy=args.image_pull_policy,
        service_account=args.service_account,
    )


def _kubernetes_backend(args: argparse.Namespace) -> Backend:
    """Runtimes as Deployments (+ Service, PDB) applied server-side in --namespace."""
    try:
        from modelgw.reconciler.kubernetes import KubernetesBackend, api_client
    except ModuleNotFoundError as exc:
        if exc.name == "modelgw.reconciler.kubernetes":
            raise BackendUnavailable("the kubernetes backend (modelgw.reconciler.kubernetes) is not in this "
                                     "installation; --dry-run prints the objects without it") from None
        if exc.name and exc.name.split(".")[0] == "kubernetes":
            raise BackendUnavailable("the kubernetes backend needs the Kubernetes client: "
                                     "pip install 'modelgw[kubernetes]'") from None
        raise
    import yaml
    from kubernetes.config import ConfigException

    try:
        api = api_client(kubeconfig=args.kubeconfig)
    except (ConfigException, OSError, yaml.YAMLError) as exc:
        where = args.kubeconfig or "the in-cluster service account or ~/.kube/config"
        raise BackendUnavailable(f"no Kubernetes API to talk to from {where}: {exc}") from None
    return KubernetesBackend(kube_settings(args), api)


BACKENDS: dict[str, Callable[[argparse.Namespace], Backend]] = {"local": _local_backend, "kubernetes": _kubernetes_backend}


async def dry_run(args: argparse.Namespace) -> int:
    """Print the kubernetes objects of every registered runtime; 1 if one cannot work."""
    import yaml

    from modelgw.reconciler.kube_objects import object_problems, runtime_objects
    from modelgw.registry.store import RegistryStore

    settings = kube_settings(args)
    async with RegistryStore(args.etcd, prefix=args.prefix) as store:
        runtimes = sorted((r.spec for r in (await store.list_runtimes()).runtimes), key=lambda spec: spec.name)
        models = [m.spec for m in (await store.list_models()).models]
        jobs = sorted((await store.list_jobs()).jobs, key=lambda record: record.spec.name)
        streams = sorted((r.spec for r in (await store.list_streams()).streams), key=lambda spec: spec.name)
    documents: list[dict] = []
    refused = 0
    for runtime in runtimes:
        problems = object_problems(runtime, models, settings)
        if problems:
            refused += 1
            for problem in problems:
                print(f"modelgw reconcile: runtimes/{runtime.name} cannot run: {problem}", file=sys.stderr)
            continue
        documents += runtime_objects(runtime, models, settings)
    pipelines, refused_pipelines = _pipeline_documents(jobs, streams, models, settings)
    documents += pipelines
    refused += refused_pipelines
    if documents:
        sys.stdout.write(yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True))
    return 1 if refused else 0


def _pipeline_documents(
    jobs: list[rpb.JobRecord], streams: list[rpb.StreamSpec], models: list[rpb.ModelSpec], settings: KubeSettings
) -> tuple[list[dict], int]:
    """The Jobs of the jobs not finished and the Deployments of the streams, as the
    kubernetes backend would apply them; and how many cannot run (named on stderr)."""
    from modelgw.reconciler.backend import job_hash
    from modelgw.reconciler.core import finished, job_status_of
    from modelgw.reconciler.kube_objects import job_object, pipeline_problems, stream_object

    documents: list[dict] = []
    refused = 0
    for record in jobs:
        status = job_status_of(record)
        if finished(status):
            continue  # the backend leaves a finished job alone: nothing to apply
        problems = pipeline_problems(record.spec, models, settings)
        for problem in problems:
            print(f"modelgw reconcile: jobs/{record.spec.name} cannot run: {problem}", file=sys.stderr)
        if problems:
            refused += 1
            continue
        attempts = status.attempts if status is not None else 0
        documents.append(job_object(record.spec, models, settings, job_hash(record.spec, record.create_revision),
                                    attempts))
    for stream in streams:
        problems = pipeline_problems(stream, models, settings)
        for problem in problems:
            print(f"modelgw reconcile: streams/{stream.name} cannot run: {problem}", file=sys.stderr)
        if problems:
            refused += 1
            continue
        documents.append(stream_object(stream, models, settings))
    return documents, refused


async def _run(args: argparse.Namespace) -> int:
    # replicas are forked from this process; gRPC's fork handlers are not needed (the
    # child execs at once) and only log noise when other threads use gRPC
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    from modelgw.reconciler.core import Reconciler
    from modelgw.registry.store import RegistryStore

    backend = BACKENDS[args.backend](args)
    identity = args.identity or f"{socket.gethostname()}-{os.getpid()}"
    store = RegistryStore(args.etcd, prefix=args.prefix)
    reconciler = Reconciler(store, backend, identity, resync_seconds=args.resync_seconds, lease_ttl=args.lease_ttl)
    task = asyncio.ensure_future(reconciler.run())

    def stop() -> None:
        # once: a second signal must not cut short the replicas' graceful stop
        if not task.cancelling():
            log.info("stopping: replicas first, then the leadership")
            task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    log.info("reconciler %s started (backend %s, etcd %s)", identity, backend.name, args.etcd)
    code = 0
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("the reconciler failed")
        code = 1
    finally:
        await backend.close()
        await store.close()
    return code


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        if args.backend != "kubernetes":
            print("modelgw reconcile: error: --dry-run prints Kubernetes objects: give --backend kubernetes",
                  file=sys.stderr)
            return 2
        return asyncio.run(dry_run(args))
    try:
        return asyncio.run(_run(args))
    except BackendUnavailable as exc:
        print(f"modelgw reconcile: error: {exc}", file=sys.stderr)
        return 2
