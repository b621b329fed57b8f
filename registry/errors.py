"""The registry's errors. Each declares its gRPC status code (`code`, read by
modelgw.errors.ErrorInterceptor and by the gateway's HTTP error middleware), so that the
store, the admin service, its client and the CLI all speak the same language:

    ValidationError     INVALID_ARGUMENT     the message names the record and field
    NotFoundError       NOT_FOUND
    ConflictError       ABORTED              current revision in the message and in the
                                             trailing metadata `modelgw-current-revision`
    IntegrityError      FAILED_PRECONDITION  missing runtime / runtime still in use
    CompactedError      OUT_OF_RANGE         Watch from a compacted revision: list again
    UnavailableError    UNAVAILABLE          etcd cannot be reached
    CorruptRecordError  DATA_LOSS
"""

from __future__ import annotations

import grpc

CURRENT_REVISION_METADATA = "modelgw-current-revision"


class RegistryError(Exception):
    """Base of every registry error; str(error) is one line a person can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ValidationError(RegistryError):
    """A record is invalid. `problems` lists one message per field, each naming the record
    and the field, e.g. "models/resnet: versions[1].uri: ..."."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class NotFoundError(RegistryError):
    """The record does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class ConflictError(RegistryError):
    """Optimistic concurrency failed: the record is not at the revision the writer expected.
    `current_revision` is the record's revision now (0 when it does not exist)."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, message: str, current_revision: int) -> None:
        self.current_revision = current_revision
        super().__init__(message)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((CURRENT_REVISION_METADATA, str(self.current_revision)),)


class IntegrityError(RegistryError):
    """Referential integrity: a model names a runtime that does not exist, or a runtime
    still used by models is being deleted (or would drop a format they use)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(RegistryError):
    """etcd (or the registry service) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class CorruptRecordError(RegistryError):
    """A stored value is not a valid record (written by something else, or damaged)."""

    code = grpc.StatusCode.DATA_LOSS


class LeaseNotFoundError(NotFoundError):
    """The lease has expired or was revoked: grant a new one and write the record again."""


class CompactedError(RegistryError):
    """A watch asked for history etcd has compacted away: list again, then watch from there."""

    code = grpc.StatusCode.OUT_OF_RANGE

    def __init__(self, compact_revision: int) -> None:
        self.compact_revision = compact_revision
        super().__init__(f"revisions before {compact_revision} were compacted; list again and watch from there")


# the client's way back: a status -> the error to raise (the inverse of the `code`s above;
# ABORTED and OUT_OF_RANGE carry more than a message and are rebuilt by the client itself)
ERROR_OF_CODE: dict[grpc.StatusCode, type[RegistryError]] = {
    cls.code: cls
    for cls in (ValidationError, NotFoundError, IntegrityError, UnavailableError, CorruptRecordError)
}
ERROR_OF_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = UnavailableError
