"""The forwarding core shared by the frontends (gRPC, OIP REST, OpenAI): admission,
replica choice and forwarding, for unary calls and streams alike.

Every request shape goes through one admission path, an `Admission`: admitted against the
in-flight caps (the gateway's and the model's) and the caller's per-tenant limits
(gateway/limits.py), a replica picked by the routing table (traffic split, then power of
two choices on `replica.outstanding`, or for an LLM the replicas' load figures), counted
in that replica's outstanding requests while it runs, recorded once in the request
metrics and released however it ends (an answer, an error, a cancel):

    answer = await proxy.unary("model_infer", payload, model, version, metadata=..., protocol="rest")

    with proxy.stream(model, version, metadata=..., timeout=..., protocol="openai") as stream:
        stream.request_sent(request_id)         # each request on it (LLM: counted, limited)
        await stream.call.write(message)        # a ModelStreamInfer call to the replica
        stream.response_received(raw)           # each response (LLM: usage, TTFT, counts)
        ...                                     # stream.status = "..." for an outcome that is no exception

An LLM stream counts on its replica as many outstanding requests as it has unanswered
(at least one while open), so that a gRPC stream carrying many generations weighs as
much as they do; each generation's final response carries the runtime's usage, which is
counted in the token metrics and debited to the tenant's token bucket.

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
from modelgw.gateway.limits import CALLER_CLAIMS, TenantLimiter, Ticket
from modelgw.gateway.routing import ModelRoute, Replica, RoutingTable
from modelgw.gateway.upstream import UpstreamPool
from modelgw.gateway.wire import with_version
from modelgw.oip.protocol import FINAL_RESPONSE
from modelgw.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

# a model at its in-flight cap; the Envoy data plane answers with the same words
MODEL_AT_ITS_CAP = "model '{model}' is at its limit of {cap} requests in flight; retry later"


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
    "model_config": pb.ModelConfigRequest,
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


class Generation:
    """One LLM request on a stream, from its write to its final response."""

    __slots__ = ("completion_tokens", "last", "prompt_tokens", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.last: float | None = None  # when its last tokens came (perf_counter)
        self.prompt_tokens = 0
        self.completion_tokens = 0


def _usage_of(response: pb.ModelInferResponse) -> tuple[int, int, bool, int]:
    """(prompt tokens, completion tokens, final, tokens in this response) of an LLM
    runtime's response (runtimes/llm/CONTRACT.md); usage 0 where it says none."""
    params = response.parameters
    prompt = params["prompt_tokens"].int64_param if "prompt_tokens" in params else 0
    completion = params["completion_tokens"].int64_param if "completion_tokens" in params else 0
    final = params[FINAL_RESPONSE].bool_param if FINAL_RESPONSE in params else False
    tokens = 0
    for output in response.outputs:
        if output.name == "token_ids":
            tokens = output.shape[0] if output.shape else 0
            break
    return prompt, completion, final, tokens


class Admission:
    """One admitted request, from admission to release: a unary call, or one upstream
    ModelStreamInfer stream (`call`). A context manager: leaving it releases the request
    (see release()), whatever ended it.

    `version` is the requested version until a replica is picked, then the one the traffic
    split chose; `status` is the request's outcome for the metrics, "OK" unless set (a
    stream's frontend sets it for an error it answers without raising)."""

    __slots__ = (
        "_call", "_counted", "_generations", "_open", "_pending", "_proxy", "_sent", "llm", "model", "protocol",
        "replica", "route", "runtime", "started", "status", "ticket", "version",
    )

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
        self.ticket: Ticket | None = None  # the tenant's buckets, when a per-tenant limit applies
        self.llm = False  # the chosen version is served by an LLM runtime (set by pick)
        self._counted = 0  # what this admission adds to its replica's outstanding requests
        self._pending = 0  # LLM streams: requests written and not finished
        self._sent = 0
        self._generations: dict[str, Generation] = {}

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
            self.replica.outstanding -= self._counted
        self._counted = self._pending or 1
        replica.outstanding += self._counted
        self.replica = replica
        self.runtime = replica.runtime
        if self.version in self.route.llm_versions:
            self.llm = True
            self._proxy._count_pick(replica)
        return replica

    # -- LLM accounting (streams: per request on them; unary: the answer's usage) ---------

    def _recount(self) -> None:
        """Keep the replica's outstanding count at this stream's unanswered requests."""
        want = max(1, self._pending)
        if self.replica is not None and want != self._counted:
            self.replica.outstanding += want - self._counted
            self._counted = want

    def request_sent(self, request_id: str = "") -> None:
        """A request is about to be written on this stream: an LLM stream counts it on its
        replica, and charges it to the tenant's limits unless it is the stream's first
        (admission charged that one). RateLimited when the tenant is over its limit."""
        if not self.llm:
            return
        if self._sent and self.ticket is not None:
            self._proxy.limiter.check(self.ticket, self.route.spec)
        self._sent += 1
        self._pending += 1
        self._generations[request_id] = Generation(time.perf_counter())
        self._recount()

    def response_received(self, raw: bytes) -> None:
        """A ModelStreamInferResponse as the replica sent it (LLM streams are parsed here:
        usage, TTFT, inter-token latency, the end of a request)."""
        if not self.llm:
            return
        try:
            response = pb.ModelStreamInferResponse.FromString(raw)
        except DecodeError:
            return  # the client gets it as it is; nothing to count
        infer = response.infer_response
        if response.error_message:
            self.generation_piece(infer.id, 0, True, 0, 0)
            return
        prompt, completion, final, tokens = _usage_of(infer)
        self.generation_piece(infer.id, tokens, final, prompt, completion)

    def generation_piece(self, request_id: str, tokens: int, final: bool, prompt_tokens: int, completion_tokens: int) -> None:
        """A response of the LLM request `request_id` on this stream: `tokens` new tokens;
        its usage when the runtime reported it (0 when not); `final`: its last one."""
        generation = self._generations.get(request_id)
        if generation is None:
            if len(self._generations) != 1:
                return  # a request this stream did not see sent (or ids reused): not counted
            generation = next(iter(self._generations.values()))
        now = time.perf_counter()
        if tokens:
            series = self._proxy._llm_series(self.model)
            if generation.last is None:
                series[0].observe(now - generation.started)
            else:
                series[1].observe((now - generation.last) / tokens)
            generation.last = now
        if completion_tokens or prompt_tokens:
            # with triton_enable_empty_final_response the last two responses both carry it
            generation.prompt_tokens, generation.completion_tokens = prompt_tokens, completion_tokens
        if final:
            self._generations = {k: g for k, g in self._generations.items() if g is not generation}
            self._pending = max(0, self._pending - 1)
            self._recount()
            self._usage(generation.prompt_tokens, generation.completion_tokens)

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """A finished LLM request's usage: into the token metrics and the tenant's bucket."""
        if prompt_tokens or completion_tokens:
            series = self._proxy._llm_series(self.model)
            series[2].inc(prompt_tokens)
            series[3].inc(completion_tokens)
        if self.ticket is not None:
            self.ticket.debit_tokens(prompt_tokens + completion_tokens)

    def unary_answer(self, raw: bytes) -> None:
        """An LLM's whole answer (ModelInfer): its usage."""
        try:
            prompt, completion, _, _ = _usage_of(pb.ModelInferResponse.FromString(raw))
        except DecodeError:
            return
        self._usage(prompt, completion)

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
            self.replica.outstanding -= self._counted
            self._counted = 0
        self._proxy._release(self, time.perf_counter() - self.started)


class Proxy:
    def __init__(
        self, table: RoutingTable, pool: UpstreamPool, limits: ProxyLimits | None = None,
        limiter: TenantLimiter | None = None,
    ) -> None:
        self.table = table
        self.pool = pool
        self.limits = limits or ProxyLimits()
        self.limiter = limiter or TenantLimiter()
        self.budget = RetryBudget(self.limits.retry_ratio, self.limits.min_retries_per_second)
        self.in_flight = 0
        self.in_flight_by_model: dict[str, int] = {}
        # prometheus children by label values: labels() takes a lock and builds a key on
        # every call (about 10 us per request for our four series); these are dict hits
        self._in_flight_gauges: dict[str, Gauge] = {}
        self._request_series: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}
        # model -> (TTFT, inter-token latency, prompt tokens, completion tokens)
        self._llm: dict[str, tuple[Histogram, Histogram, Counter, Counter]] = {}
        self._picks: dict[str, Counter] = {}  # endpoint key -> its LLM picks counter

    def _llm_series(self, model: str) -> tuple[Histogram, Histogram, Counter, Counter]:
        series = self._llm.get(model)
        if series is None:
            series = self._llm[model] = (
                metrics.TIME_TO_FIRST_TOKEN.labels(model), metrics.INTER_TOKEN_LATENCY.labels(model),
                metrics.LLM_PROMPT_TOKENS.labels(model), metrics.LLM_COMPLETION_TOKENS.labels(model),
            )
        return series

    def _count_pick(self, replica: Replica) -> None:
        counter = self._picks.get(replica.key)
        if counter is None:
            if len(self._picks) > 4 * len(self.table.replicas) + 16:
                self.forget_replicas()
            counter = self._picks[replica.key] = metrics.LLM_REPLICA_PICKS.labels(
                replica.runtime, replica.key.partition("/")[2]
            )
        counter.inc()

    def forget_replicas(self) -> None:
        """Drop the picks series of replicas no longer in the table (bounded cardinality)."""
        for key in [k for k in self._picks if k not in self.table.replicas]:
            del self._picks[key]
            runtime, _, instance = key.partition("/")
            try:
                metrics.LLM_REPLICA_PICKS.remove(runtime, instance)
            except KeyError:
                pass

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
                MODEL_AT_ITS_CAP.format(model=model, cap=cap),
            )
        # the caller's per-tenant limits: RateLimited (429) when over; None when none apply
        ticket = None
        if route.per_tenant or self.limiter.defaults is not None:
            ticket = self.limiter.admit(model, route.spec, CALLER_CLAIMS.get())
        self.in_flight += 1
        self.in_flight_by_model[model] = current + 1
        gauge = self._in_flight_gauges.get(model)
        if gauge is None:
            gauge = self._in_flight_gauges[model] = metrics.IN_FLIGHT.labels(model)
        gauge.inc()
        admission = Admission(self, route, model, version, protocol)
        admission.ticket = ticket
        return admission

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
                if admission.llm:
                    admission.unary_answer(response)
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
