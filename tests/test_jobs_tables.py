"""A job's tables on real files: reading resumes exactly where a checkpoint's position
says (JSONL by byte offset, Parquet inside a row group), and output parts keep ids,
datatypes and values, written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from job_helpers import write_parquet

from modelgw.pipelines.tables import (
    JSONL,
    PARQUET,
    Position,
    TableError,
    open_table,
    read_output,
    table_format,
    write_atomic,
    write_part,
)


def flat(chunks) -> list[tuple]:
    """(row, id, row value or error) of every row of the chunks."""
    out = []
    for chunk in chunks:
        for i, row in enumerate(chunk.rows):
            value = chunk.errors[i] if row is None else json.dumps({k: np.asarray(v).tolist() for k, v in row.items()})
            out.append((chunk.start + i, chunk.ids[i], value))
    return out


def test_jsonl_read_from_a_chunk_end_is_the_rest_of_a_full_read(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = []
    for i in range(1000):
        lines.append("oops" if i % 97 == 5 else json.dumps({"id": f"r{i}", "col": [i, -i]}))
        if i % 50 == 0:
            lines.append("   ")  # blank: not a row, but a line
    path.write_text("\n".join(lines) + "\n")
    reader = open_table(path, JSONL, {"x": "col"}, "id")
    assert reader.count_rows() == 1000
    chunks = list(reader.chunks(Position(), 64))
    full = flat(chunks)
    assert [r for r, _, _ in full] == list(range(1000))
    assert full[5][2].startswith("line 7: not valid JSON")  # a blank line after row 0
    for cut in (1, 7, len(chunks) - 1):
        assert flat(reader.chunks(chunks[cut - 1].end, 64)) == full[cut * 64:]


def test_parquet_read_from_any_position_is_the_rest_of_a_full_read(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    values = np.random.default_rng(0).standard_normal((1000, 3)).astype(np.float32)
    write_parquet(path, np.arange(1000) + 5, values, row_group_size=128)
    reader = open_table(path, PARQUET, {"x": "x"}, "id")
    assert reader.count_rows() == 1000
    full = flat(reader.chunks(Position(), 100))
    assert [i for _, i, _ in full] == list(range(5, 1005))
    np.testing.assert_array_equal(np.array([json.loads(v)["x"] for _, _, v in full], np.float32), values)
    for row in (1, 127, 128, 300, 999):
        assert flat(reader.chunks(Position(row, row, row), 100)) == full[row:]
    assert list(reader.chunks(Position(1000, 1000, 1000), 100)) == []


def test_a_parquet_input_without_the_mapped_column_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    write_parquet(path, np.arange(3), np.zeros((3, 2), np.float32))
    with pytest.raises(TableError, match="no column 'pixels'; its columns are: id, x"):
        open_table(path, PARQUET, {"image": "pixels"})
    with pytest.raises(TableError, match="cannot tell its format"):
        table_format(0, tmp_path / "in.csv")


@pytest.mark.parametrize("fmt", [JSONL, PARQUET])
def test_output_parts_keep_ids_datatypes_and_values(tmp_path: Path, fmt: int) -> None:
    scores = [np.array([0.1, 1 / 3], np.float32), np.array([2.5e-8, -7.0], np.float32)]
    labels = [np.array(3, np.int64), np.array(-1, np.int64)]
    text = [np.array(b"caf\xc3\xa9", dtype=object), np.array(b"x", dtype=object)]
    write_part(tmp_path / "part", fmt, "key", ["a", "b"], {"scores": scores, "label": labels, "text": text})
    records = read_output(tmp_path, ["part"], fmt)
    assert [r["key"] for r in records] == ["a", "b"]
    np.testing.assert_array_equal(np.array([r["scores"] for r in records], np.float32), np.stack(scores))
    assert [r["label"] for r in records] == [3, -1]
    assert [r["text"] if isinstance(r["text"], str) else r["text"].decode() for r in records] == ["café", "x"]
    if fmt == PARQUET:
        import pyarrow.parquet as pq

        kind = pq.read_schema(tmp_path / "part").field("scores").type  # float32 stays float32
        assert (str(kind.value_type), kind.list_size) == ("float", 2)


def test_an_atomic_write_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "part"
    target.write_bytes(b"old")

    def fail(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"]
