"""Export results to other formats; reads only ``OUT``, never changes it.

Formats (``FORMATS``):

- ``openai-batch``: the output file of the OpenAI Batch API, one JSON line per
  result, for tools written against that API.
- ``jsonl``: the result rows as flat JSON lines, timestamps as ISO-8601 text.
- ``parquet``: one Parquet file with the whole results schema.

Each result appears once. A key is the row id, or the id and its sweep variant
when the row has one; when a key occurs more than once (a resumed run, or one
still going or crashed before compacting), the latest row wins. Rows only in
the journal (segments after the manifest's ``parts_through``) are newer than
every part. Rows come out in input order (the ``row`` column), a row's sweep
variants together and by name (rows without one first); rows of parts written
before results had a ``row`` come last, by id.

Memory grows with the keys only. A first pass reads the id and variant columns
to find each key's latest row and the output order; a second pass streams the
winning rows part by part, in chunks of at most 8,192 rows and about 32 MiB.
Rows not already in output order are spilled to an uncompressed Arrow file
next to ``dest`` and gathered chunk by chunk through a memory map, so the page
cache holds them, not the heap.
"""

# pyarrow is otherwise kept to sources.py and sinks.py. Exporting reads and
# writes the results' own formats; it lives apart from sinks.py so that runs
# never load it, and it reuses the sinks helpers for everything they cover.

from __future__ import annotations

import hashlib
import tempfile
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, OutputError
from .journal import JOURNAL_DIR, read_segment, segments
from .jsontext import loads_answer
from .resume import load_manifest
from .sinks import (
    LOG_KEY,
    MANIFEST_FILE,
    RESULT_SCHEMA,
    RESULTS_DIR,
    USAGE_FILE,
    PartWriter,
    Row,
    atomic_write,
    conform,
    infer_type,
    latest_rows,
    list_parts,
)

__all__ = ["FORMATS", "export_results"]

FORMATS = ("openai-batch", "jsonl", "parquet")

# Rows per batch read from a part, and per chunk gathered and written; fewer
# when rows are long, so that a chunk stays near _CHUNK_BYTES: 3,000 rows of
# 200 KB prompts took 2.4-3.1 GB to export in chunks of 8,192 rows.
_CHUNK_ROWS = 8192
_CHUNK_BYTES = 32 << 20
_KEY_SEPARATOR = "\x1f"
_Writer = Callable[[Path, Iterable[pa.Table], pa.Schema], int]


def export_results(out_dir: Path, fmt: str, dest: Path) -> int:
    """Write the results of the run in ``out_dir`` to ``dest`` as ``fmt``.

    ``dest`` appears atomically (a temp file next to it, then ``os.replace``);
    ``out_dir`` is only read, and a run may still be writing to it.

    Args:
        out_dir: The run's ``OUT`` directory.
        fmt: One of ``FORMATS``.
        dest: The file to write; its directory must exist.

    Returns:
        The number of rows written: one per id (or id and variant).

    Raises:
        ConfigError: ``fmt`` is unknown, ``out_dir`` holds no batchrun run or
            no results yet (or, for ``openai-batch``, no raw responses), or
            ``dest`` is one of the files the run owns.
        OutputError: ``dest`` cannot be written, or a part cannot be read.
    """
    if fmt not in FORMATS:
        raise ConfigError(
            f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}"
        )
    _check_dest(out_dir, dest)
    if fmt == "openai-batch":
        _check_raw(out_dir)
    plan = _plan(out_dir)
    write = _WRITERS[fmt]
    written = 0

    def produce(tmp: Path) -> None:
        nonlocal written
        try:
            with _ordered_tables(plan, dest.parent) as tables:
                written = write(tmp, tables, plan.schema)
        except BaseException:
            # atomic_write cleans up only after write errors; reading OUT can
            # fail too, and an interrupt must not leave the temp file either.
            tmp.unlink(missing_ok=True)
            raise

    atomic_write(dest, produce)
    return written


def _check_dest(out_dir: Path, dest: Path) -> None:
    """Refuse a ``dest`` that would overwrite what the run owns."""
    target = dest.resolve()
    out = out_dir.resolve()
    for owned in (RESULTS_DIR, JOURNAL_DIR, MANIFEST_FILE, USAGE_FILE):
        if target.is_relative_to(out / owned):
            raise ConfigError(
                f"cannot export to {dest}: it is part of the run in {out_dir}"
            )


@dataclass(slots=True)
class _Source:
    """One part file, or the rows of one journal segment not yet in a part."""

    number: int
    rows: int
    path: Path
    table: pa.Table | None = None  # journal rows, read once and kept: bounded


@dataclass(slots=True)
class _Plan:
    """What to write: the sources in write order and which rows win, in order.

    ``winners`` are global row positions (counting through the sources in
    order), ascending. ``order`` lists indexes into ``winners`` in output order.
    """

    sources: list[_Source]
    schema: pa.Schema
    winners: array[int]
    order: pa.Array
    chunk_rows: int = _CHUNK_ROWS


def _check_raw(out_dir: Path) -> None:
    """The Batch API format carries each response body as the server sent it:
    a run with ``--no-raw`` kept none, and every line would say nothing.

    Raises:
        ConfigError: The run kept no raw responses.
    """
    manifest = load_manifest(out_dir)
    if manifest is not None and manifest.get("raw_response") is False:
        raise ConfigError(
            f"{out_dir} was run with --no-raw, and the openai-batch format needs"
            " the responses as sent; export --format jsonl or parquet instead"
        )


def _plan(out_dir: Path) -> _Plan:
    """First pass: read the keys of every row; find the winners and their order.

    Raises:
        ConfigError: No batchrun run, or no results yet.
        OutputError: A part or segment cannot be read.
    """
    import pyarrow.compute as pc  # deferred: 60 ms of start-up otherwise

    manifest = load_manifest(out_dir)
    if manifest is None:
        raise ConfigError(f"{out_dir} holds no batchrun run (no {MANIFEST_FILE})")
    through = manifest.get("parts_through", -1)
    if not isinstance(through, int):
        raise ConfigError(f"{out_dir / MANIFEST_FILE} has no valid parts_through")
    # Segments before parts: the runner writes part N before it deletes segment
    # N, so a segment that vanishes meanwhile is found as a part instead.
    pending = _read_journal(out_dir / JOURNAL_DIR, through)
    parts = list_parts(out_dir / RESULTS_DIR)
    if not parts and not pending:
        raise ConfigError(f"{out_dir} holds no results yet")
    # A segment whose part exists holds that part's rows (the run stopped, or
    # is, between writing the part and recording it in the manifest).
    numbers = {number for number, _ in parts}
    pending = [item for item in pending if item[0] not in numbers]

    sources: list[_Source] = []
    schemas = [RESULT_SCHEMA]
    ids: list[pa.Array] = []
    positions: list[pa.Array] = []
    variants: list[pa.Array] = []
    size = 0  # bytes of every row, uncompressed
    for number, path in parts:
        try:
            part = pq.ParquetFile(path)  # not read_metadata: see sinks._worth_rewriting
            metadata, schema = part.metadata, part.schema_arrow
            columns = [n for n in ("id", "row", "variant") if n in schema.names]
            keys = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc
        size += sum(
            metadata.row_group(i).total_byte_size
            for i in range(metadata.num_row_groups)
        )
        schemas.append(schema)
        sources.append(_Source(number, len(keys), path))
        ids.append(keys.column("id").combine_chunks().cast(pa.string()))
        positions.append(_positions_in_input(keys))
        variants.append(_variants(keys))
    schema = _unify([*schemas, _journal_schema(pending, schemas)], out_dir)
    for number, path, rows in pending:
        table = _journal_table(rows, schema, path)
        size += table.nbytes
        sources.append(_Source(number, len(table), path, table))
        ids.append(table.column("id").combine_chunks())
        positions.append(_positions_in_input(table))
        variants.append(_variants(table))

    all_ids = pa.chunked_array(ids, pa.string())
    all_variants = pa.chunked_array(variants, pa.string())
    winners = latest_rows(_keys(all_ids, all_variants))
    chosen_variants = all_variants.take(winners)
    chosen_positions = pa.chunked_array(positions, pa.int64()).take(winners)
    # Sorting on "has a position" and "has a variant" first puts rows without
    # one last (a row written before results had a position) or first (a row
    # outside a sweep) without SortOptions.null_placement, whose spelling
    # differs across pyarrow versions.
    order = pc.sort_indices(
        pa.table(
            {
                "no_row": pc.is_null(chosen_positions),
                "row": chosen_positions,
                "id": all_ids.take(winners),
                "has_variant": pc.is_valid(chosen_variants),
                "variant": chosen_variants,
            }
        ),
        sort_keys=[
            ("no_row", "ascending"),
            ("row", "ascending"),
            ("id", "ascending"),
            ("has_variant", "ascending"),
            ("variant", "ascending"),
        ],
    )
    count = sum(source.rows for source in sources)
    chunk_rows = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES * count // max(size, 1)))
    return _Plan(sources, schema, _positions(winners), order, chunk_rows)


def _read_journal(journal_dir: Path, through: int) -> list[tuple[int, Path, list[Row]]]:
    """The rows of each segment after part ``through``; empty segments left out."""
    found = []
    for number, path in segments(journal_dir):
        if number <= through:
            continue
        try:
            rows = [
                {k: v for k, v in row.items() if k != LOG_KEY}
                for row in read_segment(path)
                if isinstance(row.get("id"), str)
            ]
        except OSError as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc
        if rows:
            found.append((number, path, rows))
    return found


def _journal_schema(
    pending: Sequence[tuple[int, Path, list[Row]]], schemas: Sequence[pa.Schema]
) -> pa.Schema:
    """Columns only journal rows have (kept input columns of a first part)."""
    known = {name for schema in schemas for name in schema.names}
    kinds: dict[str, set[type]] = {}
    for _, _, rows in pending:
        for row in rows:
            for name, value in row.items():
                if name not in known:
                    kinds.setdefault(name, set()).add(type(value))
    return pa.schema([(name, infer_type(types)) for name, types in kinds.items()])


def _unify(schemas: Sequence[pa.Schema], out_dir: Path) -> pa.Schema:
    try:
        return pa.unify_schemas(list(schemas), promote_options="permissive")
    except pa.ArrowException as exc:
        raise OutputError(f"the parts in {out_dir} disagree on columns: {exc}") from exc


def _journal_table(rows: Sequence[Row], schema: pa.Schema, path: Path) -> pa.Table:
    """Journal rows as a table of ``schema``, converted as the runner will when
    it rolls the segment into a part."""
    extra = {f.name: f.type for f in schema if f.name not in RESULT_SCHEMA.names}
    try:
        return conform(PartWriter(path.parent, kept=extra).table(rows), schema)
    except pa.ArrowException as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc


def _positions_in_input(table: pa.Table) -> pa.Array:
    if "row" not in table.column_names:
        return pa.nulls(len(table), pa.int64())
    return table.column("row").combine_chunks().cast(pa.int64())


def _variants(table: pa.Table) -> pa.Array:
    if "variant" not in table.column_names:
        return pa.nulls(len(table), pa.string())
    return table.column("variant").combine_chunks().cast(pa.string())


def _keys(ids: pa.ChunkedArray, variants: pa.ChunkedArray) -> pa.ChunkedArray:
    """The key of each row: its id, or id and variant when it has one."""
    import pyarrow.compute as pc  # deferred: 60 ms of start-up otherwise

    joined = pc.binary_join_element_wise(ids, variants, _KEY_SEPARATOR)
    return pc.if_else(pc.is_null(variants), ids, joined)


def _positions(values: pa.Array) -> array[int]:
    """A compact ``array('q')`` copy, for bisecting."""
    out = array("q")
    for start in range(0, len(values), 65536):
        out.extend(values.slice(start, 65536).to_pylist())
    return out


def _source_tables(
    source: _Source, schema: pa.Schema, chunk_rows: int
) -> Iterator[pa.Table]:
    """A source's rows, batch by batch, as tables of ``schema``."""
    if source.table is not None:
        yield source.table
        return
    seen = 0
    try:
        parquet = pq.ParquetFile(source.path, pre_buffer=False)
        try:
            for batch in parquet.iter_batches(batch_size=chunk_rows):
                seen += batch.num_rows
                yield conform(pa.Table.from_batches([batch]), schema)
        finally:
            parquet.close()
    except FileNotFoundError as exc:
        raise OutputError(
            f"{source.path} disappeared while exporting (the run finished and"
            " compacted its results); export again"
        ) from exc
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read {source.path}: {exc}") from exc
    if seen != source.rows:
        raise OutputError(f"{source.path} changed while exporting; export again")


def _winning_tables(plan: _Plan) -> Iterator[pa.Table]:
    """Second pass: the winning rows, in write order, a batch at a time."""
    winners = plan.winners
    offset = 0
    for source in plan.sources:
        for table in _source_tables(source, plan.schema, plan.chunk_rows):
            lo = bisect_left(winners, offset)
            hi = bisect_left(winners, offset + len(table))
            if hi - lo == len(table) > 0:
                yield table
            elif hi > lo:
                picked = [p - offset for p in winners[lo:hi]]
                yield table.take(pa.array(picked, pa.int64()))
            offset += len(table)


@contextmanager
def _ordered_tables(plan: _Plan, spill_dir: Path) -> Iterator[Iterator[pa.Table]]:
    """The winning rows in output order, a chunk at a time."""
    import pyarrow.compute as pc  # deferred: 60 ms of start-up otherwise

    order = plan.order
    if len(order) < 2 or pc.all(pc.less(order[:-1], order[1:])).as_py():
        yield _winning_tables(plan)  # already in output order: no spill
        return
    with tempfile.TemporaryDirectory(prefix=".batchrun-export-", dir=spill_dir) as tmp:
        spill = Path(tmp) / "rows.arrow"
        with (
            pa.OSFile(str(spill), "wb") as sink,
            pa.ipc.new_file(sink, plan.schema) as writer,
        ):
            for table in _winning_tables(plan):
                writer.write_table(table)
        with pa.memory_map(str(spill)) as source:
            reader = pa.ipc.open_file(source)
            # Uncompressed IPC batches are views of the map, not copies.
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            yield _gathered(batches, order, plan.schema, plan.chunk_rows)


def _gathered(
    batches: Sequence[pa.RecordBatch],
    order: pa.Array,
    schema: pa.Schema,
    chunk_rows: int,
) -> Iterator[pa.Table]:
    starts = [0]
    for batch in batches:
        starts.append(starts[-1] + batch.num_rows)
    for start in range(0, len(order), chunk_rows):
        indices = order.slice(start, chunk_rows).to_pylist()
        yield _gather(batches, starts, indices, schema)


def _gather(
    batches: Sequence[pa.RecordBatch],
    starts: Sequence[int],
    indices: Sequence[int],
    schema: pa.Schema,
) -> pa.Table:
    """The spilled rows at ``indices``, in that order: one take per batch."""
    ranked = sorted(range(len(indices)), key=indices.__getitem__)
    inverse = [0] * len(indices)
    for place, k in enumerate(ranked):
        inverse[k] = place
    pieces = []
    j = 0
    while j < len(ranked):
        number = bisect_right(starts, indices[ranked[j]]) - 1
        first, end = starts[number], starts[number + 1]
        local = []
        while j < len(ranked) and indices[ranked[j]] < end:
            local.append(indices[ranked[j]] - first)
            j += 1
        pieces.append(batches[number].take(pa.array(local, pa.int64())))
    table = pa.Table.from_batches(pieces, schema=schema)
    return table.take(pa.array(inverse, pa.int64()))


def _column(table: pa.Table, name: str) -> list[Any]:
    if name not in table.column_names:
        return [None] * len(table)
    values: list[Any] = table.column(name).to_pylist()
    return values


def _batch_line(
    row_id: str,
    variant: str | None,
    status: str,
    response: str | None,
    http_status: int | None,
    error: str | None,
) -> dict[str, Any]:
    """One line of an OpenAI Batch API output file."""
    key = row_id if variant is None else f"{row_id}{_KEY_SEPARATOR}{variant}"
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    body = _json_object(response)
    return {
        "id": f"batch_req_{digest}",
        "custom_id": row_id if variant is None else f"{row_id}::{variant}",
        "response": None
        if body is None
        else {"status_code": http_status, "request_id": body.get("id"), "body": body},
        "error": None
        if status == "ok"
        else {"code": _error_code(http_status, error), "message": error or status},
    }


def _json_object(text: str | None) -> dict[str, Any] | None:
    """The response body, if it was kept and is a JSON object.

    Error bodies are stored shortened, so they may not parse; the line then
    has no response and its error says what happened.
    """
    if text is None:
        return None
    try:
        # orjson first, then what it refuses but can be read (jsontext).
        data = loads_answer(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _error_code(http_status: int | None, error: str | None) -> str:
    """``http_<status>`` for an HTTP error, else the error's type name.

    A failure after a 2xx (a malformed body) is named by its type, not its
    status.
    """
    if http_status is not None and http_status >= 400:
        return f"http_{http_status}"
    kind = (error or "").partition(":")[0].strip()
    return kind if kind.isidentifier() else "error"


def _write_openai_batch(path: Path, tables: Iterable[pa.Table], _: pa.Schema) -> int:
    written = 0
    option = orjson.OPT_APPEND_NEWLINE
    names = ("id", "variant", "status", "response", "http_status", "error")
    with path.open("wb") as handle:
        for table in tables:
            columns = [_column(table, name) for name in names]
            handle.write(
                b"".join(
                    orjson.dumps(_batch_line(*values), option=option)
                    for values in zip(*columns, strict=True)
                )
            )
            written += len(table)
    return written


def _write_jsonl(path: Path, tables: Iterable[pa.Table], _: pa.Schema) -> int:
    written = 0
    option = orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z
    with path.open("wb") as handle:
        for table in tables:
            handle.write(
                b"".join(orjson.dumps(row, option=option) for row in table.to_pylist())
            )
            written += len(table)
    return written


def _write_parquet(path: Path, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        for table in tables:
            writer.write_table(table)
            written += len(table)
    return written


_WRITERS: dict[str, _Writer] = {
    "openai-batch": _write_openai_batch,
    "jsonl": _write_jsonl,
    "parquet": _write_parquet,
}
