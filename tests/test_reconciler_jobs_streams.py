"""The reconciler's jobs and streams (issue 13).

Pure parts first (no etcd, no processes): plan_jobs (a finished job is final, a job
applied again after a delete is a new one), job_status (the fields the reconciler owns,
the job process's kept), plan_streams and stream_status, and which status changes wake
the reconciler. Then the local backend with the real core on a real etcd: a job whose
process crashes is restarted and its attempts counted; one that keeps crashing ends
FAILED with the reason once its backoff limit is used up; a stream's replica that is
killed is restarted.

The local backend's job and stream processes are `python -P -m modelgw job|stream run ...`;
the supervision tests give the backend a stand-in interpreter (a shell script, `python`
of LocalBackend) that crashes or runs as told, because what is under test is the
supervisor, not the job: the job's own behaviour is in the end-to-end test at the end,
which runs the real `modelgw job run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from reconciler_helpers import affine, pid_alive, until, wait_gone, write_affine_models

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import JOB_EXIT_FAILED, JobWorkload, Workload, job_hash, spec_hash
from modelgw.reconciler.core import (
    Reconciler,
    job_status,
    job_status_of,
    plan_jobs,
    plan_streams,
    same_stream_status,
    stream_status,
)
from modelgw.reconciler.local import LocalBackend
from modelgw.registry.keys import Section
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import Change, ChangeType

PHASE = rpb.JobStatus
NOW = Timestamp(seconds=1000)


def job(name: str = "score", **fields) -> rpb.JobSpec:
    spec = rpb.JobSpec(name=name, input_uri="/data/in.parquet", output_uri="/data/out", **fields)
    spec.model.model = "resnet"
    return spec


def record(spec: rpb.JobSpec, revision: int = 20, create_revision: int = 10,
           status: rpb.JobStatus | None = None) -> rpb.JobRecord:
    rec = rpb.JobRecord(spec=spec, revision=revision, create_revision=create_revision)
    if status is not None:
        rec.status.CopyFrom(status)
    return rec


def stream(name: str = "feed", replicas: int = 2) -> rpb.StreamSpec:
    spec = rpb.StreamSpec(name=name, replicas=replicas)
    spec.source.broker, spec.source.topic, spec.source.group = rpb.BrokerTopic.NATS, "in", "scorer"
    spec.source.servers.append("nats://127.0.0.1:4222")
    spec.source.stream = "IN"
    return spec


# ---------------------------------------------------------------- plan_jobs


def test_a_new_job_gets_a_workload_and_one_of_its_hash_is_left_alone() -> None:
    spec = job()
    hashes = {"score": job_hash(spec, 10)}
    assert [s.name for s in plan_jobs({"score": spec}, {"score": None}, {}, hashes).ensure] == ["score"]
    running = {"score": JobWorkload(job="score", spec_hash=hashes["score"], attempts=1, active=True)}
    todo = plan_jobs({"score": spec}, {"score": PHASE(phase=PHASE.RUNNING)}, running, hashes)
    assert (todo.ensure, todo.remove) == ([], [])


def test_a_running_job_whose_spec_changed_is_replaced() -> None:
    old, new = job(), job(batch_size=64)
    observed = {"score": JobWorkload(job="score", spec_hash=job_hash(old, 10), active=True)}
    todo = plan_jobs({"score": new}, {"score": PHASE(phase=PHASE.RUNNING)}, observed, {"score": job_hash(new, 10)})
    assert [s.batch_size for s in todo.ensure] == [64]


@pytest.mark.parametrize("phase", [PHASE.SUCCEEDED, PHASE.FAILED])
def test_a_finished_job_is_final_even_when_its_spec_changes(phase: int) -> None:
    old, new = job(), job(batch_size=64)
    finished = {"score": PHASE(phase=phase, observed_revision=20)}
    # its workload gone (a local process that ended, a Kubernetes Job past its TTL) ...
    assert plan_jobs({"score": new}, finished, {}, {"score": job_hash(new, 10)}).ensure == []
    # ... or still there with the old spec: left alone, not replaced, not removed
    observed = {"score": JobWorkload(job="score", spec_hash=job_hash(old, 10), outcome=phase)}
    todo = plan_jobs({"score": new}, finished, observed, {"score": job_hash(new, 10)})
    assert (todo.ensure, todo.remove) == ([], [])


def test_the_workload_of_a_deleted_job_is_removed() -> None:
    observed = {"gone": JobWorkload(job="gone", spec_hash="abc", active=True)}
    assert plan_jobs({}, {}, observed, {}).remove == ["gone"]


def test_a_job_applied_again_after_a_delete_is_a_new_job() -> None:
    spec = job()
    # the same spec, a new record: another hash, so the old (finished) workload is not it
    assert job_hash(spec, 10) != job_hash(spec, 30)
    assert job_hash(spec, 10) == job_hash(job(), 10)
    # and the old record's status (observed before the new record was created) is not its
    stale = record(spec, revision=30, create_revision=30, status=PHASE(phase=PHASE.SUCCEEDED, observed_revision=12))
    assert job_status_of(stale) is None
    todo = plan_jobs({"score": spec}, {"score": job_status_of(stale)}, {}, {"score": job_hash(spec, 30)})
    assert [s.name for s in todo.ensure] == ["score"]
    # a status the job process wrote before the reconciler's first (no observed revision) is its own
    early = record(spec, status=PHASE(phase=PHASE.RUNNING, rows_done=5))
    assert job_status_of(early) == early.status
    current = record(spec, status=PHASE(phase=PHASE.SUCCEEDED, observed_revision=20))
    assert job_status_of(current) == current.status


# ---------------------------------------------------------------- job_status


def test_a_new_job_is_pending_with_what_the_reconciler_knows() -> None:
    status = job_status(None, record(job()), JobWorkload(job="score", spec_hash="h", attempts=1, active=True),
                        "local", NOW)
    assert status is not None
    assert (status.name, status.phase, status.attempts, status.backend, status.observed_revision) == (
        "score", PHASE.PENDING, 1, "local", 20)
    assert status.updated_at == NOW
    # written once: the same observation again changes nothing
    assert job_status(status, record(job()), JobWorkload(job="score", spec_hash="h", attempts=1, active=True),
                      "local", Timestamp(seconds=2000)) is None


def test_the_job_process_fields_are_kept() -> None:
    theirs = PHASE(name="score", phase=PHASE.RUNNING, rows_done=500, rows_total=1000, rows_per_second=42.0,
                   attempts=1, backend="local", observed_revision=20, message="scoring")
    theirs.failures.add(row_id="7", row=7, error="bad shape")
    status = job_status(theirs, record(job()), JobWorkload(job="score", spec_hash="h", attempts=2, active=True,
                                                            message="exited with code 3"), "local", NOW)
    assert status is not None
    assert (status.phase, status.rows_done, status.rows_total, status.rows_per_second) == (PHASE.RUNNING, 500, 1000, 42.0)
    assert [f.row_id for f in status.failures] == ["7"]
    assert (status.attempts, status.message) == (2, "exited with code 3")  # a restart says why, once
    # the job process then says more: the reconciler does not write its restart message over it
    status.message = "resumed at row 500"
    assert job_status(status, record(job()), JobWorkload(job="score", spec_hash="h", attempts=2, active=True,
                                                         message="exited with code 3"), "local", NOW) is None


def test_a_job_out_of_retries_fails_with_the_reason_and_then_is_final() -> None:
    running = PHASE(name="score", phase=PHASE.RUNNING, attempts=7, backend="local", observed_revision=20)
    out = JobWorkload(job="score", spec_hash="h", attempts=7, outcome=PHASE.FAILED,
                      message="failed 7 times, past its backoff_limit of 6")
    failed = job_status(running, record(job()), out, "local", NOW)
    assert failed is not None
    assert (failed.phase, failed.message, failed.finished_at) == (PHASE.FAILED, out.message, NOW)
    # final: nothing the reconciler sees later rewrites it, not even a spec change
    later = JobWorkload(job="score", spec_hash="other", attempts=9, active=True)
    assert job_status(failed, record(job(batch_size=8), revision=40), later, "local", NOW) is None


def test_a_job_seen_ending_well_succeeds_if_the_process_did_not_say_so() -> None:
    running = PHASE(name="score", phase=PHASE.RUNNING, attempts=1, backend="kubernetes", observed_revision=20)
    done = JobWorkload(job="score", spec_hash="h", attempts=1, outcome=PHASE.SUCCEEDED)
    status = job_status(running, record(job()), done, "kubernetes", NOW)
    assert status is not None and (status.phase, status.finished_at) == (PHASE.SUCCEEDED, NOW)


def test_problems_of_a_refused_job_are_its_message() -> None:
    refused = JobWorkload(job="score", spec_hash="h", problems=["jobs/score: output_uri: use pvc://CLAIM/PATH"])
    status = job_status(None, record(job()), refused, "kubernetes", NOW)
    assert status is not None and (status.phase, status.message) == (PHASE.PENDING, refused.problems[0])


def test_a_stale_status_is_started_over() -> None:
    stale = PHASE(name="score", phase=PHASE.SUCCEEDED, rows_done=10, attempts=3, observed_revision=12)
    status = job_status(stale, record(job(), revision=30, create_revision=30),
                        JobWorkload(job="score", spec_hash="h", attempts=1, active=True), "local", NOW)
    assert status is not None
    assert (status.phase, status.rows_done, status.attempts, status.observed_revision) == (PHASE.PENDING, 0, 1, 30)


def test_the_failed_for_good_exit_code_is_the_job_process_own() -> None:
    jobs = pytest.importorskip("modelgw.pipelines.jobs")
    assert jobs.EXIT_FAILED == JOB_EXIT_FAILED
    assert jobs.EXIT_RETRY != JOB_EXIT_FAILED  # interrupted: restarted, resumes


# ---------------------------------------------------------------- streams


def test_plan_streams_ensures_missing_outdated_and_misscaled_and_removes_orphans() -> None:
    feed, other = stream("feed", 2), stream("other", 0)
    hashes = {"feed": spec_hash(feed), "other": spec_hash(other)}
    assert [s.name for s in plan_streams({"feed": feed, "other": other}, {}, hashes).ensure] == ["feed", "other"]
    steady = {"feed": Workload(runtime="feed", spec_hash=hashes["feed"], replicas=2),
              "other": Workload(runtime="other", spec_hash=hashes["other"], replicas=1)}  # replicas 0: one
    assert plan_streams({"feed": feed, "other": other}, steady, hashes).ensure == []
    scaled = {**steady, "feed": Workload(runtime="feed", spec_hash=hashes["feed"], replicas=1)}
    assert [s.name for s in plan_streams({"feed": feed, "other": other}, scaled, hashes).ensure] == ["feed"]
    changed = stream("feed", 2)
    changed.batch_size = 8
    assert spec_hash(changed) != spec_hash(feed) and spec_hash(stream("feed", 5)) == spec_hash(feed)
    todo = plan_streams({"feed": changed}, steady, {"feed": spec_hash(changed)})
    assert ([s.name for s in todo.ensure], todo.remove) == (["feed"], ["other"])


def test_stream_status_counts_live_replicas_and_keeps_the_replicas_figures() -> None:
    spec = stream("feed", 2)
    one = Workload(runtime="feed", spec_hash="h", replicas=2, running=1, restarts=1, instances=frozenset({"a"}))
    ours = stream_status(spec, one, "local", 7)
    assert (ours.replicas_desired, ours.replicas_ready, ours.observed_revision) == (2, 1, 7)
    conditions = {c.type: (c.status, c.message) for c in ours.conditions}
    assert conditions["Available"] == ("False", "1 of 2 replicas ready")
    stored = rpb.StreamStatus()
    stored.CopyFrom(ours)
    stored.messages_processed, stored.consumer_lag = 1234, 5  # the replicas' own figures
    assert same_stream_status(stored, ours)  # nothing of ours changed: no write
    both = Workload(runtime="feed", spec_hash="h", replicas=2, running=2, restarts=1, instances=frozenset({"a", "b"}))
    assert not same_stream_status(stored, stream_status(spec, both, "local", 7))


async def test_only_job_and_stream_changes_that_matter_wake_the_reconciler() -> None:
    store = RegistryStore("127.0.0.1:1")  # never contacted here
    try:
        reconciler = Reconciler(store, backend=None, identity="unit")  # type: ignore[arg-type]  # _matters only

        def change(section: Section, old, new) -> Change:
            return Change(section, "x", ChangeType.DELETE if new is None else ChangeType.PUT, old, new, revision=3)

        assert reconciler._matters(change(Section.JOB, None, job()))
        assert reconciler._matters(change(Section.STREAM, None, stream()))
        running = PHASE(phase=PHASE.RUNNING, attempts=1, rows_done=10)
        progress = PHASE(phase=PHASE.RUNNING, attempts=1, rows_done=20, rows_per_second=3.0)
        assert not reconciler._matters(change(Section.JOB_STATUS, running, progress))  # progress alone
        assert reconciler._matters(change(Section.JOB_STATUS, running, PHASE(phase=PHASE.SUCCEEDED, attempts=1)))
        assert reconciler._matters(change(Section.JOB_STATUS, running, None))
        ours = stream_status(stream(), None, "local", 3)
        counted = rpb.StreamStatus()
        counted.CopyFrom(ours)
        counted.messages_processed = 99
        assert not reconciler._matters(change(Section.STREAM_STATUS, ours, counted))  # a replica's figures
        assert reconciler._matters(change(Section.STREAM_STATUS, counted, rpb.StreamStatus(name="x")))
    finally:
        await store.close()


# ---------------------------------------------------------------- the local backend, real etcd

# Stands in for the interpreter the local backend runs (`$0 -P -m modelgw job|stream run ...`):
# counts its starts, then crashes (exit 3, "interrupted": restarted), gives up (exit 1) or
# ends well as STANDIN_* in the spec's env say; `forever` runs until stopped.
STANDIN = """#!/bin/sh
n=$(( $(cat "$STANDIN_STATE/starts" 2>/dev/null || echo 0) + 1 ))
echo $n > "$STANDIN_STATE/starts"
echo "$*" > "$STANDIN_STATE/argv"
[ "$STANDIN_MODE" = forever ] && exec sleep 600
if [ $n -le "${STANDIN_CRASHES:-0}" ]; then echo "crash number $n"; exit 3; fi
echo "the end"; exit "${STANDIN_EXIT:-0}"
"""


class Local:
    """The real reconciler core with the local backend, in this process, on a real etcd."""

    def __init__(self, store: RegistryStore, backend: LocalBackend, reconciler: Reconciler) -> None:
        self.store, self.backend, self.reconciler = store, backend, reconciler

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.backend.log_dir.glob("*.log")))

    async def job_status(self, name: str) -> rpb.JobStatus | None:
        got = await self.store.get_job(name)
        return got.status if got.HasField("status") else None


@contextlib.asynccontextmanager
async def running_reconciler(etcd: str, prefix: str, tmp_path: Path, python: str) -> AsyncIterator[Local]:
    store = RegistryStore(etcd, prefix=prefix)
    backend = LocalBackend(etcd, prefix, log_dir=tmp_path / "logs", lease_ttl=3, stop_grace=5.0, python=python)
    reconciler = Reconciler(store, backend, f"test-{uuid.uuid4().hex[:6]}", resync_seconds=0.5, lease_ttl=3)
    task = asyncio.ensure_future(reconciler.run())
    try:
        yield Local(store, backend, reconciler)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


@pytest.fixture
async def local(etcd_server, etcd_prefix: str, tmp_path: Path) -> AsyncIterator[Local]:
    python = tmp_path / "standin-python"
    python.write_text(STANDIN)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        # the model the jobs and streams name must exist; its runtime runs no replica
        await store.apply_runtime(rpb.RuntimeSpec(name="py", kind="python", model_formats=["python"], replicas=0))
        model = rpb.ModelSpec(name="resnet")
        model.versions.add(version="1", uri=str(tmp_path / "model.py"), format="python", runtime="py")
        await store.apply_model(model)
    async with running_reconciler(etcd_server.endpoint, etcd_prefix, tmp_path, str(python)) as running:
        yield running


def standin_job(name: str, state: Path, **env: str) -> rpb.JobSpec:
    state.mkdir(exist_ok=True)
    spec = job(name)
    spec.env.update({"STANDIN_STATE": str(state), **env})
    return spec


def starts(state: Path) -> int:
    path = state / "starts"
    return int(path.read_text()) if path.exists() else 0


async def test_a_crashing_job_is_restarted_and_its_attempts_counted(local: Local, tmp_path: Path) -> None:
    state = tmp_path / "crashy"
    await local.store.apply_job(standin_job("crashy", state, STANDIN_CRASHES="2"))

    async def succeeded() -> rpb.JobStatus | None:
        status = await local.job_status("crashy")
        return status if status is not None and status.phase == PHASE.SUCCEEDED else None

    status = await until(succeeded, "the job succeeded after two crashes", logs=local.logs)
    assert (status.attempts, starts(state)) == (3, 3)
    assert status.backend == "local" and status.observed_revision > 0
    assert "exited with code 3" in status.message and "crash number 2" in status.message, status.message
    argv = (state / "argv").read_text().split()
    assert argv[:6] == ["-P", "-m", "modelgw", "job", "run", "--name"] and argv[6] == "crashy"
    assert argv[7:] == ["--etcd", local.backend.etcd, "--prefix", local.backend.prefix]


async def test_a_job_that_keeps_crashing_fails_once_its_backoff_limit_is_used(local: Local, tmp_path: Path) -> None:
    state = tmp_path / "doomed"
    await local.store.apply_job(_with_limit(standin_job("doomed", state, STANDIN_CRASHES="99"), 2))

    async def failed() -> rpb.JobStatus | None:
        status = await local.job_status("doomed")
        return status if status is not None and status.phase == PHASE.FAILED else None

    status = await until(failed, "the job failed for good", logs=local.logs)
    assert (status.attempts, starts(state)) == (3, 3)  # the first start and backoff_limit (2) restarts
    assert "past its backoff_limit of 2" in status.message and "crash number 3" in status.message, status.message
    assert status.HasField("finished_at")
    # and it stays so: no process left, none started again
    (replica,) = local.backend.jobs["doomed"].group.replicas
    assert replica.finished and not replica.running
    assert starts(state) == 3


async def test_a_job_that_gives_up_by_itself_is_not_retried(local: Local, tmp_path: Path) -> None:
    state = tmp_path / "refuses"
    await local.store.apply_job(standin_job("refuses", state, STANDIN_EXIT=str(JOB_EXIT_FAILED)))

    async def failed() -> rpb.JobStatus | None:
        status = await local.job_status("refuses")
        return status if status is not None and status.phase == PHASE.FAILED else None

    status = await until(failed, "the job failed", logs=local.logs)
    assert (status.attempts, starts(state)) == (1, 1)
    assert "gave up (exit code 1)" in status.message, status.message


def _with_limit(spec: rpb.JobSpec, limit: int) -> rpb.JobSpec:
    spec.backoff_limit = limit
    return spec


async def test_a_killed_stream_replica_is_restarted(local: Local, tmp_path: Path) -> None:
    state = tmp_path / "feed"
    state.mkdir()
    spec = stream("feed", 2)
    spec.sink.topic = "out"
    spec.model.model = "resnet"
    spec.env.update({"STANDIN_STATE": str(state), "STANDIN_MODE": "forever"})
    await local.store.apply_stream(spec)

    def pids() -> list[int]:
        group = local.backend.streams.get("feed")
        return sorted(r.process.pid for r in group.replicas if r.running and r.process) if group else []

    async def ready(count: int) -> rpb.StreamStatus | None:
        got = await local.store.get_stream("feed")
        return got.status if got.status.replicas_ready == count and got.status.replicas_desired == 2 else None

    first = await until(lambda: pids() if len(pids()) == 2 else None, "two stream replicas", logs=local.logs)
    status = await until(lambda: ready(2), "both replicas ready in the status", logs=local.logs)
    assert status.backend == "local"
    argv = (state / "argv").read_text().split()
    assert argv[3:7] == ["stream", "run", "--name", "feed"] and "--replica" in argv
    assert int(argv[argv.index("--metrics-port") + 1]) > 0  # each consumer serves /metrics

    os.kill(first[0], signal.SIGKILL)
    await until(lambda: not pid_alive(first[0]), "the killed replica gone")
    after = await until(lambda: pids() if len(pids()) == 2 and first[0] not in pids() else None,
                        "the killed replica restarted", logs=local.logs)
    assert first[1] in after  # the other one untouched

    async def restarted() -> rpb.StreamStatus | None:
        status = await ready(2)
        degraded = {c.type: c.message for c in status.conditions}.get("Degraded") if status else None
        return status if degraded == "1 restart so far" else None

    await until(restarted, "the status counts the restart", logs=local.logs)
    await local.store.delete_stream("feed")
    await until(lambda: "feed" not in local.backend.streams, "the stream's replicas removed")
    assert wait_gone(after) == []


# ---------------------------------------------------------------- end to end: the real `modelgw job run`

E2E_ROWS = 100_000


async def test_a_job_sigkilled_twice_is_restarted_by_the_reconciler_and_scores_each_row_once(
        etcd_server, etcd_prefix: str, tmp_path: Path) -> None:
    """The acceptance's restart half, with the reconciler doing the restarts: a 100,000-row
    Parquet job (its model loaded in the job's process, from the registry) SIGKILLed at two
    random points ends SUCCEEDED after 3 attempts, with every input row exactly once in its
    output and each prediction equal to the model's own."""
    pytest.importorskip("pyarrow")
    from job_helpers import results, write_parquet

    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    rng = np.random.default_rng(seed)
    w, b = affine(rng)
    models = write_affine_models(tmp_path / "affine.py", {"Affine": (w, b)})
    x = rng.standard_normal((E2E_ROWS, 4)).astype(np.float32)
    ids = np.arange(E2E_ROWS, dtype=np.int64) * 3 + 7
    write_parquet(tmp_path / "rows.parquet", ids, x)
    output = tmp_path / "out"
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name="py", kind="python", model_formats=["python"], replicas=0))
        model = rpb.ModelSpec(name="affine")
        model.versions.add(version="1", uri=f"{models}:Affine", format="python", runtime="py")
        await store.apply_model(model)
        spec = rpb.JobSpec(name="rescored", input_uri=str(tmp_path / "rows.parquet"), output_uri=str(output),
                           id_column="id", batch_size=256, parallelism=2)
        spec.model.model, spec.model.mode = "affine", rpb.ModelCall.IN_PROCESS
        await store.apply_job(spec)

    async with running_reconciler(etcd_server.endpoint, etcd_prefix, tmp_path, sys.executable) as local:
        def job_pid() -> int | None:
            job = local.backend.jobs.get("rescored")
            replica = job.group.replicas[0] if job is not None and job.group.replicas else None
            return replica.process.pid if replica is not None and replica.running and replica.process else None

        progress = 0
        for kill in range(2):
            # once the checkpoint is past a random row (parts of 16,384 rows commit it)
            threshold = int(rng.integers(progress + 1, min(progress + 40_000, E2E_ROWS - 20_000)))
            await until(lambda at=threshold: _checkpoint_row(output) >= at, f"kill {kill + 1}: past row {threshold} "
                        f"(seed {seed})", timeout=180, every=0.02, logs=local.logs)
            pid = job_pid()
            assert pid is not None, f"seed {seed}: the job ended before kill {kill + 1}\n{local.logs()}"
            await asyncio.sleep(float(rng.random()) * 0.05)
            os.kill(pid, signal.SIGKILL)
            await until(lambda p=pid: not pid_alive(p), "the killed job process gone")
            progress = _checkpoint_row(output)
            assert progress < E2E_ROWS, f"seed {seed}: killed after it finished"

        async def succeeded() -> rpb.JobStatus | None:
            status = await local.job_status("rescored")
            return status if status is not None and status.phase in (PHASE.SUCCEEDED, PHASE.FAILED) else None

        status = await until(succeeded, f"the job finished (seed {seed})", timeout=240, logs=local.logs)
        assert status.phase == PHASE.SUCCEEDED, f"seed {seed}: {status}\n{local.logs()}"
        assert status.attempts == 3 and (status.rows_done, status.rows_total, status.rows_failed) == (
            E2E_ROWS, E2E_ROWS, 0), status
        assert status.backend == "local"

    scored, failed = results(output)
    assert failed == []
    got = np.array([r["id"] for r in scored])
    assert len(got) == E2E_ROWS and len(set(got.tolist())) == E2E_ROWS, f"seed {seed}: a row missing or twice"
    position = (got - 7) // 3
    y = np.array([r["y"] for r in scored], dtype=np.float32)
    np.testing.assert_allclose(y, x[position] @ w + b, rtol=1e-5, atol=1e-5)


def _checkpoint_row(output: Path) -> int:
    try:
        return int(json.loads((output / "_checkpoint.json").read_text())["position"]["row"])
    except (OSError, ValueError, KeyError):
        return 0


async def test_a_stream_replica_sigkilled_is_restarted_by_the_reconciler_and_nothing_is_lost(
        etcd_server, etcd_prefix: str, tmp_path: Path) -> None:
    """The real `modelgw stream run` on a real NATS JetStream, its two replicas run by the
    reconciler: one SIGKILLed mid-stream is started again by the local backend, and every
    message's result reaches the sink once (the sink deduplicates by Nats-Msg-Id), the
    source is drained (lag 0), and the status says two replicas ready after one restart."""
    nats = pytest.importorskip("nats")
    from broker_helpers import NatsServer, expected_output, nats_stored, write_models
    from nats.js.api import AckPolicy, ConsumerConfig
    from test_streams_nats import Streams

    models = write_models(tmp_path)
    with NatsServer(tmp_path / "nats") as server:
        connection = await nats.connect(server.url)
        try:
            js = connection.jetstream()
            streams = Streams()
            await streams.create(js)
            # a short ack_wait: what the killed replica held is redelivered within a second
            await js.add_consumer(streams.source, ConsumerConfig(
                durable_name="scorers", ack_policy=AckPolicy.EXPLICIT, ack_wait=1.0, filter_subject=streams.subject))
            n = 1000
            for i in range(n):
                await js.publish(streams.subject, json.dumps({"x": [float(i)]}).encode(),
                                 headers={"Nats-Msg-Id": f"m-{i}"})
            async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
                await store.apply_runtime(rpb.RuntimeSpec(name="py", kind="python", model_formats=["python"],
                                                          replicas=0))
                model = rpb.ModelSpec(name="double")
                model.versions.add(version="1", uri=f"{models}:SlowDouble", format="python", runtime="py")
                await store.apply_model(model)
                await store.apply_stream(streams.spec("doubler", server.url, "double", replicas=2, batch_size=16,
                                                      max_in_flight=64))

            async with running_reconciler(etcd_server.endpoint, etcd_prefix, tmp_path, sys.executable) as local:
                def pids() -> list[int]:
                    group = local.backend.streams.get("doubler")
                    return sorted(r.process.pid for r in group.replicas if r.running and r.process) if group else []

                async def sink_holds(count: int) -> bool:
                    return await streams.count(js, streams.sink) >= count

                await until(lambda: sink_holds(200), "the first results", timeout=120, logs=local.logs)
                first = pids()
                assert len(first) == 2, local.logs()
                os.kill(first[0], signal.SIGKILL)
                await until(lambda: pids() if len(pids()) == 2 and first[0] not in pids() else None,
                            "the killed replica restarted by the reconciler", logs=local.logs)
                await until(lambda: sink_holds(n), "every result", timeout=180, logs=local.logs)

                async def drained() -> bool:
                    info = await js.consumer_info(streams.source, "scorers")
                    return info.num_pending == 0 and info.num_ack_pending == 0

                await until(drained, "lag 0: every message acknowledged", timeout=60, logs=local.logs)

                async def restarted() -> rpb.StreamStatus | None:
                    status = (await local.store.get_stream("doubler")).status
                    degraded = {c.type: c.message for c in status.conditions}.get("Degraded")
                    ok = (status.replicas_ready, status.replicas_desired, degraded) == (2, 2, "1 restart so far")
                    return status if ok else None

                status = await until(restarted, "the status: 2 of 2 ready, one restart", logs=local.logs)
                assert status.backend == "local"
            results = await nats_stored(js, streams.sink)
        finally:
            await connection.close()
    keys = [r.headers["modelgw-key"] for r in results]
    assert set(keys) == {f"m-{i}" for i in range(n)}, "a message lost"
    assert len(keys) == n, f"{len(keys) - len(set(keys))} duplicates in the sink"
    for r in results:
        assert json.loads(r.data) == expected_output([float(r.headers["modelgw-key"][2:])])
