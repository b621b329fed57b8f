"""RegistryView: the registry held in memory and kept current by one etcd watch.

The gateway routes on it, so reads are plain attribute and dict reads, never awaits:

    view = RegistryView(store)
    await view.start()                  # first full read done (or raises UnavailableError)
    spec = view.models.get("resnet")    # ModelSpec | None
    eps = view.endpoints                # {"<runtime>/<instance>": Endpoint}
    snap = view.snapshot                # one consistent Snapshot (models, runtimes, ...)
    view.jobs, view.job_statuses        # and streams, stream_statuses: by name
    view.gateway_defaults               # GatewayDefaults | None

Each update replaces the snapshot with a new one (copy on write of the sections it
touches) and applies a whole etcd watch response at once, so a reader never sees half of
a transaction, and a Snapshot object a reader holds never changes under it. Do not
mutate what you read.

Staying current (see follow.py): one watch on the registry prefix from the snapshot's
revision (start() after stop() resumes from the last revision seen); a full resync (range
read, then a watch from its revision) when the watch breaks: after a compaction, an etcd
restart or a lost connection. While etcd is unreachable the last snapshot keeps being
served (`connected` is False) and the view reconnects with backoff by itself. `resyncs`
counts the full reads.

Subscribers learn what changed, as lists of Change (one list per applied update; a resync
yields the difference between the old and the new snapshot):

    view.subscribe(lambda changes: table.update(...))      # called synchronously
    async for changes in view.changes(): ...               # or as an async iterator
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aetcd import rpc
from google.protobuf.message import Message

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry.errors import CorruptRecordError, UnavailableError
from modelgw.registry.follow import Changes, Connected, Disconnected, Reset, follow_prefix
from modelgw.registry.keys import KIND, KINDS, ParsedKey, Section
from modelgw.registry.store import RegistryStore
from modelgw.registry.validation import GATEWAY_DEFAULTS_NAME

log = logging.getLogger(__name__)

Records = dict[str, Any]  # record name -> message, for one kind


def _empty() -> dict[Section, Records]:
    return {kind.section: {} for kind in KINDS}


@dataclass(frozen=True)
class Snapshot:
    """The registry at one etcd revision: every kind of keys.KINDS, by Section, then by
    record name (endpoints: "<runtime>/<instance>"). `snapshot.of(Section.X)` reads any
    kind; the properties are typed shortcuts for the kinds the gateway reads."""

    sections: dict[Section, Records] = field(default_factory=_empty)
    revision: int = 0

    def of(self, section: Section) -> Records:
        return self.sections[section]

    @property
    def models(self) -> dict[str, rpb.ModelSpec]:
        return self.sections[Section.MODEL]

    @property
    def runtimes(self) -> dict[str, rpb.RuntimeSpec]:
        return self.sections[Section.RUNTIME]

    @property
    def endpoints(self) -> dict[str, rpb.Endpoint]:
        return self.sections[Section.ENDPOINT]

    @property
    def statuses(self) -> dict[str, rpb.RuntimeStatus]:
        return self.sections[Section.RUNTIME_STATUS]

    @property
    def jobs(self) -> dict[str, rpb.JobSpec]:
        return self.sections[Section.JOB]

    @property
    def streams(self) -> dict[str, rpb.StreamSpec]:
        return self.sections[Section.STREAM]

    @property
    def job_statuses(self) -> dict[str, rpb.JobStatus]:
        return self.sections[Section.JOB_STATUS]

    @property
    def stream_statuses(self) -> dict[str, rpb.StreamStatus]:
        return self.sections[Section.STREAM_STATUS]

    @property
    def gateway_defaults(self) -> rpb.GatewayDefaults | None:
        """The registry-wide gateway defaults, None when none were applied."""
        return self.sections[Section.GATEWAY_DEFAULTS].get(GATEWAY_DEFAULTS_NAME)


class ChangeType(str, Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Change:
    """One record that changed. `name` is the record's name ("<runtime>/<instance>" for
    endpoints); `old` is None for a new record, `new` is None for a deleted one."""

    section: Section
    name: str
    type: ChangeType
    old: Any
    new: Any
    revision: int


Subscriber = Callable[[list[Change]], None]


class RegistryView:
    """An in-memory, always-current copy of the registry (see the module docstring)."""

    def __init__(self, store: RegistryStore, *, min_backoff: float = 0.1, max_backoff: float = 2.0) -> None:
        self._store = store
        self._keys = store.keys
        self._backoff = (min_backoff, max_backoff)
        self.snapshot = Snapshot()
        self.connected = False
        self.synced = asyncio.Event()  # set once the first full read is applied
        self._subscribers: list[Subscriber] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.resyncs = 0  # full reads done (the first one included)
        self._task: asyncio.Task[None] | None = None
        self._last_error: str | None = None

    # -- reads: plain attribute access, no awaits

    @property
    def models(self) -> dict[str, rpb.ModelSpec]:
        return self.snapshot.models

    @property
    def runtimes(self) -> dict[str, rpb.RuntimeSpec]:
        return self.snapshot.runtimes

    @property
    def endpoints(self) -> dict[str, rpb.Endpoint]:
        return self.snapshot.endpoints

    @property
    def statuses(self) -> dict[str, rpb.RuntimeStatus]:
        return self.snapshot.statuses

    @property
    def jobs(self) -> dict[str, rpb.JobSpec]:
        return self.snapshot.jobs

    @property
    def streams(self) -> dict[str, rpb.StreamSpec]:
        return self.snapshot.streams

    @property
    def job_statuses(self) -> dict[str, rpb.JobStatus]:
        return self.snapshot.job_statuses

    @property
    def stream_statuses(self) -> dict[str, rpb.StreamStatus]:
        return self.snapshot.stream_statuses

    @property
    def gateway_defaults(self) -> rpb.GatewayDefaults | None:
        return self.snapshot.gateway_defaults

    @property
    def revision(self) -> int:
        """The etcd revision the snapshot reflects (every change under the prefix up to it)."""
        return self.snapshot.revision

    def endpoints_of(self, runtime: str) -> list[rpb.Endpoint]:
        return [e for e in self.snapshot.endpoints.values() if e.runtime == runtime]

    def models_on(self, runtime: str) -> list[rpb.ModelSpec]:
        """Models with at least one version on `runtime`."""
        return [m for m in self.snapshot.models.values() if any(v.runtime == runtime for v in m.versions)]

    # -- lifecycle

    async def start(self, *, wait: bool = True, timeout: float | None = 10.0) -> RegistryView:
        """Start following etcd. With wait, return once the first full read is applied,
        raising UnavailableError if that takes longer than timeout (the view keeps trying
        in the background either way; stop() it if you give up)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-view")
        if wait:
            try:
                await asyncio.wait_for(self.synced.wait(), timeout)
            except TimeoutError:
                raise UnavailableError(
                    f"registry view: no snapshot from etcd at {self._store.endpoint} after {timeout:g}s"
                    + (f" ({self._last_error})" if self._last_error else "")
                ) from None
        return self

    async def stop(self) -> None:
        """Stop following etcd; the snapshot stays readable, and start() resumes from it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected = False

    async def __aenter__(self) -> RegistryView:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for_revision(self, revision: int, timeout: float | None = None) -> None:
        """Return once the view reflects etcd revision `revision` (e.g. that of a write
        just acknowledged under the registry prefix)."""
        if self.snapshot.revision >= revision:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, future))
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            if not future.done():
                future.cancel()
            self._waiters = [(r, f) for r, f in self._waiters if f is not future]

    # -- subscribers

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call callback(changes) after every applied update; returns an unsubscribe function.
        Callbacks run synchronously in the view's task: keep them short, never block."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    async def changes(self) -> AsyncIterator[list[Change]]:
        """Every update's changes, from the first iteration on, as an async iterator."""
        queue: asyncio.Queue[list[Change]] = asyncio.Queue()
        unsubscribe = self.subscribe(queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    # -- following etcd

    async def _run(self) -> None:
        min_backoff, max_backoff = self._backoff
        updates = follow_prefix(
            self._store.etcd,
            self._keys.root,
            since_revision=self.snapshot.revision if self.synced.is_set() else 0,  # resume after stop()
            min_backoff=min_backoff,
            max_backoff=max_backoff,
        )
        async with contextlib.aclosing(updates):
            async for update in updates:
                if isinstance(update, Reset):
                    self._reset(update.kvs.values(), update.revision)
                    self.connected = True
                elif isinstance(update, Changes):
                    self._apply(update.events, update.revision)
                elif isinstance(update, Connected):
                    self.connected = True
                elif isinstance(update, Disconnected):
                    self.connected = False
                    self._last_error = update.error
                    log.warning("registry view: etcd unreachable, serving the last snapshot: %s", update.error)

    def _decode(self, parsed: ParsedKey, kv: rpc.KeyValue) -> Message | None:
        try:
            return codec.decode(kv.value, KIND[parsed.section].message, kv.key)
        except CorruptRecordError as exc:
            log.warning("registry view: skipping %s", exc)
            return None

    def _parse(self, key: bytes) -> ParsedKey | None:
        parsed = self._keys.parse(key)
        return parsed if parsed is not None and parsed.section in KIND else None

    def _reset(self, kvs: Iterable[rpc.KeyValue], revision: int) -> None:
        sections = _empty()
        for kv in kvs:
            parsed = self._parse(kv.key)
            if parsed is not None and (message := self._decode(parsed, kv)) is not None:
                sections[parsed.section][parsed.name] = message
        old = self.snapshot
        new = Snapshot(sections, revision=revision)
        changes = []
        for section in sections:
            before, after = old.of(section), new.of(section)
            for name, message in after.items():
                if before.get(name) != message:
                    changes.append(Change(section, name, ChangeType.PUT, before.get(name), message, revision))
            for name, message in before.items():
                if name not in after:
                    changes.append(Change(section, name, ChangeType.DELETE, message, None, revision))
        self.resyncs += 1
        self._publish(new, changes)
        self.synced.set()

    def _apply(self, events: Iterable[rpc.Event], revision: int) -> None:
        snapshot = self.snapshot
        copied: dict[Section, Records] = {}  # sections copied for this update
        changes = []
        for ev in events:
            parsed = self._parse(ev.kv.key)
            if parsed is None:
                continue
            section = copied.get(parsed.section)
            if section is None:
                section = copied[parsed.section] = dict(snapshot.of(parsed.section))
            old = section.get(parsed.name)
            if ev.type == rpc.Event.PUT:
                message = self._decode(parsed, ev.kv)
                if message is None:
                    continue
                section[parsed.name] = message
                changes.append(Change(parsed.section, parsed.name, ChangeType.PUT, old, message, ev.kv.mod_revision))
            elif old is not None:
                del section[parsed.name]
                changes.append(Change(parsed.section, parsed.name, ChangeType.DELETE, old, None, ev.kv.mod_revision))
        self._publish(Snapshot({**snapshot.sections, **copied}, revision), changes)

    def _publish(self, snapshot: Snapshot, changes: list[Change]) -> None:
        self.snapshot = snapshot
        if changes:
            for callback in list(self._subscribers):
                try:
                    callback(changes)
                except Exception:
                    log.exception("registry view subscriber %r failed", callback)
        if self._waiters:
            ready = [f for r, f in self._waiters if r <= snapshot.revision]
            for future in ready:
                if not future.done():
                    future.set_result(None)
