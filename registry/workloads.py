"""Jobs and streams in etcd, and their status (part of RegistryStore):

    result = await store.apply_job(job_spec)               # ApplyJobResponse; its model must exist
    record = await store.get_job("nightly")                # JobRecord, with its status once written
    await store.update_job_status("nightly", lambda s: setattr(s, "rows_done", 5000))
    await store.delete_job("nightly")                      # its status goes with it

Streams have the same methods (apply_stream, get_stream, list_streams, delete_stream,
put_stream_status, get_stream_status, update_stream_status).

Every write is one writes.conditional_write, as for models and runtimes (records.py):
- a job's or stream's model must exist and, when the spec pins a version, have it: the
  model's mod_revision is compared in the same transaction as the write (a model called
  by jobs or streams is in turn not deleted without force, records.delete_model);
- a status is written only while its job or stream exists (so a late write never
  resurrects the status of a deleted one);
- `update_*_status(name, mutate)` is a read-modify-write: it reads the status, lets
  `mutate` change it, and writes it only if nobody wrote in between, else reads again.
  Two writers (the job process: progress; the reconciler: phase and attempts) each
  change their own fields and never lose the other's. `mutate` may run more than once
  (once per attempt, each time on the status as just read), so it must set fields from
  what its caller knows, not from side effects of an earlier call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry import etcd as ops
from modelgw.registry.errors import CorruptRecordError, IntegrityError, NotFoundError, ValidationError
from modelgw.registry.keys import Section
from modelgw.registry.records import RecordStore, check_name, decode_all, decode_kv, outcome_of, same_record
from modelgw.registry.validation import check_job, check_job_status, check_stream, check_stream_status
from modelgw.registry.writes import Read, Write, conditional_write, first

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Workload:
    """What differs between jobs and streams in the store: everything else is shared."""

    plural: str  # "jobs": the record names' prefix in messages, and check_name's kind
    section: Section
    status_section: Section
    # the message classes (Any: their fields are read by name, and differ between the two)
    spec: Any
    status: Any
    record: Any
    check_status: Callable[[Any], None]


_JOBS = _Workload("jobs", Section.JOB, Section.JOB_STATUS, rpb.JobSpec, rpb.JobStatus, rpb.JobRecord, check_job_status)
_STREAMS = _Workload(
    "streams", Section.STREAM, Section.STREAM_STATUS, rpb.StreamSpec, rpb.StreamStatus, rpb.StreamRecord,
    check_stream_status,
)


class WorkloadStore(RecordStore):
    # ------------------------------------------------------------------ jobs

    async def apply_job(self, spec: rpb.JobSpec, expected_revision: int | None = None) -> rpb.ApplyJobResponse:
        """Create or update a job. Raises ValidationError, IntegrityError (its model does
        not exist), ConflictError (not at expected_revision)."""
        check_job(spec)
        record, outcome = await self._apply(_JOBS, spec, expected_revision)
        return rpb.ApplyJobResponse(record=record, outcome=outcome)

    async def get_job(self, name: str) -> rpb.JobRecord:
        return await self._get(_JOBS, name)

    async def list_jobs(self) -> rpb.ListJobsResponse:
        records, revision = await self._list(_JOBS)
        return rpb.ListJobsResponse(jobs=records, revision=revision)

    async def delete_job(self, name: str, expected_revision: int | None = None) -> int:
        """Delete a job and its status; returns the etcd revision of the deletion."""
        return await self._delete(_JOBS, name, expected_revision)

    async def put_job_status(self, status: rpb.JobStatus) -> int:
        """Replace a job's status (NotFoundError when the job does not exist). Writers that
        share the record with another writer want update_job_status."""
        return await self._put_status(_JOBS, status)

    async def get_job_status(self, name: str) -> rpb.JobStatus | None:
        return await self._get_status(_JOBS, name)

    async def update_job_status(self, name: str, mutate: Callable[[rpb.JobStatus], None]) -> rpb.JobStatus:
        """Read-modify-write of a job's status (see the module docstring); returns the
        status as written. NotFoundError when the job does not exist."""
        return await self._update_status(_JOBS, name, mutate)

    # ------------------------------------------------------------------ streams

    async def apply_stream(self, spec: rpb.StreamSpec, expected_revision: int | None = None) -> rpb.ApplyStreamResponse:
        """Create or update a stream. Raises ValidationError, IntegrityError (its model
        does not exist), ConflictError (not at expected_revision)."""
        check_stream(spec)
        record, outcome = await self._apply(_STREAMS, spec, expected_revision)
        return rpb.ApplyStreamResponse(record=record, outcome=outcome)

    async def get_stream(self, name: str) -> rpb.StreamRecord:
        return await self._get(_STREAMS, name)

    async def list_streams(self) -> rpb.ListStreamsResponse:
        records, revision = await self._list(_STREAMS)
        return rpb.ListStreamsResponse(streams=records, revision=revision)

    async def delete_stream(self, name: str, expected_revision: int | None = None) -> int:
        """Delete a stream and its status; returns the etcd revision of the deletion."""
        return await self._delete(_STREAMS, name, expected_revision)

    async def put_stream_status(self, status: rpb.StreamStatus) -> int:
        return await self._put_status(_STREAMS, status)

    async def get_stream_status(self, name: str) -> rpb.StreamStatus | None:
        return await self._get_status(_STREAMS, name)

    async def update_stream_status(self, name: str, mutate: Callable[[rpb.StreamStatus], None]) -> rpb.StreamStatus:
        """Read-modify-write of a stream's status (see the module docstring)."""
        return await self._update_status(_STREAMS, name, mutate)

    # ------------------------------------------------------------------ shared

    def _keys_of(self, kind: _Workload, name: str) -> tuple[bytes, bytes]:
        return self.keys.record(kind.section, name), self.keys.record(kind.status_section, name)

    def _record(self, kind: _Workload, spec: Message, revision: int, create_revision: int, status: Message | None) -> Any:
        record = kind.record(spec=spec, revision=revision, create_revision=create_revision)
        if status is not None:
            record.status.CopyFrom(status)
        return record

    def _status_of(self, kind: _Workload, kv: Any) -> Message | None:
        """A stored status, or None when absent or unreadable (a status is the writers'
        latest report, rewritten soon: a damaged one must not hide its job)."""
        if kv is None:
            return None
        try:
            return decode_kv(kv, kind.status)
        except CorruptRecordError as exc:
            log.warning("ignoring %s", exc)
            return None

    async def _apply(self, kind: _Workload, spec: Any, expected_revision: int | None) -> tuple[Any, int]:
        what = f"{kind.plural}/{spec.name}"
        key, status_key = self._keys_of(kind, spec.name)
        model_key = self.keys.model(spec.model.model)
        status: Message | None = None

        def plan(read: Read) -> Write | None:
            nonlocal status
            model_kv = read.kv(0)
            if model_kv is None:
                raise IntegrityError(
                    f"{what}: model.model: model {spec.model.model!r} does not exist (apply the model first)"
                )
            if spec.model.version:
                versions = [v.version for v in decode_kv(model_kv, rpb.ModelSpec).versions]
                if spec.model.version not in versions:
                    # as a model's format its runtime does not load: a property of the spec
                    # against the record it names (records.check_model_formats)
                    raise ValidationError(
                        f"{what}: model.version: models/{spec.model.model} has no version {spec.model.version!r} "
                        f"(versions: {', '.join(versions) or 'none'})"
                    )
            status = self._status_of(kind, read.kv(1))
            if same_record(read.current, spec):
                return None
            return Write([ops.put(key, codec.encode(spec))], [ops.mod_revision_is(model_key, model_kv.mod_revision)])

        written = await conditional_write(
            self.etcd, what, key, expected_revision, plan, reads=[ops.get(model_key), ops.get(status_key)]
        )
        record = self._record(kind, spec, written.revision, written.create_revision, status)
        return record, outcome_of(written.current, written.wrote)

    async def _get(self, kind: _Workload, name: str) -> Any:
        check_name(kind.plural, name)
        key, status_key = self._keys_of(kind, name)
        read = await self.etcd.txn(success=[ops.get(key), ops.get(status_key)])
        kv = first(read.responses[0])
        if kv is None:
            raise NotFoundError(f"{kind.plural}/{name} does not exist")
        status = self._status_of(kind, first(read.responses[1]))
        return self._record(kind, decode_kv(kv, kind.spec), kv.mod_revision, kv.create_revision, status)

    async def _list(self, kind: _Workload) -> tuple[list[Any], int]:
        specs, statuses = self.keys.of(kind.section), self.keys.of(kind.status_section)
        read = await self.etcd.txn(success=[ops.get_prefix(specs), ops.get_prefix(statuses)])
        by_name = {s.name: s for _, s in decode_all(read.responses[1].response_range.kvs, kind.status)}
        records = [
            self._record(kind, spec, kv.mod_revision, kv.create_revision, by_name.get(spec.name))
            for kv, spec in decode_all(read.responses[0].response_range.kvs, kind.spec)
        ]
        return records, read.header.revision

    async def _delete(self, kind: _Workload, name: str, expected_revision: int | None) -> int:
        check_name(kind.plural, name)
        key, status_key = self._keys_of(kind, name)
        written = await conditional_write(
            self.etcd, f"{kind.plural}/{name}", key, expected_revision,
            lambda read: Write([ops.delete(key), ops.delete(status_key)]), must_exist=True, verb="delete",
        )
        return written.revision

    async def _put_status(self, kind: _Workload, status: Any) -> int:
        kind.check_status(status)
        key, status_key = self._keys_of(kind, status.name)

        def plan(read: Read) -> Write:
            if read.kv(0) is None:
                raise NotFoundError(f"{kind.plural}/{status.name} does not exist; its status was not written")
            return Write([ops.put(status_key, codec.encode(status))], [ops.exists(key)])

        written = await conditional_write(
            self.etcd, f"status/{kind.plural}/{status.name}", status_key, None, plan, reads=[ops.get(key)]
        )
        return written.revision

    async def _get_status(self, kind: _Workload, name: str) -> Any:
        check_name(kind.plural, name)
        kv = first(await self.etcd.range(self.keys.record(kind.status_section, name)))
        return decode_kv(kv, kind.status) if kv else None

    async def _update_status(self, kind: _Workload, name: str, mutate: Callable[[Any], None]) -> Any:
        check_name(kind.plural, name)
        key, status_key = self._keys_of(kind, name)
        result: Any = None

        def plan(read: Read) -> Write | None:
            nonlocal result
            if read.kv(0) is None:
                raise NotFoundError(f"{kind.plural}/{name} does not exist; its status was not written")
            before = self._status_of(kind, read.current)
            status = kind.status()
            if before is not None:
                status.CopyFrom(before)
            mutate(status)
            status.name = name
            kind.check_status(status)
            result = status
            if status == before:
                return None
            # guarded by the status' own revision just read (conditional_write) and by the
            # job or stream still existing
            return Write([ops.put(status_key, codec.encode(status))], [ops.exists(key)])

        await conditional_write(self.etcd, f"status/{kind.plural}/{name}", status_key, None, plan, reads=[ops.get(key)])
        return result
