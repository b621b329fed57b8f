"""The routing table: model name -> versions, traffic split and ready replicas.

Rebuilt from registry snapshots (models, runtimes and endpoints) whenever the watch cache
says something changed; requests only read it. Picking a replica is a dict lookup, a
weighted version choice and a power-of-two-choices draw on outstanding requests, all
without awaiting anything.

Versions served by an LLM runtime (kind `llm`) are picked by load instead (`llm_load`): a
stream holds a replica for seconds and a share of its KV cache, so the replicas' own
figures (queue depth, running sequences, KV-cache use; in their endpoint records, which
the watch brings within about a second: `report_load`) count, together with what this
gateway sent since (its outstanding requests then and now). A replica with a queue or a
nearly full cache is saturated: it gets new work only when every replica is. A replica
whose busy figures are older than `stale_after` (its record is rewritten every second
while it is busy, runtimes.registration) is judged by this gateway's counts alone, as
every replica was before.

A replica whose endpoint key disappears is not always gone. When etcd was unreachable
for longer than the endpoint lease TTL, it deletes the records of every replica on its
return, and the replicas write them again within about a second under new leases. So:

- a replica whose record vanished while it was ready, and which answered a request
  successfully within the last `orphan_grace` seconds and has not failed since, keeps
  being routed to ("orphaned") for up to `orphan_grace` seconds, until its record is
  back (same key: it is a routed replica again, as if nothing happened);
- an orphan that fails a request (any failure that ejects it), or whose grace ends, is
  dropped at once;
- a replica that leaves cleanly is dropped at once: it writes its record not ready
  before it revokes its lease (runtimes.registration), so its last record says not ready;
- a replica that was not answering (none sent it a request lately, or it failed) is
  dropped at once: a crashed replica's record goes when its lease runs out, and no
  request should find it.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import grpc

from modelgw.errors import unknown_model_message, unknown_version_message
from modelgw.gateway.errors import GatewayError
from modelgw.protos import registry_pb2 as rpb

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Replica:
    """One runtime replica as the gateway sees it. Identity is the endpoint key."""

    key: str
    runtime: str
    address: str
    outstanding: int = 0
    ejected_until: float = 0.0
    failures: int = 0
    last_success: float = float("-inf")  # time.monotonic() of the last answered request
    # set while the replica's record is gone but it is still routed to (see the module
    # docstring): called on its first failure, to drop it
    on_orphan_failure: Callable[[Replica], None] | None = None
    # the load figures its record last carried, when the gateway received them
    # (time.monotonic()) and this gateway's outstanding requests to it at that moment
    load: rpb.LoadFigures | None = None
    load_seen: float = float("-inf")
    load_outstanding: int = 0

    def report_load(self, load: rpb.LoadFigures, now: float) -> None:
        """The figures of a record just received (an LLM replica's: queue, running, KV use)."""
        self.load = load
        self.load_seen = now
        self.load_outstanding = self.outstanding

    def available(self, now: float) -> bool:
        return self.ejected_until <= now

    def answering(self, now: float, within: float) -> bool:
        """Whether it answered a request within `within` seconds and has not failed since."""
        return self.failures == 0 and self.ejected_until <= now and now - self.last_success <= within

    def eject(self, base_seconds: float = 2.0, max_seconds: float = 30.0) -> bool:
        """Take the replica out of rotation, for longer after each consecutive failure.
        Failures of requests that were in flight together count once: False when the
        replica is already ejected."""
        now = time.monotonic()
        if self.on_orphan_failure is not None:
            drop, self.on_orphan_failure = self.on_orphan_failure, None
            drop(self)
        if self.ejected_until > now:
            return False
        self.failures += 1
        self.ejected_until = now + min(max_seconds, base_seconds * 2 ** (self.failures - 1))
        return True

    def succeeded(self) -> None:
        self.last_success = time.monotonic()
        if self.failures:
            self.failures = 0
            self.ejected_until = 0.0


# a replica whose KV cache is this full is saturated: its next sequence would likely queue
SATURATED_KV_USAGE = 0.95
LLM_KIND = "llm"


def llm_load(replica: Replica, now: float, stale_after: float) -> tuple[bool, float]:
    """(saturated, estimated load) of an LLM replica; the least is picked.

    Fresh figures: the sequences it runs and queues, plus the requests this gateway sent it
    since the figures were taken (they are not in them yet; other gateways' are), never
    less than this gateway's own outstanding count; the KV-cache use breaks ties. A
    replica with requests waiting, or its cache nearly full, is saturated. Stale busy
    figures (its record stopped being rewritten; runtimes rewrite it every second while
    busy) or none: this gateway's outstanding count only. An idle replica's figures are
    not rewritten while they stay zero, so old zero figures mean idle, not stale."""
    load = replica.load
    if load is None or ((load.running or load.queue_depth) and now - replica.load_seen > stale_after):
        return False, float(replica.outstanding)
    sent_since = replica.outstanding - replica.load_outstanding
    estimate = max(float(replica.outstanding), load.running + load.queue_depth + max(0, sent_since))
    saturated = load.queue_depth > 0 or load.kv_cache_usage >= SATURATED_KV_USAGE
    return saturated, estimate + load.kv_cache_usage


@dataclass
class ModelRoute:
    spec: rpb.ModelSpec
    versions: tuple[str, ...]
    # cumulative traffic weights but the last; bisect_right(thresholds, p) indexes versions
    thresholds: list[int]
    threshold_versions: list[str]
    replicas: dict[str, list[Replica]] = field(default_factory=dict)
    runtimes: dict[str, str] = field(default_factory=dict)  # version -> runtime
    llm_versions: frozenset[str] = frozenset()  # versions served by an LLM runtime: picked by load
    per_tenant: bool = False  # the spec declares per-tenant limits (gateway/limits.py)

    @property
    def llm(self) -> bool:
        """Whether any version of the model is served by an LLM runtime."""
        return bool(self.llm_versions)

    def choose_version(self, requested: str, sticky_key: str | None) -> str:
        if requested:
            if requested not in self.runtimes:
                raise GatewayError(
                    grpc.StatusCode.NOT_FOUND,
                    unknown_version_message(
                        self.spec.name, requested,
                        f"model '{self.spec.name}' has no version '{requested}'; versions: {', '.join(self.versions)}",
                    ),
                )
            return requested
        return self.threshold_versions[bisect.bisect_right(self.thresholds, self._point(sticky_key))]

    def _point(self, sticky_key: str | None) -> int:
        """A point in [0, 100) of the traffic split: the session key's hash, else random."""
        if sticky_key is None:
            return random.randrange(100)
        digest = hashlib.blake2b(f"{self.spec.name}\0{sticky_key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % 100

    def split(self) -> list[tuple[str, int]]:
        """(version, percent) of the traffic split for requests that name no version."""
        lows = [0, *self.thresholds]
        highs = [*self.thresholds, 100]
        return [(v, hi - lo) for v, lo, hi in zip(self.threshold_versions, lows, highs, strict=True)]

    def live_split(self) -> list[tuple[str, int]]:
        """The split's versions that have replicas, with their percents (no longer summing
        to 100 when a version has none)."""
        return [(version, weight) for version, weight in self.split() if self.replicas.get(version)]

    def fallback_version(self, sticky_key: str | None) -> str | None:
        """For a request that named no version, when the split chose a version no replica
        serves: another version of the split that has replicas, by the split's weights among
        them (a version whose runtime is gone does not take its share of traffic down with
        it). None when no version of the split has a replica."""
        live = self.live_split()
        if not live:
            return None
        point = self._point(sticky_key) * sum(weight for _, weight in live) // 100
        for version, weight in live:
            if point < weight:
                return version
            point -= weight
        return live[-1][0]


def build_route(spec: rpb.ModelSpec) -> ModelRoute | None:
    """A route for a model spec (no replicas yet); None for a model with no versions."""
    versions = tuple(v.version for v in spec.versions)
    if not versions:
        return None
    weights = dict(spec.traffic) if spec.traffic else {versions[-1]: 100}
    cumulative: list[int] = []
    chosen: list[str] = []
    for version in versions:
        if weights.get(version, 0) > 0:
            cumulative.append((cumulative[-1] if cumulative else 0) + weights[version])
            chosen.append(version)
    if not chosen or cumulative[-1] != 100:
        # validation refuses such specs; never crash on one that slipped in
        cumulative, chosen = [100], [versions[-1]]
    # a point p in [0, 100) selects the first version whose cumulative weight exceeds p
    thresholds = cumulative[:-1]
    return ModelRoute(
        spec=spec,
        versions=versions,
        thresholds=thresholds,
        threshold_versions=chosen,
        runtimes={v.version: v.runtime for v in spec.versions},
        per_tenant=spec.limits.HasField("per_tenant"),
    )


class RoutingTable:
    """Models and replicas, rebuilt on registry changes, read by every request."""

    def __init__(self, orphan_grace: float = 10.0, load_aware: bool = True, stale_after: float = 2.0) -> None:
        self.routes: dict[str, ModelRoute] = {}
        # endpoint key -> replica (kept across rebuilds), orphans included
        self.replicas: dict[str, Replica] = {}
        # how long a replica that answers is still routed to after its record vanished:
        # well over the ~1 s its re-registration takes after an etcd outage
        self.orphan_grace = orphan_grace
        # LLM versions: pick by the replicas' load figures (False: by outstanding
        # requests, as every other model; bench/llm_routing.py compares the two)
        self.load_aware = load_aware
        # how old a busy replica's figures may be before only counts are trusted: two of
        # its rewrite intervals (1 s) while busy
        self.stale_after = stale_after
        self._models: dict[str, rpb.ModelSpec] = {}
        self._kinds: dict[str, str] = {}  # runtime name -> kind
        self._load_records: dict[str, rpb.Endpoint] = {}  # endpoint key -> record its figures came from
        self._endpoints: dict[str, rpb.Endpoint] = {}
        # endpoint key -> (its last record, time.monotonic() its grace ends)
        self._orphans: dict[str, tuple[rpb.Endpoint, float]] = {}
        self._expiry: asyncio.TimerHandle | None = None

    # -- updates (from the registry watch cache) ---------------------------------------

    @staticmethod
    def affects_routing(old: rpb.Endpoint | None, new: rpb.Endpoint | None) -> bool:
        """Whether an endpoint change needs the table rebuilt. Replicas rewrite their record
        as their load figures move (about once a second under load); those are taken by
        report_loads() without a rebuild."""
        if old is None or new is None:
            return True
        return (
            old.address != new.address
            or old.ready != new.ready
            or old.runtime != new.runtime
            or list(old.models) != list(new.models)
        )

    def report_loads(self, endpoints: Iterable[tuple[str, rpb.Endpoint]]) -> None:
        """Records (endpoint key, record) whose load figures may have moved: the replicas
        take them (no rebuild; nothing else changed)."""
        now = time.monotonic()
        for key, ep in endpoints:
            replica = self.replicas.get(key)
            if replica is not None and replica.address == ep.address:
                self._load_records[key] = ep
                replica.report_load(ep.load, now)

    def update(
        self,
        models: Iterable[rpb.ModelSpec] | None = None,
        endpoints: Mapping[str, rpb.Endpoint] | None = None,
        deleted: Mapping[str, rpb.Endpoint] | None = None,
        runtimes: Mapping[str, rpb.RuntimeSpec] | None = None,
    ) -> None:
        """Replace the known models, endpoints and/or runtimes and rebuild the routes.
        `deleted`: the last records of endpoints deleted since the previous update, when
        the caller knows them (one watch batch can carry a replica's last write, not
        ready, and its deletion); else the last record this table saw is taken.
        `runtimes`: their kinds say which versions are LLMs (picked by load)."""
        if models is not None:
            self._models = {m.name: m for m in models}
        if runtimes is not None:
            self._kinds = {name: spec.kind for name, spec in runtimes.items()}
        if endpoints is not None:
            now = time.monotonic()
            for key, last in self._endpoints.items():
                if key in endpoints:
                    continue
                last = (deleted or {}).get(key, last)
                replica = self.replicas.get(key)
                if last.ready and replica is not None and replica.answering(now, self.orphan_grace):
                    log.info(
                        "replica %s (%s): its record is gone but it answers; still routed to for up to %.0fs",
                        key, replica.address, self.orphan_grace,
                    )
                    self._orphans[key] = (last, now + self.orphan_grace)
            for key in [k for k in self._orphans if k in endpoints]:
                del self._orphans[key]
                log.info("replica %s: registered again", key)
            self._endpoints = dict(endpoints)
        self._rebuild()

    def _drop_orphan(self, replica: Replica) -> None:
        if self._orphans.pop(replica.key, None) is not None:
            log.info("replica %s (%s): failed while its record is gone; dropped", replica.key, replica.address)
            self._rebuild()

    def _expire_orphans(self) -> None:
        self._expiry = None
        self._rebuild()

    def _rebuild(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, until) in self._orphans.items() if until <= now]:
            log.info("replica %s: its record did not come back within %.0fs; dropped", key, self.orphan_grace)
            del self._orphans[key]
        endpoints = {key: ep for key, (ep, _) in self._orphans.items()}
        endpoints.update(self._endpoints)
        replicas: dict[str, Replica] = {}
        for key, ep in endpoints.items():
            replica = self.replicas.get(key)
            if replica is None or replica.address != ep.address:
                replica = Replica(key=key, runtime=ep.runtime, address=ep.address)
            if self._load_records.get(key) is not ep:  # a new record (an orphan's is not)
                self._load_records[key] = ep
                replica.report_load(ep.load, now)
            replica.on_orphan_failure = self._drop_orphan if key in self._orphans else None
            replicas[key] = replica
        self._schedule_expiry(now)
        # one pass over the endpoints: (runtime, model, version) -> replicas serving it ready
        serving: dict[tuple[str, str, str], list[Replica]] = {}
        for key, ep in endpoints.items():
            if not ep.ready:
                continue
            for m in ep.models:
                if m.state == rpb.LoadedModel.READY:
                    serving.setdefault((ep.runtime, m.name, m.version), []).append(replicas[key])
        routes: dict[str, ModelRoute] = {}
        for name, spec in self._models.items():
            route = build_route(spec)
            if route is None:
                continue
            for version, runtime in route.runtimes.items():
                route.replicas[version] = serving.get((runtime, name, version), [])
            route.llm_versions = frozenset(v for v, rt in route.runtimes.items() if self._kinds.get(rt) == LLM_KIND)
            routes[name] = route
        self.replicas = replicas
        self.routes = routes
        self._load_records = {k: ep for k, ep in self._load_records.items() if k in replicas}

    def _schedule_expiry(self, now: float) -> None:
        """A rebuild when the first orphan's grace ends (none needed without orphans)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if not self._orphans:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next update drops expired orphans
        first = min(until for _, until in self._orphans.values())
        self._expiry = loop.call_later(max(0.0, first - now) + 0.01, self._expire_orphans)

    def _why_unavailable(self, model: str, version: str, runtime: str) -> str:
        """What the registry says about a version with no ready replica (error path only)."""
        head = f"model '{model}' version '{version}' has no ready replica"
        replicas = [ep for ep in self._endpoints.values() if ep.runtime == runtime]
        if not replicas:
            return f"{head}: no replica of its runtime '{runtime}' is running"
        ready = [ep for ep in replicas if ep.ready]
        if not ready:
            return f"{head}: {len(replicas)} replica(s) of runtime '{runtime}', none ready yet"
        states = []
        for ep in ready:
            for m in ep.models:
                if m.name == model and m.version == version:
                    state = rpb.LoadedModel.State.Name(m.state).lower()
                    states.append(f"{ep.instance}: {state}" + (f" ({m.message})" if m.message else ""))
        if not states:
            return f"{head}: {len(ready)} ready replica(s) of runtime '{runtime}', none has loaded it yet"
        return f"{head} on runtime '{runtime}': " + "; ".join(states)

    # -- the hot path --------------------------------------------------------------------

    def route(self, model: str) -> ModelRoute:
        route = self.routes.get(model)
        if route is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, unknown_model_message(model, f"unknown model '{model}'"))
        return route

    def pick(
        self, model: str, version: str = "", sticky_key: str | None = None, exclude: Replica | None = None
    ) -> tuple[str, Replica]:
        """(version, replica) for a request: traffic split, then power of two choices."""
        route = self.route(model)
        chosen = route.choose_version(version, sticky_key)
        candidates = route.replicas.get(chosen, ())
        if not candidates and not version:
            fallback = route.fallback_version(sticky_key)
            if fallback is not None:
                chosen, candidates = fallback, route.replicas[fallback]
        if not candidates:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, self._why_unavailable(model, chosen, route.runtimes[chosen]))
        if len(candidates) == 1 and exclude is None:
            return chosen, candidates[0]  # nothing to choose (ejected or not: it is all there is)
        now = time.monotonic()
        healthy = [r for r in candidates if r is not exclude and r.ejected_until <= now]
        if not healthy:
            # every replica is ejected or excluded: try one anyway rather than fail outright
            healthy = [r for r in candidates if r is not exclude] or list(candidates)
        count = len(healthy)
        if count == 1:
            return chosen, healthy[0]
        if self.load_aware and chosen in route.llm_versions:
            return chosen, self._least_loaded(healthy, now)
        # power of two choices: two distinct replicas at random, the less busy one wins
        i = random.randrange(count)
        j = random.randrange(count - 1)
        a, b = healthy[i], healthy[j + (j >= i)]
        return chosen, a if a.outstanding <= b.outstanding else b

    def _least_loaded(self, replicas: list[Replica], now: float) -> Replica:
        """The LLM replica with the least estimated load, unsaturated ones first (every
        replica is looked at: an LLM fleet is a handful, and a request costs seconds);
        ties go to a random one of them, so that equal replicas share new work."""
        best: list[Replica] = []
        best_score: tuple[bool, float] | None = None
        for replica in replicas:
            score = llm_load(replica, now, self.stale_after)
            if best_score is None or score < best_score:
                best, best_score = [replica], score
            elif score == best_score:
                best.append(replica)
        return best[0] if len(best) == 1 else random.choice(best)
