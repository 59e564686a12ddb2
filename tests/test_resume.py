"""Resume: the same command continues an output exactly; changes are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.journal import read_segment, segments
from batchrun.simulator import ScriptedResponse, SimulatorHandle
from batchrun.sinks import OutputLock

from .helpers import prompts, read_results, run_against, run_cli, write_jsonl


def _counts(sim: SimulatorHandle) -> dict[str, int]:
    counts: dict[str, int] = sim.state.snapshot(prompts=True)["prompt_counts"]
    return counts


def _flaky_rows() -> list[dict[str, str]]:
    """Ten rows; rows 3 and 7 fail with a 400 the first time only."""
    rows = prompts(10)
    for i in (3, 7):
        rows[i]["prompt"] += " [[sim:fail=400]]"
    return rows


def test_a_limited_run_then_the_whole_one(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--limit sends only the first rows; the same command without it sends
    the rest, each row once (the limit is not part of what resume compares)."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--limit", "3") == 0
    assert [r["id"] for r in read_results(out)] == ["row-0", "row-1", "row-2"]
    assert sim.state.snapshot()["requests"] == 3
    assert run_against(sim, inp, out) == 0
    assert sim.state.snapshot()["requests"] == 10
    assert len(read_results(out)) == 10
    capsys.readouterr()
    assert run_cli("status", out) == 0
    assert "rows: 10 ok, 0 failed, 0 not reached" in capsys.readouterr().out


def test_rerun_retries_only_failed_rows(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same command again skips ok rows and retries the failed ones."""
    inp = write_jsonl(tmp_path / "in.jsonl", _flaky_rows())
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 1
    assert sum(r["status"] == "error" for r in read_results(out)) == 2
    code = run_cli(
        "run", inp, "-o", out, "--base-url", sim.base_url, "--model", "m",
        "--progress", "off",
    )  # fmt: skip
    assert code == 0
    assert (
        "resumed: 8 already done and skipped, 2 retried, 0 new"
        in capsys.readouterr().err
    )
    results = read_results(out)
    assert [r["id"] for r in results] == sorted(f"row-{i}" for i in range(10))
    assert {r["status"] for r in results} == {"ok"}
    counts = _counts(sim)
    for i, row in enumerate(_flaky_rows()):
        assert counts[row["prompt"]] == (2 if i in (3, 7) else 1)


def test_rerun_of_finished_output_sends_nothing(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """Re-running a finished job sends no request and changes no result."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    before = read_results(out)
    assert run_against(sim, inp, out) == 0
    assert sim.state.snapshot()["requests"] == 20
    assert read_results(out) == before


def test_skip_failed_keeps_error_rows(sim: SimulatorHandle, tmp_path: Path) -> None:
    """--skip-failed leaves earlier error rows as they are."""
    inp = write_jsonl(tmp_path / "in.jsonl", _flaky_rows())
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 1
    assert run_against(sim, inp, out, "--skip-failed") == 0
    assert sim.state.snapshot()["requests"] == 10
    assert sum(r["status"] == "error" for r in read_results(out)) == 2


def test_new_rows_in_the_input_are_run(sim: SimulatorHandle, tmp_path: Path) -> None:
    """Rows added to the input (with ids) since the last run are run, the rest not."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    write_jsonl(inp, prompts(8))
    assert run_against(sim, inp, out) == 0
    assert sim.state.snapshot()["requests"] == 8
    assert len(read_results(out)) == 8


def test_changed_request_is_run_again(sim: SimulatorHandle, tmp_path: Path) -> None:
    """A row whose request changed since it was answered is run again and replaced."""
    rows = prompts(4)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    rows[2]["prompt"] = "an edited prompt"
    write_jsonl(inp, rows)
    assert run_against(sim, inp, out) == 0
    assert sim.state.snapshot()["requests"] == 5
    results = {r["id"]: r for r in read_results(out)}
    assert len(results) == 4
    assert results["row-2"]["prompt"] == "an edited prompt"


def test_changed_options_are_refused(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Other request options refuse with exit 2 naming the change; limits may change."""
    inp = write_jsonl(tmp_path / "in.jsonl", _flaky_rows())
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--temperature", "0.5") == 1
    capsys.readouterr()
    assert run_against(sim, inp, out, "--temperature", "0.7") == 2
    err = capsys.readouterr().err
    assert "params was {'temperature': 0.5}, now {'temperature': 0.7}" in err
    assert "--overwrite" in err
    code = run_against(
        sim, inp, out, "--temperature", "0.5", "--concurrency", "3", "--rpm", "6000",
        "--max-attempts", "2", "--timeout", "20",
    )  # fmt: skip
    assert code == 0


def test_overwrite_starts_afresh(sim: SimulatorHandle, tmp_path: Path) -> None:
    """--overwrite discards the earlier output, whatever its options."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--temperature", "0.5") == 0
    assert run_against(sim, inp, out, "--temperature", "0.9", "--overwrite") == 0
    assert sim.state.snapshot()["requests"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["request"]["params"] == {"temperature": 0.9}
    assert manifest["runs"] == 1


def test_positional_ids_with_changed_input_are_refused(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without an id column, an edited input is refused, suggesting an id column."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    write_jsonl(inp, [{"prompt": f"p{i}"} for i in [0, 2, 1, 3]])
    assert run_against(sim, inp, out) == 2
    err = capsys.readouterr().err
    assert "changed since" in err
    assert "id column" in err
    assert sim.state.snapshot()["requests"] == 4


def test_journal_rows_are_recovered_and_torn_tail_ignored(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows only in the journal count as done on resume, by the run that did them
    (not in the resumed run's summary); a torn last line does not count."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    # Make the output look like a run killed after journaling rows 0-2, with
    # row 3's line torn in half and nothing rolled into parts.
    table = pq.read_table(next((out / "results").glob("part-*.parquet")))
    wanted = ("row-0", "row-1", "row-2", "row-3")
    # In id order, so that the torn last line is row-3's.
    done = sorted(
        (r for r in table.to_pylist() if r["id"] in wanted), key=lambda r: str(r["id"])
    )
    for row in done:
        for key in ("started_at", "finished_at"):
            row[key] = row[key].timestamp()
    for path in (out / "results").glob("part-*.parquet"):
        path.unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(status="running", parts_through=-1, stats={})
    (out / "manifest.json").write_text(json.dumps(manifest))
    journal = out / "journal"
    journal.mkdir(exist_ok=True)
    lines = [json.dumps(r).encode() + b"\n" for r in done]
    torn = b"".join(lines)[:-7]
    (journal / "seg-00000.jsonl").write_bytes(torn)
    before = sim.state.snapshot(prompts=True)["prompt_counts"]
    capsys.readouterr()

    resume = ("run", inp, "-o", out, "--base-url", sim.base_url, "--model", "m")
    assert run_cli(*resume, "--progress", "off") == 0
    summary = capsys.readouterr().err
    assert "3 rows: 3 ok, 0 failed (3 requests)" in summary
    assert "resumed: 3 already done and skipped, 0 retried, 3 new" in summary
    after = _counts(sim)
    results = read_results(out)
    assert [r["id"] for r in results] == sorted(f"row-{i}" for i in range(6))
    resent = {p for p, n in after.items() if n > before.get(p, 0)}
    assert resent == {f"Prompt number {i}:" for i in (3, 4, 5)}
    assert not list(segments(journal))


def test_unwritable_output_exits_3_and_keeps_results(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Output that cannot be written aborts with exit 3; earlier results stay."""
    inp = write_jsonl(tmp_path / "in.jsonl", _flaky_rows())
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 1
    before = read_results(out)
    shutil.rmtree(out / "journal", ignore_errors=True)
    (out / "journal").write_text("not a directory")
    capsys.readouterr()
    assert run_against(sim, inp, out) == 3
    err = capsys.readouterr().err
    assert "cannot write the journal" in err
    assert read_results(out) == before


def test_status_reports_progress(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """batchrun status shows rows ok and failed, tokens and whether it finished."""
    inp = write_jsonl(tmp_path / "in.jsonl", _flaky_rows())
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 1
    capsys.readouterr()
    assert run_cli("status", out) == 0
    text = capsys.readouterr().out
    assert "finished" in text
    assert "rows: 8 ok, 2 failed, 0 not reached" in text
    (error,) = {r["error"] for r in read_results(out) if r["status"] == "error"}
    assert f"failed rows, by error:\n  2 x {error}\n" in text
    seen = sim.state.snapshot()
    assert f"{seen['prompt_tokens']} prompt" in text
    assert "last write: 20" in text
    # The failed rows succeed when the run is resumed: the latest result counts.
    assert run_against(sim, inp, out) == 0
    capsys.readouterr()
    assert run_cli("status", out) == 0
    text = capsys.readouterr().out
    assert "rows: 10 ok, 0 failed" in text
    assert "by error" not in text


def test_answers_without_usage_are_named_by_run_and_status(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that leaves usage out of some answers: the summary, status
    and usage.parquet say how many, since the token counts miss them."""
    choice = {"index": 0, "text": "hi", "finish_reason": "stop"}
    sim.state.enqueue(*[ScriptedResponse(body={"id": "x", "choices": [choice]})] * 2)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "out"
    code = run_cli(
        "run", inp, "-o", out, "--base-url", sim.base_url, "--model", "m",
        "--concurrency", "1", "--progress", "off",
    )  # fmt: skip
    assert code == 0
    line = (
        "2 of 5 answers came without token usage: the token counts and the cost"
        " leave them out"
    )
    said = capsys.readouterr()
    assert line in (said.out + said.err).splitlines()
    assert run_cli("status", out) == 0
    assert line in capsys.readouterr().out.splitlines()
    usage = pq.read_table(out / "usage.parquet").to_pylist()
    assert [row["no_usage"] for row in usage] == [2, 2]  # the model's, and all


def test_status_tells_a_live_run_by_its_lock(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest left saying 'running' is a live run only while OUT's lock is
    held: a live pid alone (reused, or a killed run not yet reaped) is not one."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(status="running", pid=os.getpid())  # a pid that is alive
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("status", out) == 0
    assert "stopped before finishing" in capsys.readouterr().out
    lock = OutputLock.acquire(out)
    try:
        assert run_cli("status", out) == 0
        assert f"running (pid {os.getpid()})" in capsys.readouterr().out
        assert OutputLock.held(out) is True
    finally:
        lock.release()
    assert OutputLock.held(out) is False
    assert OutputLock.held(tmp_path / "nothing-here") is None


def test_status_of_missing_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status on a folder without a run is a one-line error with exit 2."""
    assert run_cli("status", tmp_path) == 2
    assert "no batchrun run" in capsys.readouterr().err


def test_usage_counts_everyrun_against(sim: SimulatorHandle, tmp_path: Path) -> None:
    """usage.parquet adds up the attempts and tokens of every run into OUT."""
    inp = write_jsonl(tmp_path / "in.jsonl", _flaky_rows())
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 1
    assert run_against(sim, inp, out) == 0
    usage = {r["model"]: r for r in pq.read_table(out / "usage.parquet").to_pylist()}
    seen = sim.state.snapshot()
    assert usage["*"]["attempts"] == seen["requests"] == 12
    assert usage["*"]["prompt_tokens"] == seen["prompt_tokens"]
    assert usage["*"]["completion_tokens"] == seen["completion_tokens"]


def test_journal_is_empty_after_a_completerun_against(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """A finished run leaves no journal segments and few part files."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    assert not [row for _, p in segments(out / "journal") for row in read_segment(p)]
    assert len(list((out / "results").glob("part-*.parquet"))) == 1


def test_fsync_run_completes(sim: SimulatorHandle, tmp_path: Path) -> None:
    """--fsync forces journal writes to disk and the run still completes normally."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(50))
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--fsync") == 0
    assert len(read_results(out)) == 50
    assert not [row for _, p in segments(out / "journal") for row in read_segment(p)]
