"""Tests for ``batchrun.sources``: input discovery, batched reading, id sets."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import InputError
from batchrun.sources import (
    BATCH_BYTES,
    IdSet,
    RowBatch,
    count_rows,
    expand_inputs,
    iter_batches,
)

from .helpers import write_jsonl, write_parquet


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"p{i}", "n": i} for i in range(n)]


def _all(batches: list[RowBatch]) -> tuple[list[dict[str, Any]], list[int]]:
    rows = [row for batch in batches for row in batch.rows]
    numbers = [number for batch in batches for number in batch.numbers]
    return rows, numbers


# --- expand_inputs ------------------------------------------------------------


def test_expand_inputs_missing_path(tmp_path: Path) -> None:
    """A path that does not exist is an InputError naming it."""
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="no such file") as info:
        expand_inputs([missing])
    assert info.value.path == str(missing)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_pipe_or_standard_input_is_refused_saying_why(tmp_path: Path) -> None:
    """Rows are read twice, so a pipe cannot be an input: said as such, where
    "-" was "no such file or directory" and a pipe from a shell (/dev/fd/63)
    "unknown input format"."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    for path in (fifo, Path("-")):
        with pytest.raises(InputError) as info:
            expand_inputs([path])
        assert str(info.value) == (
            f"{path}: is not a file: every row is read twice, checked before the"
            " first request and then sent, so a pipe or standard input cannot be"
            " an input; save it to a file first"
        )


def test_expand_inputs_unknown_suffix(tmp_path: Path) -> None:
    """A file of an unknown format is an InputError naming it."""
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(InputError, match="unknown input format") as info:
        expand_inputs([path])
    assert info.value.path == str(path)


def test_expand_inputs_dir_without_inputs(tmp_path: Path) -> None:
    """A directory with no input file is an InputError naming it."""
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.jsonl").write_text("{}")
    with pytest.raises(InputError, match=r"no \.parquet or JSON Lines") as info:
        expand_inputs([tmp_path])
    assert info.value.path == str(tmp_path)


def test_expand_inputs_dir_of_jsonl_shards(tmp_path: Path) -> None:
    """A directory without Parquet files expands to its JSON Lines shards, in
    name order, leaving out hidden and marker files."""
    for name in ("part-1.jsonl.gz", "part-0.jsonl", "_SUCCESS", ".part-2.jsonl"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([tmp_path]) == [
        tmp_path / "part-0.jsonl",
        tmp_path / "part-1.jsonl.gz",
    ]


def test_expand_inputs_dir_is_sorted_parquet_only(tmp_path: Path) -> None:
    """A directory expands to its .parquet files in sorted order, nothing else."""
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("c.parquet", "a.parquet", "b.parquet"):
        write_parquet(parts / name, _rows(1))
    write_jsonl(parts / "notes.jsonl", _rows(1))
    assert expand_inputs([parts]) == [
        parts / "a.parquet",
        parts / "b.parquet",
        parts / "c.parquet",
    ]


def test_expand_inputs_keeps_argument_order(tmp_path: Path) -> None:
    """Files come out in the order given, each accepted suffix included."""
    names = ["z.jsonl", "a.json", "m.jsonl.gz", "b.parquet"]
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.write_bytes(b"")
    assert expand_inputs(paths) == paths


# --- JSONL --------------------------------------------------------------------


def test_jsonl_batch_sizes(tmp_path: Path) -> None:
    """JSONL rows come in batches of batch_rows, the last one partial."""
    path = write_jsonl(tmp_path / "in.jsonl", _rows(7))
    batches = list(iter_batches([path], batch_rows=3))
    assert [len(b.rows) for b in batches] == [3, 3, 1]
    assert {b.kind for b in batches} == {"line"}
    assert {b.path for b in batches} == {str(path)}
    rows, numbers = _all(batches)
    assert rows == _rows(7)
    assert numbers == [1, 2, 3, 4, 5, 6, 7]


def test_jsonl_blank_lines_skipped_and_numbered(tmp_path: Path) -> None:
    """Blank lines yield no rows; numbers stay the 1-based physical line numbers."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n\n{"a": 3}\n')
    rows, numbers = _all(list(iter_batches([path], batch_rows=2)))
    assert rows == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert numbers == [1, 4, 6]


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    """A line that is valid JSON but not an object is an InputError with its line."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(InputError, match="JSON object, got an array") as info:
        list(iter_batches([path]))
    assert info.value.line == 3
    assert info.value.path == str(path)
    assert "jq" not in str(info.value)  # the format hint is for line 1 only


def test_jsonl_utf8_bom_is_skipped(tmp_path: Path) -> None:
    """A UTF-8 byte order mark at the start of the file is not part of row 1."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n')
    rows, numbers = _all(list(iter_batches([path])))
    assert rows == [{"a": 1}, {"a": 2}]
    assert numbers == [1, 2]


def test_jsonl_lone_surrogate_is_read_as_replacement_character(
    tmp_path: Path,
) -> None:
    """Half of a surrogate pair (valid JSON, not valid Unicode) is read as
    U+FFFD and the row noted; a whole pair stays the character it encodes."""
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"a": "fine"}\n'
        '{"a": "cut \\ud83d here", "b": "\\ud83d\\ude00"}\n'
        '{"\\udc00": 1}\n'
    )
    (batch,) = iter_batches([path])
    assert batch.rows == [
        {"a": "fine"},
        {"a": "cut \ufffd here", "b": "\U0001f600"},
        {"\ufffd": 1},
    ]
    assert list(batch.repaired) == [2, 3]


def test_jsonl_other_malformed_line_with_surrogate_is_refused(tmp_path: Path) -> None:
    """Only a lone surrogate is forgiven: NaN beside it is still malformed."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": "\\ud83d", "b": NaN}\n')
    with pytest.raises(InputError, match="malformed JSON") as info:
        list(iter_batches([path]))
    assert info.value.line == 1


@pytest.mark.parametrize(
    ("data", "line", "message", "fix"),
    [
        (b'[\n  {"a": 1},\n  {"a": 2}\n]\n', 1, "the file is a JSON array", "jq -c"),
        (
            b'[{"a": 1}, {"a": 2}]\n',
            1,
            "got an array; JSON Lines holds one object",
            "jq -c",
        ),
        (
            b'{"a": 1}\n{\n  "a": 2\n}\n',
            2,
            "an object spread over several lines",
            "jq -c",
        ),
        (
            b'{"a": "ok"}\n{"a": "caf\xe9"}\n',
            2,
            "not UTF-8: byte 0xe9 at column 11",
            "iconv",
        ),
        ('{"a": "ok"}\n'.encode("utf-16"), 1, "the file is UTF-16", "iconv"),
    ],
)
def test_a_file_not_in_json_lines_names_the_fix(
    tmp_path: Path, data: bytes, line: int, message: str, fix: str
) -> None:
    """A JSON array, a pretty-printed object, or text in another encoding is
    named as such, with the command that fixes it (not as malformed JSON)."""
    path = tmp_path / "in.json"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        list(iter_batches([path]))
    assert message in str(info.value)
    assert fix in str(info.value)
    assert info.value.line == line


def test_jsonl_malformed_line(tmp_path: Path) -> None:
    """Malformed JSON is an InputError carrying the path and 1-based line."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n\n{"a": \n{"a": 4}\n')
    with pytest.raises(InputError, match="malformed JSON") as info:
        list(iter_batches([path]))
    assert info.value.path == str(path)
    assert info.value.line == 4
    assert f"{path}:4" in str(info.value)


def test_batches_of_long_rows_end_at_a_size(tmp_path: Path) -> None:
    """Batches of long rows end at about BATCH_BYTES, not at 1,024 rows, in
    JSONL and in Parquet (sized from the file's metadata): with prompts of
    200 KB, batches of 1,024 rows took the peak RSS to 1.2 GB."""
    long = "x" * (BATCH_BYTES // 3 + 1)  # three rows pass BATCH_BYTES
    # Distinct prompts, and one long value repeated (a Parquet dictionary
    # stores it once; read, it takes its full size in every row).
    rows = [{"id": f"r{i}", "prompt": f"{i}{long}"} for i in range(10)]
    same = [{"id": f"r{i}", "prompt": long} for i in range(10)]
    jsonl = write_jsonl(tmp_path / "in.jsonl", rows)
    assert [len(b.rows) for b in iter_batches([jsonl])] == [3, 3, 3, 1]
    for name, table in (("distinct", rows), ("repeated", same)):
        parquet = write_parquet(tmp_path / f"{name}.parquet", table)
        assert [len(b.rows) for b in iter_batches([parquet])] == [2, 2, 2, 2, 2]
    short = write_jsonl(tmp_path / "short.jsonl", _rows(1500))
    assert [len(b.rows) for b in iter_batches([short])] == [1024, 476]


def test_limit_stops_after_that_many_rows(tmp_path: Path) -> None:
    """A limit ends the rows across batches and files, and nothing after it is
    read: a malformed line past it goes unnoticed."""
    first = write_jsonl(tmp_path / "a.jsonl", _rows(5))
    second = tmp_path / "b.jsonl"
    second.write_text('{"id": "b0"}\n{"id": "b1"}\nnot json\n')
    batches = list(iter_batches([first, second], batch_rows=2, limit=7))
    rows, numbers = _all(batches)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4", "b0", "b1"]
    assert numbers == [1, 2, 3, 4, 5, 1, 2]
    assert [len(b.rows) for b in batches] == [2, 2, 1, 2]
    assert len(_all(list(iter_batches([first], batch_rows=2, limit=3)))[0]) == 3
    with pytest.raises(InputError, match="malformed JSON"):
        list(iter_batches([first, second], batch_rows=2, limit=8))


def test_jsonl_lines_numbered_across_batches(tmp_path: Path) -> None:
    """Batches of clean lines and batches with blank lines number alike, and a
    bad line far into the file is named by its physical line."""
    path = tmp_path / "in.jsonl"
    lines = [f'{{"a": {i}}}' for i in range(7)]
    lines[4:4] = ["", "  "]  # a batch of only blank lines at batch_rows=2
    path.write_text("\n".join(lines) + '\n{"a": 7} {"a": 8}\n')
    batches = iter_batches([path], batch_rows=2)
    rows, numbers = _all([next(batches) for _ in range(3)])
    assert rows == [{"a": i} for i in range(6)]
    assert numbers == [1, 2, 3, 4, 7, 8]
    with pytest.raises(InputError, match="malformed JSON") as info:
        list(batches)
    assert info.value.line == 10


def test_jsonl_gzip(tmp_path: Path) -> None:
    """A .jsonl.gz file is decompressed transparently."""
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('{"id": "x"}\n\n{"id": "y"}\n')
    rows, numbers = _all(list(iter_batches([path])))
    assert rows == [{"id": "x"}, {"id": "y"}]
    assert numbers == [1, 3]


def test_jsonl_truncated_gzip(tmp_path: Path) -> None:
    """A truncated gzip file is an InputError naming the file."""
    path = tmp_path / "in.jsonl.gz"
    data = gzip.compress(b"".join(b'{"id": %d}\n' % i for i in range(1000)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read") as info:
        list(iter_batches([path]))
    assert info.value.path == str(path)


def test_jsonl_columns_ignored(tmp_path: Path) -> None:
    """columns= does not filter JSONL rows, which are read whole."""
    path = write_jsonl(tmp_path / "in.jsonl", _rows(2))
    rows, _ = _all(list(iter_batches([path], columns={"id"})))
    assert rows == _rows(2)


def test_several_files_in_order(tmp_path: Path) -> None:
    """Files are read one after another; numbers restart in each file."""
    first = write_jsonl(tmp_path / "a.jsonl", _rows(2))
    second = write_parquet(tmp_path / "b.parquet", _rows(3))
    batches = list(iter_batches([first, second], batch_rows=10))
    assert [(b.path, b.kind, list(b.numbers)) for b in batches] == [
        (str(first), "line", [1, 2]),
        (str(second), "row", [1, 2, 3]),
    ]


# --- Parquet ------------------------------------------------------------------


def test_parquet_row_numbers_across_batches(tmp_path: Path) -> None:
    """Parquet rows are numbered from 1, continuing across batches."""
    path = write_parquet(tmp_path / "in.parquet", _rows(10))
    batches = list(iter_batches([path], batch_rows=4))
    assert [len(b.rows) for b in batches] == [4, 4, 2]
    assert {b.kind for b in batches} == {"row"}
    rows, numbers = _all(batches)
    assert rows == _rows(10)
    assert numbers == list(range(1, 11))


def test_parquet_several_row_groups(tmp_path: Path) -> None:
    """Row numbers stay continuous across Parquet row groups."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(9)), path, row_group_size=2)
    rows, numbers = _all(list(iter_batches([path], batch_rows=3)))
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(9)]
    assert numbers == list(range(1, 10))


def test_parquet_columns_restrict_read(tmp_path: Path) -> None:
    """columns= reads only those columns and ignores names not in the file."""
    path = write_parquet(tmp_path / "in.parquet", _rows(3))
    batches = list(iter_batches([path], columns={"id", "prompt", "not_there"}))
    rows, _ = _all(batches)
    assert rows == [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(3)]


def test_parquet_columns_none_reads_all(tmp_path: Path) -> None:
    """columns=None reads every column."""
    path = write_parquet(tmp_path / "in.parquet", _rows(2))
    rows, _ = _all(list(iter_batches([path], columns=None)))
    assert rows == _rows(2)


def test_parquet_corrupt_file(tmp_path: Path) -> None:
    """A file that is not Parquet is an InputError naming it."""
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read Parquet") as info:
        list(iter_batches([path]))
    assert info.value.path == str(path)


# --- count_rows ---------------------------------------------------------------


def test_count_rows_parquet(tmp_path: Path) -> None:
    """count_rows sums Parquet row counts from metadata."""
    a = write_parquet(tmp_path / "a.parquet", _rows(3))
    b = write_parquet(tmp_path / "b.parquet", _rows(5))
    assert count_rows([a, b]) == 8
    assert count_rows([]) == 0


def test_count_rows_unknown_with_jsonl(tmp_path: Path) -> None:
    """count_rows is None as soon as a JSONL file is among the inputs."""
    a = write_parquet(tmp_path / "a.parquet", _rows(3))
    b = write_jsonl(tmp_path / "b.jsonl", _rows(2))
    assert count_rows([a, b]) is None


def test_count_rows_corrupt_parquet(tmp_path: Path) -> None:
    """count_rows on a corrupt Parquet file is an InputError."""
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"garbage")
    with pytest.raises(InputError) as info:
        count_rows([path])
    assert info.value.path == str(path)


# --- IdSet --------------------------------------------------------------------


def test_idset_empty() -> None:
    """An empty set has no suspects."""
    ids = IdSet()
    assert len(ids) == 0
    assert ids.suspects() == set()


def test_idset_no_duplicate() -> None:
    """Distinct ids give no suspects."""
    ids = IdSet()
    ids.add_many(["a", "b"])
    ids.add_many(["c"])
    assert len(ids) == 3
    assert ids.suspects() == set()


def test_idset_duplicate_across_calls() -> None:
    """An id added in two calls is a suspect, under its own key."""
    ids = IdSet()
    ids.add_many(["a", "b"])
    ids.add_many(["c", "b"])
    assert ids.suspects() == {IdSet.key("b")}


def test_idset_large() -> None:
    """A hundred thousand ids with one repeat yield exactly that suspect."""
    ids = IdSet()
    ids.add_many(f"id-{i}" for i in range(100_000))
    ids.add_many(["id-123"])
    assert ids.suspects() == {IdSet.key("id-123")}
