"""Per-tenant limits (gateway/limits.py): the bucket math with an injected clock, the
tenant taken from the verified claims, the 429 answer's headers; and end to end, a real
`modelgw gateway` trusting a real OIDC issuer, a real LLM runtime, both registered in a
real etcd: a tenant over its tokens-per-minute limit is refused with 429 and Retry-After
while another tenant on the same model is served, and is served again once its bucket
has refilled at the declared rate."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from auth_helpers import AUDIENCE, AuthGateway, Issuer, Key
from conftest import modelgw_command
from gateway_helpers import Fleet, GatewayProcess, http_request, metric_value, model_spec, runtime_spec, wait_until

from modelgw.gateway.limits import ANONYMOUS, OTHER, RateLimited, TenantLimiter, tenant_of
from modelgw.protos import registry_pb2 as rpb

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_spec(name: str = "m", **limit: float | str) -> rpb.ModelSpec:
    spec = rpb.ModelSpec(name=name)
    spec.limits.per_tenant.CopyFrom(rpb.TenantLimit(**limit))
    return spec


# -- the buckets -------------------------------------------------------------------------


def test_no_limit_costs_nothing_and_admits_everyone() -> None:
    limiter = TenantLimiter(clock=Clock())
    spec = rpb.ModelSpec(name="m")
    assert all(limiter.admit("m", spec, {"sub": "a"}) is None for _ in range(1000))
    assert limiter.buckets == {}


def test_requests_per_second_refill_at_the_declared_rate() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock=clock)
    spec = limited_spec(requests_per_second=2, burst_seconds=2)  # 4 deep
    for _ in range(4):
        limiter.admit("m", spec, {"sub": "a"})
    with pytest.raises(RateLimited) as refused:
        limiter.admit("m", spec, {"sub": "a"})
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.kind == "requests"
    assert refused.value.headers["Retry-After"] == "1"  # 0.5 s to the next token, rounded up
    clock.now += 0.5  # one token back at 2/s
    limiter.admit("m", spec, {"sub": "a"})
    with pytest.raises(RateLimited):
        limiter.admit("m", spec, {"sub": "a"})
    clock.now += 10  # never more than the burst: 4
    for _ in range(4):
        limiter.admit("m", spec, {"sub": "a"})
    with pytest.raises(RateLimited):
        limiter.admit("m", spec, {"sub": "a"})


def test_tokens_admit_while_positive_and_debit_actual_usage_below_zero() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock=clock)
    spec = limited_spec(tokens_per_minute=600)  # 10 tokens/s, 60 s (600 tokens) deep
    ticket = limiter.admit("m", spec, {"sub": "a"})
    assert ticket is not None
    ticket.debit_tokens(900)  # one big generation: 300 below zero
    ticket.debit_tokens(900)  # only the first debit of a ticket counts
    with pytest.raises(RateLimited) as refused:
        limiter.admit("m", spec, {"sub": "a"})
    error = refused.value
    assert error.kind == "tokens" and error.openai_type == "tokens"
    # 300 missing at 10/s: 30 s, in Retry-After and in the IETF fields
    assert error.headers["Retry-After"] == "30"
    assert error.headers["RateLimit-Policy"] == '"tokens";q=600;w=60;qu="tokens"'
    assert error.headers["RateLimit"] == '"tokens";r=0;t=30'
    assert ("grpc-retry-pushback-ms", "30000") in error.trailing_metadata()
    # another tenant of the same model has a bucket of its own
    assert limiter.admit("m", spec, {"sub": "b"}) is not None
    clock.now += 29.9
    with pytest.raises(RateLimited):
        limiter.admit("m", spec, {"sub": "a"})
    clock.now += 0.2  # refilled past zero at exactly the declared rate
    assert limiter.admit("m", spec, {"sub": "a"}) is not None


def test_both_limits_and_the_policy_header_lists_both() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock=clock)
    spec = limited_spec(requests_per_second=1, tokens_per_minute=120)
    limiter.admit("m", spec, {"sub": "a"})
    with pytest.raises(RateLimited) as refused:
        limiter.admit("m", spec, {"sub": "a"})
    assert refused.value.kind == "requests"
    assert refused.value.headers["RateLimit-Policy"] == (
        '"requests";q=1;w=1;qu="requests", "tokens";q=120;w=60;qu="tokens"'
    )


def test_the_model_limit_wins_over_the_defaults_and_a_change_takes_effect() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock=clock)
    limiter.set_defaults(rpb.GatewayDefaults(name="default", per_tenant=rpb.TenantLimit(requests_per_second=1)))
    plain = rpb.ModelSpec(name="plain")
    limiter.admit("plain", plain, None)
    with pytest.raises(RateLimited):
        limiter.admit("plain", plain, None)  # the defaults apply to a model that says nothing
    own = limited_spec("own", requests_per_second=100)
    for _ in range(100):
        limiter.admit("own", own, None)
    limiter.set_defaults(None)
    assert limiter.admit("plain", plain, None) is None  # defaults gone: no limit


def test_the_tenant_is_the_configured_claim() -> None:
    assert tenant_of({"sub": "alice"}, "sub") == "alice"
    assert tenant_of({"sub": "alice", "org": "acme"}, "org") == "acme"
    assert tenant_of({"groups": ["", "team-a", "team-b"]}, "groups") == "team-a"
    assert tenant_of({"tier": 3}, "tier") == "3"
    assert tenant_of({"sub": "alice"}, "org") == ANONYMOUS  # the claim is missing
    assert tenant_of(None, "sub") == ANONYMOUS  # no token (public model, or no auth)
    clock = Clock()
    limiter = TenantLimiter(clock=clock)
    spec = limited_spec(requests_per_second=1, tenant_claim="org")
    limiter.admit("m", spec, {"sub": "alice", "org": "acme"})
    with pytest.raises(RateLimited):
        limiter.admit("m", spec, {"sub": "bob", "org": "acme"})  # same tenant, other person


def test_metric_labels_are_bounded_and_full_buckets_are_dropped() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock=clock, max_buckets=10, max_tenant_labels=3)
    spec = limited_spec(requests_per_second=1)
    for i in range(25):
        limiter.admit("m", spec, {"sub": f"t{i}"})
        clock.now += 1.0  # each earlier bucket is full again
    assert len(limiter.buckets) <= 10
    assert [limiter.label(f"t{i}") for i in range(5)] == ["t0", "t1", "t2", OTHER, OTHER]


# -- end to end --------------------------------------------------------------------------

RUNTIME = "llm"
MODEL = "tiny"
FORMAT = "hf-llama"
TOKENS_PER_MINUTE = 120  # 2 tokens a second: a tenant over it comes back within seconds
MAX_TOKENS = 40


@dataclass
class Setup:
    fleet: Fleet
    gateway: GatewayProcess
    issuer: Issuer
    key: Key

    def complete(self, tenant: str) -> tuple[int, dict, dict]:
        token = self.issuer.token(self.key, sub=tenant)
        body = {"model": MODEL, "prompt": "Hello world", "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}
        status, raw, headers = http_request(
            "POST", f"{self.gateway.base}/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}, timeout=120,
        )
        return status, json.loads(raw), headers


@pytest.fixture(scope="module")
def setup(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("tenant-limits")
    checkpoint = root / "tiny"
    made = subprocess.run(
        modelgw_command("llm", "make-checkpoint", str(checkpoint), "--layers", "2", "--hidden", "64", "--seed", "5"),
        capture_output=True, text=True, timeout=120,
    )
    assert made.returncode == 0, made.stderr
    issuer = Issuer().start()
    key = issuer.new_key("RS256")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        spec = model_spec(MODEL, RUNTIME, FORMAT, {"1": str(checkpoint)})
        spec.limits.per_tenant.CopyFrom(rpb.TenantLimit(tokens_per_minute=TOKENS_PER_MINUTE, burst_seconds=30))
        fleet.apply(runtime_spec(RUNTIME, "llm", [FORMAT]), spec)
        fleet.replica(RUNTIME, "llm", "--option", "threads=1", "--option", "max_num_seqs=4")
        gateway = AuthGateway.in_fleet(fleet, "--issuer", issuer.url, "--audience", AUDIENCE)
        setup = Setup(fleet, gateway, issuer, key)
        answers: list[tuple[int, dict, dict]] = []

        def answered() -> bool:
            answers.append(setup.complete("warmup"))
            return answers[-1][0] == 200

        try:
            wait_until(answered, 180, "the model never answered", interval=0.5)
        except TimeoutError as err:
            raise AssertionError(f"{err}: {answers[-1][:2]}\n{gateway.output()[-3000:]}") from None
        yield setup
    finally:
        fleet.close()
        issuer.stop()


def test_a_tenant_over_its_tokens_per_minute_is_refused_while_another_is_served(setup: Setup) -> None:
    # the bucket holds 30 s of 2 tokens/s = 60 tokens; an answer uses its prompt + 40: the
    # first leaves it positive, the second takes it below zero, the third is refused
    for _ in range(2):
        status, body, _ = setup.complete("alice")
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > MAX_TOKENS
    status, body, headers = setup.complete("alice")
    assert status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "tokens"
    assert "alice" in body["error"]["message"] and MODEL in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert headers["RateLimit-Policy"] == '"tokens";q=60;w=30;qu="tokens"'
    assert headers["RateLimit"].startswith('"tokens";r=0;t=')
    # another tenant, same model: served
    status, body, _ = setup.complete("bob")
    assert status == 200, body
    metrics = setup.gateway.metrics()
    assert metric_value(metrics, "modelgw_tenant_limited_total", model=MODEL, tenant="alice", limit="tokens") >= 1
    assert metric_value(metrics, "modelgw_tenant_tokens_total", model=MODEL, tenant="bob") > MAX_TOKENS
    assert metric_value(metrics, "modelgw_llm_completion_tokens_total", model=MODEL) >= 3 * MAX_TOKENS
    # the limit recovers at the declared rate: served again once the bucket refilled above
    # zero (polled, no assertion on how fast)
    wait_until(lambda: setup.complete("alice")[0] == 200, 120, "alice was never served again", interval=1.0)
