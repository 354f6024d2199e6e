"""Parquet: record batches read row group by row group; row groups, codec, schema and metadata kept.

Each row group of the input becomes one row group of the output with the same rows, and every
column keeps the compression codec it had. The text column may be string, large_string or
dictionary-encoded; the perturbed values are rebuilt as exactly that type. A corrupt row group is a
data error naming the input and the row group.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtext.errors import InputFormatError, UsageError


def _arrow_error_types() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowException, OSError)


_STDIN: list[bytes] = []


def _stdin_bytes() -> bytes:
    """Stdin read once (validation opens the input before the run opens it again)."""
    if not _STDIN:
        _STDIN.append(sys.stdin.buffer.read())
    return _STDIN[0]


@dataclass
class ParquetChunk:
    row_group: int
    batch: Any  # pyarrow.RecordBatch
    last_in_group: bool


class ParquetSource:
    def __init__(self, path: str, file: Any):
        self.path = path
        self.file = file
        self.schema = file.schema_arrow
        self.metadata = file.metadata

    @classmethod
    def open(cls, path: str) -> ParquetSource:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = "stdin" if path == "-" else path
        try:
            if path == "-":  # Parquet needs random access: read stdin into memory first
                file = pq.ParquetFile(pa.BufferReader(_stdin_bytes()))
            else:
                file = pq.ParquetFile(path)
        except PermissionError:
            raise UsageError(f"input file {name} is not readable; check its permissions") from None
        except FileNotFoundError:
            raise UsageError(f"input file not found: {name}; check the path or use - for stdin") from None
        except _arrow_error_types():
            raise InputFormatError(f"cannot read {name} as Parquet (not Parquet, or its footer is "
                                   "damaged); check --format or re-create the file") from None
        return cls(path, file)

    @property
    def num_rows(self) -> int:
        return int(self.metadata.num_rows)

    def check_field(self, field_name: str) -> None:
        import pyarrow as pa

        if "." in field_name or field_name not in self.schema.names:
            raise UsageError(
                f"field {field_name!r} is not a top-level column of the Parquet input; "
                f"pass --field with one of: {', '.join(self.schema.names)}"
            )
        col_type = self.schema.field(field_name).type
        if pa.types.is_dictionary(col_type):
            col_type = col_type.value_type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise UsageError(f"column {field_name!r} has type {col_type}, not string; "
                             "pass --field with a text column")

    def compression(self) -> str | dict[str, str]:
        """The input's codec per column (pyarrow's names), to write the output the same way."""
        if self.metadata.num_row_groups == 0:
            return "snappy"
        group = self.metadata.row_group(0)
        codecs = {group.column(i).path_in_schema: group.column(i).compression.lower()
                  for i in range(group.num_columns)}
        codecs = {k: ("none" if v == "uncompressed" else v) for k, v in codecs.items()}
        values = set(codecs.values())
        return values.pop() if len(values) == 1 else codecs

    def chunks(self, chunk_size: int, start_group: int = 0) -> Iterator[ParquetChunk]:
        """Batches of at most chunk_size rows, never crossing a row group."""
        for group in range(start_group, self.metadata.num_row_groups):
            try:
                batches = list(self.file.iter_batches(batch_size=chunk_size, row_groups=[group]))
            except _arrow_error_types():
                raise InputFormatError(
                    f"{self.path}: row group {group} is corrupt and cannot be read; "
                    "re-create the file (row groups before it were fine)"
                ) from None
            for i, batch in enumerate(batches):  # an empty row group holds nothing to keep
                yield ParquetChunk(group, batch, i == len(batches) - 1)


def segment_groups(path: Path) -> Iterator[Any]:
    """The row groups of a finished segment file, one table at a time."""
    import pyarrow.parquet as pq

    segment = pq.ParquetFile(path)
    for group in range(segment.metadata.num_row_groups):
        yield segment.read_row_group(group)


def column_values(batch: Any, field_name: str) -> list[str | None]:
    return batch.column(field_name).to_pylist()  # dictionary columns decode here


def rebuild(batch: Any, field_name: str, values: list[str | None]) -> Any:
    """The batch with the perturbed column swapped in, as exactly the column's type."""
    import pyarrow as pa

    position = batch.schema.get_field_index(field_name)
    col_type = batch.schema.field(position).type
    if pa.types.is_dictionary(col_type):
        column = pa.array(values, type=col_type.value_type).dictionary_encode().cast(col_type)
    else:
        column = pa.array(values, type=col_type)
    arrays = [column if i == position else batch.column(i) for i in range(batch.num_columns)]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


class ParquetSink:
    """Writes whole row groups: one `write_table` per input row group, with its codec."""

    def __init__(self, where: Any, schema: Any, compression: str | dict[str, str]):
        import pyarrow.parquet as pq

        self.schema = schema
        self._writer = pq.ParquetWriter(where, schema, compression=compression)

    def write_group(self, batches: list[Any]) -> None:
        import pyarrow as pa

        table = pa.Table.from_batches(batches, schema=self.schema)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))

    def write_table(self, table: Any) -> None:
        """One row group holding `table`."""
        self._writer.write_table(table.cast(self.schema), row_group_size=max(1, table.num_rows))

    def copy_groups_from(self, path: Path) -> None:
        """Appends every row group of a segment file (resume: segments become the output)."""
        import pyarrow.parquet as pq

        segment = pq.ParquetFile(path)
        for group in range(segment.metadata.num_row_groups):
            table = segment.read_row_group(group)
            self._writer.write_table(table.cast(self.schema), row_group_size=max(1, table.num_rows))

    def close(self) -> None:
        self._writer.close()
