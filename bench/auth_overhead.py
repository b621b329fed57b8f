"""What authentication costs at the gateway: the same model and load through two gateways
of one registry, one with --insecure-no-auth and one verifying a bearer token (one token
reused, as a client holding a token does) and checking the model's access policy.

Everything is started here and stopped on exit (also on Ctrl-C and SIGTERM): a private
etcd, the registry records (the model requires a scope, so the policy check runs), one
`modelgw runtime serve --kind pytorch` replica, the development issuer of
modelgw.gateway.auth.devissuer on loopback and the two gateways. The model and the load
are those of bench/gateway_overhead.py (TorchScript MLP, batch 1, grpc.aio ModelInfer with
raw bytes, N workers on one channel); the measured time is split into rounds that
alternate between the two gateways, so that noise from other work hits both alike.

It prints req/s, p50 and p99 per gateway and level, the on/off throughput ratio (goal:
>= 0.97) and how many signatures the auth-on gateway checked (1: the verified-token cache
answered every other request).

    .venv/bin/python bench/auth_overhead.py                      # about 1 minute
    .venv/bin/python bench/auth_overhead.py --concurrency 16 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from gateway_overhead import PREFIX, RUNTIME, runtime_server  # noqa: E402  (sibling scripts)
from runtime_throughput import (  # noqa: E402
    MODEL_NAME,
    Result,
    Server,
    build_model,
    build_request,
    drive,
    print_errors,
    thread_env,
)

from modelgw.gateway.auth.devissuer import DevIssuer  # noqa: E402
from modelgw.net import free_port  # noqa: E402
from modelgw.protos import inference_pb2 as pb  # noqa: E402
from modelgw.protos import registry_pb2 as rpb  # noqa: E402
from modelgw.registry.etcd_server import LocalEtcd  # noqa: E402
from modelgw.registry.store import RegistryStore  # noqa: E402

SCOPE = "bench:infer"


async def register(etcd: str, model: Path) -> None:
    async with RegistryStore(etcd, prefix=PREFIX) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name=RUNTIME, kind="pytorch", model_formats=["torchscript"], replicas=1))
        spec = rpb.ModelSpec(name=MODEL_NAME, access=rpb.AccessPolicy(scopes=[SCOPE]))
        spec.versions.add(version="1", uri=str(model), format="torchscript", runtime=RUNTIME)
        await store.apply_model(spec)


class IssuerThread:
    """The development issuer, served from a thread of its own for the bench's lifetime."""

    def __init__(self, directory: Path) -> None:
        self.issuer = DevIssuer(directory)
        self.state = self.issuer.prepare()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._started = threading.Event()

    def _serve(self) -> None:
        self._loop.run_until_complete(self.issuer.start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.issuer.stop())

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def gateway(label: str, etcd: str, workdir: Path, *auth: str) -> tuple[Server, int]:
    port, http_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "modelgw", "--log-level", "WARNING", "gateway", "--etcd", etcd, "--prefix", PREFIX,
        "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", str(http_port), *auth,
    ]
    return Server(label, argv, port, workdir / f"{label}.log", thread_env(1)), http_port


def wait_ready(server: Server, metadata: tuple, timeout: float = 120.0) -> None:
    """Until an inference through this gateway answers (registry read, replica routed)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ready = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")
        while True:
            if server.process and server.process.poll() is not None:
                raise RuntimeError(f"{server.label} exited; {server.tail_log()}")
            with contextlib.suppress(grpc.RpcError):
                raw = ready(pb.ModelReadyRequest(name=MODEL_NAME).SerializeToString(), timeout=1, metadata=metadata)
                if pb.ModelReadyResponse.FromString(raw).ready:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.label} not ready after {timeout:.0f}s; {server.tail_log()}")
            time.sleep(0.2)


async def measure(
    targets: list[tuple[Server, tuple]], payload: bytes, levels: list[int], args: argparse.Namespace
) -> dict[tuple[str, int], Result]:
    results: dict[tuple[str, int], Result] = {}
    for n in levels:
        for server, metadata in targets:
            await drive(server.port, payload, n, args.warmup, args.max_requests, metadata)
            results[(server.label, n)] = Result(server.label, n)
        for _ in range(args.rounds):
            for server, metadata in targets:
                run = await drive(server.port, payload, n, args.duration / args.rounds, args.max_requests, metadata)
                results[(server.label, n)].add(*run)
        for server, _ in targets:
            r = results[(server.label, n)]
            spread = "/".join(f"{x:.0f}" for x in r.round_rps)
            print(
                f"  {server.label:>8} c={n:<3} {r.rps:7.0f} req/s (rounds {spread})  p50 {r.percentile_ms(50):6.2f} ms  "
                f"p99 {r.percentile_ms(99):6.2f} ms  {r.requests} requests, {sum(r.errors.values())} errors",
                flush=True,
            )
    return results


def signature_checks(http_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("modelgw_auth_signature_checks "):
                return line.split()[1]
    return "?"


def print_table(results: dict[tuple[str, int], Result], levels: list[int]) -> None:
    header = (f"{'conc':>4} | {'off req/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'on req/s':>9} {'p50 ms':>7} "
              f"{'p99 ms':>7} | {'on/off':>6} {'added p50':>9}")
    print(header)
    print("-" * len(header))
    for n in levels:
        off, on = results[("auth-off", n)], results[("auth-on", n)]
        if not (off.requests and on.requests):
            print(f"{n:>4} | no figures")
            continue
        print(
            f"{n:>4} | {off.rps:>9.0f} {off.percentile_ms(50):>7.2f} {off.percentile_ms(99):>7.2f} | "
            f"{on.rps:>9.0f} {on.percentile_ms(50):>7.2f} {on.percentile_ms(99):>7.2f} | "
            f"{on.rps / off.rps:>6.3f} {on.percentile_ms(50) - off.percentile_ms(50):>+7.3f}ms"
        )
    print_errors(results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gateway throughput with authentication on vs off")
    add = parser.add_argument
    add("--concurrency", default="1,16,64", help="comma-separated levels (default 1,16,64)")
    add("--duration", type=float, default=8.0, help="measured s per gateway and level (default 8)")
    add("--rounds", type=int, default=4, help="alternating rounds the duration is split into")
    add("--warmup", type=float, default=1.0, help="warm-up s per gateway and level (default 1)")
    add("--max-requests", type=int, default=50_000, help="request cap per phase (default 50000)")
    add("--torch-threads", type=int, default=1, help="torch intra-op threads of the runtime")
    add("--keep-logs", action="store_true", help="keep the temp dir with the logs")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}; grpcio {grpc.__version__}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="modelgw-auth-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            etcd = LocalEtcd(data_dir=workdir / "etcd")
            stack.callback(etcd.cleanup)
            etcd.start()
            issuer = IssuerThread(workdir / "issuer")
            issuer.start()
            stack.callback(issuer.stop)
            model, example, _ = build_model(workdir)
            asyncio.run(register(etcd.endpoint, model))
            runtime = runtime_server(etcd.endpoint, args, workdir)
            off, _ = gateway("auth-off", etcd.endpoint, workdir, "--insecure-no-auth")
            on, on_http = gateway("auth-on", etcd.endpoint, workdir, "--issuer", issuer.state.issuer,
                                  "--audience", issuer.state.audience)
            for server in (runtime, off, on):
                stack.callback(server.stop)
                server.start()
            token = issuer.state.mint("bench", scopes=[SCOPE], ttl=3600)
            with_token = (("authorization", f"Bearer {token}"),)
            wait_ready(off, ())
            wait_ready(on, with_token)
            print(
                f"model: TorchScript MLP, batch 1, torch threads {args.torch_threads}, access policy scope {SCOPE}; "
                f"per gateway and level {args.warmup:g}s warm-up + {args.duration:g}s in {args.rounds} alternating "
                f"rounds; logs in {workdir}",
                flush=True,
            )
            payload = build_request(example).SerializeToString()
            results = asyncio.run(measure([(off, ()), (on, with_token)], payload, levels, args))
            print()
            print_table(results, levels)
            print(f"signatures checked by the auth-on gateway: {signature_checks(on_http)} "
                  "(everything else answered by the verified-token cache)")
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
