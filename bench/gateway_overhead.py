"""What the gateway adds: the same model, the same load, direct to the runtime vs through
`modelgw gateway` (and through nginx `grpc_pass` when nginx is installed).

Everything is started here and stopped on exit (also on Ctrl-C and SIGTERM): a private
etcd (LocalEtcd), the registry records, one `modelgw runtime serve --kind pytorch`
replica registered in it, and a `modelgw gateway` routing by it. A bare grpc.aio byte
proxy (no routing, metrics or metadata; this script in another mode) is measured too:
the floor of what any Python gRPC hop costs on this machine, so that what the gateway's
own logic adds can be told apart. The model and the load generator are those of
bench/runtime_throughput.py: a TorchScript MLP (64 -> 256 x 3 -> 10, FP32, batch 1,
torch threads 1) and grpc.aio `ModelInfer` with raw bytes in and out, N concurrent
workers on one channel, each phase bounded by time and a request cap, rounds alternating
between the targets so that noise from other work on the machine hits all alike. Every
target's answer is checked against the model before any load.

For each concurrency level (default 1, 16, 64) it prints req/s, p50 and p99 per target,
the latency the gateway adds (gateway - direct, at p50 and p99) and the throughput
ratios. On a machine with few cores the load generator, the gateway and the runtime
share them: the figures are rough, and the gateway's share of the CPU is part of what
is measured.

Run from the repository root (about 1.5 minutes):

    .venv/bin/python bench/gateway_overhead.py
    .venv/bin/python bench/gateway_overhead.py --concurrency 16 --duration 10 --keep-logs
    .venv/bin/python bench/gateway_overhead.py --concurrency 16 --profile-dir /tmp/gw-prof  # py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from runtime_throughput import (  # noqa: E402  (a sibling script, not a package)
    MODEL_NAME,
    Result,
    Server,
    build_model,
    build_request,
    check_output,
    drive,
    measure,
    print_errors,
    profile,
    thread_env,
)

from modelgw.net import free_port  # noqa: E402
from modelgw.protos import registry_pb2 as rpb  # noqa: E402
from modelgw.registry.etcd_server import LocalEtcd  # noqa: E402
from modelgw.registry.store import RegistryStore  # noqa: E402

PREFIX = "/modelgw-bench/v1/"
RUNTIME = "torch"


# ------------------------------------------------------------------ setup


async def register(etcd: str, model: Path) -> None:
    async with RegistryStore(etcd, prefix=PREFIX) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name=RUNTIME, kind="pytorch", model_formats=["torchscript"], replicas=1))
        spec = rpb.ModelSpec(name=MODEL_NAME)
        spec.versions.add(version="1", uri=str(model), format="torchscript", runtime=RUNTIME)
        await store.apply_model(spec)


def runtime_server(etcd: str, args: argparse.Namespace, workdir: Path) -> Server:
    """The replica, registered in etcd; it loads the model the registry assigns it."""
    port = free_port()
    argv = [
        sys.executable, "-m", "modelgw", "runtime", "serve", "--kind", "pytorch",
        "--registry", etcd, "--prefix", PREFIX, "--runtime", RUNTIME,
        "--host", "127.0.0.1", "--port", str(port), "--option", f"threads={args.torch_threads}",
    ]
    return Server("direct", argv, port, workdir / "runtime.log", thread_env(args.torch_threads))


def gateway_server(etcd: str, workdir: Path, data_plane: str = "python") -> Server:
    port = free_port()
    label = "gateway" if data_plane == "python" else "envoy-gw"
    argv = [
        sys.executable, "-m", "modelgw", "--log-level", "WARNING", "gateway", "--etcd", etcd, "--prefix", PREFIX,
        "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", str(free_port()),
        "--insecure-no-auth",  # the hop itself is measured; token checks would be extra
        "--data-plane", data_plane,  # envoy: one Envoy worker, beside nginx's one worker
    ]
    return Server(label, argv, port, workdir / f"{label}.log", thread_env(1))


def plain_envoy_server(envoy: str, upstream_port: int, workdir: Path) -> Server:
    """Envoy as a plain gRPC proxy in front of the runtime (one worker, no filters but the
    router): what the envoy data plane's own filters (Lua, routing) add is told apart."""
    import json

    port = free_port()
    http2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "plain", "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "runtime"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    config = {"static_resources": {
        "listeners": [{"name": "grpc", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "runtime", "type": "STATIC", "connect_timeout": "1s",
                      "typed_extension_protocol_options": http2,
                      "load_assignment": {"cluster_name": "runtime", "endpoints": [{"lb_endpoints": [{"endpoint": {
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}]}}],
    }}
    path = workdir / "plain-envoy.json"
    path.write_text(json.dumps(config))
    argv = [envoy, "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"]
    return Server("envoy", argv, port, workdir / "plain-envoy.log", thread_env(1))


def cpu_seconds(group: int) -> float:
    """utime + stime of every process in a process group (a gateway and its Envoy alike)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def cpu_per_request(
    targets: list[Server], payload: bytes, levels: list[int], requests: int, rounds: int
) -> dict[tuple[str, int], list[float]]:
    """Microseconds of the proxy's CPU per proxied request (the runtime's not counted), per
    (target, concurrency): one figure a round, rounds alternating between the targets (in
    reverse every other round) so that drift on the machine hits them alike."""
    out: dict[tuple[str, int], list[float]] = {}
    for n in levels:
        for r in range(rounds):
            for target in targets if r % 2 == 0 else targets[::-1]:
                assert target.process is not None
                before = cpu_seconds(target.process.pid)
                _, _, errors = await drive(target.port, payload, n, 600.0, requests)
                out.setdefault((target.label, n), []).append((cpu_seconds(target.process.pid) - before) / requests * 1e6)
                if errors:
                    print(f"  {target.label}: errors while measuring CPU: {dict(errors)}")
    return out


def print_cpu(cpu: dict[tuple[str, int], list[float]], levels: list[int], labels: list[str], requests: int) -> None:
    """Median CPU per request, each round's figure, and the ratio to nginx's median."""
    rounds = len(next(iter(cpu.values())))
    print(f"\nCPU per proxied request (utime+stime of the proxy's processes; median of {rounds} alternating "
          f"rounds of {requests} requests):")
    for n in levels:
        base = statistics.median(cpu[("nginx", n)]) if ("nginx", n) in cpu else None
        for label in labels:
            figures = cpu.get((label, n))
            if not figures:
                continue
            median = statistics.median(figures)
            ratio = f"  ({median / base:.2f}x nginx)" if base else ""
            each = " ".join(f"{x:.0f}" for x in figures)
            print(f"  c={n:<3} {label:>9} {median:7.0f} us{ratio}   rounds: {each}")


def bare_proxy_server(upstream_port: int, workdir: Path) -> Server:
    """This script in --serve-bare-proxy mode: the least a Python grpc.aio proxy does."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare-proxy", str(port), f"127.0.0.1:{upstream_port}"]
    return Server("bare", argv, port, workdir / "bare-proxy.log", thread_env(1))


def serve_bare_proxy(port: int, upstream: str) -> None:
    """Every inference RPC forwarded as bytes over one channel: no routing, no metrics, no
    metadata; what is left of the gateway's cost when its own logic is taken away."""

    async def run() -> None:
        channel = grpc.aio.insecure_channel(upstream)
        methods = {}
        for name in ("ModelInfer", "ModelReady", "ServerReady"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{name}")

            async def handler(request: bytes, context: grpc.aio.ServicerContext, call=call) -> bytes:
                return await call(request, timeout=30)

            methods[name] = grpc.unary_unary_rpc_method_handler(handler)  # bytes in, bytes out
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", methods),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def nginx_server(nginx: str, upstream_port: int, workdir: Path) -> Server:
    """nginx as a plain gRPC reverse proxy in front of the same runtime (one worker)."""
    port = free_port()
    root = workdir / "nginx"
    root.mkdir()
    (root / "nginx.conf").write_text(
        f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream runtime {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} http2;  # the form nginx < 1.25 (Debian 12) knows
        location / {{ grpc_pass grpc://runtime; }}
    }}
}}
"""
    )
    argv = [nginx, "-p", str(root), "-c", str(root / "nginx.conf")]
    return Server("nginx", argv, port, workdir / "nginx.log", thread_env(1))


# ------------------------------------------------------------------ report


def print_table(results: dict[tuple[str, int], Result], levels: list[int], labels: list[str]) -> None:
    def cols(r: Result | None) -> str:
        if r is None or not r.requests:
            return f"{'-':>13} {'-':>7} {'-':>7}"
        return f"{r.rps:>13.0f} {r.percentile_ms(50):>7.2f} {r.percentile_ms(99):>7.2f}"

    header = " | ".join([f"{'conc':>4}"] + [f"{label + ' req/s':>13} {'p50 ms':>7} {'p99 ms':>7}" for label in labels])
    header += f" | {'added p50':>9} {'added p99':>9} {'gw/direct':>9}"
    if "bare" in labels:
        header += f" {'gw/bare':>8} {'bare +p50':>10}"
    if "nginx" in labels:
        header += f" {'gw/nginx':>8} {'nginx +p50':>10}"
    print(header)
    print("-" * len(header))
    for n in levels:
        line = " | ".join([f"{n:>4}"] + [cols(results.get((label, n))) for label in labels])
        print(line)
    print()
    # every proxy against direct and against nginx
    direct = {n: results.get(("direct", n)) for n in levels}
    print(f"{'proxy':>9} {'conc':>4} {'added p50':>10} {'added p99':>10} {'x direct':>9} {'x nginx':>8}")
    for label in [x for x in labels if x != "direct"]:
        for n in levels:
            r, d, ng = results.get((label, n)), direct[n], results.get(("nginx", n))
            if not (r and r.requests and d and d.requests):
                continue
            vs_nginx = f"{r.rps / ng.rps:>7.2f}x" if ng and ng.requests else f"{'-':>8}"
            print(f"{label:>9} {n:>4} {r.percentile_ms(50) - d.percentile_ms(50):>+8.3f}ms "
                  f"{r.percentile_ms(99) - d.percentile_ms(99):>+8.3f}ms {r.rps / d.rps:>8.2f}x {vs_nginx}")
    print()
    header = " | ".join([f"{'conc':>4}"] + [f"{label + ' req/s':>13} {'p50 ms':>7} {'p99 ms':>7}" for label in labels])
    header += f" | {'added p50':>9} {'added p99':>9} {'gw/direct':>9}"
    print(header)
    print("-" * len(header))
    for n in levels:
        line = " | ".join([f"{n:>4}"] + [cols(results.get((label, n))) for label in labels])
        direct, gateway, bare, nginx = (results.get((label, n)) for label in ("direct", "gateway", "bare", "nginx"))
        if direct and gateway and direct.requests and gateway.requests:
            added50 = gateway.percentile_ms(50) - direct.percentile_ms(50)
            added99 = gateway.percentile_ms(99) - direct.percentile_ms(99)
            line += f" | {added50:>+7.3f}ms {added99:>+7.3f}ms {gateway.rps / direct.rps:>8.2f}x"
            for other, width in ((bare, 7), (nginx, 7)):
                if other is not None and other.requests:
                    added = other.percentile_ms(50) - direct.percentile_ms(50)
                    line += f" {gateway.rps / other.rps:>{width}.2f}x {added:>+8.3f}ms"
        print(line)
    print("added = gateway minus direct latency; gw/direct = ratio of req/s")
    if "bare" in labels:
        print("bare = a bare grpc.aio byte proxy (no routing, metrics or metadata): gw/bare = ratio of req/s, "
              "bare +p50 = its own added p50, i.e. what Python gRPC costs a hop before any gateway logic")
    if "nginx" in labels:
        print("gw/nginx = ratio of req/s against nginx grpc_pass; nginx +p50 = nginx's added p50")
    print_errors(results)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gateway overhead: direct vs through the gateway (vs nginx)")
    add = parser.add_argument
    add("--concurrency", default="1,16,64", help="comma-separated levels (default 1,16,64)")
    add("--duration", type=float, default=6.0, help="measured s per target and level (default 6)")
    add("--rounds", type=int, default=3, help="alternating rounds the duration is split into")
    add("--warmup", type=float, default=1.0, help="warm-up s per target and level (default 1)")
    add("--max-requests", type=int, default=20_000, help="request cap per phase (default 20000)")
    add("--torch-threads", type=int, default=1, help="torch intra-op threads of the runtime")
    add("--no-nginx", action="store_true", help="skip nginx even when it is installed")
    add("--no-bare", action="store_true", help="skip the bare grpc.aio proxy reference")
    add("--no-envoy", action="store_true", help="skip the envoy data plane and plain Envoy (run when envoy is installed)")
    add("--cpu-requests", type=int, default=4_000, help="requests per proxy and round for CPU per request (0: skip)")
    add("--cpu-rounds", type=int, default=4, help="alternating rounds of CPU per request (the median is reported)")
    add("--cpu-concurrency", default="1,16", help="comma-separated levels CPU per request is measured at")
    add("--keep-logs", action="store_true", help="keep the temp dir with the logs")
    add("--profile-dir", type=Path, help="afterwards, py-spy the gateway at concurrency 16 into DIR")
    add("--serve-bare-proxy", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare_proxy:
        serve_bare_proxy(int(args.serve_bare_proxy[0]), args.serve_bare_proxy[1])
        return 0
    # A SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop every process we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    nginx = None if args.no_nginx else shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    envoy = None
    if not args.no_envoy:
        from modelgw.gateway.envoy.config import EnvoyConfigError
        from modelgw.gateway.envoy.supervisor import find_envoy

        with contextlib.suppress(EnvoyConfigError):
            envoy = find_envoy()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}; grpcio {grpc.__version__}; "
          f"nginx: {nginx or 'not installed (skipped)'}; envoy: {envoy or 'not installed (skipped)'}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="modelgw-gateway-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            etcd = LocalEtcd(data_dir=workdir / "etcd")
            stack.callback(etcd.cleanup)
            etcd.start()
            model, example, expected = build_model(workdir)
            asyncio.run(register(etcd.endpoint, model))
            runtime = runtime_server(etcd.endpoint, args, workdir)
            targets = [runtime, gateway_server(etcd.endpoint, workdir)]
            if envoy:
                targets.append(gateway_server(etcd.endpoint, workdir, "envoy"))
            if not args.no_bare:
                targets.append(bare_proxy_server(runtime.port, workdir))
            if nginx:
                targets.append(nginx_server(nginx, runtime.port, workdir))
            if envoy:
                targets.append(plain_envoy_server(envoy, runtime.port, workdir))
            for target in targets:
                stack.callback(target.stop)
                target.start()
            request = build_request(example)
            for target in targets:
                target.wait_ready()  # the gateway: once it routes the model to the replica
                # Envoy's routes follow the Python side's table within milliseconds
                for attempt in range(50):
                    try:
                        check_output(target, request, expected)
                        break
                    except grpc.RpcError:
                        if attempt == 49:
                            raise
                        time.sleep(0.1)
            print(
                f"model: TorchScript MLP, batch 1, torch threads {args.torch_threads}; per target and level "
                f"{args.warmup:g}s warm-up + {args.duration:g}s in {args.rounds} alternating rounds "
                f"(cap {args.max_requests} requests per phase); logs in {workdir}",
                flush=True,
            )
            results = asyncio.run(measure(targets, request.SerializeToString(), levels, args))
            print()
            print_table(results, levels, [t.label for t in targets])
            if args.cpu_requests:
                proxies = targets[1:]
                cpu_levels = [int(n) for n in args.cpu_concurrency.split(",") if n.strip()]
                cpu = asyncio.run(cpu_per_request(
                    proxies, request.SerializeToString(), cpu_levels, args.cpu_requests, args.cpu_rounds))
                print_cpu(cpu, cpu_levels, [t.label for t in proxies], args.cpu_requests)
            if args.profile_dir:
                asyncio.run(profile(targets[1], request.SerializeToString(), 16, args))
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
