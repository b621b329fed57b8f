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
  issuers: audiences, JWKS cache, clock skew; the verified subject into x-modelgw-subject);
  RBAC per route checks the model's AccessPolicy on the verified claims; the router sends
  the request to a cluster per model version (least request, outlier detection, retries of
  resets and UNAVAILABLE within a retry budget, the model's max_in_flight as circuit
  breaker, the client's deadline capped by the model's timeout). A request without a
  version takes the traffic split as weighted clusters, hashed on x-modelgw-session when
  it is sent. Everything else on that listener (health, metadata, readiness, streams, the
  RegistryService, unknown models and versions) goes to the Python gateway, which
  authenticates and answers it as it always has.
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
    MODEL_HEADER,
    MODEL_INFER_PATH,
    UNVERSIONED_HEADER,
    VERSION_HEADER,
    lua_source,
    version_source,
)
from modelgw.gateway.routing import ModelRoute, RoutingTable
from modelgw.oip.protocol import MAX_MESSAGE_BYTES, SESSION_HEADER, SUBJECT_HEADER

TYPE = "type.googleapis.com/"
JWT_FILTER = "envoy.filters.http.jwt_authn"
RBAC_FILTER = "envoy.filters.http.rbac"
JWT_PAYLOAD = "jwt_payload"  # where jwt_authn puts a verified token's claims (dynamic metadata)
GRPC_ROUTES = "grpc"  # the RDS route configuration's name
PYTHON_GRPC = "modelgw_python_grpc"
PYTHON_HTTP = "modelgw_python_http"
ENVOY_ADMIN = "modelgw_envoy_admin"
ENVOY_METRICS_PATH = "/metrics/envoy"
# requirement names of the jwt_authn filter (per route)
TOKEN = "token"
TOKEN_OR_NONE = "token_or_none"


class EnvoyConfigError(ValueError):
    """The configuration cannot be expressed for Envoy; the message says what to change."""


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
    retries: int = 2  # at most 3 attempts, as the Python proxy
    retry_budget_percent: float = 20.0
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


def model_cluster(
    name: str, route: ModelRoute, version: str, settings: EnvoySettings, eds: dict[str, Any] | None
) -> dict[str, Any]:
    """A version's cluster: least request over its ready replicas, ejection of failing
    ones, the model's in-flight cap as the circuit breaker, a retry budget. `eds`: the
    config source its endpoints come from (None: inline, for static configs)."""
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
            "retry_budget": {"budget_percent": {"value": settings.retry_budget_percent}, "min_retry_concurrency": 3},
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
    }
    if eds is None:
        cluster["type"] = "STATIC"
    else:
        cluster["type"] = "EDS"
        cluster["eds_cluster_config"] = {"eds_config": eds, "service_name": name}
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


def route_rbac(route: ModelRoute, auth: AuthConfig) -> dict[str, Any] | None:
    """The per-route RBAC config of a model with an access policy (None: any verified
    caller, or a public model)."""
    spec = route.spec
    if not spec.HasField("access") or spec.access.public:
        return None
    principals = [p for p in (policy_principal(spec.access, i) for i in auth.issuers) if p is not None]
    if not principals:
        return None
    return {
        "@type": TYPE + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        "rbac": {"rules": {"action": "ALLOW", "policies": {
            "access-policy": {"permissions": [{"any": True}], "principals": principals},
        }}},
    }


def _per_route_auth(route: ModelRoute, auth: AuthConfig | None) -> dict[str, Any]:
    if auth is None:
        return {}
    public = route.spec.HasField("access") and route.spec.access.public
    config: dict[str, Any] = {
        JWT_FILTER: {"@type": TYPE + "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
                     "requirement_name": TOKEN_OR_NONE if public else TOKEN},
    }
    rbac = route_rbac(route, auth)
    if rbac is not None:
        config[RBAC_FILTER] = rbac
    return config


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


def model_routes(route: ModelRoute, settings: EnvoySettings, auth: AuthConfig | None) -> list[dict[str, Any]]:
    """A model's routes: one per named version, then one for requests naming none."""
    name = route.spec.name
    per_filter = _per_route_auth(route, auth)
    model_match = {"name": MODEL_HEADER, "string_match": {"exact": name}}
    out = []
    for version in route.versions:
        action = {"cluster": cluster_name(name, version), **_route_action(route, settings)}
        out.append({
            "name": f"{name}/{version}",
            "match": {"path": MODEL_INFER_PATH, "headers": [
                model_match, {"name": VERSION_HEADER, "string_match": {"exact": version}},
            ]},
            "route": action,
            "typed_per_filter_config": per_filter,
            "request_headers_to_remove": [MODEL_HEADER, VERSION_HEADER, UNVERSIONED_HEADER],
        })
    weights = split_weights(route)
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
            "typed_per_filter_config": per_filter,
            # the version's upstream filter reads (and drops) the unversioned mark
            "request_headers_to_remove": [MODEL_HEADER, VERSION_HEADER]
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
    routes: list[dict[str, Any]] = []
    for name in sorted(table.routes):
        route = table.routes[name]
        if not admitted_by_envoy(route, tenant_defaults):
            continue
        for version in route.versions:
            cluster = cluster_name(name, version)
            resources.clusters.append(model_cluster(cluster, route, version, settings, eds={}))
            resources.endpoints[cluster] = load_assignment(cluster, endpoints_of(route, version, resources.skipped))
        routes.extend(model_routes(route, settings, auth))
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
            "forward": False,  # the token stays here: runtimes get the verified subject
            "payload_in_metadata": JWT_PAYLOAD,
            "claim_to_headers": [{"header_name": SUBJECT_HEADER, "claim_name": issuer.subject_claim}],
            "clock_skew_seconds": int(issuer.leeway_seconds),
            "require_expiration": True,  # as the Python verifier: a token without exp is refused
        }
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
    token_or_none = {"requires_any": {"requirements": [any_issuer, {"allow_missing": {}}]}}
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "requirement_map": {TOKEN: any_issuer, TOKEN_OR_NONE: token_or_none},
        },
    }


def _router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router",
            "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"}}


def _hcm(stat_prefix: str, routes: dict[str, Any], filters: list[dict[str, Any]], settings: EnvoySettings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [*filters, _router()],
        # a client's x-request-id is kept (passed on to the runtime), one is made otherwise
        "preserve_external_request_id": True,
        # room for the largest token accepted plus the usual headers, as the Python listeners
        "max_request_headers_kb": max(60, -(-settings.max_header_bytes // 1024)),
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "common_http_protocol_options": {"headers_with_underscores_action": "ALLOW"},
        **routes,
    }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


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
        filters.append(jwt_filter(auth, jwks))
        # no rules here: a route with an access policy brings its own (RBACPerRoute)
        filters.append({"name": RBAC_FILTER, "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.rbac.v3.RBAC"}})
    http_routes = {"route_config": {"name": "http", "virtual_hosts": [{"name": "modelgw", "domains": ["*"], "routes": [
        {"match": {"path": ENVOY_METRICS_PATH},
         "route": {"cluster": ENVOY_ADMIN, "prefix_rewrite": "/stats/prometheus"}},
        {"match": {"prefix": "/"}, "route": {"cluster": PYTHON_HTTP, "timeout": "0s"}},
    ]}]}}
    # the whole of a request may be buffered (the Lua filter reads a ModelInfer body)
    buffer = settings.max_message_bytes + 64 * 1024
    return [
        {
            "name": "grpc",
            "address": _socket(settings.host, settings.grpc_port),
            "per_connection_buffer_limit_bytes": buffer,
            "filter_chains": [{"filters": [_hcm("grpc", grpc_routes, filters, settings)]}],
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

    def eds(self, cluster: str) -> str:
        return f"{self.directory}/eds/{cluster}.json"


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
    }


def _overload() -> dict[str, Any]:
    # a bound on client connections (Envoy warns at start without one)
    return {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
            "max_active_downstream_connections": 100_000,
        },
    }]}


def with_eds(resources: Resources, files: Files) -> list[dict[str, Any]]:
    """The clusters with their EDS file sources filled in (compile_resources leaves them empty)."""
    out = []
    for cluster in resources.clusters:
        cluster = {"@type": TYPE + "envoy.config.cluster.v3.Cluster", **cluster}
        cluster["eds_cluster_config"] = {"eds_config": path_source(files.eds(cluster["name"])), "service_name": cluster["name"]}
        out.append(cluster)
    return out


def static_config(
    settings: EnvoySettings, auth: AuthConfig | None, jwks: Mapping[str, Jwks], resources: Resources
) -> dict[str, Any]:
    """Everything inline (STATIC clusters with their endpoints, routes in the listener): the
    same configuration as the files give, in one document `envoy --mode validate` checks."""
    routes = {k: v for k, v in resources.routes.items() if k != "@type"}
    clusters = []
    for cluster in resources.clusters:
        cluster = {k: v for k, v in cluster.items() if k != "eds_cluster_config"}
        cluster["type"] = "STATIC"
        assignment = dict(resources.endpoints[cluster["name"]])
        del assignment["@type"]
        cluster["load_assignment"] = assignment
        clusters.append(cluster)
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
