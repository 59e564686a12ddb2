"""Read input files as a stream of row batches.

JSONL (``.jsonl``, ``.json``, ``.jsonl.gz``) and Parquet (a file, or a directory
of ``.parquet`` files). Rows come out as plain dicts in batches, so memory stays
flat whatever the input's size. This module knows nothing about prompts or
requests; it only reads, and raises ``InputError`` naming the file and line.
"""

from __future__ import annotations

import gzip
from array import array
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .jsontext import kind_of, loads_without_lone_surrogates

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "IdSet",
    "RowBatch",
    "expand_inputs",
    "iter_batches",
    "parquet_columns",
]

DEFAULT_BATCH_ROWS = 1024
# A batch also ends at about this much input, however few rows that is: with
# prompts of 200 KB, batches of 1,024 rows (and copies of them down the
# pipeline) took the peak RSS to 1.2 GB.
BATCH_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class RowBatch:
    """Consecutive rows of one input file.

    Attributes:
        path: The file the rows come from.
        rows: The rows, as dicts of column to value.
        numbers: For each row, its 1-based line (JSONL) or row (Parquet) number.
        kind: ``"line"`` or ``"row"``: what ``numbers`` count.
        repaired: The numbers of rows whose text held lone UTF-16 surrogates,
            each read as U+FFFD (see ``jsontext``).
    """

    path: str
    rows: list[dict[str, Any]]
    numbers: Sequence[int]
    kind: str
    repaired: Sequence[int] = ()


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """Turn the user's paths into the list of files to read, in order.

    Raises:
        InputError: A path does not exist, or a directory holds no input file.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(_directory_inputs(path))
        elif path.is_file():
            if _format_of(path) is None:
                raise InputError(
                    "unknown input format: expected .jsonl, .json, .jsonl.gz"
                    " or .parquet",
                    path=str(path),
                )
            files.append(path)
        elif str(path) == "-" or path.exists():
            # A pipe, a device, or "-" for standard input.
            raise InputError(
                "is not a file: every row is read twice, checked before the"
                " first request and then sent, so a pipe or standard input"
                " cannot be an input; save it to a file first",
                path=str(path),
            )
        else:
            raise InputError("no such file or directory", path=str(path))
    return files


def _directory_inputs(path: Path) -> list[Path]:
    """A directory's Parquet files (a dataset), or else its JSON Lines files
    (shards), in name order; hidden files (``.`` or ``_``) left out."""
    shown = [
        p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
    ]
    for kind in ("parquet", "jsonl"):
        found = sorted(p for p in shown if _format_of(p) == kind)
        if found:
            return found
    raise InputError(
        "directory holds no .parquet or JSON Lines (.jsonl, .jsonl.gz) files",
        path=str(path),
    )


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return None


def parquet_columns(path: Path) -> dict[str, bool] | None:
    """A Parquet file's columns, each with whether it holds text; ``None``
    for a JSON Lines file, or a Parquet file without rows.

    Raises:
        InputError: The file cannot be read.
    """
    if _format_of(path) != "parquet":
        return None
    try:
        parquet = pq.ParquetFile(path)  # see sinks._worth_rewriting
        metadata, schema = parquet.metadata, parquet.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Parquet file: {exc}", path=str(path)) from exc
    if not metadata.num_rows:
        return None
    text = (pa.string(), pa.large_string())
    return {field.name: field.type in text for field in schema}


def count_rows(files: Sequence[Path]) -> int | None:
    """The total number of rows if it is known from metadata alone (Parquet only)."""
    total = 0
    for path in files:
        if _format_of(path) != "parquet":
            return None
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise InputError(
                f"cannot read Parquet file: {exc}", path=str(path)
            ) from exc
    return total


def iter_batches(
    files: Sequence[Path],
    *,
    columns: Collection[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    limit: int | None = None,
) -> Iterator[RowBatch]:
    """Yield the rows of every file in order, ``batch_rows`` at a time.

    Args:
        files: Files from ``expand_inputs``.
        columns: Parquet columns to read; ``None`` reads all. Missing ones are
            skipped here and reported by whoever needs them.
        batch_rows: Rows per batch.
        limit: Stop after this many rows; nothing after them is read.

    Raises:
        InputError: A file cannot be read, or a JSONL line is not a JSON object.
    """
    left = limit
    for path in files:
        if _format_of(path) == "parquet":
            batches = _parquet_batches(path, columns, batch_rows)
        else:
            batches = _jsonl_batches(path, batch_rows)
        for batch in batches:
            if left is not None and len(batch.rows) >= left:
                yield _first(batch, left)
                return
            if left is not None:
                left -= len(batch.rows)
            yield batch


def _first(batch: RowBatch, n: int) -> RowBatch:
    """The first ``n`` rows of ``batch``."""
    numbers = batch.numbers[:n]
    last = numbers[-1] if n else 0
    repaired = [number for number in batch.repaired if number <= last]
    return RowBatch(batch.path, batch.rows[:n], numbers, batch.kind, repaired)


def _open_jsonl(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


# Editors and exports on Windows often start a UTF-8 file with one.
_BOM = b"\xef\xbb\xbf"
_ONE_PER_LINE = "JSON Lines holds one object per line"
_NOT_AN_ARRAY = f"{_ONE_PER_LINE} (convert with jq -c '.[]')"


def _jsonl_batches(path: Path, batch_rows: int) -> Iterator[RowBatch]:
    name = str(path)
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    repaired: list[int] = []
    size = 0
    loads = orjson.loads
    try:
        with _open_jsonl(path) as handle:
            first = handle.readline().removeprefix(_BOM)
            for number, line in enumerate(chain((first,), handle), start=1):
                if not line.strip():
                    continue
                try:
                    row = loads(line)
                except orjson.JSONDecodeError as exc:
                    row = _lenient(line, number, exc, name)
                    repaired.append(number)
                if not isinstance(row, dict):
                    got = kind_of(row)
                    if number == 1 and isinstance(row, list):
                        got += f"; {_NOT_AN_ARRAY}"
                    raise InputError(
                        f"expected a JSON object, got {got}", path=name, line=number
                    )
                rows.append(row)
                numbers.append(number)
                size += len(line)
                if len(rows) >= batch_rows or size >= BATCH_BYTES:
                    yield RowBatch(name, rows, numbers, "line", repaired)
                    rows, numbers, repaired = [], [], []
                    size = 0
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read file: {exc}", path=name) from exc
    if rows:
        yield RowBatch(name, rows, numbers, "line", repaired)


def _lenient(line: bytes, number: int, exc: orjson.JSONDecodeError, name: str) -> Any:
    """A line orjson refused: read it if its only fault is a lone surrogate
    escape (``jsontext``), or raise the InputError that says what is wrong."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise InputError(_not_utf8(line, number, bad), path=name, line=number) from exc
    try:
        return loads_without_lone_surrogates(line)
    except ValueError:
        raise InputError(_malformed(line, number, exc), path=name, line=number) from exc


def _not_utf8(line: bytes, number: int, bad: UnicodeDecodeError) -> str:
    """The message for a line that is not UTF-8, naming the encoding to convert
    from when it can be told: UTF-16 (as Windows PowerShell writes files), or
    else probably a single-byte one such as Latin-1."""
    if number == 1 and line.startswith((b"\xff\xfe", b"\xfe\xff")):
        return (
            "the file is UTF-16 and JSON Lines is UTF-8"
            " (convert with iconv -f utf-16 -t utf-8)"
        )
    return (
        f"not UTF-8: byte 0x{line[bad.start]:02x} at column {bad.start + 1}"
        " (if the file is Latin-1, convert with iconv -f latin1 -t utf-8)"
    )


def _malformed(line: bytes, number: int, exc: orjson.JSONDecodeError) -> str:
    """The message for a line that is not JSON, with a hint for the usual cause:
    a JSON document (an array, a pretty-printed object) rather than JSON Lines."""
    start = line.lstrip()[:1]
    if number == 1 and start == b"[":
        return f"the file is a JSON array; {_NOT_AN_ARRAY}"
    if line.strip() == b"{":
        return f"an object spread over several lines; {_ONE_PER_LINE} (jq -c .)"
    return f"malformed JSON: {exc}"


def _parquet_batches(
    path: Path, columns: Collection[str] | None, batch_rows: int
) -> Iterator[RowBatch]:
    name = str(path)
    try:
        # pre_buffer (on by default) keeps every column chunk it has read for
        # the life of the file: reading 500,000 rows of 500-character prompts
        # grew RSS by 96 MB with it and by 11 MB without. Without threads,
        # reading 1,000,000 such rows took 0.9-1.1 s instead of 1.1-1.2 s and
        # peaked 5 MB lower (with the command's allocator settings, see
        # __main__.py): the decoding work is too small to share out.
        parquet = pq.ParquetFile(path, pre_buffer=False)
        present = parquet.schema_arrow.names
        wanted = None if columns is None else [c for c in present if c in columns]
        size = _row_bytes(parquet, wanted)
        rows_per_batch = max(1, min(batch_rows, BATCH_BYTES // max(size, 1)))
        start = 1
        for batch in parquet.iter_batches(
            batch_size=rows_per_batch, columns=wanted, use_threads=False
        ):
            rows = batch.to_pylist()
            yield RowBatch(name, rows, range(start, start + len(rows)), "row")
            start += len(rows)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Parquet file: {exc}", path=name) from exc


def _row_bytes(parquet: pq.ParquetFile, columns: list[str] | None) -> int:
    """About how many bytes a row of ``columns`` (all if ``None``) takes once
    read: the larger of the file's own figure (uncompressed) and the size of
    its first rows as read. A value repeated down a column (one long document
    for many questions) is stored once in a dictionary, so only reading tells
    its real size."""
    metadata = parquet.metadata
    rows: int = metadata.num_rows
    if not rows:
        return 0
    stored: int = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if columns is None or chunk.path_in_schema.split(".")[0] in columns:
                stored += chunk.total_uncompressed_size
    first = next(parquet.iter_batches(batch_size=_PROBE_ROWS, columns=columns), None)
    read = first.nbytes // first.num_rows if first is not None and first.num_rows else 0
    return max(stored // rows, read)


_PROBE_ROWS = 16


class IdSet:
    """Ids seen so far, as one 64-bit hash each (8 bytes per id).

    Finding duplicates among a million ids this way costs about 8 MB, where a
    Python ``set`` of the strings would cost about 100 MB. A shared hash only
    makes its ids *suspects*; the caller confirms them by comparing strings.
    The hashes are filed in 256 buckets by their low byte, so ``suspects``
    needs a set of one bucket at a time: its peak stays a few MB however
    many ids there are (one Arrow hash table over a million ids added 40 MB).
    """

    _BUCKETS = 256

    def __init__(self) -> None:
        self._buckets = [array("q") for _ in range(self._BUCKETS)]
        self._count = 0

    @staticmethod
    def key(row_id: str) -> int:
        """The hash an id is filed under (stable within one process)."""
        return hash(row_id)

    def add_many(self, ids: Iterable[str]) -> None:
        """File ids."""
        buckets = self._buckets
        mask = self._BUCKETS - 1
        count = 0
        for key in map(hash, ids):
            buckets[key & mask].append(key)
            count += 1
        self._count += count

    def __len__(self) -> int:
        return self._count

    def suspects(self) -> set[int]:
        """Hashes filed more than once: a duplicate id, or (rarely) a collision."""
        repeated: set[int] = set()
        for bucket in self._buckets:
            if len(set(bucket)) == len(bucket):
                continue  # the usual case, decided at C speed
            seen: set[int] = set()
            for key in bucket:
                if key in seen:
                    repeated.add(key)
                else:
                    seen.add(key)
        return repeated
