"""A job's tables: its input read in chunks, its output written in parts.

    reader = open_table(path, JobSpec.JSONL or PARQUET, mapping={"x": "features"}, id_column="id")
    total = reader.count_rows()
    for chunk in reader.chunks(Position(0, 0), rows=1024):   # or from a checkpoint's position
        chunk.rows[i]      # model input name -> value, or None when the row could not be read
        chunk.errors[i]    # why not (a malformed JSONL line, with its line number)
        chunk.ids[i]       # the row's id: the id column's value, else its 0-based row number
        chunk.end          # the Position the next chunk starts at
    write_part(directory / "part-....parquet", PARQUET, id_name, ids, outputs)   # atomically

Formats:
- JSONL: one JSON object per line; blank lines are not rows. A line that is not a JSON
  object is a row failure naming its line number (1-based), never a crash. Positions
  carry the byte offset of the next line, so a resumed job seeks instead of rereading.
- Parquet: read with pyarrow.parquet.ParquetFile.iter_batches; a resumed job starts at
  the row group holding its position. Fixed-size list columns become numpy rows without
  going through Python lists.
Columns map to model inputs by JobSpec.inputs (input name -> column), by default the
inputs' own names. Outputs are written in the input's format: the id column (named as
the job's id_column, else "row") and one column per output.

Every part is written to a temporary file in the same directory, fsynced, renamed over
its final name and the directory fsynced (write_atomic), so a part is either there whole
or not at all; the job's checkpoint (pipelines/jobs.py) says which parts count.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import numpy as np

from modelgw.protos import registry_pb2 as rpb

JSONL = rpb.JobSpec.JSONL
PARQUET = rpb.JobSpec.PARQUET
FORMAT_NAMES = {JSONL: "jsonl", PARQUET: "parquet"}
SUFFIXES = {".jsonl": JSONL, ".ndjson": JSONL, ".json": JSONL, ".parquet": PARQUET, ".pq": PARQUET}


class TableError(ValueError):
    """The job's input or output cannot be used as given; the message says what to fix."""


def data_path(uri: str) -> Path:
    """The local path a job's input_uri or output_uri names: a path, file:///PATH, or
    pvc://CLAIM/PATH (mounted where the kubernetes backend mounts claims)."""
    from modelgw.registry.validation import parse_pvc_uri, pvc_mount_path

    if not uri:
        raise TableError("no URI given; expected a local path, file:///PATH or pvc://CLAIM/PATH")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "pvc":
        try:
            claim, inside = parse_pvc_uri(uri)
        except ValueError as exc:
            raise TableError(str(exc)) from None
        return Path(pvc_mount_path(claim), inside)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise TableError(f"'{uri}': unsupported URI scheme '{parsed.scheme}'; expected a local path, file:// or pvc://")
    return Path(uri).expanduser()


def table_format(spec_format: int, path: Path) -> int:
    """The job's format: as the spec says, else from the input's file extension."""
    if spec_format in (JSONL, PARQUET):
        return spec_format
    found = SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise TableError(f"input '{path}': cannot tell its format from the extension '{path.suffix}'; "
                         "name it .jsonl or .parquet, or set the job's format (JSONL or PARQUET)")
    return found


@dataclass(frozen=True, slots=True)
class Position:
    """Where reading resumes: the 0-based row and, for JSONL, the byte offset of its line
    and the number of lines before it (blank ones included, for messages)."""

    row: int = 0
    offset: int = 0
    line: int = 0


@dataclass(slots=True)
class Chunk:
    start: int                                   # 0-based row position of rows[0]
    end: Position                                # where the next chunk starts
    rows: list[dict[str, Any] | None] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # index in rows -> why it is None


class JsonlReader:
    def __init__(self, path: Path, mapping: Mapping[str, str], id_column: str) -> None:
        self.path = path
        self.mapping = dict(mapping)
        self.id_column = id_column
        self.columns: list[str] | None = None  # JSONL declares none: rows are checked one by one

    def count_rows(self) -> int:
        """Non-blank lines (one pass over the file)."""
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def chunks(self, start: Position, rows: int) -> Iterator[Chunk]:
        with open(self.path, "rb") as f:
            f.seek(start.offset)
            offset, row, line_number = start.offset, start.row, start.line
            chunk = Chunk(row, start)
            for line in f:
                offset += len(line)
                line_number += 1
                if not line.strip():
                    continue
                self._add(chunk, line, line_number, row)
                row += 1
                if len(chunk.rows) == rows:
                    chunk.end = Position(row, offset, line_number)
                    yield chunk
                    chunk = Chunk(row, chunk.end)
            if chunk.rows:
                chunk.end = Position(row, offset, line_number)
                yield chunk

    def _add(self, chunk: Chunk, line: bytes, line_number: int, row: int) -> None:
        index = len(chunk.rows)
        try:
            value = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            chunk.rows.append(None)
            chunk.ids.append(row)
            chunk.errors[index] = f"line {line_number}: not valid JSON: {exc}"
            return
        if not isinstance(value, dict):
            chunk.rows.append(None)
            chunk.ids.append(row)
            chunk.errors[index] = f"line {line_number}: a JSON {type(value).__name__}, expected an object of column -> value"
            return
        if self.id_column:
            if self.id_column not in value:
                chunk.rows.append(None)
                chunk.ids.append(row)
                chunk.errors[index] = f"line {line_number}: no field '{self.id_column}' (the job's id_column)"
                return
            chunk.ids.append(value[self.id_column])
        else:
            chunk.ids.append(row)
        chunk.rows.append({name: value.get(column) for name, column in self.mapping.items()})


class ParquetReader:
    def __init__(self, path: Path, mapping: Mapping[str, str], id_column: str) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.mapping = dict(mapping)
        self.id_column = id_column
        try:
            self._file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for what is not Parquet
            raise TableError(f"input '{path}': not a readable Parquet file: {exc}") from None
        self.columns = list(self._file.schema_arrow.names)
        wanted = [*self.mapping.values(), *([id_column] if id_column else [])]
        missing = [c for c in wanted if c not in self.columns]
        if missing:
            raise TableError(f"input '{path}' has no column '{missing[0]}'; its columns are: {', '.join(self.columns)}")
        self._read = list(dict.fromkeys(wanted))

    def count_rows(self) -> int:
        return int(self._file.metadata.num_rows)

    def chunks(self, start: Position, rows: int) -> Iterator[Chunk]:
        metadata = self._file.metadata
        first_group, group_start = 0, 0
        while first_group < metadata.num_row_groups:
            size = metadata.row_group(first_group).num_rows
            if group_start + size > start.row:
                break
            group_start += size
            first_group += 1
        groups = list(range(first_group, metadata.num_row_groups))
        if not groups:
            return
        row = group_start
        skip = start.row - group_start
        pending: list[Any] = []  # record batches, concatenated into chunks of `rows`
        pending_rows = 0
        for batch in self._file.iter_batches(batch_size=rows, row_groups=groups, columns=self._read):
            if skip:
                cut = min(skip, batch.num_rows)
                batch = batch.slice(cut)
                skip -= cut
                row += cut
                if not batch.num_rows:
                    continue
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= rows:
                chunk, pending, pending_rows = self._take(pending, rows, row)
                row += len(chunk.rows)
                yield chunk
        if pending_rows:
            chunk, _, _ = self._take(pending, pending_rows, row)
            yield chunk

    def _take(self, pending: list[Any], rows: int, row: int) -> tuple[Chunk, list[Any], int]:
        import pyarrow as pa

        table = pa.Table.from_batches(pending)
        head, rest = table.slice(0, rows), table.slice(rows)
        columns = {name: _column_values(head.column(column)) for name, column in self.mapping.items()}
        count = head.num_rows
        chunk = Chunk(row, Position(row + count, row + count, row + count))
        chunk.rows = [{name: values[i] for name, values in columns.items()} for i in range(count)]
        chunk.ids = head.column(self.id_column).to_pylist() if self.id_column else list(range(row, row + count))
        return chunk, rest.to_batches() if rest.num_rows else [], rest.num_rows


def _column_values(column: Any) -> Sequence[Any]:
    """A column's per-row values: numpy rows for null-free numeric and fixed-size list
    columns (no Python objects per element), Python values otherwise."""
    import pyarrow as pa

    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count == 0:
        kind = array.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            return array.to_numpy(zero_copy_only=False)
        if pa.types.is_fixed_size_list(kind) and array.flatten().null_count == 0:
            inner = array.flatten()
            if pa.types.is_integer(inner.type) or pa.types.is_floating(inner.type):
                return inner.to_numpy(zero_copy_only=False).reshape(len(array), kind.list_size)
    return array.to_pylist()


def open_table(path: Path, fmt: int, mapping: Mapping[str, str], id_column: str = "") -> JsonlReader | ParquetReader:
    if not path.is_file():
        raise TableError(f"input '{path}': no such file")
    if fmt == PARQUET:
        return ParquetReader(path, mapping, id_column)
    return JsonlReader(path, mapping, id_column)


# ------------------------------------------------------------------ output parts


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` whole or not at all: a temp file beside it, fsynced, renamed over it,
    the directory fsynced (the rename is durable only then)."""
    fd, temp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


TEMP_PREFIX = ".tmp-"


def jsonable(value: Any) -> Any:
    """A value as JSON can hold it (numpy arrays and scalars to lists and numbers, bytes to
    text): the one conversion of outputs for JSONL parts and stream results."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [jsonable(v) for v in value.tolist()] if value.ndim else jsonable(value.item())
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _arrow_column(values: list[Any]) -> Any:
    """An Arrow array for one output's per-row arrays, keeping their dtype (float32 stays
    float32): fixed-size lists for 1-d rows of one length, nested lists otherwise."""
    import pyarrow as pa

    if values and all(isinstance(v, np.ndarray) and v.dtype != object for v in values):
        shapes = {v.shape for v in values}
        if len(shapes) == 1:
            shape = shapes.pop()
            stacked = np.stack(values)
            if not shape:
                return pa.array(stacked)
            if len(shape) == 1:
                return pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1)), shape[0])
    return pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in values])


def write_part(path: Path, fmt: int, id_name: str, ids: Sequence[Any], columns: Mapping[str, list[Any]]) -> None:
    """One part file: the id column and the given columns (one value per id), written
    atomically in the job's format."""
    if fmt == PARQUET:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {id_name: pa.array(list(ids))}
        arrays.update({name: _arrow_column(values) for name, values in columns.items()})
        table = pa.table(arrays) if ids else pa.table({id_name: pa.array([], pa.int64())})
        write_atomic(path, lambda f: pq.write_table(table, f))
        return

    def lines(f: IO[bytes]) -> None:
        names = list(columns)
        for i, row_id in enumerate(ids):
            record = {id_name: jsonable(row_id)}
            for name in names:
                record[name] = jsonable(columns[name][i])
            f.write(json.dumps(record, ensure_ascii=False).encode())
            f.write(b"\n")

    write_atomic(path, lines)


def read_output(directory: Path, names: Sequence[str], fmt: int) -> list[dict[str, Any]]:
    """Every record of the given part files, in order (tests and examples read results so)."""
    records: list[dict[str, Any]] = []
    for name in names:
        path = directory / name
        if fmt == PARQUET:
            import pyarrow.parquet as pq

            records.extend(pq.read_table(path).to_pylist())
        else:
            with open(path, encoding="utf-8") as f:
                records.extend(json.loads(line) for line in f if line.strip())
    return records
