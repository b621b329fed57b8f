"""The registry's errors. Each maps to one gRPC status code (see service.py), so that the
store, the admin service, its client and the CLI all speak the same language."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every registry error; str(error) is one line a person can act on."""


class ValidationError(RegistryError):
    """A record is invalid. `problems` lists one message per field, each naming the record
    and the field, e.g. "models/resnet: versions[1].uri: ..."."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class NotFoundError(RegistryError):
    """The record does not exist."""


class ConflictError(RegistryError):
    """Optimistic concurrency failed: the record is not at the revision the writer expected.
    `current_revision` is the record's revision now (0 when it does not exist)."""

    def __init__(self, message: str, current_revision: int) -> None:
        self.current_revision = current_revision
        super().__init__(message)


class IntegrityError(RegistryError):
    """Referential integrity: a model names a runtime that does not exist, or a runtime
    still used by models is being deleted (or would drop a format they use)."""


class UnavailableError(RegistryError):
    """etcd (or the registry service) cannot be reached."""


class CorruptRecordError(RegistryError):
    """A stored value is not a valid record (written by something else, or damaged)."""


class LeaseNotFoundError(NotFoundError):
    """The lease has expired or was revoked: grant a new one and write the record again."""


class CompactedError(RegistryError):
    """A watch asked for history etcd has compacted away: list again, then watch from there."""

    def __init__(self, compact_revision: int) -> None:
        self.compact_revision = compact_revision
        super().__init__(f"revisions before {compact_revision} were compacted; list again and watch from there")
