"""Jobs through a real gateway: a 100,000-row Parquet job whose every prediction equals the
model run directly; the same job SIGKILLed twice at random points and started again,
finishing with each row exactly once; a JSONL job with malformed rows.

Everything is real: an etcd, a pytorch runtime replica registered in it, a `modelgw
gateway` process, and `modelgw job run` processes."""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gateway_helpers import Fleet, GatewayProcess, model_spec, runtime_spec, wait_model_ready, wait_until
from job_helpers import (
    apply_job,
    build_mlp,
    features,
    job_spec,
    job_status,
    results,
    row_ids,
    run_job,
    run_mlp,
    start_job,
    write_job_file,
    write_parquet,
)

from modelgw.pipelines.jobs import CHECKPOINT
from modelgw.protos import registry_pb2 as rpb

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

ROWS = 100_000
BATCH = 1024


class Deployment:
    def __init__(self, fleet: Fleet, gateway: GatewayProcess, root: Path, model: Path) -> None:
        self.fleet = fleet
        self.gateway = gateway
        self.root = root
        self.model = model
        self.ids = row_ids(ROWS)
        self.features = features(ROWS, seed=1)
        self.parquet = root / "rows.parquet"
        write_parquet(self.parquet, self.ids, self.features)
        self.scores, self.labels = run_mlp(model, self.features, BATCH)


@pytest.fixture(scope="module")
def deployment(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("jobs-gateway")
    model = build_mlp(root)
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(runtime_spec("torch", "pytorch", ["torchscript"]),
                    model_spec("mlp", "torch", "torchscript", {"1": str(model)}))
        gateway = fleet.gateway()
        fleet.replica("torch", "pytorch", "--option", "threads=1")
        wait_model_ready(gateway.grpc_url, "mlp", what=f"(logs in {root})")
        yield Deployment(fleet, gateway, root, model)
    finally:
        fleet.close()


def check_parquet_output(d: Deployment, output: Path) -> None:
    """Every input row exactly once, with the prediction the model gives it directly."""
    scored, failed = results(output)
    assert failed == []
    ids = np.array([r["id"] for r in scored])
    assert len(ids) == ROWS and len(set(ids.tolist())) == ROWS, "a row is missing or written twice"
    position = (ids - 1000) // 7  # row_ids(): id = 7 * row + 1000
    np.testing.assert_array_equal(d.ids[position], ids)
    scores = np.array([r["scores"] for r in scored], dtype=np.float32)
    np.testing.assert_array_equal(scores, d.scores[position])
    np.testing.assert_array_equal(np.array([r["label"] for r in scored]), d.labels[position])


def test_a_parquet_job_of_100k_rows_matches_the_model_run_directly(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    output = tmp_path / "out"
    spec = job_spec("score-all", d.parquet, output, gateway=d.gateway.grpc_url, batch_size=BATCH, parallelism=4,
                    id_column="id", inputs={"features": "x"})
    apply_job(d.fleet.etcd, d.fleet.prefix, spec)
    log = tmp_path / "job.log"
    assert run_job(log, "--name", "score-all", "--etcd", d.fleet.etcd, "--prefix", d.fleet.prefix) == 0, log.read_text()
    check_parquet_output(d, output)
    status = job_status(d.fleet.etcd, d.fleet.prefix, "score-all")
    assert status.phase == rpb.JobStatus.SUCCEEDED, status
    assert (status.rows_done, status.rows_total, status.rows_failed) == (ROWS, ROWS, 0)
    assert status.rows_per_second > 0
    assert status.HasField("started_at") and status.HasField("finished_at")


def _checkpoint_row(output: Path) -> int:
    try:
        return json.loads((output / CHECKPOINT).read_text())["position"]["row"]
    except (OSError, ValueError):
        return 0


def test_a_job_killed_twice_at_random_points_finishes_with_each_row_exactly_once(
        deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    output = tmp_path / "out"
    # parts of 16,384 rows (16 batches): the kills land between and inside commits
    spec = job_spec("killed", d.parquet, output, gateway=d.gateway.grpc_url, batch_size=BATCH, parallelism=4,
                    id_column="id", inputs={"features": "x"})
    job_file = write_job_file(tmp_path / "job.json", spec)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    progress = 0
    part = 16 * BATCH
    for attempt in range(2):
        # kill once the checkpoint is past a random row of the next part, after a random
        # extra moment (under a part's time on a fast machine, ~0.1 s): both kills land in
        # the first half of the rows, so the job is still running when the kill comes
        # however fast the machine is (100,000 rows can take under a second)
        threshold = rng.randrange(progress + 1, progress + part + 1)
        log = tmp_path / f"job-{attempt}.log"
        process = start_job(log, "-f", str(job_file))
        try:
            wait_until(lambda at=threshold, p=process: _checkpoint_row(output) >= at or p.poll() is not None, 120,
                       f"job never got past row {threshold} (seed {seed}):\n{log.read_text()}")
            time.sleep(rng.random() * 0.05)
            assert process.poll() is None, f"the job ended before it was killed (seed {seed}):\n{log.read_text()}"
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait()
        progress = _checkpoint_row(output)
        assert progress < ROWS, f"seed {seed}: killed after it finished"
    # what a crash leaves: a temp file and a part renamed into place before its checkpoint
    (output / ".tmp-part-000000099999.parquet-abc").write_bytes(b"half")
    stray = output / "part-000000099999.parquet"
    stray.write_bytes(b"not listed")
    log = tmp_path / "job-last.log"
    assert run_job(log, "-f", str(job_file)) == 0, log.read_text()
    assert "resuming at row" in log.read_text()
    assert not stray.exists() and not list(output.glob(".tmp-*"))
    check_parquet_output(d, output)


def test_a_jsonl_job_reports_malformed_rows_and_scores_the_rest(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    rows = 3000
    values = features(rows, seed=5)
    bad = {17: "{not json", 400: json.dumps({"key": "k400", "features": [1.0, 2.0]}),
           1234: json.dumps({"key": "k1234", "features": "eight floats"}),
           2999: json.dumps({"key": "k2999"}), 2000: "[1, 2, 3]"}
    path = tmp_path / "rows.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            f.write((bad[i] if i in bad else json.dumps({"key": f"k{i}", "features": values[i].tolist()})) + "\n")
            if i == 10:
                f.write("\n")  # a blank line is not a row
    output = tmp_path / "out"
    spec = job_spec("jsonl", path, output, gateway=d.gateway.grpc_url, batch_size=256, id_column="key")
    apply_job(d.fleet.etcd, d.fleet.prefix, spec)
    log = tmp_path / "job.log"
    assert run_job(log, "--name", "jsonl", "--etcd", d.fleet.etcd, "--prefix", d.fleet.prefix) == 0, log.read_text()

    scored, failed = results(output)
    errors = {f["row"]: f["error"] for f in failed}
    assert sorted(errors) == sorted(bad), errors
    assert "line 19" in errors[17] and "not valid JSON" in errors[17]  # line numbers count the blank line
    assert "'features'" in errors[400] and "shape [2]" in errors[400]
    assert "'features'" in errors[1234] and "not numbers" in errors[1234]
    assert "'features'" in errors[2999] and "missing" in errors[2999]
    assert "object" in errors[2000]
    assert {f["key"] for f in failed if f["row"] != 17 and f["row"] != 2000} == {"k400", "k1234", "k2999"}

    good = [i for i in range(rows) if i not in bad]
    assert [r["key"] for r in scored] == [f"k{i}" for i in good]
    expected_scores, expected_labels = run_mlp(d.model, values[good], len(good))
    np.testing.assert_allclose(np.array([r["scores"] for r in scored], np.float32), expected_scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal([r["label"] for r in scored], expected_labels)

    status = job_status(d.fleet.etcd, d.fleet.prefix, "jsonl")
    assert status.phase == rpb.JobStatus.SUCCEEDED
    assert (status.rows_done, status.rows_total, status.rows_failed) == (rows, rows, len(bad))
    assert {f.row: f.error for f in status.failures} == errors
    assert {f.row_id for f in status.failures} >= {"k400", "k1234", "k2999"}


def test_max_failed_rows_stops_the_job_as_failed(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"features": [0.5] * 8 if i % 10 else "bad"}) + "\n" for i in range(100)))
    spec = job_spec("too-many", path, tmp_path / "out", gateway=d.gateway.grpc_url, batch_size=10, max_failed_rows=3)
    apply_job(d.fleet.etcd, d.fleet.prefix, spec)
    log = tmp_path / "job.log"
    assert run_job(log, "--name", "too-many", "--etcd", d.fleet.etcd, "--prefix", d.fleet.prefix) == 1, log.read_text()
    status = job_status(d.fleet.etcd, d.fleet.prefix, "too-many")
    assert status.phase == rpb.JobStatus.FAILED
    assert "max_failed_rows (3)" in status.message and "'features'" in status.message
    assert status.rows_failed == 10 and status.HasField("finished_at")
