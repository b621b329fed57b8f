"""Rows/s of a job against the same rows sent as single infer calls, through one gateway.

Everything is started here and stopped on exit: a private etcd, the registry records, one
`modelgw runtime serve --kind pytorch` replica and a `modelgw gateway` (the setup of
bench/gateway_overhead.py, the MLP of bench/runtime_throughput.py: 64 -> 256 x 3 -> 10,
FP32, torch threads 1). The rows (N x 64 FP32, seeded) are written to a Parquet file and
scored twice per round, rounds alternating so that noise from other work on the machine
hits both alike:
- single calls: one ModelInfer per row (batch 1) through the gateway from grpc.aio
  workers at concurrency 16 on one channel, as a client without batching would;
- a job: pipelines/jobs.run_job (what `modelgw job run` runs) over the Parquet file,
  batch_size rows per call, `parallelism` calls in flight, its parts and checkpoint
  written to disk (fsynced) as always.
Both run in this process, so they share its CPU alike. Every job's outputs are compared
with the single calls' (allclose: a matmul's rounding depends on the batch it is in).

Run from the repository root (about a minute):

    .venv/bin/python bench/job_throughput.py
    .venv/bin/python bench/job_throughput.py --rows 50000 --batch-size 512 --parallelism 4 --rounds 3
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
import time
from pathlib import Path

import grpc
import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from gateway_overhead import gateway_server, register, runtime_server  # noqa: E402  (sibling scripts)
from runtime_throughput import FEATURES, INPUT, MODEL_NAME, OUTPUT, build_model, build_request, check_output  # noqa: E402

from modelgw.oip import codec  # noqa: E402
from modelgw.pipelines.jobs import run_job  # noqa: E402
from modelgw.pipelines.tables import read_output  # noqa: E402
from modelgw.protos import inference_pb2 as pb  # noqa: E402
from modelgw.protos import inference_pb2_grpc as pb_grpc  # noqa: E402
from modelgw.protos import registry_pb2 as rpb  # noqa: E402
from modelgw.registry.etcd_server import LocalEtcd  # noqa: E402


def write_rows(path: Path, rows: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = np.random.default_rng(7).standard_normal((rows, FEATURES), dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), FEATURES)
    pq.write_table(pa.table({"id": pa.array(np.arange(rows)), INPUT: column}), path)
    return values


async def single_calls(address: str, values: np.ndarray, concurrency: int) -> tuple[float, np.ndarray]:
    """(seconds, outputs): every row as its own ModelInfer, `concurrency` workers."""
    outputs = np.empty((len(values), 10), np.float32)
    requests = []
    for row in values:
        request = pb.ModelInferRequest(model_name=MODEL_NAME)
        codec.add_input(request, INPUT, row[None, :])
        requests.append(request)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        next_row = iter(range(len(values)))

        async def worker() -> None:
            for i in next_row:
                response = await stub.ModelInfer(requests[i], timeout=30)
                outputs[i] = codec.decode_response_outputs(response)[OUTPUT][0]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, outputs


async def job(address: str, table: Path, output: Path, args: argparse.Namespace) -> float:
    spec = rpb.JobSpec(name="bench", input_uri=str(table), output_uri=str(output), id_column="id",
                       batch_size=args.batch_size, parallelism=args.parallelism)
    spec.model.model = MODEL_NAME
    spec.model.gateway = address
    started = time.perf_counter()
    outcome = await run_job(spec, show_progress=False)
    seconds = time.perf_counter() - started
    if outcome.exit_code:
        raise RuntimeError(f"the job failed: {outcome.status.message}")
    return seconds


def check_job_output(output: Path, expected: np.ndarray) -> None:
    parts = sorted(p.name for p in output.glob("part-*"))
    records = read_output(output, parts, rpb.JobSpec.PARQUET)
    got = np.empty_like(expected)
    for record in records:
        got[record["id"]] = record[OUTPUT]
    if len(records) != len(expected) or not np.allclose(got, expected, atol=1e-5):
        raise RuntimeError("the job's outputs differ from the single calls'")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16, help="single calls in flight (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1024, help="the job's batch_size (default %(default)s)")
    p.add_argument("--parallelism", type=int, default=4, help="the job's parallelism (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default %(default)s)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--keep-logs", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="modelgw-job-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            etcd = LocalEtcd(data_dir=workdir / "etcd")
            stack.callback(etcd.cleanup)
            etcd.start()
            model, example, expected = build_model(workdir)
            asyncio.run(register(etcd.endpoint, model))
            targets = [runtime_server(etcd.endpoint, args, workdir), gateway_server(etcd.endpoint, workdir)]
            for target in targets:
                stack.callback(target.stop)
                target.start()
            for target in targets:
                target.wait_ready()
            gateway = targets[1]
            check_output(gateway, build_request(example), expected)
            address = f"127.0.0.1:{gateway.port}"
            table = workdir / "rows.parquet"
            values = write_rows(table, args.rows)
            print(f"{args.rows} rows of {FEATURES} FP32; single calls at concurrency {args.concurrency}; job batch "
                  f"{args.batch_size}, parallelism {args.parallelism}; {args.rounds} alternating rounds; logs in {workdir}",
                  flush=True)
            single_times, job_times = [], []
            for round_ in range(args.rounds):
                seconds, outputs = asyncio.run(single_calls(address, values, args.concurrency))
                single_times.append(seconds)
                output = workdir / f"out-{round_}"
                job_times.append(asyncio.run(job(address, table, output, args)))
                check_job_output(output, outputs)
                print(f"round {round_ + 1}: single calls {args.rows / seconds:8.0f} rows/s   "
                      f"job {args.rows / job_times[-1]:8.0f} rows/s", flush=True)
            single = args.rows / min(single_times)
            batched = args.rows / min(job_times)
            print()
            print(f"{'':24} {'rows/s (best round)':>20}")
            print(f"{'single calls (c=' + str(args.concurrency) + ')':24} {single:20.0f}")
            print(f"{'job (batch ' + str(args.batch_size) + ')':24} {batched:20.0f}")
            print(f"job / single calls: {batched / single:.1f}x")
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
