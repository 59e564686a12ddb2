"""Part files, compaction and the journal, on their own."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import orjson
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batchrun.errors import InputError, OutputError
from batchrun.journal import Journal, read_segment, segments
from batchrun.sinks import (
    LOCK_FILE,
    CompactionStopped,
    OutputLock,
    PartWriter,
    compact,
    list_parts,
)

from .helpers import make_row


def _read(results: Path) -> list[dict[str, object]]:
    return sorted(
        ds.dataset(results).to_table().to_pylist(), key=lambda r: str(r["id"])
    )


def test_few_parts_are_left_alone(tmp_path: Path) -> None:
    """Up to min_parts parts without repeated ids are not rewritten."""
    writer = PartWriter(tmp_path)
    for n in range(3):
        writer.write(n, [make_row(f"{n}-{i}") for i in range(5)])
    assert compact(tmp_path, writer.schema, dedupe=False, min_parts=4) == 3
    assert [n for n, _ in list_parts(tmp_path)] == [0, 1, 2]


def test_many_parts_are_merged(tmp_path: Path) -> None:
    """More parts than min_parts become files of up to target_rows rows."""
    writer = PartWriter(tmp_path)
    for n in range(10):
        writer.write(n, [make_row(f"{n}-{i}") for i in range(5)])
    files = compact(tmp_path, writer.schema, dedupe=False, target_rows=20, min_parts=4)
    assert files == 3
    assert [n for n, _ in list_parts(tmp_path)] == [10, 11, 12]
    assert len(_read(tmp_path)) == 50
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_parts_without_a_newer_column_are_merged(tmp_path: Path) -> None:
    """A part written before results had a column (``row``) is merged with
    nulls in it, not refused: a cast needs the same columns."""
    writer = PartWriter(tmp_path)
    for n in range(6):
        writer.write(n, [make_row(f"{n}-{i}", position=5 * n + i) for i in range(5)])
    old = list_parts(tmp_path)[0][1]
    pq.write_table(pq.read_table(old).drop_columns(["row"]), old)
    assert compact(tmp_path, writer.schema, dedupe=False, min_parts=4) == 1
    rows = _read(tmp_path)
    assert [r["row"] for r in rows] == [None] * 5 + list(range(5, 30))


def test_a_part_without_a_newer_column_is_rewritten(tmp_path: Path) -> None:
    """Few parts are left alone, unless one lacks a column (written before an
    upgrade, then resumed): pyarrow.dataset takes the first file's schema,
    and read the results without the column at all."""
    writer = PartWriter(tmp_path)
    for n in range(3):
        writer.write(n, [make_row(f"{n}-{i}", position=5 * n + i) for i in range(5)])
    assert compact(tmp_path, writer.schema, dedupe=False, min_parts=4) == 3
    old = list_parts(tmp_path)[0][1]
    pq.write_table(pq.read_table(old).drop_columns(["row"]), old)
    assert "row" not in ds.dataset(tmp_path).schema.names
    assert compact(tmp_path, writer.schema, dedupe=False, min_parts=4) == 1
    assert ds.dataset(tmp_path).schema.names == writer.schema.names
    assert [r["row"] for r in _read(tmp_path)] == [None] * 5 + list(range(5, 15))


class _StopAfter(threading.Event):
    """Set once it has been asked ``checks`` times: a Ctrl-C mid-compaction."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.checks = checks

    def is_set(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_stopped_compaction_leaves_the_parts_as_they_were(tmp_path: Path) -> None:
    """Told to stop after two of its new files, compaction removes them and
    leaves every part as it was."""
    writer = PartWriter(tmp_path)
    for n in range(10):
        writer.write(n, [make_row(f"{n}-{i}") for i in range(5)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    stop = _StopAfter(6)  # a batch per part; a new file every four
    with pytest.raises(CompactionStopped):
        compact(
            tmp_path, writer.schema, dedupe=False, target_rows=20, min_parts=4,
            stop=stop,
        )  # fmt: skip
    assert stop.checks == -1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_no_statistics_on_free_text_columns(tmp_path: Path) -> None:
    """Parts and compacted files keep min/max for ids and numbers, not for text."""
    writer = PartWriter(tmp_path)
    for n in range(3):
        writer.write(n, [make_row(f"{n}-{i}") for i in range(5)])
    compact(tmp_path, writer.schema, dedupe=False, min_parts=1)
    for _, path in list_parts(tmp_path):
        group = pq.ParquetFile(path).metadata.row_group(0)
        stats = {
            group.column(i).path_in_schema: group.column(i).is_stats_set
            for i in range(group.num_columns)
        }
        with_stats = {name for name, present in stats.items() if present}
        assert {"id", "prompt_tokens", "started_at"} <= with_stats
        assert not {"prompt", "completion", "response"} & with_stats


def test_dedupe_keeps_the_latest(tmp_path: Path) -> None:
    """With dedupe, each id keeps its row from the latest part."""
    writer = PartWriter(tmp_path)
    writer.write(0, [make_row("a", "error", completion="old"), make_row("b")])
    writer.write(1, [make_row("a", "ok", completion="new"), make_row("c")])
    writer.write(2, [make_row("c", "ok", completion="newest")])
    compact(tmp_path, writer.schema, dedupe=True)
    rows = {r["id"]: r for r in _read(tmp_path)}
    assert sorted(str(k) for k in rows) == ["a", "b", "c"]
    assert rows["a"]["completion"] == "new"
    assert rows["c"]["completion"] == "newest"


def test_journal_appends_rotates_and_discards(tmp_path: Path) -> None:
    """Rows land in the current segment; discard drops segments up to a number."""
    journal = Journal(tmp_path, 0)
    journal.append([make_row("a"), make_row("b")])
    journal.rotate(1)
    journal.append([make_row("c")])
    assert [n for n, _ in segments(tmp_path)] == [0, 1]
    journal.discard(0)
    ((number, path),) = segments(tmp_path)
    assert number == 1
    assert [r["id"] for r in read_segment(path)] == ["c"]
    journal.close()


def test_torn_tail_is_cut_before_appending(tmp_path: Path) -> None:
    """Reopening a segment with a torn last line cuts it, so new lines stay whole.

    A line is one batch: tearing it loses the whole (never acknowledged) batch.
    """
    journal = Journal(tmp_path, 0)
    journal.append([make_row("a"), make_row("b")])
    journal.append([make_row("c"), make_row("d")])
    journal.close()
    path = segments(tmp_path)[0][1]
    assert path.read_bytes().count(b"\n") == 2
    path.write_bytes(path.read_bytes()[:-4])
    assert [r["id"] for r in read_segment(path)] == ["a", "b"]
    journal = Journal(tmp_path, 0)
    journal.append([make_row("e")])
    journal.close()
    assert [r["id"] for r in read_segment(path)] == ["a", "b", "e"]


def test_a_segment_of_one_row_per_line_is_read(tmp_path: Path) -> None:
    """Lines holding a single row object (the earlier format) are still read."""
    path = tmp_path / "seg-00000.jsonl"
    rows = [make_row("a"), make_row("b")]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    assert [r["id"] for r in read_segment(path)] == ["a", "b"]


def test_empty_segment_is_removed_on_close(tmp_path: Path) -> None:
    """Closing a segment nothing was written to deletes it."""
    Journal(tmp_path, 3).close()
    assert segments(tmp_path) == []


def test_parts_skip_statistics_and_dictionaries_that_cannot_help(
    tmp_path: Path,
) -> None:
    """Free text gets no min/max statistics; columns of distinct values get no
    dictionary; short repeated columns keep both."""
    writer = PartWriter(tmp_path)
    path = writer.write(0, [make_row(f"r{i}", completion=f"c{i}") for i in range(50)])
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {
        group.column(i).path_in_schema: group.column(i)
        for i in range(group.num_columns)
    }

    def dictionary(name: str) -> bool:
        return "RLE_DICTIONARY" in columns[name].encodings

    assert columns["prompt"].statistics is None
    assert columns["completion"].statistics is None
    assert columns["status"].statistics is not None
    assert not dictionary("id")
    assert not dictionary("completion")
    assert dictionary("status")
    assert dictionary("model")


def test_a_part_takes_each_value_from_its_own_column(tmp_path: Path) -> None:
    """Every column of a part holds that row's value, and a row journaled
    without a newer column (an earlier version's journal) gets a null there."""
    writer = PartWriter(tmp_path)
    rows = [make_row(f"r{i}", completion=f"c{i}", started_at=i + 1.5) for i in range(3)]
    table = writer.table(rows)
    assert table.column("id").to_pylist() == ["r0", "r1", "r2"]
    assert table.column("completion").to_pylist() == ["c0", "c1", "c2"]
    started = [t.timestamp() for t in table.column("started_at").to_pylist()]
    assert started == [1.5, 2.5, 3.5]
    old = dict(rows[1])
    del old["http_status"]
    table = writer.table([rows[0], old])
    assert table.column("http_status").to_pylist() == [200, None]
    assert table.column("completion").to_pylist() == ["c0", "c1"]
    unknown = dict(rows[2], finished_at=None)
    table = writer.table([rows[0], unknown])
    assert table.column("finished_at").null_count == 1
    assert writer.table([]).num_rows == 0


def test_output_lock_waits_out_a_look_by_status(tmp_path: Path) -> None:
    """A run starting while ``status`` holds the lock shared (for an instant)
    still gets it; a second run while the first holds it does not."""
    out = tmp_path / "out"
    OutputLock.acquire(out).release()  # creates the lock file
    looking = os.open(out / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(looking, fcntl.LOCK_SH)
    threading.Timer(0.05, os.close, (looking,)).start()
    lock = OutputLock.acquire(out)
    try:
        with pytest.raises(InputError, match="another batchrun run is writing here"):
            OutputLock.acquire(out)
    finally:
        lock.release()


@pytest.mark.parametrize(
    "error",
    [
        # As pyarrow raises it (a part or usage.parquet on a full tmpfs).
        OSError(
            errno.ENOSPC,
            "Error writing bytes to file. Detail: [errno 28] No space left on device",
        ),
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # os.write, the journal
    ],
    ids=["pyarrow", "os"],
)
def test_a_full_disk_says_so_and_what_to_do(error: OSError) -> None:
    """A full disk is told plainly, with what to do, not in pyarrow's words."""
    assert str(OutputError.writing("OUT/usage.parquet", error)) == (
        "cannot write OUT/usage.parquet: the disk is full; free some space and"
        " run the same command again (what is written is kept)"
    )


def test_other_write_errors_keep_their_reason() -> None:
    """Any other reason is its strerror (the path is named already)."""
    error = OSError(errno.EACCES, os.strerror(errno.EACCES), "OUT/usage.parquet")
    assert str(OutputError.writing("OUT/usage.parquet", error)) == (
        "cannot write OUT/usage.parquet: Permission denied"
    )
