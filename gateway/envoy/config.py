"""The gateway's routing table and auth config compiled into Envoy v3 configuration.

One model of routing: `gateway/routing.py`'s RoutingTable (models, their traffic split and
the ready replicas of each version, orphans included) is the input; this module only
translates it. Nothing here reads etcd.

    settings = EnvoySettings(grpc_port=8001, http_port=8000, admin_port=9901,
                             python_grpc="127.0.0.1:40001", python_http="127.0.0.1:40002")
    resources = compile_resources(table, settings, auth)    # clusters, endpoints, routes
    bootstrap = bootstrap_config(settings, auth, jwks, files)  # listeners + static clusters
    static = static_config(settings, auth, jwks, resources)    # all inline: `envoy --mode validate`

What Envoy gets:
- a gRPC listener. A Lua filter (lua.py) reads the model name and version from a
  ModelInfer body into headers; jwt_authn verifies the bearer token (providers from the
  issuers: audiences, JWKS cache, clock skew, exp required; the verified subject into
  x-modelgw-subject) but refuses nothing (allow_missing_or_failed); a shadow RBAC judges
  the route's rules (a token of one of the issuers, and the model's AccessPolicy on its
  claims); the auth gate (lua.py GATE_SOURCE) sends every request Envoy would refuse (a
  protected model without a verified token or against its policy; a public model with a
  token that did not verify) to the Python gateway, which answers with its own code and
  message and refetches the JWKS at once for an unknown kid; an enforcing RBAC with the
  same rules comes last, so a gate that failed still refuses (fail closed). The router
  sends the request to a cluster per model version (least request, outlier detection,
  retries of resets and UNAVAILABLE within a retry budget, the model's max_in_flight as
  circuit breaker, the client's deadline capped by the model's timeout). A version's open
  breaker (response flag UO) is answered RESOURCE_EXHAUSTED with the Python proxy's words
  (local_replies); Envoy's cap counts per version, the Python proxy's per model. A
  request without a version takes the traffic split as weighted clusters, hashed on
  x-modelgw-session when it is sent. Everything else on that listener (health, metadata,
  readiness, streams, the RegistryService, unknown models and versions) goes to the
  Python gateway, which authenticates and answers it as it always has.
  The gate's happy-path cost (shadow RBAC + gate Lua, against a required jwt_authn and
  one RBAC), Envoy utime+stime per ModelInfer, A/B alternated, 8 rounds of 3000 on a
  shared 2-core machine: median 733 µs (without) vs 833 µs (with), minimum 577 vs 603 µs;
  within that machine's noise.
- an HTTP listener in front of the Python gateway's (REST, OpenAI, admin, /metrics), and
  Envoy's own statistics at /metrics/envoy (Prometheus format).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
from modelgw.gateway.envoy.lua import (
    GATE_FILTER,
    MODEL_HEADER,
    MODEL_INFER_PATH,
    PYTHON_HEADER,
    UNVERSIONED_HEADER,
    VERSION_HEADER,
    gate_source,
    lua_source,
    version_source,
)
from modelgw.gateway.proxy import MODEL_AT_ITS_CAP, ProxyLimits
from modelgw.gateway.routing import ModelRoute, RoutingTable
from modelgw.oip.protocol import MAX_MESSAGE_BYTES, SESSION_HEADER, SUBJECT_HEADER

TYPE = "type.googleapis.com/"
JWT_FILTER = "envoy.filters.http.jwt_authn"
RBAC_FILTER = "envoy.filters.http.rbac"  # enforcing: the last word, after the gate
RBAC_SHADOW = "modelgw.rbac_shadow"  # the same rules in shadow mode, read by the gate
SHADOW_PREFIX = "modelgw_"  # the shadow rules' stat (and metadata key) prefix
METADATA = "modelgw"  # route metadata: the model and its in-flight cap, for local replies
JWT_PAYLOAD = "jwt_payload"  # where jwt_authn puts a verified token's claims (dynamic metadata)
JWT_HEADER = "jwt_header"  # ... and its JOSE header (for the issuer's algorithms)
GRPC_ROUTES = "grpc"  # the RDS route configuration's name
PYTHON_GRPC = "modelgw_python_grpc"
PYTHON_HTTP = "modelgw_python_http"
ENVOY_ADMIN = "modelgw_envoy_admin"
ENVOY_METRICS_PATH = "/metrics/envoy"
# the jwt_authn filter's requirement (per route): a verified token, or none that passes
TOKEN = "token_or_python"


class EnvoyConfigError(ValueError):
    """The configuration cannot be expressed for Envoy; the message says what to change."""


def retry_settings(limits: ProxyLimits) -> dict[str, Any]:
    """EnvoySettings' retry fields from the Python proxy's limits: attempts less the first;
    its retry ratio as the budget's percentage; its floor of retries a second at any traffic
    as the retries in flight Envoy always allows (Envoy's default of 3 failed requests when
    a replica died under 4 concurrent ones)."""
    return {"retries": limits.max_attempts - 1, "retry_budget_percent": limits.retry_ratio * 100,
            "min_retry_concurrency": max(3, round(limits.min_retries_per_second))}


_DEFAULT_RETRIES = retry_settings(ProxyLimits())


@dataclass(frozen=True)
class EnvoySettings:
    """Where Envoy listens and where the Python gateway's own listeners are."""

    grpc_port: int
    http_port: int
    admin_port: int
    python_grpc: str  # host:port of the Python gateway's gRPC listener
    python_http: str
    host: str = "0.0.0.0"
    admin_host: str = "127.0.0.1"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_header_bytes: int = 16 * 1024
    default_timeout: float = 60.0  # when neither the client nor the model sets one (ProxyLimits)
    max_in_flight: int = 4096  # a version's cap when its model sets none (the gateway-wide cap)
    # the Python proxy's retry limits (retry_settings), so that both planes retry alike
    retries: int = _DEFAULT_RETRIES["retries"]
    retry_budget_percent: float = _DEFAULT_RETRIES["retry_budget_percent"]
    min_retry_concurrency: int = _DEFAULT_RETRIES["min_retry_concurrency"]
    drain_seconds: float = 30.0


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `host:port` or `[v6]:port`; EnvoyConfigError otherwise."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", address.strip())
    if not match:
        raise EnvoyConfigError(f"endpoint address '{address}': expected HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    return host, port


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def cluster_name(model: str, version: str) -> str:
    """A stable cluster name per model version: readable, and unique whatever the names."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", f"{model}_v{version}")[:80]
    digest = hashlib.blake2b(f"{model}\0{version}".encode(), digest_size=4).hexdigest()
    return f"model_{readable}_{digest}"


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def load_assignment(name: str, addresses: list[str]) -> dict[str, Any]:
    """A ClusterLoadAssignment of the replicas' addresses (IP literals; see endpoints_of)."""
    lb = [{"endpoint": {"address": _socket(*split_address(a))}} for a in addresses]
    return {"@type": TYPE + "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": lb}] if lb else []}


def _lua(code: str) -> dict[str, Any]:
    return {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.lua.v3.Lua", "default_source_code": {"inline_string": code},
    }}


def _http2_options(version: str | None = None) -> dict[str, Any]:
    """HTTP/2 to the upstream; `version`: the upstream filter that names it in the message."""
    options: dict[str, Any] = {
        "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1024}},
    }
    if version is not None:
        options["http_filters"] = [
            _lua(version_source(version)),
            {"name": "envoy.filters.http.upstream_codec",
             "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
        ]
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}


# -- clusters and endpoints per model version ------------------------------------------------


@dataclass
class Resources:
    """What the registry decides: one cluster and its endpoints per model version, and the
    gRPC listener's routes. Compared as JSON to know what changed."""

    clusters: list[dict[str, Any]] = field(default_factory=list)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # cluster name -> ClusterLoadAssignment
    routes: dict[str, Any] = field(default_factory=dict)  # the RouteConfiguration
    skipped: list[str] = field(default_factory=list)  # replicas Envoy cannot reach by address (not IPs)


def model_cluster(name: str, route: ModelRoute, version: str, settings: EnvoySettings) -> dict[str, Any]:
    """A version's cluster: least request over its ready replicas, ejection of failing
    ones, the model's in-flight cap as the circuit breaker, a retry budget. Its endpoints
    are kept apart (Resources.endpoints) and put inline by inline_clusters."""
    cap = route.spec.limits.max_in_flight or settings.max_in_flight
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        # one version: the runtime's default is that version, and no message needs naming it
        "typed_extension_protocol_options": _http2_options(version if len(route.versions) > 1 else None),
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            # requests in flight (HTTP/2: streams) and waiting for a connection
            "max_requests": cap,
            "max_pending_requests": cap,
            "max_connections": 1024,
            # retries in flight: at most this share of the requests, as the Python proxy's budget
            "retry_budget": {"budget_percent": {"value": settings.retry_budget_percent},
                             "min_retry_concurrency": settings.min_retry_concurrency},
        }]},
        # as the Python table ejects: at the first failure without a response (reset,
        # refused, UNAVAILABLE), for 2 s, doubling per consecutive ejection up to 30 s
        "outlier_detection": {
            "consecutive_gateway_failure": 1,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 5,
            "interval": "1s",
            "base_ejection_time": "2s",
            "max_ejection_time": "30s",
            "max_ejection_percent": 100,
        },
        # as the Python table: ejected replicas get requests only when every one is ejected
        "common_lb_config": {"healthy_panic_threshold": {"value": 1.0}},
        "type": "STATIC",  # endpoints inline (inline_clusters)
    }
    return cluster


def endpoints_of(route: ModelRoute, version: str, skipped: list[str]) -> list[str]:
    """The addresses of the version's ready replicas that Envoy can use: endpoints given as
    IP:PORT (an EDS endpoint is not resolved; a replica that registered a host name is left
    to the Python data plane and reported)."""
    out = []
    for replica in route.replicas.get(version, ()):
        try:
            host, _ = split_address(replica.address)
        except EnvoyConfigError:
            skipped.append(replica.address)
            continue
        if _is_ip(host):
            out.append(replica.address)
        else:
            skipped.append(replica.address)
    return sorted(set(out))


# -- authorization: AccessPolicy -> RBAC on the verified claims ---------------------------------


def _claim_path(claim: str) -> list[dict[str, str]]:
    """The metadata path of a claim (a dotted path reaches nested objects, as in tokens.py)."""
    return [{"key": JWT_PAYLOAD}, *({"key": part} for part in claim.split("."))]


def _metadata(claim: str, value: dict[str, Any]) -> dict[str, Any]:
    """A principal: the verified claim (jwt_authn's dynamic metadata) matches `value`."""
    return {"sourced_metadata": {"metadata_matcher": {"filter": JWT_FILTER, "path": _claim_path(claim), "value": value}}}


def _claim_has(claim: str, value: str, split: bool) -> dict[str, Any]:
    """A principal: the verified claim is `value`, or a list holding it, or (split: the
    OAuth scope form) a space-separated string naming it."""
    string = (
        {"safe_regex": {"regex": f"(.* )?{re.escape(value)}( .*)?"}} if split else {"exact": value}
    )
    matchers = [
        _metadata(claim, {"string_match": string}),
        _metadata(claim, {"list_match": {"one_of": {"string_match": {"exact": value}}}}),
    ]
    return {"or_ids": {"ids": matchers}}


def _any_claim_has(claims: tuple[str, ...], value: str, split: bool) -> dict[str, Any]:
    return {"or_ids": {"ids": [_claim_has(c, value, split) for c in claims]}}


def _issuer_is(issuer: str) -> dict[str, Any]:
    return _metadata("iss", {"string_match": {"exact": issuer}})


def policy_principal(access: Any, issuer: IssuerConfig) -> dict[str, Any] | None:
    """The RBAC principal of a model's AccessPolicy for tokens of one issuer (its claim
    names): every scope, one of the groups, one of the roles. None: nothing to check."""
    required: list[dict[str, Any]] = [_any_claim_has(issuer.scope_claims, s, True) for s in dict.fromkeys(access.scopes)]
    if access.groups:
        required.append({"or_ids": {"ids": [_any_claim_has(issuer.group_claims, g, False) for g in sorted(set(access.groups))]}})
    if access.roles:
        required.append({"or_ids": {"ids": [_any_claim_has(issuer.role_claims, r, False) for r in sorted(set(access.roles))]}})
    if not required:
        return None
    return {"and_ids": {"ids": [_issuer_is(issuer.issuer), *required]}}


def _is_public(route: ModelRoute) -> bool:
    return route.spec.HasField("access") and route.spec.access.public


def access_rules(route: ModelRoute, auth: AuthConfig) -> dict[str, Any] | None:
    """The RBAC rules of a protected model: a token verified by one of the issuers and,
    with an access policy, that policy on its claims (None: a public model)."""
    if _is_public(route):
        return None
    spec = route.spec
    principals: list[dict[str, Any]] = []
    for issuer in auth.issuers:
        principal = policy_principal(spec.access, issuer) if spec.HasField("access") else None
        # as the Python verifier: a token names its subject (a string); one without is
        # refused, so the gate sends it to Python for its words
        subject = _metadata(issuer.subject_claim, {"string_match": {"safe_regex": {"regex": ".+"}}})
        # jwt_authn takes any algorithm its JWKS key allows; the issuer's list is checked here
        # (a token outside it goes to Python, which refuses it in its own words)
        algorithm = {"sourced_metadata": {"metadata_matcher": {
            "filter": JWT_FILTER, "path": [{"key": JWT_HEADER}, {"key": "alg"}],
            "value": {"string_match": {"safe_regex": {"regex": "|".join(re.escape(a) for a in issuer.algorithms)}}},
        }}}
        first = principal if principal is not None else _issuer_is(issuer.issuer)
        principals.append({"and_ids": {"ids": [first, subject, algorithm]}})
    return {"action": "ALLOW", "policies": {"access-policy": {"permissions": [{"any": True}], "principals": principals}}}


def route_rbac(route: ModelRoute, auth: AuthConfig, shadow: bool = False) -> dict[str, Any] | None:
    """The per-route RBAC config of a protected model (None: a public model). `shadow`:
    the rules judged, not enforced, for the gate to read (RBAC_SHADOW); else enforced."""
    rules = access_rules(route, auth)
    if rules is None:
        return None
    rbac: dict[str, Any] = {"shadow_rules": rules, "shadow_rules_stat_prefix": SHADOW_PREFIX} if shadow else {"rules": rules}
    return {"@type": TYPE + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute", "rbac": rbac}


def _per_route_auth(route: ModelRoute, auth: AuthConfig | None) -> dict[str, Any]:
    if auth is None:
        return {}
    # every token passes jwt_authn (allow_missing_or_failed); the gate sends those that
    # did not verify, and policy refusals, to the Python gateway (lua.py GATE_SOURCE)
    config: dict[str, Any] = {
        JWT_FILTER: {"@type": TYPE + "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
                     "requirement_name": TOKEN},
    }
    for name, shadow in ((RBAC_SHADOW, True), (RBAC_FILTER, False)):
        rbac = route_rbac(route, auth, shadow)
        if rbac is not None:
            config[name] = rbac
    return config


def _route_metadata(route: ModelRoute, settings: EnvoySettings, auth: AuthConfig | None) -> dict[str, Any]:
    """What the gate reads (public or protected) and the circuit breaker's message names."""
    meta: dict[str, Any] = {METADATA: {"model": route.spec.name,
                                       "max_in_flight": str(route.spec.limits.max_in_flight or settings.max_in_flight)}}
    if auth is not None:
        meta[GATE_FILTER] = {"access": "public" if _is_public(route) else "protected"}
    return {"filter_metadata": meta}


# -- routes ----------------------------------------------------------------------------------


def _retry_policy(settings: EnvoySettings) -> dict[str, Any]:
    """Requests that got no response (reset, refused, connect failure) or UNAVAILABLE are
    tried again on another replica, as the Python proxy does."""
    return {
        "retry_on": "reset,connect-failure,refused-stream,unavailable",
        "num_retries": settings.retries,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": TYPE + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
        }],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
    }


def _route_action(route: ModelRoute, settings: EnvoySettings) -> dict[str, Any]:
    timeout = route.spec.limits.timeout_seconds or settings.default_timeout
    return {
        # the client's grpc-timeout, capped by the model's timeout (or the default)
        "timeout": _duration(timeout),
        "max_stream_duration": {"grpc_timeout_header_max": _duration(timeout)},
        "retry_policy": _retry_policy(settings),
    }


def split_weights(route: ModelRoute) -> list[tuple[str, int]]:
    """(version, percent) of the traffic split, as the routing table computes it: the
    versions that have replicas share the traffic (as the Python plane's fallback_version);
    all of them while none has."""
    return route.live_split() or route.split()


def model_routes(
    route: ModelRoute, settings: EnvoySettings, auth: AuthConfig | None, reachable: frozenset[str] | None = None
) -> list[dict[str, Any]]:
    """A model's routes: one per named version, then one for requests naming none.
    `reachable`: the versions whose cluster has endpoints (default: all). A version
    without any gets no route, and a split with one such version neither: the Python
    gateway answers those requests (UNAVAILABLE saying why no replica is ready) where
    Envoy would say "no healthy upstream"."""
    name = route.spec.name
    reachable = frozenset(route.versions) if reachable is None else reachable
    per_filter = _per_route_auth(route, auth)
    metadata = _route_metadata(route, settings, auth)
    # jwt_authn keeps the token for the Python gateway (forward); runtimes never get it
    token = ["authorization"] if auth is not None else []
    model_match = {"name": MODEL_HEADER, "string_match": {"exact": name}}
    out = []
    for version in route.versions:
        if version not in reachable:
            continue
        action = {"cluster": cluster_name(name, version), **_route_action(route, settings)}
        out.append({
            "name": f"{name}/{version}",
            "match": {"path": MODEL_INFER_PATH, "headers": [
                model_match, {"name": VERSION_HEADER, "string_match": {"exact": version}},
            ]},
            "route": action,
            "metadata": metadata,
            "typed_per_filter_config": per_filter,
            "request_headers_to_remove": [MODEL_HEADER, VERSION_HEADER, UNVERSIONED_HEADER, *token],
        })
    weights = split_weights(route)
    if not all(version in reachable for version, _ in weights):
        return out
    no_version = {"name": VERSION_HEADER, "present_match": False}
    if len(weights) == 1:
        splits: list[tuple[str, list[dict[str, object]], dict[str, object]]] = [
            ("split", [model_match, no_version], {"cluster": cluster_name(name, weights[0][0])})
        ]
    else:
        clusters = [{"name": cluster_name(name, v), "weight": w} for v, w in weights]
        splits = [
            # a session key picks the version by its hash (the same key, the same version);
            # a route of its own, since without the header the hash would be constant
            ("sticky", [model_match, no_version, {"name": SESSION_HEADER, "present_match": True}], {
                "weighted_clusters": {"clusters": clusters, "use_hash_policy": True},
                "hash_policy": [{"header": {"header_name": SESSION_HEADER}}],
            }),
            ("split", [model_match, no_version], {"weighted_clusters": {"clusters": clusters}}),
        ]
    for suffix, headers, target in splits:
        out.append({
            "name": f"{name}/{suffix}",
            "match": {"path": MODEL_INFER_PATH, "headers": headers},
            "route": {**target, **_route_action(route, settings)},
            "metadata": metadata,
            "typed_per_filter_config": per_filter,
            # the version's upstream filter reads (and drops) the unversioned mark
            "request_headers_to_remove": [MODEL_HEADER, VERSION_HEADER, *token]
            + ([UNVERSIONED_HEADER] if len(route.versions) == 1 else []),
        })
    return out


def _to_python(name: str, match: dict[str, Any]) -> dict[str, Any]:
    # streams and admin calls last as long as they last: no route timeout (the Python
    # gateway applies its own)
    return {"name": name, "match": match, "route": {"cluster": PYTHON_GRPC, "timeout": "0s"}}


def admitted_by_envoy(route: ModelRoute, tenant_defaults: bool) -> bool:
    """Whether Envoy may route the model's ModelInfer itself. Models whose admission only the
    Python data plane has (per-tenant limits, their own or the registry's defaults: buckets
    per tenant; LLM versions: the choice of replica by reported load) stay behind Python, so
    the envoy data plane never lets a request skip a limit or a policy."""
    return not (route.llm or route.per_tenant or tenant_defaults)


def compile_resources(
    table: RoutingTable, settings: EnvoySettings, auth: AuthConfig | None, *, tenant_defaults: bool = False
) -> Resources:
    """Clusters, endpoints and gRPC routes for every model version the table routes and
    Envoy may admit (admitted_by_envoy); the rest reach the Python gateway's listener.
    `tenant_defaults`: the registry's GatewayDefaults declare per-tenant limits."""
    resources = Resources()
    # what the auth gate sends to the Python gateway (a token that did not verify, a
    # policy refusal): the Python gateway answers it with its own code and message
    routes: list[dict[str, Any]] = []
    if auth is not None:
        routes.append(_to_python("auth", {"prefix": "/", "headers": [{"name": PYTHON_HEADER, "present_match": True}]}))
    for name in sorted(table.routes):
        route = table.routes[name]
        if not admitted_by_envoy(route, tenant_defaults):
            continue
        reachable = set()
        for version in route.versions:
            cluster = cluster_name(name, version)
            addresses = endpoints_of(route, version, resources.skipped)
            resources.clusters.append(model_cluster(cluster, route, version, settings))
            resources.endpoints[cluster] = load_assignment(cluster, addresses)
            if addresses:
                reachable.add(version)
        routes.extend(model_routes(route, settings, auth, frozenset(reachable)))
    # unknown models and versions, bodies that do not parse, and every other RPC: the
    # Python gateway answers them (NOT_FOUND with its message, health, metadata, streams,
    # the RegistryService behind its admin scope)
    routes.append(_to_python("python", {"prefix": "/"}))
    resources.routes = {
        "@type": TYPE + "envoy.config.route.v3.RouteConfiguration",
        "name": GRPC_ROUTES,
        "virtual_hosts": [{"name": "modelgw", "domains": ["*"], "routes": routes}],
    }
    return resources


# -- listeners, static clusters, bootstrap ---------------------------------------------------


@dataclass(frozen=True)
class Jwks:
    """Where Envoy gets an issuer's keys: a URL (fetched and cached) or, for a shared
    secret, the key itself."""

    uri: str | None = None
    inline: str | None = None


def jwks_for(issuer: IssuerConfig, discovered: Mapping[str, str]) -> Jwks:
    """An issuer's JWKS for Envoy: its HMAC secret inline, else its jwks_uri (configured,
    or found by OIDC discovery: `discovered`)."""
    if issuer.shared_secret is not None:
        k = base64.urlsafe_b64encode(issuer.shared_secret).rstrip(b"=").decode()
        keys = [{"kty": "oct", "k": k, "alg": alg} for alg in issuer.algorithms if alg.startswith("HS")]
        return Jwks(inline=json.dumps({"keys": keys}))
    uri = issuer.jwks_uri or discovered.get(issuer.issuer)
    if not uri:
        raise EnvoyConfigError(f"issuer '{issuer.issuer}': no jwks_uri (configure one, or make its discovery document reachable)")
    return Jwks(uri=uri)


def jwks_cluster_name(index: int) -> str:
    return f"modelgw_jwks_{index}"


def _jwks_cluster(index: int, uri: str) -> dict[str, Any]:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    cluster: dict[str, Any] = {
        "name": jwks_cluster_name(index),
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "5s",
        "load_assignment": load_assignment(jwks_cluster_name(index), [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]),
    }
    del cluster["load_assignment"]["@type"]
    if parts.scheme == "https":
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
            }},
        }}
    return cluster


def jwt_filter(auth: AuthConfig, jwks: Mapping[str, Jwks]) -> dict[str, Any]:
    """jwt_authn with one provider per issuer; routes choose a requirement by name."""
    providers: dict[str, Any] = {}
    for index, issuer in enumerate(auth.issuers):
        source = jwks[issuer.issuer]
        provider: dict[str, Any] = {
            "issuer": issuer.issuer,
            "audiences": list(issuer.audiences),
            # kept for the Python gateway (a request the gate sends there is judged again);
            # a model's routes drop it: runtimes get the verified subject, not the token
            "forward": True,
            "payload_in_metadata": JWT_PAYLOAD,
            "header_in_metadata": JWT_HEADER,
            "claim_to_headers": [{"header_name": SUBJECT_HEADER, "claim_name": issuer.subject_claim}],
            "clock_skew_seconds": int(issuer.leeway_seconds),
            "require_expiration": True,  # as the Python verifier: a token without exp is refused
        }
        if auth.cache_entries:
            # verified tokens are kept (until their exp) as the Python verifier keeps them:
            # a repeated token skips the signature check
            provider["jwt_cache_config"] = {"jwt_cache_size": auth.cache_entries}
        if source.inline is not None:
            provider["local_jwks"] = {"inline_string": source.inline}
        else:
            assert source.uri is not None
            provider["remote_jwks"] = {
                "http_uri": {
                    "uri": source.uri, "cluster": jwks_cluster_name(index), "timeout": _duration(auth.http_timeout_seconds),
                },
                "cache_duration": _duration(issuer.jwks_cache_seconds),
                # fetched when the listener starts, not on the first request; retried
                "async_fetch": {"fast_listener": False},
                "retry_policy": {"num_retries": 3, "retry_back_off": {"base_interval": "0.2s", "max_interval": "2s"}},
            }
        providers[f"issuer{index}"] = provider
    any_issuer: dict[str, Any]
    if len(providers) == 1:
        any_issuer = {"provider_name": next(iter(providers))}
    else:
        any_issuer = {"requires_any": {"requirements": [{"provider_name": p} for p in providers]}}
    # a token that fails, or none, passes here: the gate sends the request to the Python
    # gateway (or, for a public model without a token, lets it on anonymously)
    token_or_python = {"requires_any": {"requirements": [any_issuer, {"allow_missing_or_failed": {}}]}}
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "requirement_map": {TOKEN: token_or_python},
        },
    }


def _router(grpc: bool) -> dict[str, Any]:
    config: dict[str, Any] = {"@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"}
    if grpc:
        # no x-envoy-* headers to runtimes or clients (the Python plane sends none either);
        # no per-HTTP-code cluster stats, which for gRPC are all 200 (its status is in the
        # trailers): together about 5% of a plain Envoy's CPU per request (A/B, c=16)
        config.update(suppress_envoy_headers=True, dynamic_stats=False)
    return {"name": "envoy.filters.http.router", "typed_config": config}


def _hcm(
    stat_prefix: str, routes: dict[str, Any], filters: list[dict[str, Any]], settings: EnvoySettings, *, grpc: bool = False
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [*filters, _router(grpc)],
        # a client's x-request-id is kept (passed on to the runtime), one is made otherwise
        "preserve_external_request_id": True,
        # room for the largest token accepted plus the usual headers, as the Python listeners
        "max_request_headers_kb": max(60, -(-settings.max_header_bytes // 1024)),
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "common_http_protocol_options": {"headers_with_underscores_action": "ALLOW"},
        **routes,
    }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


# the Python proxy's words for a model at its cap, filled from the route's metadata
OVERFLOW_MESSAGE = MODEL_AT_ITS_CAP.format(
    model=f"%METADATA(ROUTE:{METADATA}:model)%", cap=f"%METADATA(ROUTE:{METADATA}:max_in_flight)%",
)


def local_replies() -> dict[str, Any]:
    """The gRPC listener's local replies rewritten as the Python gateway answers: a version's
    circuit breaker open (response flag UO: its max_in_flight reached) is RESOURCE_EXHAUSTED
    naming the model and its limit, not UNAVAILABLE (Envoy's code for a 503)."""
    return {"mappers": [{
        # UO is also set when a retry overflowed the retry budget after a failed attempt
        # (reset, refused, connect failure, timeout): not the model's cap, so the reply
        # stays Envoy's UNAVAILABLE (the first mapper that matches is the one used)
        "filter": {"response_flag_filter": {"flags": ["UF", "UC", "UR", "URX", "UT", "LR", "UH", "UMSDR"]}},
    }, {
        # only a model version's cluster is small enough to overflow (the Python gateway's
        # has no breaker below its own limits); a mapper's metadata_filter reads dynamic
        # metadata, not the route's, so the flag alone selects it
        "filter": {"response_flag_filter": {"flags": ["UO"]}},
        "headers_to_add": [{"header": {"key": "grpc-status", "value": "8"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "body_format_override": {"text_format_source": {"inline_string": OVERFLOW_MESSAGE}},
    }]}


def listeners(
    settings: EnvoySettings, auth: AuthConfig | None, jwks: Mapping[str, Jwks], grpc_routes: dict[str, Any]
) -> list[dict[str, Any]]:
    """The gRPC listener (`grpc_routes`: an `rds` source or an inline `route_config`) and
    the HTTP listener in front of the Python gateway."""
    filters: list[dict[str, Any]] = [{
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.lua.v3.Lua",
                         "default_source_code": {"inline_string": lua_source(SUBJECT_HEADER)}},
    }]
    if auth is not None:
        no_rules = {"@type": TYPE + "envoy.extensions.filters.http.rbac.v3.RBAC"}
        gate = {"@type": TYPE + "envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": gate_source(JWT_PAYLOAD, SHADOW_PREFIX)}}
        # no rules here: a protected model's route brings its own (RBACPerRoute)
        filters += [
            jwt_filter(auth, jwks),
            {"name": RBAC_SHADOW, "typed_config": no_rules},
            {"name": GATE_FILTER, "typed_config": gate},
            {"name": RBAC_FILTER, "typed_config": no_rules},
        ]
    http_routes = {"route_config": {"name": "http", "virtual_hosts": [{"name": "modelgw", "domains": ["*"], "routes": [
        {"match": {"path": ENVOY_METRICS_PATH},
         "route": {"cluster": ENVOY_ADMIN, "prefix_rewrite": "/stats/prometheus"}},
        {"match": {"prefix": "/"}, "route": {"cluster": PYTHON_HTTP, "timeout": "0s"}},
    ]}]}}
    grpc_hcm = _hcm("grpc", grpc_routes, filters, settings, grpc=True)
    grpc_hcm["typed_config"]["local_reply_config"] = local_replies()
    # the whole of a request may be buffered (the Lua filter reads a ModelInfer body)
    buffer = settings.max_message_bytes + 64 * 1024
    return [
        {
            "name": "grpc",
            "address": _socket(settings.host, settings.grpc_port),
            "per_connection_buffer_limit_bytes": buffer,
            "filter_chains": [{"filters": [grpc_hcm]}],
        },
        {
            "name": "http",
            "address": _socket(settings.host, settings.http_port),
            "per_connection_buffer_limit_bytes": buffer,
            "filter_chains": [{"filters": [_hcm("http", http_routes, [], settings)]}],
        },
    ]


def static_clusters(settings: EnvoySettings, auth: AuthConfig | None, jwks: Mapping[str, Jwks]) -> list[dict[str, Any]]:
    """The Python gateway's two listeners, Envoy's admin (for /metrics/envoy), JWKS hosts."""

    def upstream(name: str, address: str, http2: bool) -> dict[str, Any]:
        cluster: dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": "1s",
                                   "load_assignment": load_assignment(name, [address])}
        del cluster["load_assignment"]["@type"]
        if http2:
            cluster["typed_extension_protocol_options"] = _http2_options()
        # one Python gateway: no breaker below its own limits
        cluster["circuit_breakers"] = {"thresholds": [{"max_requests": 100_000, "max_pending_requests": 100_000,
                                                        "max_connections": 100_000}]}
        return cluster

    clusters = [
        upstream(PYTHON_GRPC, settings.python_grpc, http2=True),
        upstream(PYTHON_HTTP, settings.python_http, http2=False),
        upstream(ENVOY_ADMIN, f"{settings.admin_host}:{settings.admin_port}", http2=False),
    ]
    if auth is not None:
        for index, issuer in enumerate(auth.issuers):
            source = jwks[issuer.issuer]
            if source.uri is not None:
                clusters.append(_jwks_cluster(index, source.uri))
    return clusters


@dataclass(frozen=True)
class Files:
    """Where the dynamic resources live (each written whole and renamed into place)."""

    directory: str

    @property
    def bootstrap(self) -> str:
        return f"{self.directory}/bootstrap.json"

    @property
    def cds(self) -> str:
        return f"{self.directory}/cds.json"

    @property
    def rds(self) -> str:
        return f"{self.directory}/rds.json"


def path_source(path: str) -> dict[str, Any]:
    return {"path_config_source": {"path": path}, "resource_api_version": "V3"}


def _admin(settings: EnvoySettings) -> dict[str, Any]:
    return {"address": _socket(settings.admin_host, settings.admin_port)}


def bootstrap_config(
    settings: EnvoySettings, auth: AuthConfig | None, jwks: Mapping[str, Jwks], files: Files, node_id: str = "modelgw"
) -> dict[str, Any]:
    """The bootstrap: static listeners (ports and auth never change while the gateway
    runs), static clusters, and clusters (CDS) and gRPC routes (RDS) from files."""
    rds = {"rds": {"route_config_name": GRPC_ROUTES, "config_source": path_source(files.rds)}}
    return {
        "node": {"id": node_id, "cluster": "modelgw"},
        "admin": _admin(settings),
        "static_resources": {
            "listeners": listeners(settings, auth, jwks, rds),
            "clusters": static_clusters(settings, auth, jwks),
        },
        "dynamic_resources": {"cds_config": path_source(files.cds)},
        "overload_manager": _overload(),
        "stats_config": _stats_config(),
    }


# The stats Envoy keeps (the rest are never created): what /metrics/envoy and the supervisor
# read. Measured (bench/gateway_overhead.py's plain Envoy, A/B): the per-request histograms
# (upstream_rq_time, downstream_rq_time, ...) and unread counters cost CPU on every request.
_CLUSTER_STATS = (
    r"^cluster\.[^.]+\.(upstream_rq_(total|completed|active|pending_.*|retry.*|timeout|per_try_timeout|rx_reset"
    r"|tx_reset|cancelled|maintenance_mode|[0-9]xx|[0-9]{3})|upstream_cx_(total|active|connect_fail|connect_timeout"
    r"|overflow|none_healthy|pool_overflow|destroy.*)|circuit_breakers\..*|outlier_detection\..*|membership_.*"
    r"|health_check\..*|update_.*|assignment_.*|init_fetch_timeout|version)$"
)
_HTTP_STATS = (
    r"^http\.[^.]+\.(downstream_rq_(total|active|[0-9]xx|timeout|rx_reset|tx_reset|overload_close)"
    r"|downstream_cx_(total|active)|no_route|no_cluster|rds\..*|rbac\..*|jwt_authn\..*|lua\..*|modelgw_.*)$"
)


def _stats_config() -> dict[str, Any]:
    patterns: list[dict[str, Any]] = [
        {"prefix": prefix} for prefix in ("cluster_manager.", "listener_manager.", "server.", "runtime.")
    ]
    patterns += [{"safe_regex": {"regex": _CLUSTER_STATS}}, {"safe_regex": {"regex": _HTTP_STATS}}]
    return {"stats_matcher": {"inclusion_list": {"patterns": patterns}}}


def _overload() -> dict[str, Any]:
    # a bound on client connections (Envoy warns at start without one)
    return {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
            "max_active_downstream_connections": 100_000,
        },
    }]}


def inline_clusters(resources: Resources) -> list[dict[str, Any]]:
    """The model clusters with their endpoints inline (STATIC): the clusters file holds
    everything. Not a file per cluster (EDS): Envoy opens an inotify instance for every
    file it watches, and the kernel's per-user limit (fs.inotify.max_user_instances, 128
    by default) made Envoy abort at about 60 model versions. An endpoint change rewrites
    its cluster; Envoy replaces only the clusters whose content changed."""
    out = []
    for cluster in resources.clusters:
        assignment = dict(resources.endpoints[cluster["name"]])
        assignment.pop("@type", None)
        out.append({**cluster, "load_assignment": assignment})
    return out


def cluster_resources(resources: Resources) -> list[dict[str, Any]]:
    """The clusters file's resources (CDS): inline_clusters, typed."""
    return [{"@type": TYPE + "envoy.config.cluster.v3.Cluster", **cluster} for cluster in inline_clusters(resources)]


def static_config(
    settings: EnvoySettings, auth: AuthConfig | None, jwks: Mapping[str, Jwks], resources: Resources
) -> dict[str, Any]:
    """Everything inline (STATIC clusters with their endpoints, routes in the listener): the
    same configuration as the files give, in one document `envoy --mode validate` checks."""
    routes = {k: v for k, v in resources.routes.items() if k != "@type"}
    clusters = inline_clusters(resources)
    return {
        "node": {"id": "modelgw", "cluster": "modelgw"},
        "admin": _admin(settings),
        "static_resources": {
            "listeners": listeners(settings, auth, jwks, {"route_config": routes}),
            "clusters": static_clusters(settings, auth, jwks) + clusters,
        },
    }


def discovery_document(resources: list[dict[str, Any]], version: int) -> dict[str, Any]:
    """A file subscription's content: a DiscoveryResponse."""
    return {"version_info": str(version), "resources": resources}
