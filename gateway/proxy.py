"""The forwarding core shared by the frontends (gRPC, OIP REST, OpenAI): admission,
replica choice and forwarding, for unary calls and streams alike.

Every request shape goes through one admission path, an `Admission`: admitted against the
in-flight caps (the gateway's and the model's), a replica picked by the routing table
(traffic split, then power of two choices on `replica.outstanding`), counted in that
replica's outstanding requests while it runs, recorded once in the request metrics and
released however it ends (an answer, an error, a cancel):

    answer = await proxy.unary("model_infer", payload, model, version, metadata=..., protocol="rest")

    with proxy.stream(model, version, metadata=..., timeout=..., protocol="openai") as stream:
        await stream.call.write(message)        # a ModelStreamInfer call to the replica
        ...                                     # stream.status = "..." for an outcome that is no exception

A unary request is sent over a pooled channel as the bytes it is, and retried on another
replica when the chosen one was unreachable before it answered; retries draw on a budget
so that a sick fleet is not hit with a multiple of its load. A stream is never retried:
once it has started, replaying it could repeat generated output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram

from modelgw.gateway import metrics
from modelgw.gateway.errors import GatewayError
from modelgw.gateway.forwarding import request_timeout
from modelgw.gateway.routing import ModelRoute, Replica, RoutingTable
from modelgw.gateway.upstream import UpstreamPool
from modelgw.gateway.wire import with_version
from modelgw.protos import inference_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class ProxyLimits:
    max_in_flight: int = 4096         # whole gateway
    max_attempts: int = 3             # first try + retries on other replicas
    retry_ratio: float = 0.2          # retries allowed per request, on average
    min_retries_per_second: float = 10.0
    default_timeout: float = 60.0     # when neither the client nor the model sets one


# method -> the request message it carries
REQUEST_TYPES = {
    "model_infer": pb.ModelInferRequest,
    "model_metadata": pb.ModelMetadataRequest,
    "model_ready": pb.ModelReadyRequest,
}


def malformed_request(method: str, payload: bytes) -> str | None:
    """Why `payload` is not a valid request for `method`, or None when it is."""
    try:
        REQUEST_TYPES[method].FromString(payload)
    except DecodeError as err:
        return f"malformed request message: {err}"
    return None


def status_of(error: BaseException) -> str:
    """The `status` label of a request that ended with `error`."""
    if isinstance(error, GatewayError):
        return error.code.name
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    if isinstance(error, (asyncio.CancelledError, GeneratorExit, ConnectionError)):
        # the client went away (or the gateway stops) mid-request; GeneratorExit: gRPC
        # closed a streaming handler whose client stopped reading
        return "CANCELLED"
    return grpc.StatusCode.UNKNOWN.name


class RetryBudget:
    """Token bucket: each request earns `ratio` tokens, each retry spends one; a floor of
    `min_per_second` keeps retries possible at low traffic (as Finagle and Linkerd do)."""

    def __init__(self, ratio: float, min_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.clock = clock
        self.cap = max(10.0, min_per_second * 10)
        self.tokens = self.cap
        self._last = clock()

    def deposit(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        now = self.clock()
        self.tokens = min(self.cap, self.tokens + (now - self._last) * self.min_per_second)
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Admission:
    """One admitted request, from admission to release: a unary call, or one upstream
    ModelStreamInfer stream (`call`). A context manager: leaving it releases the request
    (see release()), whatever ended it.

    `version` is the requested version until a replica is picked, then the one the traffic
    split chose; `status` is the request's outcome for the metrics, "OK" unless set (a
    stream's frontend sets it for an error it answers without raising)."""

    __slots__ = ("_call", "_open", "_proxy", "model", "protocol", "replica", "route", "runtime", "started", "status", "version")

    def __init__(self, proxy: Proxy, route: ModelRoute, model: str, version: str, protocol: str) -> None:
        self._proxy = proxy
        self.route = route
        self.model = model
        self.version = version
        self.runtime = ""
        self.protocol = protocol
        self.status = "OK"
        self.started = time.perf_counter()
        self.replica: Replica | None = None
        self._call: grpc.aio.StreamStreamCall | None = None  # streams only
        self._open = True

    @property
    def call(self) -> grpc.aio.StreamStreamCall:
        """A stream's ModelStreamInfer call to its replica."""
        if self._call is None:
            raise RuntimeError(f"no stream was opened for this request to '{self.model}'")
        return self._call

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release(exc)

    def pick(self, sticky_key: str | None = None, exclude: Replica | None = None) -> Replica:
        """Choose a replica (traffic split, then power of two choices) and count the
        request in its outstanding requests, moving the count off a replica tried before.
        GatewayError NOT_FOUND / UNAVAILABLE when there is none."""
        self.version, replica = self._proxy.table.pick(self.model, self.version, sticky_key, exclude)
        if self.replica is not None:
            self.replica.outstanding -= 1
        replica.outstanding += 1
        self.replica = replica
        self.runtime = replica.runtime
        return replica

    def release(self, error: BaseException | None = None) -> None:
        """End the request: cancel its upstream call if it still runs (the runtime then
        stops working on it), take it off its replica's outstanding requests and the
        in-flight counts, and record it in the request metrics, with the status of
        `error` unless one was set. Only the first call does anything."""
        if not self._open:
            return
        self._open = False
        if error is not None and self.status == "OK":
            self.status = status_of(error)
        if self._call is not None:
            self._call.cancel()  # a no-op once the call is done
        if self.replica is not None:
            self.replica.outstanding -= 1
        self._proxy._release(self, time.perf_counter() - self.started)


class Proxy:
    def __init__(self, table: RoutingTable, pool: UpstreamPool, limits: ProxyLimits | None = None) -> None:
        self.table = table
        self.pool = pool
        self.limits = limits or ProxyLimits()
        self.budget = RetryBudget(self.limits.retry_ratio, self.limits.min_retries_per_second)
        self.in_flight = 0
        self.in_flight_by_model: dict[str, int] = {}
        # prometheus children by label values: labels() takes a lock and builds a key on
        # every call (about 10 us per request for our four series); these are dict hits
        self._in_flight_gauges: dict[str, Gauge] = {}
        self._request_series: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}

    # -- admission -----------------------------------------------------------------------

    def _admit(self, model: str, version: str, protocol: str) -> Admission:
        """Admit a request to `model` against the in-flight caps (GatewayError NOT_FOUND,
        RESOURCE_EXHAUSTED); a refused request is not counted."""
        route = self.table.route(model)
        if self.in_flight >= self.limits.max_in_flight:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway is at its limit of {self.limits.max_in_flight} requests in flight; retry later",
            )
        current = self.in_flight_by_model.get(model, 0)
        cap = route.spec.limits.max_in_flight
        if cap and current >= cap:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model '{model}' is at its limit of {cap} requests in flight; retry later",
            )
        self.in_flight += 1
        self.in_flight_by_model[model] = current + 1
        gauge = self._in_flight_gauges.get(model)
        if gauge is None:
            gauge = self._in_flight_gauges[model] = metrics.IN_FLIGHT.labels(model)
        gauge.inc()
        return Admission(self, route, model, version, protocol)

    def _release(self, admission: Admission, seconds: float) -> None:
        """Admission.release's part here: the in-flight counts and the request metrics."""
        model = admission.model
        self.in_flight -= 1
        self.in_flight_by_model[model] -= 1
        self._in_flight_gauges[model].dec()
        labels = (model, admission.version, admission.runtime, admission.protocol, admission.status)
        series = self._request_series.get(labels)
        if series is None:
            series = self._request_series[labels] = (metrics.REQUESTS.labels(*labels), metrics.LATENCY.labels(*labels))
        series[0].inc()
        series[1].observe(seconds)

    # -- unary ---------------------------------------------------------------------------

    async def unary(
        self,
        method: str,
        payload: bytes,
        model: str,
        version: str,
        *,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None = None,
        sticky_key: str | None = None,
        protocol: str = "grpc",
    ) -> bytes:
        """Forward one serialized request (`method`: model_infer, model_metadata or
        model_ready) to a replica of the model and return the serialized response."""
        with self._admit(model, version, protocol) as admission:
            self.budget.deposit()
            deadline = time.monotonic() + (request_timeout(admission.route, timeout) or self.limits.default_timeout)
            tried: Replica | None = None
            attempt = 0
            while True:
                attempt += 1
                replica = admission.pick(sticky_key, tried)
                if not version:
                    # the runtime must serve the version the traffic split chose, on
                    # retries too
                    version = admission.version
                    payload = with_version(payload, version)
                call = getattr(self.pool.get(replica.address), method)
                try:
                    response = await call(payload, timeout=max(0.001, deadline - time.monotonic()), metadata=metadata)
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                        # the request is forwarded unparsed; if the runtime choked on it,
                        # say so as the client's error (parsed here, off the hot path)
                        malformed = malformed_request(method, payload)
                        if malformed:
                            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, malformed) from None
                    if code == grpc.StatusCode.UNAVAILABLE:
                        if replica.eject():
                            metrics.EJECTIONS.labels(replica.runtime).inc()
                            log.warning("replica %s (%s) unavailable, ejected: %s", replica.key, replica.address, err.details())
                        if attempt < self.limits.max_attempts and time.monotonic() < deadline and self.budget.withdraw():
                            metrics.RETRIES.labels(model).inc()
                            tried = replica
                            continue
                    raise GatewayError(code, err.details() or code.name) from None
                replica.succeeded()
                return response

    # -- streams -------------------------------------------------------------------------

    def stream(
        self,
        model: str,
        version: str,
        *,
        metadata: Sequence[tuple[str, str]],
        sticky_key: str | None = None,
        timeout: float | None = None,
        protocol: str,
    ) -> Admission:
        """Admit a stream to `model` and open it (ModelStreamInfer, `.call`) on a replica
        picked like a unary call's, counted there until it is released; use it as a
        context manager. GatewayError NOT_FOUND / RESOURCE_EXHAUSTED / UNAVAILABLE when
        it cannot be opened (counted in the metrics unless refused at admission).
        `timeout` bounds the whole stream (None: until it ends or is cancelled)."""
        admission = self._admit(model, version, protocol)
        try:
            replica = admission.pick(sticky_key)
            admission._call = self.pool.get(replica.address).model_stream_infer(metadata=metadata, timeout=timeout)
        except BaseException as err:
            admission.release(err)
            raise
        return admission
