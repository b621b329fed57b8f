"""Per-tenant rate limits: token buckets per (model, tenant), for requests per second and,
for LLMs, tokens (prompt + completion) per minute.

    limiter = TenantLimiter()
    limiter.set_defaults(snapshot_defaults)          # GatewayDefaults.per_tenant, or None
    ticket = limiter.admit(route, CALLER.get())      # RateLimited (429 / RESOURCE_EXHAUSTED) when over
    ...
    ticket.debit_tokens(prompt + completion)         # once the runtime reported its usage

What applies to a model: its `limits.per_tenant` when set, else the registry's
GatewayDefaults `per_tenant`, else nothing (no bucket, no cost). The tenant is a claim of
the caller's verified token: `tenant_claim`, `sub` when empty (a string claim as it is; a
number as its decimal; an array by its first string, e.g. the first group); a caller
without a token (a public model, or a gateway run with --insecure-no-auth) or without that
claim is the tenant "anonymous", one bucket for all of them.

The buckets:
- requests: `requests_per_second` refill per second, `burst_seconds` (default 1) of it
  deep, at least 1; a request takes 1 and is refused when less than 1 is left.
- tokens: `tokens_per_minute` / 60 refill per second, `burst_seconds` (default 60) of it
  deep. A request is admitted while the bucket is positive, and its actual usage is
  debited when the runtime reports it; so one large generation can take the bucket below
  zero, and the tenant then waits until it has refilled above zero. Nothing is reserved
  up front: the gateway does not know how many tokens a generation will make.

A refusal says when to come back: Retry-After (whole seconds, rounded up), the IETF
RateLimit-Policy and RateLimit fields (draft-ietf-httpapi-ratelimit-headers-09/10:
`RateLimit-Policy: "tokens";q=6000;w=60;qu="tokens"`, `RateLimit: "tokens";r=0;t=3`),
and on gRPC trailers `retry-after` and `grpc-retry-pushback-ms` (gRPC's retry pushback,
proposal A6; the draft keeps its RateLimit fields out of trailers).

Each gateway replica keeps its own buckets (nothing is shared, nothing touches etcd): with
N gateway replicas behind a load balancer a tenant gets up to N times the declared rate in
all; declare the per-replica share (README, "Per-tenant limits").

Memory: a bucket that has refilled to full is the same as none, so full buckets are
dropped when there are more than `max_buckets`. Metrics label tenants by name for the first
`max_tenant_labels` tenants this gateway sees, "other" after that (bounded cardinality).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter

from modelgw.gateway import metrics
from modelgw.gateway.errors import GatewayError
from modelgw.protos import registry_pb2 as rpb

ANONYMOUS = "anonymous"
OTHER = "other"
DEFAULT_CLAIM = "sub"

# The verified claims of the request being served, set by the auth door (gateway/auth) when
# it lets a request in, read by Admission: the frontends need not pass it along.
CALLER_CLAIMS: ContextVar[Mapping[str, Any] | None] = ContextVar("modelgw_caller_claims", default=None)

LIMITED = Counter(
    "modelgw_tenant_limited_total", "Requests refused by a per-tenant limit, by model, tenant and limit",
    ("model", "tenant", "limit"), registry=metrics.REGISTRY,
)
ADMITTED = Counter(
    "modelgw_tenant_requests_total", "Requests admitted under a per-tenant limit, by model and tenant",
    ("model", "tenant"), registry=metrics.REGISTRY,
)
TENANT_TOKENS = Counter(
    "modelgw_tenant_tokens_total", "LLM tokens (prompt + completion) debited to tenants' buckets",
    ("model", "tenant"), registry=metrics.REGISTRY,
)


@dataclass(frozen=True)
class TenantPolicy:
    """A TenantLimit as the buckets use it (0 rates: that limit is off)."""

    requests_per_second: float
    tokens_per_minute: float
    burst_seconds: float  # 0: the defaults (1 s of requests, 60 s of tokens)
    tenant_claim: str

    @classmethod
    def of(cls, limit: rpb.TenantLimit) -> TenantPolicy | None:
        if limit.requests_per_second <= 0 and limit.tokens_per_minute <= 0:
            return None
        return cls(
            max(0.0, limit.requests_per_second), max(0.0, limit.tokens_per_minute),
            max(0.0, limit.burst_seconds), limit.tenant_claim or DEFAULT_CLAIM,
        )

    @property
    def request_window(self) -> float:
        return self.burst_seconds or 1.0

    @property
    def token_window(self) -> float:
        return self.burst_seconds or 60.0


class TokenBucket:
    """`rate` per second up to `capacity`, starting full; `clock` is time.monotonic unless a
    test gives its own."""

    __slots__ = ("capacity", "clock", "last", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = capacity
        self.last = clock()

    def level(self) -> float:
        """The tokens now (refilled for the time since the last look; may be negative)."""
        now = self.clock()
        if now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
        return self.tokens

    def seconds_until(self, level: float) -> float:
        """How long until the bucket holds more than `level` (0 if it does now)."""
        missing = level - self.level()
        return 0.0 if missing < 0 else missing / self.rate

    def full(self) -> bool:
        return self.level() >= self.capacity


def tenant_of(claims: Mapping[str, Any] | None, claim: str) -> str:
    """The tenant a caller's verified claims name (see the module docstring)."""
    if not claims:
        return ANONYMOUS
    value = claims.get(claim)
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v), None)
    if isinstance(value, bool) or value is None:
        return ANONYMOUS
    if isinstance(value, (int, float)):
        return str(value)
    return value if isinstance(value, str) and value else ANONYMOUS


class RateLimited(GatewayError):
    """A request over its tenant's limit: 429 / RESOURCE_EXHAUSTED, with when to retry in
    `headers` (HTTP, sent by the error middleware) and trailing_metadata() (gRPC, sent by
    modelgw.errors.ErrorInterceptor)."""

    def __init__(self, message: str, retry_after: float, policy: str, remaining: str, kind: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.retry_after = max(1, math.ceil(retry_after))
        self.kind = kind  # "requests" or "tokens": OpenAI's error type for it
        self.openai_type = kind
        self.openai_code = "rate_limit_exceeded"
        self.headers = {
            "Retry-After": str(self.retry_after),
            "RateLimit-Policy": policy,
            "RateLimit": remaining,
        }
        self.pushback_ms = max(1, math.ceil(retry_after * 1000))

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        # not the RateLimit fields: the draft forbids them in trailers
        return (("retry-after", str(self.retry_after)), ("grpc-retry-pushback-ms", str(self.pushback_ms)))


def _number(value: float) -> str:
    """A structured-field integer (the draft's q, r and t are integers)."""
    return str(max(0, int(value)))


class Ticket:
    """An admitted request's claim on its tenant's buckets: debit_tokens() when the usage
    is known (only the first call counts)."""

    __slots__ = ("_debited", "_limiter", "model", "tenant", "tokens")

    def __init__(self, limiter: TenantLimiter, model: str, tenant: str, tokens: TokenBucket | None) -> None:
        self._limiter = limiter
        self.model = model
        self.tenant = tenant
        self.tokens = tokens
        self._debited = False

    def debit_tokens(self, count: int) -> None:
        if self._debited or count <= 0:
            return
        self._debited = True
        if self.tokens is not None:
            self.tokens.level()
            self.tokens.tokens -= count  # may go below zero: see the module docstring
            TENANT_TOKENS.labels(self.model, self._limiter.label(self.tenant)).inc(count)


class TenantLimiter:
    """Token buckets per (model, tenant); see the module docstring."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 100_000, max_tenant_labels: int = 100
    ) -> None:
        self.clock = clock
        self.max_buckets = max_buckets
        self.max_tenant_labels = max_tenant_labels
        self.defaults: TenantPolicy | None = None
        # (model, tenant) -> (requests bucket, tokens bucket), either None when that limit is off
        self.buckets: dict[tuple[str, str], tuple[TokenBucket | None, TokenBucket | None]] = {}
        self._policies: dict[str, tuple[rpb.ModelSpec, TenantPolicy | None, TenantPolicy | None]] = {}
        self._labels: set[str] = set()

    # -- policies -------------------------------------------------------------------------

    def set_defaults(self, defaults: rpb.GatewayDefaults | None) -> None:
        """The registry's GatewayDefaults (None: there is none)."""
        policy = TenantPolicy.of(defaults.per_tenant) if defaults is not None and defaults.HasField("per_tenant") else None
        if policy != self.defaults:
            self.defaults = policy
            self._policies.clear()

    def policy(self, model: str, spec: rpb.ModelSpec) -> TenantPolicy | None:
        """What applies to requests for `spec`: its own per_tenant limit, else the defaults."""
        cached = self._policies.get(model)
        if cached is not None and cached[0] is spec and cached[1] is self.defaults:
            return cached[2]
        if len(self._policies) > 4096:
            self._policies.clear()  # models deleted since
        if spec.limits.HasField("per_tenant"):
            policy = TenantPolicy.of(spec.limits.per_tenant)
        else:
            policy = self.defaults
        self._policies[model] = (spec, self.defaults, policy)
        if cached is not None and cached[2] != policy:
            # a changed limit starts from full buckets of the new size
            self.buckets = {k: v for k, v in self.buckets.items() if k[0] != model}
        return policy

    def label(self, tenant: str) -> str:
        """The tenant's metrics label: its name for the first max_tenant_labels tenants."""
        if tenant in self._labels:
            return tenant
        if len(self._labels) < self.max_tenant_labels:
            self._labels.add(tenant)
            return tenant
        return OTHER

    # -- admission ------------------------------------------------------------------------

    def _buckets(self, model: str, tenant: str, policy: TenantPolicy) -> tuple[TokenBucket | None, TokenBucket | None]:
        key = (model, tenant)
        pair = self.buckets.get(key)
        if pair is None:
            if len(self.buckets) >= self.max_buckets:
                self.buckets = {
                    k: v for k, v in self.buckets.items() if not all(b is None or b.full() for b in v)
                }
            requests = tokens = None
            if policy.requests_per_second > 0:
                rate = policy.requests_per_second
                requests = TokenBucket(rate, max(1.0, rate * policy.request_window), self.clock)
            if policy.tokens_per_minute > 0:
                rate = policy.tokens_per_minute / 60.0
                tokens = TokenBucket(rate, rate * policy.token_window, self.clock)
            pair = self.buckets[key] = (requests, tokens)
        return pair

    def admit(self, model: str, spec: rpb.ModelSpec, claims: Mapping[str, Any] | None) -> Ticket | None:
        """A Ticket for a request to `model` by the caller with `claims` (None when no
        limit applies), or RateLimited."""
        if self.defaults is None and not spec.limits.HasField("per_tenant"):
            return None  # the common case: no limits anywhere, nothing to look up
        policy = self.policy(model, spec)
        if policy is None:
            return None
        return self._take(model, policy, tenant_of(claims, policy.tenant_claim))

    def check(self, ticket: Ticket, spec: rpb.ModelSpec) -> None:
        """Another request on an admitted stream (a gRPC ModelStreamInfer stream carries
        many): charged like a new one from the same tenant. RateLimited when over."""
        policy = self.policy(ticket.model, spec)
        if policy is not None:
            self._take(ticket.model, policy, ticket.tenant)

    def _take(self, model: str, policy: TenantPolicy, tenant: str) -> Ticket:
        requests, tokens = self._buckets(model, tenant, policy)
        if tokens is not None and tokens.level() <= 0:
            self._refuse(model, tenant, policy, "tokens", tokens.seconds_until(0.0), requests, tokens)
        if requests is not None and requests.level() < 1.0:
            self._refuse(model, tenant, policy, "requests", requests.seconds_until(1.0 - 1e-9), requests, tokens)
        if requests is not None:
            requests.tokens -= 1.0
        ADMITTED.labels(model, self.label(tenant)).inc()
        return Ticket(self, model, tenant, tokens)

    def _refuse(
        self, model: str, tenant: str, policy: TenantPolicy, kind: str, wait: float,
        requests: TokenBucket | None, tokens: TokenBucket | None,
    ) -> None:
        LIMITED.labels(model, self.label(tenant), kind).inc()
        policies, states = [], []
        if requests is not None:
            window = policy.request_window
            policies.append(f'"requests";q={_number(requests.capacity)};w={_number(max(1.0, window))};qu="requests"')
            states.append(f'"requests";r={_number(requests.level())};t={math.ceil(requests.seconds_until(1.0 - 1e-9))}')
        if tokens is not None:
            window = policy.token_window
            policies.append(f'"tokens";q={_number(tokens.capacity)};w={_number(max(1.0, window))};qu="tokens"')
            states.append(f'"tokens";r={_number(tokens.level())};t={math.ceil(tokens.seconds_until(0.0))}')
        if kind == "tokens":
            what = f"{policy.tokens_per_minute:g} tokens per minute"
        else:
            what = f"{policy.requests_per_second:g} requests per second"
        raise RateLimited(
            f"tenant '{tenant}' is over its limit of {what} for model '{model}'; "
            f"retry in {max(1, math.ceil(wait))}s",
            wait, ", ".join(policies), ", ".join(states), kind,
        )
