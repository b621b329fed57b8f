"""The one conditional write of the registry: read, check, transaction, bounded retry.

Every write of a record (apply and delete of models and runtimes, a runtime's status) is

    written = await conditional_write(etcd, "models/resnet", key, expected_revision, plan,
                                      reads=[ops.get(runtime_key)])

which, on each attempt, reads the record and `reads` in one transaction, checks the
writer's expected revision (ConflictError), asks `plan(read)` what to write (it raises
ValidationError / IntegrityError / NotFoundError against what was read, or returns None when
there is nothing to write), and commits `plan`'s operations guarded by the record's revision
just read plus `plan`'s own guards (the revisions of what it depends on), so integrity is
checked inside the same transaction as the write. When a guard fails someone wrote in
between: read again, at most MAX_ATTEMPTS times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aetcd import rpc

from modelgw.registry import etcd as ops
from modelgw.registry.errors import ConflictError, NotFoundError
from modelgw.registry.etcd import Etcd

# Writes without an expected revision retry when another writer slipped in between their
# read and their transaction; this bounds the retries under heavy contention.
MAX_ATTEMPTS = 16


@dataclass(frozen=True)
class Read:
    """What one attempt read: the record (None: absent), the responses of the extra reads
    in their order, and the etcd revision all of it was read at."""

    current: rpc.KeyValue | None
    responses: Sequence[rpc.ResponseOp]
    revision: int

    def kv(self, index: int) -> rpc.KeyValue | None:
        """The first kv of extra read `index` (a single-key get), or None."""
        return first(self.responses[index])

    def kvs(self, index: int) -> Sequence[rpc.KeyValue]:
        """Every kv of extra read `index` (a prefix get)."""
        return self.responses[index].response_range.kvs


@dataclass(frozen=True)
class Write:
    """What an attempt writes, and what else must be unchanged since its read."""

    operations: list[rpc.RequestOp]
    guards: list[rpc.Compare] = field(default_factory=list)


@dataclass(frozen=True)
class Written:
    """The outcome: the record as read before the write (None: it did not exist), the etcd
    revision of the write (the record's own when nothing was written), and whether it was."""

    current: rpc.KeyValue | None
    revision: int
    wrote: bool

    @property
    def create_revision(self) -> int:
        return self.current.create_revision if self.current is not None else self.revision


Plan = Callable[[Read], Write | None]


async def conditional_write(
    etcd: Etcd,
    what: str,
    key: bytes,
    expected_revision: int | None,
    plan: Plan,
    *,
    reads: Sequence[rpc.RequestOp] = (),
    must_exist: bool = False,
    verb: str = "write",
) -> Written:
    """Write `key` as `plan` says, if the record is at `expected_revision` (None: whatever
    it is at, 0: absent). `must_exist`: NotFoundError when it is absent and no revision is
    expected (a delete). See the module docstring."""
    current_revision = 0
    for _ in range(MAX_ATTEMPTS):
        read = await etcd.txn(success=[ops.get(key), *reads])
        current = first(read.responses[0])
        current_revision = current.mod_revision if current else 0
        if must_exist and current is None and not expected_revision:
            raise NotFoundError(f"{what} does not exist")
        check_expected(what, expected_revision, current_revision)
        write = plan(Read(current, read.responses[1:], read.header.revision))
        if write is None:
            return Written(current, current_revision, wrote=False)
        guards = [ops.mod_revision_is(key, current_revision), *write.guards]
        written = await etcd.txn(guards, write.operations)
        if written.succeeded:
            return Written(current, written.header.revision, wrote=True)
        # the record or something it depends on changed since the read: read again
    raise ConflictError(f"{what} kept changing under this {verb} ({MAX_ATTEMPTS} attempts); retry", current_revision)


def check_expected(what: str, expected: int | None, current: int) -> None:
    """Raise ConflictError unless the record's current revision is what the writer expects."""
    if expected is None or expected == current:
        return
    if expected == 0:
        message = f"{what} already exists (revision {current}); read it and apply with that revision to change it"
    elif current == 0:
        message = f"{what} was expected at revision {expected} but no longer exists"
    else:
        message = (
            f"{what} was changed by someone else: it is at revision {current}, not {expected}; "
            "read it again and reapply your change"
        )
    raise ConflictError(message, current)


def first(response: rpc.RangeResponse | rpc.ResponseOp) -> rpc.KeyValue | None:
    """The first kv of a range response (or of a transaction's range op), or None."""
    if isinstance(response, rpc.ResponseOp):
        response = response.response_range
    return response.kvs[0] if response.kvs else None
