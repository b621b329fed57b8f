"""The forwarding core shared by the gRPC and REST frontends.

A request is routed by the routing table (a dict lookup), limited by the in-flight caps,
sent over a pooled channel as the bytes it is, and retried on another replica when the
chosen one was unreachable before it answered. Retries draw on a budget so that a sick
fleet is not hit with a multiple of its load.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from modelgw.gateway import metrics
from modelgw.gateway.errors import GatewayError
from modelgw.gateway.routing import ModelRoute, Replica, RoutingTable
from modelgw.gateway.upstream import Upstream, UpstreamPool
from modelgw.gateway.wire import with_version
from modelgw.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

# Headers forwarded to runtimes as they came (lower-case gRPC metadata keys).
PROPAGATED = ("x-request-id", "traceparent", "tracestate")
# Set by the gateway only; a client's copy is dropped.
SUBJECT_HEADER = "x-modelgw-subject"
STICKY_HEADER = "x-modelgw-session"


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


# Request ids for requests that come without one: a random per-process prefix and a
# counter, unique across gateway replicas and ten times cheaper than uuid4 per request.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


def request_timeout(route: ModelRoute | None, client_timeout: float | None) -> float | None:
    """The smaller of the client's and the model's timeouts; None when neither is set."""
    model_timeout = route.spec.limits.timeout_seconds if route else 0.0
    candidates = [t for t in (client_timeout, model_timeout) if t]
    return min(candidates) if candidates else None


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
        self._in_flight_gauges: dict[str, object] = {}
        self._request_series: dict[tuple[str, ...], tuple[object, object]] = {}

    # -- admission -----------------------------------------------------------------------

    def _admit(self, model: str, cap: int) -> None:
        if self.in_flight >= self.limits.max_in_flight:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway is at its limit of {self.limits.max_in_flight} requests in flight; retry later",
            )
        current = self.in_flight_by_model.get(model, 0)
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

    def _release(self, model: str) -> None:
        self.in_flight -= 1
        self.in_flight_by_model[model] -= 1
        self._in_flight_gauges[model].dec()

    def _record(self, labels: tuple[str, ...], seconds: float) -> None:
        """Count a finished request in modelgw_requests_total and its latency histogram."""
        series = self._request_series.get(labels)
        if series is None:
            series = self._request_series[labels] = (metrics.REQUESTS.labels(*labels), metrics.LATENCY.labels(*labels))
        series[0].inc()
        series[1].observe(seconds)

    @staticmethod
    def outbound_metadata(
        incoming: Sequence[tuple[str, str | bytes]] | None, subject: str | None
    ) -> tuple[list[tuple[str, str]], str]:
        """Metadata for the runtime: propagated trace headers, a request id, the subject."""
        out: list[tuple[str, str]] = []
        request_id = ""
        for key, value in incoming or ():
            if key in PROPAGATED and isinstance(value, str):
                out.append((key, value))
                if key == "x-request-id":
                    request_id = value
        if not request_id:
            request_id = new_request_id()
            out.append(("x-request-id", request_id))
        if subject:
            out.append((SUBJECT_HEADER, subject))
        return out, request_id

    # -- unary ---------------------------------------------------------------------------

    async def unary(
        self,
        method: str,
        payload: bytes,
        model: str,
        version: str,
        *,
        metadata: list[tuple[str, str]],
        timeout: float | None = None,
        sticky_key: str | None = None,
        protocol: str = "grpc",
    ) -> bytes:
        """Forward one serialized request (`method`: model_infer, model_metadata or
        model_ready) to a replica of the model and return the serialized response."""
        route = self.table.route(model)
        self._admit(model, route.spec.limits.max_in_flight)
        started = time.perf_counter()
        chosen_version, runtime, status = version, "", "OK"
        self.budget.deposit()
        try:
            deadline = time.monotonic() + (request_timeout(route, timeout) or self.limits.default_timeout)
            tried: Replica | None = None
            attempt = 0
            while True:
                attempt += 1
                chosen_version, replica = self.table.pick(model, version, sticky_key, exclude=tried)
                runtime = replica.runtime
                if not version:
                    # the runtime must serve the version the traffic split chose, on
                    # retries too
                    payload = with_version(payload, chosen_version)
                    version = chosen_version
                call = getattr(self.pool.get(replica.address), method)
                replica.outstanding += 1
                try:
                    response = await call(payload, timeout=max(0.001, deadline - time.monotonic()), metadata=metadata)
                    replica.succeeded()
                    return response
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
                finally:
                    replica.outstanding -= 1
        except GatewayError as err:
            status = err.code.name
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"  # the client went away (or the gateway stops) mid-request
            raise
        finally:
            self._release(model)
            self._record((model, chosen_version, runtime, protocol, status), time.perf_counter() - started)

    # -- streaming -----------------------------------------------------------------------

    def open_stream(
        self, model: str, version: str, *, metadata: list[tuple[str, str]], sticky_key: str | None = None
    ) -> tuple[Upstream, Replica, str]:
        """Pick a replica for a stream of requests to `model` (no retries: once a stream
        has started, replaying it could repeat generated output)."""
        chosen_version, replica = self.table.pick(model, version, sticky_key)
        return self.pool.get(replica.address), replica, chosen_version

    def admit(self, model: str) -> None:
        """Count a request that unary() does not forward (the OpenAI API's streams) against
        the in-flight limits (GatewayError NOT_FOUND / RESOURCE_EXHAUSTED); pair with finish()."""
        self._admit(model, self.table.route(model).spec.limits.max_in_flight)

    def finish(self, model: str, labels: tuple[str, str, str, str], seconds: float) -> None:
        """Release an admit()ted request and count it as unary() counts its own; `labels`
        are (version, runtime, protocol, status)."""
        self._release(model)
        self._record((model, *labels), seconds)

