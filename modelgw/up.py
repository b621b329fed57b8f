"""`modelgw up`: the whole system on one machine, with a demo model, in one command.

Starts (or reuses, with --etcd) a local etcd whose data lives in the data dir, a
development token issuer on loopback (`modelgw token` mints its tokens), the local
reconciler and the gateway in this process, registers a `pytorch` runtime and a `demo`
model (a small TorchScript MLP made on first start), waits until the demo answers and
prints how to call it. Ctrl-C stops everything it started. Run it again with the same
data dir and it finds its registry (and whatever you applied since) again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

from modelgw.net import free_port

log = logging.getLogger("modelgw.up")

DEMO_MODEL = "demo"
DEMO_RUNTIME = "pytorch"
DEMO_LLM = "tiny-llm"
DEMO_LLM_RUNTIME = "llm"


def default_data_dir() -> Path:
    return Path(os.environ.get("MODELGW_HOME", Path.home() / ".modelgw"))


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
    p.set_defaults(func=run)


def make_demo_model(directory: Path) -> Path:
    """A TorchScript MLP (4 -> 16 -> 3, softmax) with its signature sidecar; made once."""
    path = directory / "model.pt"
    if path.exists():
        return path
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3), torch.nn.Softmax(dim=-1)
    ).eval()
    torch.jit.script(model).save(str(path))
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
    runtime = rpb.RuntimeSpec(name=DEMO_RUNTIME, kind="pytorch", model_formats=["torchscript"], replicas=1)
    runtime.options["threads"] = "1"
    model = rpb.ModelSpec(
        name=DEMO_MODEL,
        description="demo: a 4-feature MLP returning 3 class probabilities",
        versions=[rpb.ModelVersion(version="1", uri=f"file://{model_path}", format="torchscript", runtime=DEMO_RUNTIME)],
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


def _instructions(host: str, http_port: int, grpc_port: int, issuer: str, data_dir: Path | None) -> str:
    http = f"http://{host}:{http_port}"
    where = f" --data-dir {data_dir}" if data_dir is not None else ""
    return f"""
modelgw is up.
  gateway   gRPC {host}:{grpc_port}   HTTP {http}   metrics {http}/metrics
  issuer    {issuer}   (development only: `modelgw token` mints its tokens)

Every call needs a token; this one may also change the registry (modelgw:admin):
  export TOKEN=$(modelgw token --sub you --scope modelgw:admin{where})

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


async def _up(args: argparse.Namespace) -> int:
    from modelgw.gateway.app import Gateway, GatewayConfig
    from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
    from modelgw.gateway.auth.devissuer import DevIssuer
    from modelgw.reconciler.core import Reconciler
    from modelgw.reconciler.local import LocalBackend
    from modelgw.registry.etcd_server import LocalEtcd
    from modelgw.registry.keys import DEFAULT_PREFIX
    from modelgw.registry.store import RegistryStore

    data_dir: Path = (args.data_dir or default_data_dir()).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    etcd_server = None
    endpoint = args.etcd
    if endpoint is None:
        client, peer = _etcd_ports(data_dir)
        etcd_server = LocalEtcd(data_dir=data_dir / "etcd", client_port=client, peer_port=peer)
        if etcd_server.healthy():
            # an etcd of this data dir outlived an `up` that was killed: keep using it
            log.info("reusing the etcd already running on %s", etcd_server.endpoint)
            etcd_server = None
            endpoint = f"127.0.0.1:{client}"
        else:
            await asyncio.to_thread(etcd_server.start)
            endpoint = etcd_server.endpoint
            log.info("etcd running on %s (data in %s)", endpoint, data_dir / "etcd")

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
        GatewayConfig(etcd=endpoint, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, auth=auth)
    )
    reconciling = None
    try:
        await issuer.start()
        log.info("development token issuer on %s (key in %s)", issuer.url, data_dir / "issuer")
        if not args.no_demo:
            await _register_demo(store, data_dir)
        reconciling = asyncio.ensure_future(reconciler.run())
        await gateway.start()
        if not args.no_demo:
            log.info("waiting for the demo model to load (runtime logs in %s)", data_dir / "logs")
            waiting = asyncio.ensure_future(_wait_demo_ready(gateway, 120))
            await asyncio.wait({waiting, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done() and not waiting.result():
                log.error("the demo models did not become ready within 120 s; see %s", data_dir / "logs")
        if not stop.is_set():
            host = args.host if args.host != "0.0.0.0" else "127.0.0.1"
            print(_instructions(host, gateway.http_port, gateway.grpc_port, issuer.url, args.data_dir), flush=True)
            await stop.wait()
        log.info("stopping")
    finally:
        await gateway.stop(grace=5)
        await issuer.stop()
        if reconciling is not None:
            reconciling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciling
        await backend.close()
        await store.close()
        if etcd_server is not None:
            await asyncio.to_thread(etcd_server.stop)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_up(args))
