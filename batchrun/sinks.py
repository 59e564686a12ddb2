"""Write results durably: Parquet part files, the usage table and the manifest.

Every file appears atomically (written to a temp file, then ``os.replace``d),
so ``OUT`` stays readable whatever stops the process. This module owns the
results schema. It does not decide *when* to flush; the runner does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, OutputError
from .journal import JOURNAL_DIR
from .records import Result

__all__ = [
    "LOCK_FILE",
    "LOG_KEY",
    "MANIFEST_FILE",
    "RESULTS_DIR",
    "RESULT_SCHEMA",
    "USAGE_FILE",
    "USAGE_SCHEMA",
    "CompactionStopped",
    "OutputLock",
    "PartWriter",
    "Row",
    "clear_output",
    "compact",
    "conform",
    "has_output",
    "infer_type",
    "key_of",
    "latest_rows",
    "list_parts",
    "open_output",
    "read_parts",
    "result_row",
    "row_keys",
    "write_json",
    "write_usage",
]

RESULTS_DIR = "results"
LOG_KEY = "_log"
KEY_SEPARATOR = "\x1f"
DEFAULT_COMPACT_ROWS = 250_000
COMPACT_MIN_PARTS = 32
Row = dict[str, Any]
USAGE_FILE = "usage.parquet"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".batchrun.lock"
_LOCK_ATTEMPTS = 20
_LOCK_RETRY_S = 0.01

_TS = pa.timestamp("us", tz="UTC")
_CHOICE = pa.struct(
    [("index", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string())]
)
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("row", pa.int64()),
        ("status", pa.string()),
        ("endpoint", pa.string()),
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("reasoning", pa.string()),
        ("tool_calls", pa.string()),
        ("choices", pa.list_(_CHOICE)),
        ("finish_reason", pa.string()),
        ("logprobs", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("response", pa.string()),
        ("http_status", pa.int64()),
        ("attempts", pa.int64()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("started_at", _TS),
        ("finished_at", _TS),
        ("request_hash", pa.int64()),
        ("variant", pa.string()),
    ]
)
# A result row as the journal holds it: timestamps as float epoch seconds.
_ROW_TYPE = pa.struct(
    [pa.field(f.name, pa.float64()) if f.type == _TS else f for f in RESULT_SCHEMA]
)
USAGE_SCHEMA = pa.schema(
    [
        ("variant", pa.string()),
        ("model", pa.string()),
        ("endpoint", pa.string()),
        ("requests", pa.int64()),
        ("succeeded", pa.int64()),
        ("failed", pa.int64()),
        ("truncated", pa.int64()),
        ("attempts", pa.int64()),
        ("retries", pa.int64()),
        ("rate_limited", pa.int64()),
        ("server_errors", pa.int64()),
        ("timeouts", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("no_usage", pa.int64()),
        ("wall_s", pa.float64()),
        ("requests_per_s", pa.float64()),
        ("completion_tokens_per_s", pa.float64()),
        ("latency_p50_s", pa.float64()),
        ("latency_p90_s", pa.float64()),
        ("latency_p99_s", pa.float64()),
        ("cost_usd", pa.float64()),
    ]
)


def infer_type(kinds: Iterable[type]) -> pa.DataType:
    """The Arrow type for a kept input column, from the Python types of its values.

    Mixed int and float become float64; anything else mixed, or nested, is
    stored as JSON text so that every part file shares one schema.
    """
    found = {k for k in kinds if k is not type(None)}
    if found == {bool}:
        return pa.bool_()
    if found == {int}:
        return pa.int64()
    if found and found <= {int, float}:
        return pa.float64()
    return pa.string()


def _to_column(values: Sequence[object], type_: pa.DataType) -> Sequence[object]:
    if type_ == pa.string():
        return [
            v if v is None or isinstance(v, str) else orjson.dumps(v).decode()
            for v in values
        ]
    if type_ == pa.float64():
        return [None if v is None else float(v) for v in values]  # type: ignore[arg-type]
    return values


def result_schema(
    kept: Mapping[str, pa.DataType],
    cell_columns: Mapping[str, pa.DataType] | None = None,
) -> pa.Schema:
    """``RESULT_SCHEMA``, then a sweep's cell columns, then kept input columns
    (``input_<name>`` when a name is taken)."""
    fields = list(RESULT_SCHEMA)
    cell_columns = cell_columns or {}
    fields += [pa.field(name, type_) for name, type_ in cell_columns.items()]
    taken = set(RESULT_SCHEMA.names) | set(cell_columns)
    for name, type_ in kept.items():
        fields.append(pa.field(kept_name(name, taken), type_))
    return pa.schema(fields)


def kept_name(name: str, taken: Iterable[str] = RESULT_SCHEMA.names) -> str:
    """The results column that holds the kept input column ``name``."""
    return f"input_{name}" if name in set(taken) else name


def result_row(
    result: Result,
    *,
    raw: bool,
    kept_names: Mapping[str, str],
    cells: Mapping[str, Mapping[str, Any]] | None = None,
) -> Row:
    """The row a result becomes: one journal line, one row of a part file.

    Timestamps are float epoch seconds here. ``_log`` (not a column) keeps what
    the usage table needs about retried attempts. ``cells`` maps a sweep
    variant's name to its cell columns (``template``, swept parameters).
    """
    record = result.record
    usage = result.usage
    choices = result.choices()
    first = choices[0] if choices else None
    response = result.response if raw else None
    if isinstance(response, bytes):
        response = response.decode("utf-8", "replace")
    row: Row = {
        "id": record.id,
        "row": record.row,
        "status": result.status,
        "endpoint": record.endpoint,
        "model": record.model,
        "prompt": record.prompt,
        "completion": None if first is None else first["text"],
        "reasoning": result.reasoning(),
        "tool_calls": result.tool_calls(),
        "choices": choices,
        "finish_reason": None if first is None else first["finish_reason"],
        "logprobs": result.logprobs(),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "response": response,
        "http_status": result.http_status,
        "attempts": result.attempts,
        "latency_s": result.latency_s,
        "error": result.error,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "request_hash": record.request_hash,
        "variant": record.variant,
    }
    if cells and record.variant is not None:
        row.update(cells[record.variant])
    extra = record.extra
    if kept_names:
        for name, column in kept_names.items():
            row[column] = None if extra is None else extra.get(name)
    log = result.log
    if log is not None:
        row[LOG_KEY] = [
            log.rate_limited,
            log.server_errors,
            log.timeouts,
            log.billed_prompt_tokens,
            log.billed_completion_tokens,
        ]
    return row


class CompactionStopped(Exception):
    """Compaction was told to stop; the parts are as they were."""


class PartWriter:
    """Turns rows into numbered, atomically written part files.

    Args:
        results_dir: ``OUT/results``.
        kept: Kept input columns and their Arrow types, in output order.
        cell_columns: A sweep's cell columns and their Arrow types.
    """

    def __init__(
        self,
        results_dir: Path,
        *,
        kept: Mapping[str, pa.DataType] | None = None,
        cell_columns: Mapping[str, pa.DataType] | None = None,
    ) -> None:
        self.results_dir = results_dir
        kept = dict(kept or {})
        cell_columns = dict(cell_columns or {})
        taken = set(RESULT_SCHEMA.names) | set(cell_columns)
        self.kept_names = {name: kept_name(name, taken) for name in kept}
        self.schema = result_schema(kept, cell_columns)
        # A sweep's cell columns and kept input columns, after the result's.
        self._added = list(self.schema)[len(RESULT_SCHEMA) :]
        self._options = _write_options(self.schema)

    def table(self, rows: Sequence[Row]) -> pa.Table:
        """The rows as an Arrow table of ``self.schema``.

        The result columns come from one conversion of the rows as structs:
        15.8 instead of 20.4 thousand instructions a row (callgrind) than
        transposing the rows and converting column by column. Timestamps, float
        seconds in a row, are turned into microseconds in Python: Arrow's own
        multiply and cast need pyarrow.compute, whose import costs about 45 ms
        of CPU a run, and these two columns cost about 0.3 us a row. A row
        journaled without a newer column (an earlier version's journal), or
        with a null timestamp, gets a null.
        """
        structs = pa.array(rows, _ROW_TYPE)
        arrays = []
        for field, column in zip(RESULT_SCHEMA, structs.flatten(), strict=True):
            if field.type == _TS:
                name = field.name
                micros = [
                    None if (t := row.get(name)) is None else int(t * 1_000_000)
                    for row in rows
                ]
                column = pa.array(micros, _TS)
            arrays.append(column)
        for field in self._added:
            values = [row.get(field.name) for row in rows]
            arrays.append(pa.array(_to_column(values, field.type), field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def write(self, number: int, rows: Sequence[Row]) -> Path:
        """Write part ``number`` atomically. Blocking.

        Raises:
            OutputError: The file cannot be written.
        """
        path = part_path(self.results_dir, number)
        table = self.table(rows)
        options = self._options
        atomic_write(path, lambda tmp: _write_table(table, tmp, **options))
        return path


# Arrow writes a local file unbuffered: a part of 1,000 results took about 70
# write and 40 seek system calls, one or two writes through this buffer
# (strace). The CPU time did not move measurably here; filesystems that
# charge for each call (network ones) gain more.
_WRITE_BUFFER_BYTES = 1 << 20


def _write_table(table: pa.Table, path: Path, **options: Any) -> None:
    with pa.output_stream(
        path, compression=None, buffer_size=_WRITE_BUFFER_BYTES
    ) as out:
        pq.write_table(table, out, **options)


def part_path(results_dir: Path, number: int) -> Path:
    """The path of part ``number``."""
    return results_dir / f"part-{number:05d}.parquet"


def list_parts(results_dir: Path) -> list[tuple[int, Path]]:
    """The part files, in the order they were written."""
    if not results_dir.is_dir():
        return []
    found = []
    for path in results_dir.iterdir():
        name = path.name
        if name.startswith("part-") and name.endswith(".parquet"):
            digits = name[5:-8]
            if digits.isdigit():
                found.append((int(digits), path))
    return sorted(found)


def read_parts(results_dir: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    """Some columns of every part, in order. Blocking."""
    for _, path in list_parts(results_dir):
        try:
            yield pq.read_table(path, columns=list(columns))
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc


def latest_rows(ids: pa.ChunkedArray) -> pa.Array:
    """Positions (into ``ids``) of each id's last occurrence, ascending.

    Rows are in write order, so the last occurrence is the latest result.
    """
    import pyarrow.compute as pc  # deferred: 60 ms of start-up otherwise

    if len(ids) == 0:
        return pa.array([], pa.uint64())
    # A stable sort keeps each id's occurrences in write order: the last of
    # each run of equal ids is its latest result.
    order = pc.sort_indices(pa.table({"id": ids}), sort_keys=[("id", "ascending")])
    ordered = ids.take(order)
    last = pc.not_equal(ordered[:-1], ordered[1:]).combine_chunks()
    winners = order.filter(pa.concat_arrays([last, pa.array([True])]))
    return winners.take(pc.sort_indices(winners))


def row_keys(table: pa.Table) -> pa.Array:
    """What identifies a result: its id, or id and sweep variant."""
    import pyarrow.compute as pc  # deferred: 60 ms of start-up otherwise

    ids = table.column("id").combine_chunks()
    variants = table.column("variant").combine_chunks()
    joined = pc.binary_join_element_wise(ids, variants, KEY_SEPARATOR)
    return pc.if_else(pc.is_null(variants), ids, joined)


def key_of(row_id: str, variant: str | None) -> str:
    """``row_keys`` for one result."""
    return row_id if variant is None else f"{row_id}{KEY_SEPARATOR}{variant}"


def _latest_positions(results_dir: Path) -> tuple[array[int], int]:
    """Global row positions that hold each key's latest result, and the total."""
    keys = pa.chunked_array(
        [row_keys(t) for t in read_parts(results_dir, ["id", "variant"])],
        pa.string(),
    )
    positions = latest_rows(keys).cast(pa.int64())
    return array("q", positions.to_pylist()), len(keys)


_COMPACT_BATCH_ROWS = 1024
# Columns of free text, from the prompt to the raw answer.
_FREE_TEXT = frozenset(
    {
        "prompt",
        "completion",
        "reasoning",
        "tool_calls",
        "choices",
        "logprobs",
        "response",
    }
)
# Min/max statistics of free text prune no query. Statistics on every column
# cost about 0.5 us a row of the 3.4 us that writing a part took (1,000 result
# rows, pq.write_table).
_NO_STATISTICS = _FREE_TEXT | {"error"}
# Columns whose values are (nearly) all distinct: a dictionary only costs the
# writer a try before it falls back. Without it, encoding 1,000 rows took
# 0.76 us a row instead of 0.95, and the file grew 3 % on the benchmark's
# repetitive text.
_NO_DICTIONARY = _FREE_TEXT | {
    "id",
    "latency_s",
    "started_at",
    "finished_at",
    "request_hash",
}


def _write_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options for result files of ``schema``."""
    names = schema.names
    return {
        "write_statistics": [n for n in names if n not in _NO_STATISTICS],
        "use_dictionary": [n for n in names if n not in _NO_DICTIONARY],
    }


def compact(
    results_dir: Path,
    schema: pa.Schema,
    *,
    dedupe: bool,
    target_rows: int = DEFAULT_COMPACT_ROWS,
    min_parts: int = COMPACT_MIN_PARTS,
    announce: Callable[[int], object] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Rewrite the parts as few large files, each id once (latest wins). Blocking.

    New files are written under hidden names, then renamed after the last
    existing part, then the old parts are deleted; a crash in between leaves
    duplicates that the latest-wins rule resolves, never a loss.

    Args:
        results_dir: ``OUT/results``.
        schema: The parts' schema.
        dedupe: Some ids may occur more than once (the output was resumed).
        target_rows: Rows per compacted file.
        min_parts: Leave at most this many parts alone when no id repeats:
            a few files of a thousand rows are fine to read; thousands are not.
        announce: Told the number of parts when they are to be rewritten
            (about 5 s for a million rows), so the wait is not a silent one.
        stop: Set from another thread to give up at the next batch (Ctrl-C):
            the new files are removed and the parts stay as they were.

    Returns:
        The number of part files afterwards.

    Raises:
        CompactionStopped: ``stop`` was set; nothing changed.
        OutputError: A file could not be read or written; nothing changed.
    """
    parts = list_parts(results_dir)
    if not parts:
        return 0
    keep: array[int] | None = None
    if dedupe:
        keep, total = _latest_positions(results_dir)
        if len(keep) == total:
            keep = None
    if keep is None and not _worth_rewriting(parts, schema, min_parts, target_rows):
        return len(parts)
    if announce is not None:
        announce(len(parts))
    options = _write_options(schema)
    temps: list[Path] = []
    writer: pq.ParquetWriter | None = None
    written = 0
    try:
        offset = 0
        for _, path in parts:
            # No pre_buffer: it keeps what it read (see sources._parquet_batches).
            # Batches of 1,024: compacting 400 parts of 1,000 rows left RSS
            # 44 MB higher with batch_size=8192, though no batch was larger.
            # No threads: compacting 290 parts of 1,000 results peaked at 105 MB
            # instead of 108-109 (from 69; the command's allocator settings)
            # and left 90 MB resident instead of 101-103, in the same time.
            source = pq.ParquetFile(path, pre_buffer=False)
            for batch in source.iter_batches(
                batch_size=_COMPACT_BATCH_ROWS, use_threads=False
            ):
                if stop is not None and stop.is_set():
                    raise CompactionStopped
                table = pa.Table.from_batches([batch])
                table = conform(table, schema)
                if keep is not None:
                    lo = bisect_left(keep, offset)
                    hi = bisect_left(keep, offset + len(table))
                    picked = [p - offset for p in keep[lo:hi]]
                    table = table.take(pa.array(picked, pa.int64()))
                offset += batch.num_rows
                if not len(table):
                    continue
                if writer is None or written >= target_rows:
                    if writer is not None:
                        writer.close()
                    temps.append(results_dir / f".compact-{len(temps):05d}.tmp")
                    writer = pq.ParquetWriter(temps[-1], schema, **options)
                    written = 0
                writer.write_table(table)
                written += len(table)
        if writer is not None:
            writer.close()
            writer = None
        first = parts[-1][0] + 1
        for index, temp in enumerate(temps):
            os.replace(temp, part_path(results_dir, first + index))
        for _, path in parts:
            path.unlink()
    except (OSError, pa.ArrowException, CompactionStopped) as exc:
        if writer is not None:
            # Closing writes the footer, which fails again on a full disk.
            with contextlib.suppress(OSError, pa.ArrowException):
                writer.close()
        for temp in temps:
            temp.unlink(missing_ok=True)
        if isinstance(exc, CompactionStopped):
            raise
        raise OutputError.writing(f"the compacted parts in {results_dir}", exc) from exc
    return len(temps)


def _worth_rewriting(
    parts: Sequence[tuple[int, Path]],
    schema: pa.Schema,
    min_parts: int,
    target_rows: int,
) -> bool:
    """Whether parts without repeated ids should be compacted: there are many
    small ones, or one lacks a column of ``schema`` (written by an earlier
    version of batchrun before a resume), which readers that take the first
    file's schema, such as ``pyarrow.dataset``, would then leave out."""
    largest = 0
    try:
        for _, path in parts:
            # ParquetFile's schema_arrow, not read_metadata's to_arrow_schema:
            # the latter left about 20 KB of freed heap resident a file (22 MB
            # over 1,000 parts), and a 1,000,000-row run's memory jumped by
            # 50 MB when its compaction began.
            part = pq.ParquetFile(path)
            if not part.schema_arrow.equals(schema):
                return True
            largest = max(largest, part.metadata.num_rows)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    return len(parts) > min_parts and largest < target_rows


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns of ``schema``: cast, and nulls where missing
    (a part written before a column existed)."""
    if table.schema.equals(schema):
        # Only when needed: a cast imports pyarrow.compute (about 45 ms) even
        # for a table of the same schema.
        return table
    names = set(table.column_names)
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in names
        else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a temp file in the same directory, then rename over ``path``.

    Raises:
        OutputError: Writing or renaming failed; ``path`` is unchanged.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError.writing(str(path), exc) from exc


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a JSON document atomically (indented, for people to read too)."""
    # orjson: the manifest is rewritten at every part, and the json module
    # took about 1 ms for it.
    text = orjson.dumps(
        data, default=str, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
    )
    atomic_write(path, lambda tmp: tmp.write_bytes(text))


def write_usage(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the usage table atomically."""
    table = pa.Table.from_pylist(list(rows), schema=USAGE_SCHEMA)
    atomic_write(path, lambda tmp: _write_table(table, tmp))


def has_output(out_dir: Path) -> bool:
    """Whether ``OUT`` already holds a run (a manifest, results or a journal)."""
    if (out_dir / MANIFEST_FILE).exists():
        return True
    return any(
        (out_dir / sub).is_dir() and any((out_dir / sub).iterdir())
        for sub in (RESULTS_DIR, JOURNAL_DIR)
    )


class OutputLock:
    """One run at a time in an ``OUT`` directory.

    Two runs into one ``OUT`` (the same command started twice, or a scheduler
    retrying a job that is still alive) would both send every row not yet
    done, paying twice, and would write over each other's journal segments.
    The lock is an exclusive ``flock`` on ``OUT/.batchrun.lock``, held for the
    whole run. The kernel lets it go when the process ends however it ends, so
    a killed run never leaves a stale lock. The file stays: deleting it would
    let a third run lock a new file while a second still holds the old one.

    Use ``OutputLock.acquire(out_dir)``, then ``release()``.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, out_dir: Path) -> OutputLock:
        """Create ``OUT`` if needed and lock it. Blocking: while another
        process holds the lock, it tries again for at most 0.2 s (``held``
        takes it for an instant), then gives up.

        Raises:
            InputError: Another run holds ``OUT``: names its pid.
            OutputError: ``OUT`` cannot be created.
        """
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one run at a time is up to you
            return cls(None)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            reason = exc.strerror or exc
            paths = [out_dir, *out_dir.parents]
            file = next((p for p in paths if p.exists() and not p.is_dir()), None)
            if file is not None:
                reason = f"{file} is a file, and the output is a directory"
            raise OutputError(f"cannot write in {out_dir}: {reason}") from exc
        for _ in range(_LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(_LOCK_RETRY_S)
            except OSError:
                # A filesystem without locks: run unlocked rather than not at all.
                os.close(fd)
                return cls(None)
        else:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise InputError(
                f"another batchrun run is writing here{pid}; let it finish, or"
                " stop it and run again to resume",
                path=str(out_dir),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    @staticmethod
    def held(out_dir: Path) -> bool | None:
        """Whether a run holds ``OUT`` now, or ``None`` if that cannot be told
        (no lock file, as in outputs from before the lock; or no ``flock``).

        Unlike the pid in the manifest, this cannot be fooled by a pid reused
        by another process, or by a killed run left unreaped. It takes a shared
        lock for an instant; a run starting in that instant tries again.
        """
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fd = os.open(out_dir / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)  # drops the shared lock too
        return False

    def release(self) -> None:
        """Let the next run in (closing the file drops the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clear_output(out_dir: Path) -> None:
    """Delete what batchrun wrote in ``OUT`` (``--overwrite``); nothing else.

    Raises:
        OutputError: Something could not be deleted.
    """
    try:
        for sub in (RESULTS_DIR, JOURNAL_DIR):
            if (out_dir / sub).exists():
                shutil.rmtree(out_dir / sub)
        for name in (USAGE_FILE, MANIFEST_FILE):
            (out_dir / name).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot clear {out_dir}: {exc.strerror or exc}") from exc


def open_output(out_dir: Path) -> Path:
    """Create ``OUT/results`` and check that ``OUT`` is writable.

    Returns:
        The results directory.

    Raises:
        OutputError: The directory cannot be created or written.
    """
    results = out_dir / RESULTS_DIR
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".batchrun-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    return results
