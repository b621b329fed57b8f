"""Throughput and latency of modelgw's pytorch runtime against KServe's Python ModelServer.

Both serve the same TorchScript MLP on this machine and are driven by the same load
generator over the same protocol: gRPC OIP v2 `ModelInfer` on loopback, one FP32 row of
64 features sent as raw contents. For each concurrency level (default 1, 16, 64) the
load generator runs N concurrent workers on one grpc.aio channel. It prints requests/s,
p50 and p99 latency side by side and the ratio modelgw / KServe.

Method. Both servers are started up front (an idle server costs nothing measurable) and
load goes to one at a time. Per level, each server gets a warm-up, then the measured time
(--duration) is split into --rounds rounds that alternate between the servers, so a
burst of noise from other work on the machine hits both alike; every phase is also capped
at --max-requests. Figures pool all rounds: req/s = requests / seconds, p50 and p99 over
all latencies; the spread of the per-round req/s is printed as well.

Fairness: the same model file; the same torch intra-op thread count (--torch-threads,
also OMP_NUM_THREADS / MKL_NUM_THREADS for both processes); no batching on either side
(KServe's ModelServer has none; the model's signature declares max_batch_size 0 for
modelgw); each server's answer is checked against the model run in this process before
any load is sent. KServe runs as it ships (its per-request info log goes to a file).
`--ceiling` adds a reference: an empty grpc.aio handler answering canned bytes, i.e. the
most a Python gRPC server does against this load generator on this machine.

KServe lives in its own virtualenv (default bench/.venv-kserve). Create it with
`--setup-kserve`, or by hand (the script prints the commands when it is missing):

    python3 -m venv bench/.venv-kserve
    bench/.venv-kserve/bin/pip install torch==2.13.0 kserve

torch is pinned: unpinned, pip would pull a multi-GB CUDA build.

Run from the repository root with the project's virtualenv (about 1.5 minutes):

    .venv/bin/python bench/runtime_throughput.py --ceiling
    .venv/bin/python bench/runtime_throughput.py --only modelgw --profile-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from modelgw.net import free_port
from modelgw.oip import codec
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_KSERVE_VENV = BENCH_DIR / ".venv-kserve"
KSERVE_SERVER = BENCH_DIR / "kserve_torchscript_server.py"
MODEL_NAME = "mlp"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
INPUT = "input__0"
OUTPUT = "output__0"
FEATURES = 64
HIDDEN = 256
CLASSES = 10


def setup_commands(venv: Path) -> list[list[str]]:
    return [
        ["python3", "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "torch==2.13.0", "kserve"],
    ]


# ------------------------------------------------------------------ the model


def build_model(directory: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A TorchScript MLP (64 -> 256 -> 256 -> 256 -> 10), an input row and its output.

    Next to it, the signature sidecar that modelgw's pytorch kind reads for TorchScript
    (mlp.json; KServe ignores it). max_batch_size 0: no dynamic batching."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    ).eval()
    path = directory / "mlp.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    signature = {
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, FEATURES]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, CLASSES]}],
        "max_batch_size": 0,
    }
    path.with_suffix(".json").write_text(json.dumps(signature))
    example = np.random.default_rng(0).standard_normal((1, FEATURES), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(example)).numpy()
    return path, example, expected


# ------------------------------------------------------------------ server processes


@dataclass
class Server:
    label: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
                start_new_session=True,  # its own process group: stop() reaches children
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll ServerReady and ModelReady until both say yes."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.process and self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.label} exited with {self.process.returncode}; {self.tail_log()}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    if (
                        stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
                        and stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=1).ready
                    ):
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.label} not ready after {timeout:.0f}s; {self.tail_log()}"
                    )
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after 10 s."""
        if not self.process or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail_log(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "no log"
        return f"last lines of {self.log}:\n" + "\n".join(text)


def thread_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def modelgw_server(model: Path, args: argparse.Namespace, workdir: Path) -> Server:
    port = free_port()
    argv = [
        sys.executable, "-m", "modelgw", "runtime", "serve",
        "--kind", "pytorch",
        "--model", f"{MODEL_NAME}={model}",
        "--port", str(port),
        "--option", f"threads={args.torch_threads}",
        *args.modelgw_arg,
    ]
    return Server("modelgw", argv, port, workdir / "modelgw.log", thread_env(args.torch_threads))


def kserve_server(model: Path, args: argparse.Namespace, workdir: Path) -> Server:
    port = free_port()
    argv = [
        str(args.kserve_venv / "bin" / "python"), str(KSERVE_SERVER),
        "--model-file", str(model),
        "--model-name", MODEL_NAME,
        "--grpc-port", str(port),
        "--http-port", str(free_port()),
        "--torch-threads", str(args.torch_threads),
        "--output-name", OUTPUT,
    ]
    return Server("kserve", argv, port, workdir / "kserve.log", thread_env(args.torch_threads))


def ceiling_server(expected: np.ndarray, workdir: Path) -> Server:
    """This script in --serve-empty mode, answering the model's real response bytes."""
    response = pb.ModelInferResponse(model_name=MODEL_NAME)
    codec.add_output(response, OUTPUT, expected)
    canned = workdir / "ceiling-response.bin"
    canned.write_bytes(response.SerializeToString())
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-empty", str(port), str(canned)]
    return Server("ceiling", argv, port, workdir / "ceiling.log", thread_env(1))


def serve_empty(port: int, response: bytes) -> None:
    """The ceiling server: ModelInfer answers canned bytes without decoding the request."""
    answers = {
        "ModelInfer": response,
        "ServerReady": pb.ServerReadyResponse(ready=True).SerializeToString(),
        "ModelReady": pb.ModelReadyResponse(ready=True).SerializeToString(),
    }

    def canned(answer: bytes) -> grpc.RpcMethodHandler:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return answer

        return grpc.unary_unary_rpc_method_handler(handler)  # no (de)serializers: bytes

    async def run() -> None:
        server = grpc.aio.server()
        methods = {name: canned(answer) for name, answer in answers.items()}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", methods),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


# ------------------------------------------------------------------ load generator


@dataclass
class Result:
    """Pooled figures of one server at one concurrency level."""

    server: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    round_rps: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, latencies: list[float], seconds: float, errors: Counter[str]) -> None:
        self.latencies += latencies
        self.seconds += seconds
        self.round_rps.append(len(latencies) / seconds if seconds else 0.0)
        self.errors += errors

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000.0) if self.latencies else float("nan")


def build_request(example: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    codec.add_input(request, INPUT, example)  # raw contents, as tritonclient sends
    return request


def check_output(server: Server, request: pb.ModelInferRequest, expected: np.ndarray) -> None:
    """One real inference, compared with the model run in this process."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    outputs = codec.decode_response_outputs(response)
    got = outputs.get(OUTPUT)
    if got is None or got.shape != expected.shape or not np.allclose(got, expected, atol=1e-5):
        raise RuntimeError(f"{server.label} answered {outputs!r}; the model gives {expected!r}")


async def drive(
    port: int, payload: bytes, concurrency: int, seconds: float, max_requests: int, metadata: tuple = ()
) -> tuple[list[float], float, Counter[str]]:
    """`concurrency` workers send `payload` back to back on one channel until `seconds`
    pass or `max_requests` were sent: (latencies, elapsed seconds, errors). Request and
    response stay serialized bytes, so the generator spends its CPU on gRPC alone."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(MODEL_INFER)  # no (de)serializers: bytes in, bytes out
        await call(payload, timeout=30, metadata=metadata)  # connected (token verified) before the clock starts
        issued = 0
        start = time.perf_counter()
        stop_at = start + seconds
        last_done = start

        async def worker() -> None:
            nonlocal issued, last_done
            while issued < max_requests and time.perf_counter() < stop_at:
                issued += 1
                sent = time.perf_counter()
                try:
                    await call(payload, timeout=30, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    errors[f"{exc.code().name}: {exc.details()}"] += 1
                    continue
                last_done = time.perf_counter()
                latencies.append(last_done - sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, last_done - start, errors


async def measure(
    servers: list[Server], payload: bytes, levels: list[int], args: argparse.Namespace
) -> dict[tuple[str, int], Result]:
    results: dict[tuple[str, int], Result] = {}
    for n in levels:
        for server in servers:
            await drive(server.port, payload, n, args.warmup, args.max_requests)
            results[(server.label, n)] = Result(server.label, n)
        for _ in range(args.rounds):
            for server in servers:
                run = await drive(
                    server.port, payload, n, args.duration / args.rounds, args.max_requests
                )
                results[(server.label, n)].add(*run)
        for server in servers:
            r = results[(server.label, n)]
            spread = "/".join(f"{x:.0f}" for x in r.round_rps)
            print(
                f"  {server.label:>7} c={n:<3} {r.rps:7.0f} req/s (rounds {spread})  "
                f"p50 {r.percentile_ms(50):6.2f} ms  p99 {r.percentile_ms(99):6.2f} ms  "
                f"{r.requests} requests, {sum(r.errors.values())} errors",
                flush=True,
            )
    return results


# ------------------------------------------------------------------ profiling


_LINE_NUMBER = re.compile(r":\d+\)$")
_PARTS = ("runtimes/", "torch/", "cygrpc", "concurrent/futures")
_NATIVE_ADDRESS = re.compile(r"^0x[0-9a-f]+ \((?:.*/)?([^/]+)\)$")


async def profile(
    server: Server, payload: bytes, concurrency: int, args: argparse.Namespace
) -> None:
    """py-spy our runtime under load: only samples holding the GIL (the Python server is
    bound by one thread's GIL time) with native frames, so gRPC's C/Cython work shows."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not py_spy:
        print("py-spy not found: `.venv/bin/pip install py-spy` to profile", file=sys.stderr)
        return
    out_dir: Path = args.profile_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    collapsed = out_dir / f"{server.label}-c{concurrency}.collapsed"
    seconds = max(3, int(args.duration))
    with open(out_dir / "py-spy.log", "wb") as log:
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.process.pid), "--duration", str(seconds),
             "--rate", "250", "--gil", "--native", "--format", "raw", "--output", str(collapsed)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        latencies, elapsed, _ = await drive(server.port, payload, concurrency, seconds + 1, 10**9)
        spy.wait(timeout=60)
    print(f"\nprofile of {server.label} at concurrency {concurrency} under py-spy "
          f"({len(latencies) / elapsed:.0f} req/s while sampled): {collapsed}")
    if collapsed.exists():
        report = summarize_profile(collapsed)
        (out_dir / "summary.txt").write_text(report + "\n")
        print(report)


def summarize_profile(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        # "func (path/file.py:123)" -> "func (path/file.py)": aggregate over lines; frames
        # of stripped native libraries (gRPC's Cython core) -> "[native] (lib.so)".
        frames = [
            _NATIVE_ADDRESS.sub(r"[native] (\1)", _LINE_NUMBER.sub(")", frame))
            for frame in stack.split(";")
        ]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "no samples"
    lines = [f"{total} samples holding the GIL; self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    # Inclusive time of the parts that matter: our runtime's code, torch, gRPC's core
    # (the entry frames every sample shares are left out).
    parts = [
        (name, n)
        for name, n in inclusive.most_common()
        if any(key in name for key in _PARTS) and "runtimes/cli.py" not in name
    ]
    lines.append("inclusive time of modelgw runtime code, torch and gRPC's core:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in parts[:top]]
    return "\n".join(lines)


# ------------------------------------------------------------------ report


def print_table(results: dict[tuple[str, int], Result], levels: list[int]) -> None:
    header = (
        f"{'concurrency':>11} | {'modelgw req/s':>13} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'kserve req/s':>12} {'p50 ms':>7} {'p99 ms':>7} | {'ratio req/s':>11} {'ratio p50':>9}"
    )
    print(header)
    print("-" * len(header))

    def cols(r: Result | None, width: int) -> str:
        if r is None:
            return f"{'-':>{width}} {'-':>7} {'-':>7}"
        return f"{r.rps:>{width}.0f} {r.percentile_ms(50):>7.2f} {r.percentile_ms(99):>7.2f}"

    for n in levels:
        ours, theirs = results.get(("modelgw", n)), results.get(("kserve", n))
        both = ours is not None and theirs is not None and theirs.rps > 0 and ours.requests > 0
        ratio = f"{ours.rps / theirs.rps:>10.2f}x" if both else f"{'-':>11}"
        speed = (
            f"{theirs.percentile_ms(50) / ours.percentile_ms(50):>8.2f}x" if both else f"{'-':>9}"
        )
        print(f"{n:>11} | {cols(ours, 13)} | {cols(theirs, 12)} | {ratio} {speed}")
    print(
        "ratio req/s = modelgw / KServe; ratio p50 = KServe p50 / modelgw p50 (>1: modelgw better)"
    )
    ceiling = [results[("ceiling", n)] for n in levels if ("ceiling", n) in results]
    if ceiling:
        figures = ", ".join(
            f"c={r.concurrency} {r.rps:.0f} req/s p50 {r.percentile_ms(50):.2f} ms" for r in ceiling
        )
        print(f"ceiling, an empty grpc.aio handler (no model), same load generator: {figures}")
    print_errors(results)


def print_errors(results: dict) -> None:
    """One line per (target, level) that saw errors: the most common one and its count."""
    for r in results.values():
        if r.errors:
            error, count = r.errors.most_common(1)[0]
            print(f"! {r.server} at concurrency {r.concurrency}: {count} x {error}")


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="modelgw pytorch runtime vs KServe ModelServer: gRPC ModelInfer req/s, p50, p99"
    )
    add = parser.add_argument
    add("--concurrency", default="1,16,64", help="comma-separated levels (default 1,16,64)")
    add("--duration", type=float, default=6.0, help="measured s per server and level (default 6)")
    add("--rounds", type=int, default=3, help="alternating rounds the duration is split into")
    add("--warmup", type=float, default=1.0, help="warm-up s per server and level (default 1)")
    add("--max-requests", type=int, default=50_000, help="request cap per phase")
    add("--torch-threads", type=int, default=1, help="torch intra-op threads of both servers")
    add("--only", choices=["modelgw", "kserve"], help="run one server only")
    add("--ceiling", action="store_true", help="also measure an empty grpc.aio handler")
    add("--kserve-venv", type=Path, default=DEFAULT_KSERVE_VENV)
    add("--setup-kserve", action="store_true", help="create the KServe virtualenv if missing")
    add("--modelgw-arg", action="append", default=[], help="extra arg for modelgw runtime serve")
    add("--profile-dir", type=Path, help="afterwards, py-spy modelgw at concurrency 16 into DIR")
    add("--keep-logs", action="store_true", help="keep the temp dir with the server logs")
    add("--serve-empty", nargs=2, metavar=("PORT", "RESPONSE_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    return args


def ensure_kserve(args: argparse.Namespace) -> bool:
    python = args.kserve_venv / "bin" / "python"
    if args.setup_kserve and not python.exists():
        for command in setup_commands(args.kserve_venv):
            print("+", shlex.join(command), flush=True)
            subprocess.run(command, check=True)
    if python.exists():
        return True
    print(f"KServe's virtualenv {args.kserve_venv} is missing. Create it with --setup-kserve, or:")
    for command in setup_commands(args.kserve_venv):
        print("   ", shlex.join(command))
    return False


def versions(args: argparse.Namespace) -> str:
    import torch

    kserve = "-"
    if args.only != "modelgw":
        probe = (
            "import importlib.metadata as m; "
            "print(*(m.version(p) for p in ('kserve', 'torch', 'grpcio')))"
        )
        done = subprocess.run(
            [str(args.kserve_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True
        )
        kserve = done.stdout.strip() or done.stderr.strip()[-200:]
    return (
        f"cpus={os.cpu_count()} python={sys.version.split()[0]} torch={torch.__version__} "
        f"grpcio={grpc.__version__}; KServe venv: kserve torch grpcio = {kserve}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_empty:
        serve_empty(int(args.serve_empty[0]), Path(args.serve_empty[1]).read_bytes())
        return 0
    # A SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop every server we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    if args.only != "modelgw" and not ensure_kserve(args):
        return 2
    print(versions(args))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="modelgw-bench-"))
    try:
        model, example, expected = build_model(workdir)
        print(
            f"model: TorchScript MLP {FEATURES}->{HIDDEN}->{HIDDEN}->{HIDDEN}->{CLASSES} FP32, "
            f"batch 1; torch threads {args.torch_threads}; per server and level {args.warmup:g}s "
            f"warm-up + {args.duration:g}s in {args.rounds} alternating rounds; logs in {workdir}",
            flush=True,
        )
        servers = []
        if args.only != "kserve":
            servers.append(modelgw_server(model, args, workdir))
        if args.only != "modelgw":
            servers.append(kserve_server(model, args, workdir))
        if args.ceiling:
            servers.append(ceiling_server(expected, workdir))
        request = build_request(example)
        payload = request.SerializeToString()
        with contextlib.ExitStack() as stack:
            for server in servers:
                stack.callback(server.stop)
                server.start()
            for server in servers:
                server.wait_ready()
                check_output(server, request, expected)
            results = asyncio.run(measure(servers, payload, levels, args))
            print()
            print_table(results, levels)
            ours = next((s for s in servers if s.label == "modelgw"), None)
            if args.profile_dir and ours:
                asyncio.run(profile(ours, payload, 16, args))
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
