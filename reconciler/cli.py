"""`modelgw reconcile`: keep runtime workloads in line with the registry.

The backends it can run are the entries of BACKENDS (name -> a factory taking the parsed
arguments); only `local` exists today. A second backend adds its entry there and brings
back a `--backend` flag choosing among them (reconciler.backend.Backend is what it must
implement); the core, the election and the status writes do not change.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from modelgw.registry.keys import DEFAULT_PREFIX

if TYPE_CHECKING:
    from modelgw.reconciler.backend import Backend

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
    p.add_argument("--data-dir", default=None, help="local backend: where replica logs go")
    p.add_argument("--host", default="127.0.0.1", help="local backend: address replicas listen on")
    p.set_defaults(func=run, backend="local")


def _local_backend(args: argparse.Namespace) -> Backend:
    """Replicas as supervised processes on this machine, logs in DATA_DIR/logs."""
    from modelgw.reconciler.local import LocalBackend

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="modelgw-reconciler-")
    log.info("replica logs in %s", os.path.join(data_dir, "logs"))
    return LocalBackend(
        args.etcd, args.prefix, log_dir=os.path.join(data_dir, "logs"), host=args.host, lease_ttl=args.lease_ttl
    )


BACKENDS: dict[str, Callable[[argparse.Namespace], Backend]] = {"local": _local_backend}


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
    return asyncio.run(_run(args))
