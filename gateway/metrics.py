"""Prometheus metrics of the gateway, in a registry of its own (served on /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

LABELS = ("model", "version", "runtime", "protocol", "status")

REQUESTS = Counter(
    "modelgw_requests_total", "Inference requests by model, version, runtime, protocol and status", LABELS,
    registry=REGISTRY,
)
LATENCY = Histogram(
    "modelgw_request_duration_seconds", "Request latency at the gateway", LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("modelgw_in_flight_requests", "Requests being served, by model", ("model",), registry=REGISTRY)
RETRIES = Counter("modelgw_retries_total", "Requests retried on another replica", ("model",), registry=REGISTRY)
EJECTIONS = Counter(
    "modelgw_replica_ejections_total", "Replicas taken out of rotation after failures", ("runtime",), registry=REGISTRY
)
ROUTES = Gauge("modelgw_routes", "Models known to the routing table", registry=REGISTRY)
REPLICAS = Gauge("modelgw_replicas", "Runtime replicas known to the routing table", registry=REGISTRY)

# The registry watch behind the routing table; their values are read from the view when
# scraped (set_function in Gateway.start), so the watch does no metrics work of its own.
REGISTRY_CONNECTED = Gauge(
    "modelgw_registry_connected", "1 while the registry watch is connected to etcd (routes are served either way)",
    registry=REGISTRY,
)
REGISTRY_FULL_READS = Gauge(
    "modelgw_registry_full_reads", "Full reads of the registry since start: the first one, then one per etcd "
    "reconnect or compaction", registry=REGISTRY,
)
REGISTRY_REVISION = Gauge("modelgw_registry_revision", "etcd revision the routing table reflects", registry=REGISTRY)

# LLM traffic (models served by runtimes of kind `llm`), from the runtimes' own usage
# figures and the gateway's clock: observed by the proxy's Admission (gateway/proxy.py)
LLM_PROMPT_TOKENS = Counter(
    "modelgw_llm_prompt_tokens_total", "Prompt tokens of LLM requests, as the runtime counted them", ("model",),
    registry=REGISTRY,
)
LLM_COMPLETION_TOKENS = Counter(
    "modelgw_llm_completion_tokens_total", "Generated tokens of LLM requests, as the runtime counted them", ("model",),
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "modelgw_llm_time_to_first_token_seconds", "Streamed LLM requests: from admission to the first token's response",
    ("model",), buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30), registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "modelgw_llm_inter_token_latency_seconds",
    "Streamed LLM requests: time between responses, per token they carry", ("model",),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=REGISTRY,
)
LLM_REPLICA_PICKS = Counter(
    "modelgw_llm_replica_picks_total", "LLM requests and streams sent to each replica (by its load figures)",
    ("runtime", "instance"), registry=REGISTRY,
)
