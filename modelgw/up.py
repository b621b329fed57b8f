"""`modelgw up`: the whole system on one machine, with a demo model, in one command.

Starts (or reuses, with --etcd) a local etcd whose data lives in the data dir, a
development token issuer on loopback (`modelgw token` mints its tokens), the local
reconciler and the gateway in this process, registers a `pytorch` runtime and a `demo`
model (a small TorchScript MLP made on first start), waits until the demo answers and
prints how to call it. Ctrl-C stops everything it started; etcd and the replicas also
die with it when it is killed (PR_SET_PDEATHSIG, modelgw.process). Run it again with the
same data dir and it finds its registry (and whatever you applied since) again.

One `up` per data dir: a second one says which process runs there (pid and ports) and
exits 1. Every port is checked before anything starts; expected failures (a port in use,
etcd missing or failing to start) are one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

from modelgw.net import free_port, port_free
from modelgw.paths import default_data_dir, remember_data_dir
from modelgw.registry.keys import DEFAULT_PREFIX
from modelgw.tasks import stop_tasks

log = logging.getLogger("modelgw.up")

DEMO_MODEL = "demo"
DEMO_RUNTIME = "pytorch"
DEMO_LLM = "tiny-llm"
DEMO_LLM_RUNTIME = "llm"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="run everything on this machine (etcd, reconciler, gateway) with a demo model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=None, help="where etcd data, models and logs live (default ~/.modelgw)")
    p.add_argument("--etcd", default=None, help="use this etcd HOST:PORT instead of starting one")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default %(default)s)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--no-demo", action="store_true", help="do not register the demo runtime and model")
    p.add_argument("--data-plane", choices=("python", "envoy"), default="python",
                   help="who serves gRPC inference: the gateway itself, or an Envoy it runs (modelgw[envoy])")
    p.set_defaults(func=run)


def make_demo_model(directory: Path) -> Path:
    """An MLP (4 -> 16 -> 3, softmax) as a torch.export program (.pt2, batch 1..64) with a
    sidecar naming its tensors (a program's outputs are otherwise output_0...); made once."""
    path = directory / "model.pt2"
    if path.exists():
        return path
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3), torch.nn.Softmax(dim=-1)
    ).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    # an example batch of 2: torch.export specializes dims that are 0 or 1 in the example
    program = torch.export.export(model, (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    (directory / "model.json").write_text(
        json.dumps(
            {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
                "max_batch_size": 64,
            },
            indent=2,
        )
    )
    return path


def _etcd_ports(data_dir: Path) -> tuple[int, int]:
    """Ports kept in the data dir, so a second `up` finds the same etcd member config."""
    path = data_dir / "etcd-ports.json"
    if path.exists():
        ports = json.loads(path.read_text())
        return ports["client"], ports["peer"]
    client, peer = free_port(), free_port()
    path.write_text(json.dumps({"client": client, "peer": peer}))
    return client, peer


async def _register_demo(store, data_dir: Path) -> None:
    from modelgw.protos import registry_pb2 as rpb
    from modelgw.registry.errors import ConflictError

    model_path = await asyncio.to_thread(make_demo_model, data_dir / "models" / DEMO_MODEL / "1")
    runtime = rpb.RuntimeSpec(name=DEMO_RUNTIME, kind="pytorch", model_formats=["pt2", "torchscript"], replicas=1)
    runtime.options["threads"] = "1"
    model = rpb.ModelSpec(
        name=DEMO_MODEL,
        description="demo: a 4-feature MLP returning 3 class probabilities",
        versions=[rpb.ModelVersion(version="1", uri=f"file://{model_path}", format="pt2", runtime=DEMO_RUNTIME)],
    )
    llm_path = await asyncio.to_thread(make_demo_llm, data_dir / "models" / DEMO_LLM / "1")
    llm_runtime = rpb.RuntimeSpec(name=DEMO_LLM_RUNTIME, kind="llm", model_formats=["hf-llama"], replicas=1)
    llm = rpb.ModelSpec(
        name=DEMO_LLM,
        description="demo: a tiny random Llama (it speaks gibberish) for the OpenAI and streaming APIs",
        versions=[rpb.ModelVersion(version="1", uri=f"file://{llm_path}", format="hf-llama", runtime=DEMO_LLM_RUNTIME)],
    )
    # create only: what a user changed since the first start is theirs to keep
    for apply, spec in (
        (store.apply_runtime, runtime),
        (store.apply_model, model),
        (store.apply_runtime, llm_runtime),
        (store.apply_model, llm),
    ):
        with contextlib.suppress(ConflictError):
            await apply(spec, expected_revision=0)


def make_demo_llm(directory: Path) -> Path:
    """A tiny random Llama checkpoint with a trained tokenizer and a chat template; made once."""
    if (directory / "config.json").exists():
        return directory
    from modelgw.runtimes.llm.make_checkpoint import make_checkpoint

    return make_checkpoint(directory, layers=2, hidden=64, heads=4, kv_heads=2, vocab=512)


def _instructions(
    host: str, http_port: int, grpc_port: int, issuer: str, etcd: str, data_dir: Path | None, demo: bool = True
) -> str:
    """The banner `up` prints once serving; without the demo (--no-demo) it offers no calls
    to models it did not register."""
    http = f"http://{host}:{http_port}"
    where = f" --data-dir {data_dir}" if data_dir is not None else ""
    calls = "\nNo models are registered (--no-demo): apply yours, then call them.\n"
    if demo:
        calls = f"""
Call the demo model with curl (OIP v2 REST):
  curl -s {http}/v2/models/{DEMO_MODEL}/infer -H "Authorization: Bearer $TOKEN" \\
    -H 'Content-Type: application/json' \\
    -d '{{"inputs":[{{"name":"input","datatype":"FP32","shape":[1,4],"data":[0.1,0.2,0.3,0.4]}}]}}'

or with tritonclient (pip install 'tritonclient[grpc]'):
  python - <<'EOF'
import os, numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient("{host}:{grpc_port}")
x = g.InferInput("input", [1, 4], "FP32"); x.set_data_from_numpy(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
auth = {{"authorization": "Bearer " + os.environ["TOKEN"]}}
print(c.infer("{DEMO_MODEL}", [x], headers=auth).as_numpy("probabilities"))
EOF

Chat with the demo LLM (a tiny random Llama: expect gibberish) through the OpenAI API:
  curl -s {http}/v1/chat/completions -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' \
    -d '{{"model":"{DEMO_LLM}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16}}'
  # or: openai.OpenAI(base_url="{http}/v1", api_key=os.environ["TOKEN"])
"""
    return f"""
modelgw is up.
  gateway   gRPC {host}:{grpc_port}   HTTP {http}   metrics {http}/metrics
  issuer    {issuer}   (development only: `modelgw token` mints its tokens)
  etcd      {etcd}   (the registry: etcdctl --endpoints {etcd} get --prefix {DEFAULT_PREFIX} --keys-only)

Every call needs a token; this one may also change the registry (modelgw:admin):
  export TOKEN=$(modelgw token --sub you --scope modelgw:admin{where})
{calls}
Manage the registry:  modelgw get models --server {host}:{grpc_port} --token "$TOKEN"
                      modelgw apply -f my-model.yaml --server {host}:{grpc_port} --token "$TOKEN"
                      (or export MODELGW_TOKEN="$TOKEN" once)
Press Ctrl-C to stop everything.
"""


async def _wait_demo_ready(gateway, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        routes = [gateway.table.routes.get(name) for name in (DEMO_MODEL, DEMO_LLM)]
        if all(route and any(route.replicas.values()) for route in routes):
            return True
        await asyncio.sleep(0.2)
    return False


class UpError(Exception):
    """An expected failure: printed as one line, exit code 1."""


# the state of a running `up` in its data dir: UP_LOCK is held (flock) while it runs, so
# a second `up` knows at once, whatever happened to the first (even SIGKILL frees it);
# UP_STATE says which process and ports, for the second one's message
UP_LOCK = "up.lock"
UP_STATE = "up.json"


def _claim(data_dir: Path) -> IO[str]:
    """Hold the data dir's lock for this process's life; UpError if another `up` has it."""
    lock = open(data_dir / UP_LOCK, "a+")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UpError(f"already running on {data_dir} ({_describe(_read_state(data_dir))})") from None
    return lock


def _read_state(data_dir: Path) -> dict:
    try:
        state = json.loads((data_dir / UP_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _describe(state: dict) -> str:
    if not state:
        return "its pid and ports are not recorded yet: it is starting"
    parts = [f"pid {state.get('pid')}", f"gateway gRPC {state.get('grpc')} HTTP {state.get('http')}"]
    if state.get("etcd"):
        parts.append(f"etcd {state['etcd']}")
    return ", ".join(parts)


def _stop_leftover_etcd(data_dir: Path, state: dict) -> None:
    """An etcd that an `up` of this data dir started and that outlived it (an `up` from
    before etcd died with it): stop it, so that ours can start on the same ports."""
    pid = state.get("etcd_pid")
    if not isinstance(pid, int):
        return
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not argv or not argv[0].endswith(b"etcd") or str(data_dir / "etcd").encode() not in argv:
        return  # the pid is someone else's now
    log.warning("stopping the etcd (pid %d) a previous modelgw up of %s left running", pid, data_dir)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _check_ports(ports: list[tuple[str, int, str]]) -> None:
    """UpError naming the first (host, port, what) that a server could not listen on."""
    for host, port, what in ports:
        if port and not port_free(host, port):
            raise UpError(f"{what} port {host}:{port} is already in use")


async def _serve(args: argparse.Namespace, data_dir: Path, endpoint: str) -> int:
    """The issuer, the demo registration, the reconciler and the gateway, until a signal."""
    from modelgw.gateway.app import Gateway, GatewayConfig
    from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
    from modelgw.gateway.auth.devissuer import DevIssuer
    from modelgw.reconciler.core import Reconciler
    from modelgw.reconciler.local import LocalBackend
    from modelgw.registry.store import RegistryStore

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    store = RegistryStore(endpoint, prefix=DEFAULT_PREFIX)
    backend = LocalBackend(endpoint, DEFAULT_PREFIX, log_dir=data_dir / "logs", lease_ttl=10)
    reconciler = Reconciler(store, backend, identity=f"up-{os.getpid()}", resync_seconds=5.0)
    issuer = DevIssuer(data_dir / "issuer")
    issuer.prepare()
    auth = AuthConfig(issuers=(IssuerConfig(issuer=issuer.url, audiences=(issuer.audience,)),))
    gateway = Gateway(
        GatewayConfig(
            etcd=endpoint, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, auth=auth,
            data_plane=args.data_plane,
        )
    )
    reconciling = None
    try:
        try:
            await issuer.start()
        except OSError as exc:
            raise UpError(f"the development issuer did not start: {exc}") from None
        log.info("development token issuer on %s (key in %s)", issuer.url, data_dir / "issuer")
        if not args.no_demo:
            await _register_demo(store, data_dir)
        reconciling = asyncio.ensure_future(reconciler.run())
        try:
            await gateway.start()
        except OSError as exc:
            raise UpError(f"the gateway did not start: {exc}") from None
        if not args.no_demo:
            log.info("waiting for the demo model to load (runtime logs in %s)", data_dir / "logs")
            waiting = asyncio.ensure_future(_wait_demo_ready(gateway, 120))
            await asyncio.wait({waiting, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done() and not waiting.result():
                log.error("the demo models did not become ready within 120 s; see %s", data_dir / "logs")
        if not stop.is_set():
            host = args.host if args.host != "0.0.0.0" else "127.0.0.1"
            banner = _instructions(
                host, gateway.http_port, gateway.grpc_port, issuer.url, endpoint, args.data_dir, demo=not args.no_demo
            )
            print(banner, flush=True)
            await stop.wait()
        log.info("stopping")
    finally:
        await gateway.stop(grace=5)
        await issuer.stop()
        await stop_tasks(reconciling)
        await backend.close()
        await store.close()
    return 0


def _up(args: argparse.Namespace) -> int:
    """Claim the data dir, check every port, start etcd (from the main thread: its death
    signal follows the thread that starts it), then serve."""
    from modelgw.gateway.auth.devissuer import ensure_state
    from modelgw.registry.etcd_server import LocalEtcd

    data_dir: Path = (args.data_dir or default_data_dir()).expanduser().resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UpError(f"cannot use {data_dir} as the data dir: {exc}") from None
    lock = _claim(data_dir)
    state_path = data_dir / UP_STATE
    etcd_server = None
    try:
        try:  # its port is kept in the data dir, so that tokens outlive restarts
            issuer_port = int(ensure_state(data_dir / "issuer").issuer.rsplit(":", 1)[1])
        except (OSError, ValueError) as exc:
            raise UpError(f"the development issuer in {data_dir / 'issuer'} is unusable: {exc}") from None
        ports = [
            (args.host, args.http_port, "the gateway's HTTP"),
            (args.host, args.grpc_port, "the gateway's gRPC"),
            ("127.0.0.1", issuer_port, f"the development issuer's (kept in {data_dir / 'issuer'})"),
        ]
        endpoint = args.etcd
        if endpoint is None:
            _stop_leftover_etcd(data_dir, _read_state(data_dir))
            client, peer = _etcd_ports(data_dir)
            _check_ports([*ports, ("127.0.0.1", client, "etcd's client"), ("127.0.0.1", peer, "etcd's peer")])
            try:
                etcd_server = LocalEtcd(data_dir=data_dir / "etcd", client_port=client, peer_port=peer, die_with_parent=True)
                etcd_server.start()
            except (OSError, RuntimeError, TimeoutError) as exc:
                raise UpError(f"etcd did not start: {exc}") from None
            endpoint = etcd_server.endpoint
            log.info("etcd running on %s (data in %s)", endpoint, data_dir / "etcd")
        else:
            _check_ports(ports)
        state = {"pid": os.getpid(), "data_dir": str(data_dir), "etcd": endpoint,
                 "etcd_pid": etcd_server.pid if etcd_server else None,
                 "http": f"{args.host}:{args.http_port}", "grpc": f"{args.host}:{args.grpc_port}"}
        state_path.write_text(json.dumps(state))
        remember_data_dir(data_dir)
        return asyncio.run(_serve(args, data_dir, endpoint))
    finally:
        if etcd_server is not None:
            etcd_server.stop()
        with contextlib.suppress(OSError):
            state_path.unlink()
        lock.close()


def run(args: argparse.Namespace) -> int:
    try:
        return _up(args)
    except UpError as exc:
        print(f"modelgw up: {exc}", file=sys.stderr)
        return 1
