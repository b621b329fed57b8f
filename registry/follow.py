"""Follow a key range of etcd for as long as it takes: a full read, then one watch from
the read's revision (or from a revision the caller's state already reflects, to resume).

A full read again (a resync) whenever that watch breaks: after a compaction of the revision
it needed, when etcd's revision is behind ours (restored from a backup), and after the
connection broke. A broken connection is told apart unreliably (a stopping etcd ends
streams with INTERNAL as well as UNAVAILABLE), and what comes back may be a restored or
replaced data dir; a resync is one range read, and it makes the state exactly etcd's.
Retries back off with jitter while etcd cannot be reached.

It yields:

    Reset(kvs, revision)    the whole range as of revision: replace what you have
    Changes(events, rev)    the events of one watch response (whole revisions), in order
    Connected(revision)     a watch is established (after a start or an outage)
    Disconnected(error)     etcd is unreachable; following resumes by itself
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from aetcd import rpc

from modelgw.registry.errors import CompactedError, RegistryError
from modelgw.registry.etcd import Etcd
from modelgw.registry.keys import prefix_end

log = logging.getLogger(__name__)


@dataclass
class Reset:
    kvs: dict[bytes, rpc.KeyValue]
    revision: int


@dataclass
class Changes:
    events: Sequence[rpc.Event]
    revision: int


@dataclass
class Connected:
    revision: int


@dataclass
class Disconnected:
    error: str


Update = Reset | Changes | Connected | Disconnected


async def follow_prefix(
    etcd: Etcd,
    prefix: bytes,
    *,
    since_revision: int = 0,
    prev_kv: bool = False,
    min_backoff: float = 0.1,
    max_backoff: float = 2.0,
) -> AsyncIterator[Update]:
    """Yield updates for every key under prefix, forever (cancel the consumer to stop).
    since_revision: the revision a consumer's state already reflects, to resume from
    (0: start with a full read)."""
    end = prefix_end(prefix)
    revision = since_revision  # the revision our state reflects; 0 means a full read is needed
    backoff = min_backoff
    disconnected = False
    while True:
        try:
            if revision == 0:
                response = await etcd.range(prefix, end)
                revision = response.header.revision
                yield Reset({kv.key: kv for kv in response.kvs}, revision)
            watch = etcd.watch(prefix, end, start_revision=revision + 1, prev_kv=prev_kv, progress_notify=True)
            async with contextlib.aclosing(watch) as responses:
                async for response in responses:
                    if response.created:
                        if response.header.revision < revision:
                            # etcd's history is behind ours (restored): our state may be wrong
                            log.warning(
                                "etcd is at revision %d, behind the %d we saw: full resync",
                                response.header.revision,
                                revision,
                            )
                            revision = 0
                            break
                        backoff, disconnected = min_backoff, False
                        yield Connected(revision)
                    elif response.events:
                        # header.revision may run ahead of these events while the watch catches
                        # up, so progress is the last event's revision, not the header's
                        revision = response.events[-1].kv.mod_revision
                        yield Changes(response.events, revision)
                    else:  # progress notification: nothing changed up to header.revision
                        revision = max(revision, response.header.revision)
        except CompactedError as exc:
            log.info("watch of %r from revision %d: %s; full resync", prefix, revision + 1, exc)
            revision = 0
        except RegistryError as exc:
            revision = 0  # read everything again once etcd answers
            if not disconnected:
                disconnected = True
                yield Disconnected(str(exc))
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, max_backoff)
