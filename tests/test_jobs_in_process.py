"""Jobs that load their model in process (ModelCall IN_PROCESS), the caller's row
failures (conversion, bisection of a rejected batch, a model's batch limit) on the
runtime SDK's real repository and servicer, and bad job specs answered with errors a
person can act on. `modelgw job run` runs as a real process; the registry is a real etcd."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from gateway_helpers import apply as apply_records
from gateway_helpers import model_spec, runtime_spec
from job_helpers import apply_job, job_spec, job_status, results, run_job, write_job_file, write_parquet

from modelgw.pipelines.caller import CallError, LocalModel, open_caller
from modelgw.protos import registry_pb2 as rpb

IN_PROCESS = rpb.ModelCall.IN_PROCESS
PICKY = "tests.job_helpers:Picky"


async def caller_for(cls: str, **call: object):
    return await open_caller(rpb.ModelCall(model="m", mode=IN_PROCESS, **call), local=LocalModel("m", "1", "python", cls))


async def test_rows_the_model_rejects_are_found_by_bisection_and_the_rest_scored() -> None:
    caller = await caller_for(PICKY)
    try:
        rows = [{"x": [float(i), 1.0]} for i in range(100)]
        for bad in (3, 64, 65, 99):
            rows[bad]["x"][0] = -1.0
        results = await caller.infer_rows(rows, ids=[f"id{i}" for i in range(100)])
        failed = {i for i, r in enumerate(results) if r.error is not None}
        assert failed == {3, 64, 65, 99}
        assert "row id64" in results[64].error and "must not be negative" in results[64].error
        for i, r in enumerate(results):
            if i not in failed:
                np.testing.assert_array_equal(r.outputs["y"], np.array([2.0 * i, 2.0], np.float32))
    finally:
        await caller.aclose()


async def test_rows_that_do_not_fit_the_metadata_fail_alone_naming_the_input() -> None:
    caller = await caller_for(PICKY)
    try:
        rows = [{"x": [1, 2]}, {"x": [1, 2, 3]}, {"x": "ab"}, {"x": None}, {"y": [1, 2]}, {"x": [[1, 2]]}]
        results = await caller.infer_rows(rows)
        assert results[0].error is None
        np.testing.assert_array_equal(results[0].outputs["y"], [2, 4])
        assert "input 'x' has shape [3], expected [2]" in results[1].error and "row 1" in results[1].error
        assert "input 'x'" in results[2].error and "not numbers for FP32" in results[2].error
        assert "input 'x' is missing" in results[3].error
        assert "input 'y' is unknown" in results[4].error
        assert "input 'x' has shape [1, 2]" in results[5].error
    finally:
        await caller.aclose()


async def test_a_batch_too_big_for_the_model_is_split_to_the_size_that_works() -> None:
    caller = await caller_for("tests.job_helpers:Small")
    try:
        results = await caller.infer_rows([{"x": [i, 0]} for i in range(50)])
        assert all(r.error is None for r in results)
        assert [float(r.outputs["y"][0]) for r in results] == [i + 1.0 for i in range(50)]
        assert caller.max_rows is not None and caller.max_rows <= 8
        sent = caller.requests
        await caller.infer_rows([{"x": [i, 0]} for i in range(40)])
        assert caller.requests - sent == -(-40 // caller.max_rows), "the learnt limit is not used"
    finally:
        await caller.aclose()


async def test_an_unknown_output_or_model_is_refused_at_open() -> None:
    with pytest.raises(CallError) as info:
        await caller_for(PICKY, outputs=["nope"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no output 'nope'" in str(info.value)
    with pytest.raises(CallError) as info:
        await open_caller(rpb.ModelCall(model="m", mode=IN_PROCESS), local=LocalModel("m", "1", "python", "no.such:Model"))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no.such" in str(info.value)


# -- `modelgw job run` in process ----------------------------------------------------------


def test_an_in_process_job_resolves_its_model_in_the_registry(etcd_server, tmp_path: Path) -> None:
    etcd, prefix = etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    apply_records(etcd, prefix, runtime_spec("py", "python", ["python"]),
                  model_spec("picky", "py", "python", {"1": PICKY}))
    rows = 5000
    x = np.stack([np.arange(rows, dtype=np.float32), np.ones(rows, np.float32)], axis=1)
    x[[10, 4321], 0] = -5.0
    ids = np.arange(rows, dtype=np.int64) + 10
    write_parquet(tmp_path / "in.parquet", ids, x)
    output = tmp_path / "out"
    apply_job(etcd, prefix, job_spec("local", tmp_path / "in.parquet", output, mode=IN_PROCESS, model="picky",
                                     id_column="id", batch_size=500, parallelism=2))
    log = tmp_path / "job.log"
    assert run_job(log, "--name", "local", "--etcd", etcd, "--prefix", prefix) == 0, log.read_text()
    scored, failed = results(output)
    assert sorted(f["row"] for f in failed) == [10, 4321]
    assert sorted(f["id"] for f in failed) == [20, 4331]
    assert [r["id"] for r in scored] == [i + 10 for i in range(rows) if i not in (10, 4321)]
    for record in scored:
        np.testing.assert_array_equal(record["y"], 2 * x[record["id"] - 10])
    status = job_status(etcd, prefix, "local")
    assert status.phase == rpb.JobStatus.SUCCEEDED and status.rows_failed == 2 and status.rows_done == rows


def _standalone(tmp_path: Path, spec: rpb.JobSpec, *extra: str) -> tuple[int, str]:
    log = tmp_path / "job.log"
    code = run_job(log, "-f", str(write_job_file(tmp_path / "job.json", spec)),
                   "--model-uri", PICKY, "--runtime-kind", "python", *extra)
    return code, log.read_text()


def test_a_standalone_jsonl_job_with_the_model_given_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"x": [i, 0]}) + "\n" for i in range(300)))
    spec = job_spec("cli", path, tmp_path / "out", mode=IN_PROCESS, model="picky", batch_size=64)
    code, log = _standalone(tmp_path, spec)
    assert code == 0, log
    scored, failed = results(tmp_path / "out")
    assert failed == [] and [r["row"] for r in scored] == list(range(300))
    assert [r["y"] for r in scored] == [[2.0 * i, 0.0] for i in range(300)]


@pytest.mark.parametrize("case", ["unknown input", "missing column", "bad field", "no input file", "checkpoint of another input"])
def test_a_bad_job_spec_fails_with_a_message_naming_what_to_fix(tmp_path: Path, case: str) -> None:
    table = tmp_path / "in.parquet"
    write_parquet(table, np.arange(10), np.zeros((10, 2), np.float32))
    spec = job_spec("bad", table, tmp_path / "out", mode=IN_PROCESS, model="picky", inputs={"x": "x"})
    expected = ""
    if case == "unknown input":
        spec.inputs.clear()
        spec.inputs["features"] = "x"
        expected = "no input 'features'; its inputs are: x"
    elif case == "missing column":
        spec.inputs["x"] = "pixels"
        expected = "no column 'pixels'; its columns are: id, x"
    elif case == "bad field":
        spec.batch_size = 10**9
        expected = "batch_size"
    elif case == "no input file":
        spec.input_uri = str(tmp_path / "missing.parquet")
        expected = "missing.parquet': no such file"
    else:
        other = tmp_path / "other.parquet"
        write_parquet(other, np.arange(20), np.zeros((20, 2), np.float32))
        first = job_spec("bad", other, tmp_path / "out", mode=IN_PROCESS, model="picky")
        assert _standalone(tmp_path, first)[0] == 0
        expected = "holds a checkpoint of another input"
    code, log = _standalone(tmp_path, spec)
    assert code == 1, log
    assert expected in log, log


def test_a_job_not_in_the_registry_is_not_found(etcd_server, tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    code = run_job(log, "--name", "nobody", "--etcd", etcd_server.endpoint, "--prefix", f"/modelgw-test/{uuid.uuid4().hex}/")
    assert code == 1
    assert "jobs/nobody" in log.read_text() and "not exist" in log.read_text()
