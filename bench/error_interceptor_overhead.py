"""What modelgw.errors.ErrorInterceptor (and the gateway's admin guard, which passes every
inference call through untouched) adds to one unary call, in-process.

    .venv/bin/python bench/error_interceptor_overhead.py --calls 3000

Two grpc.aio servers with the same raw-bytes ModelInfer-shaped handler, one plain, one
with the gateway's interceptors; the client alternates rounds between them so that drift
of the machine hits both. Prints microseconds per call, median of the rounds; then the
interceptors' own Python cost per call measured without the network (intercept_service
for the method, then the wrapped behaviour), which the end-to-end figure hides in noise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from modelgw.errors import ErrorInterceptor
from modelgw.gateway.auth.guard import AdminScopeGuard


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _no_check(context: grpc.aio.ServicerContext, method: str) -> None:
    return None


async def _server(interceptors: list) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=interceptors)
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    service = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler})
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _round(channel: grpc.aio.Channel, calls: int, payload: bytes) -> float:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    started = time.perf_counter()
    for _ in range(calls):
        await call(payload)
    return (time.perf_counter() - started) / calls * 1e6


class _Details:
    method = "/inference.GRPCInferenceService/ModelInfer"
    invocation_metadata = ()


async def _direct(calls: int) -> None:
    """Per call: both interceptors' intercept_service plus the wrapped behaviour, against
    the bare handler lookup and behaviour."""
    handler = grpc.unary_unary_rpc_method_handler(_echo)

    async def continuation(details: object) -> grpc.RpcMethodHandler:
        return handler

    error, guard = ErrorInterceptor(), AdminScopeGuard(_no_check)

    async def chain(details: object) -> grpc.RpcMethodHandler:
        return await error.intercept_service(lambda d: guard.intercept_service(continuation, d), details)

    for label, find in (("bare", continuation), ("intercepted", chain)):
        started = time.perf_counter()
        for _ in range(calls):
            found = await find(_Details)
            await found.unary_unary(b"", None)
        print(f"  {label}: {(time.perf_counter() - started) / calls * 1e6:.2f} us/call (lookup + behaviour, no network)")


async def main(calls: int, rounds: int) -> None:
    plain, plain_port = await _server([])
    guarded, guarded_port = await _server([ErrorInterceptor(), AdminScopeGuard(_no_check)])
    payload = b"\x0a\x01m" + b"\x00" * 64
    results: dict[str, list[float]] = {"plain": [], "intercepted": []}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}") as a,
        grpc.aio.insecure_channel(f"127.0.0.1:{guarded_port}") as b,
    ):
        await _round(a, 200, payload)
        await _round(b, 200, payload)  # warm up
        for _ in range(rounds):
            results["plain"].append(await _round(a, calls // rounds, payload))
            results["intercepted"].append(await _round(b, calls // rounds, payload))
    await plain.stop(0)
    await guarded.stop(0)
    plain_us, intercepted_us = statistics.median(results["plain"]), statistics.median(results["intercepted"])
    print(f"plain {plain_us:.1f} us/call, intercepted {intercepted_us:.1f} us/call, added {intercepted_us - plain_us:+.1f} us")
    await _direct(100_000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))
