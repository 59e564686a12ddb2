"""Export: OpenAI Batch output, JSON lines and Parquet, each key once, latest wins."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import export
from batchrun.errors import ConfigError, OutputError
from batchrun.export import FORMATS, export_results
from batchrun.journal import Journal
from batchrun.records import AttemptLog
from batchrun.simulator import ScriptedResponse, SimulatorHandle
from batchrun.sinks import RESULT_SCHEMA, PartWriter, part_path

from .helpers import make_row, prompts, read_results, run_against, write_jsonl

Row = dict[str, Any]


def _make_out(
    out: Path,
    parts: list[list[Row]],
    *,
    parts_through: int,
    journal: dict[int, list[Row]] | None = None,
) -> Path:
    """An OUT with these part files, journal segments and manifest."""
    # Until RESULT_SCHEMA has a variant column, it travels as a kept column.
    kept = {} if "variant" in RESULT_SCHEMA.names else {"variant": pa.string()}
    writer = PartWriter(out / "results", kept=kept)
    (out / "results").mkdir(parents=True)
    for number, rows in enumerate(parts):
        writer.write(number, rows)
    for number, rows in (journal or {}).items():
        segment = Journal(out / "journal", number)
        segment.append(rows)
        segment.close()
    (out / "manifest.json").write_text(json.dumps({"parts_through": parts_through}))
    return out


def _lines(path: Path) -> list[Row]:
    """Each line of a JSON-lines file, parsed on its own."""
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def _exported(fmt: str, path: Path) -> list[tuple[str, str | None, str]]:
    """(id, variant, status) of each exported row, in file order."""
    if fmt == "parquet":
        return [
            (r["id"], r.get("variant"), r["status"])
            for r in pq.read_table(path).to_pylist()
        ]
    if fmt == "jsonl":
        return [(r["id"], r.get("variant"), r["status"]) for r in _lines(path)]
    found: list[tuple[str, str | None, str]] = []
    for line in _lines(path):
        row_id, _, variant = line["custom_id"].partition("::")
        status = "ok" if line["error"] is None else "error"
        found.append((row_id, variant or None, status))
    return found


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under ``out``."""
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


# Ids whose order as text (row-0, row-1, row-10, row-11, row-2, ...) is not
# their input order.
INPUT_IDS = [f"row-{i}" for i in range(12)]


def _run_with_one_400(sim: SimulatorHandle, tmp_path: Path) -> Path:
    """A finished run of 12 ok rows and one row the server rejects with 400."""
    rows = [*prompts(12), {"id": "bad", "prompt": "Refuse [[sim:status=400]]"}]
    assert [row["id"] for row in rows[:12]] == INPUT_IDS
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 1
    return out


def test_openai_batch_matches_the_results(sim: SimulatorHandle, tmp_path: Path) -> None:
    """Each line carries a result's id and its response body, in input order."""
    out = _run_with_one_400(sim, tmp_path)
    before = _snapshot(out)
    dest = tmp_path / "batch_output.jsonl"
    assert export_results(out, "openai-batch", dest) == 13
    assert _snapshot(out) == before
    results = sorted(read_results(out), key=lambda r: int(r["row"]))
    lines = _lines(dest)
    assert [line["custom_id"] for line in lines] == [*INPUT_IDS, "bad"]
    assert [line["custom_id"] for line in lines] == [r["id"] for r in results]
    for line, result in zip(lines, results, strict=True):
        body = json.loads(result["response"])
        assert line["response"]["body"] == body
        assert line["response"]["status_code"] == result["http_status"]
        if result["status"] == "ok":
            assert line["error"] is None
            assert line["response"]["request_id"] == body["id"]
    ids = [line["id"] for line in lines]
    assert all(i.startswith("batch_req_") for i in ids)
    assert len(set(ids)) == len(ids)
    again = tmp_path / "again.jsonl"
    export_results(out, "openai-batch", again)
    assert [line["id"] for line in _lines(again)] == ids


def test_openai_batch_keeps_an_answer_that_is_not_unicode(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """An answer kept despite half a surrogate pair exports with its body,
    U+FFFD in place of the half: a success never exports without one."""
    body = b'{"id": "cmpl-1", "choices": [{"index": 0, "text": "cut \\ud83d"}]}'
    sim.state.enqueue(ScriptedResponse(body=body))
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    dest = tmp_path / "batch_output.jsonl"
    export_results(out, "openai-batch", dest)
    (line,) = _lines(dest)
    assert line["error"] is None
    assert line["response"]["body"]["choices"][0]["text"] == "cut \ufffd"


def test_openai_batch_errormake_row(sim: SimulatorHandle, tmp_path: Path) -> None:
    """A rejected request exports with status 400 and an http_400 error."""
    out = _run_with_one_400(sim, tmp_path)
    dest = tmp_path / "batch_output.jsonl"
    export_results(out, "openai-batch", dest)
    (line,) = [x for x in _lines(dest) if x["custom_id"] == "bad"]
    assert line["response"] is None or line["response"]["status_code"] == 400
    assert line["error"]["code"] == "http_400"
    assert "Simulated error" in line["error"]["message"]


def test_openai_batch_without_raw_responses(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """With --no-raw no body was kept, so the Batch format is refused (every
    line would have a null response) and the other formats are named; they
    still export."""
    rows = [*prompts(3), {"id": "bad", "prompt": "Refuse [[sim:status=400]]"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--no-raw") == 1
    dest = tmp_path / "batch_output.jsonl"
    with pytest.raises(ConfigError, match=r"--no-raw.*--format jsonl or parquet"):
        export_results(out, "openai-batch", dest)
    assert not dest.exists()
    assert export_results(out, "jsonl", tmp_path / "rows.jsonl") == 4


def test_jsonl_round_trips_ids_and_statuses(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """Flat rows keep every column; timestamps are ISO-8601 with Z."""
    out = _run_with_one_400(sim, tmp_path)
    dest = tmp_path / "results.jsonl"
    assert export_results(out, "jsonl", dest) == 13
    rows = _lines(dest)
    results = sorted(read_results(out), key=lambda r: int(r["row"]))
    assert [(r["id"], r["status"]) for r in rows] == [
        (r["id"], r["status"]) for r in results
    ]
    assert set(rows[0]) == set(RESULT_SCHEMA.names)
    for row, result in zip(rows, results, strict=True):
        assert row["started_at"].endswith("Z")
        assert datetime.fromisoformat(row["started_at"]) == result["started_at"]
        assert row["choices"] == result["choices"]
    assert isinstance(rows[0]["choices"], list)


def test_parquet_is_one_file_with_each_id_once(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """One readable file, in input order, with the full results schema."""
    out = _run_with_one_400(sim, tmp_path)
    dest_dir = tmp_path / "export"
    dest_dir.mkdir()
    dest = dest_dir / "results.parquet"
    assert export_results(out, "parquet", dest) == 13
    assert list(dest_dir.iterdir()) == [dest]  # no temp file or spill left
    table = pq.read_table(dest)
    assert table.column("id").to_pylist() == [*INPUT_IDS, "bad"]
    assert table.column("row").to_pylist() == list(range(13))
    assert set(RESULT_SCHEMA.names) <= set(table.column_names)


@pytest.mark.parametrize("fmt", FORMATS)
def test_latest_part_wins(tmp_path: Path, fmt: str) -> None:
    """An id in two parts exports once, from the later part."""
    out = _make_out(
        tmp_path / "out",
        [[make_row("a", "error"), make_row("b")], [make_row("a"), make_row("c")]],
        parts_through=1,
    )
    dest = tmp_path / f"export.{fmt}"
    assert export_results(out, fmt, dest) == 3
    assert _exported(fmt, dest) == [
        ("a", None, "ok"),
        ("b", None, "ok"),
        ("c", None, "ok"),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_variant_is_part_of_the_key(tmp_path: Path, fmt: str) -> None:
    """Each (id, variant) exports once, latest winning, rows without one first."""
    out = _make_out(
        tmp_path / "out",
        [
            [make_row("a", variant="y"), make_row("a", variant="x"), make_row("b")],
            [make_row("a", "error", variant="x"), make_row("a", "error")],
        ],
        parts_through=1,
    )
    dest = tmp_path / f"export.{fmt}"
    assert export_results(out, fmt, dest) == 4
    assert _exported(fmt, dest) == [
        ("a", None, "error"),
        ("a", "x", "error"),
        ("a", "y", "ok"),
        ("b", None, "ok"),
    ]


def test_variant_custom_id_and_batch_id(tmp_path: Path) -> None:
    """A variant row's custom_id is id::variant and its batch id differs."""
    out = _make_out(
        tmp_path / "out", [[make_row("a"), make_row("a", variant="x")]], parts_through=0
    )
    dest = tmp_path / "batch.jsonl"
    export_results(out, "openai-batch", dest)
    plain, varied = _lines(dest)
    assert (plain["custom_id"], varied["custom_id"]) == ("a", "a::x")
    assert plain["id"] != varied["id"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_journal_rows_after_parts_through_are_included(
    tmp_path: Path, fmt: str
) -> None:
    """Segments after parts_through are the newest rows; earlier ones are not."""
    out = _make_out(
        tmp_path / "out",
        [[make_row("a", "error"), make_row("b")]],
        parts_through=0,
        journal={
            0: [make_row("stale")],  # already in part 0: its rows must not recur
            1: [make_row("a"), make_row("c", log=AttemptLog(attempts=2))],
        },
    )
    dest = tmp_path / f"export.{fmt}"
    assert export_results(out, fmt, dest) == 3
    assert _exported(fmt, dest) == [
        ("a", None, "ok"),
        ("b", None, "ok"),
        ("c", None, "ok"),
    ]


def test_journal_rows_convert_like_parts(tmp_path: Path) -> None:
    """Journal timestamps (epoch seconds) export as UTC timestamps, no _log."""
    out = _make_out(
        tmp_path / "out",
        [[make_row("a")]],
        parts_through=0,
        journal={1: [make_row("b", started_at=86400.25, log=AttemptLog(attempts=2))]},
    )
    export_results(out, "jsonl", tmp_path / "rows.jsonl")
    row = _lines(tmp_path / "rows.jsonl")[1]
    assert "_log" not in row
    assert row["started_at"] == "1970-01-02T00:00:00.250000Z"
    export_results(out, "parquet", tmp_path / "rows.parquet")
    table = pq.read_table(tmp_path / "rows.parquet")
    assert table.column("started_at")[1].as_py() == datetime(
        1970, 1, 2, 0, 0, 0, 250000, tzinfo=UTC
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_parts_come_out_in_input_order(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows scattered over parts and batches are gathered in input order."""
    monkeypatch.setattr(export, "_CHUNK_ROWS", 3)  # many batches and chunks
    _export_scattered_rows(tmp_path, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_rows_come_out_in_chunks_of_a_size(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are counted in bytes too (long rows: fewer rows a chunk); at
    a byte limit below one row, every row is its own chunk, still in order."""
    monkeypatch.setattr(export, "_CHUNK_BYTES", 1)
    _export_scattered_rows(tmp_path, fmt)


def _export_scattered_rows(tmp_path: Path, fmt: str) -> None:
    """Export rows scattered over parts, some retried, and check their order:
    the input's (here not the ids'), then, by id, rows of a part written
    before results had a position."""
    ids = [f"id-{i:03d}" for i in range(40)]
    order = ids[::-1]  # the input order
    random.Random(7).shuffle(ids)
    retried = set(ids[::5])

    def row(row_id: str, status: str = "ok") -> dict[str, Any]:
        return make_row(row_id, status, position=order.index(row_id))

    parts = [[row(i, "error" if i in retried else "ok") for i in ids[:25]]]
    parts.append([row(i) for i in ids[25:]])
    parts.append([row(i) for i in sorted(retried, reverse=True)])
    parts.append([make_row(f"old-{i}") for i in (2, 1)])
    out = _make_out(tmp_path / "out", parts, parts_through=3)
    # A part written before results had a "row" column.
    path = part_path(out / "results", 3)
    pq.write_table(pq.read_table(path).drop_columns(["row"]), path)
    dest = tmp_path / f"export.{fmt}"
    assert export_results(out, fmt, dest) == 42
    expected = [(i, None, "ok") for i in [*order, "old-1", "old-2"]]
    assert _exported(fmt, dest) == expected


def test_empty_output_exports_no_rows(tmp_path: Path) -> None:
    """An OUT whose run had no rows exports a readable, empty Parquet file."""
    out = _make_out(tmp_path / "out", [[]], parts_through=0)
    dest = tmp_path / "empty.parquet"
    assert export_results(out, "parquet", dest) == 0
    table = pq.read_table(dest)
    assert table.num_rows == 0
    assert set(RESULT_SCHEMA.names) <= set(table.column_names)


def test_unknown_format_is_a_config_error(tmp_path: Path) -> None:
    """A format outside FORMATS is refused before anything is read."""
    out = _make_out(tmp_path / "out", [[make_row("a")]], parts_through=0)
    with pytest.raises(ConfigError, match="unknown export format 'csv'"):
        export_results(out, "csv", tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_missing_out_is_a_config_error(tmp_path: Path) -> None:
    """An OUT that does not exist (no manifest) is refused."""
    with pytest.raises(ConfigError, match="no batchrun run"):
        export_results(tmp_path / "nowhere", "jsonl", tmp_path / "x.jsonl")


def test_out_without_results_is_a_config_error(tmp_path: Path) -> None:
    """A manifest with no parts and no journal rows has nothing to export."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"parts_through": -1}))
    with pytest.raises(ConfigError, match="no results"):
        export_results(out, "jsonl", tmp_path / "x.jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
def test_unwritable_dest_is_an_output_error(tmp_path: Path, fmt: str) -> None:
    """A destination in a missing directory raises OutputError."""
    out = _make_out(tmp_path / "out", [[make_row("b"), make_row("a")]], parts_through=0)
    with pytest.raises(OutputError, match="cannot write"):
        export_results(out, fmt, tmp_path / "missing" / "x")


def test_dest_inside_the_run_is_refused(tmp_path: Path) -> None:
    """Exporting over the run's own files is a ConfigError; OUT is untouched."""
    out = _make_out(tmp_path / "out", [[make_row("a")]], parts_through=0)
    before = _snapshot(out)
    for dest in (out / "results" / "part-00001.parquet", out / "manifest.json"):
        with pytest.raises(ConfigError, match="part of the run"):
            export_results(out, "parquet", dest)
    assert _snapshot(out) == before
