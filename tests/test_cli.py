"""The command-line contract: usage errors, input errors and exit codes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchrun.cli import main
from batchrun.simulator import SimulatorHandle
from batchrun.sinks import OutputLock

from .helpers import (
    SimFactory,
    prompts,
    read_results,
    run_against,
    run_cli,
    write_jsonl,
    write_parquet,
)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    assert err[0].startswith("batchrun: error: ")
    return err[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and exits 0."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("batchrun ")


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """run --help lists the flags and worked examples."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--provider", "--template-file", "--concurrency", "--keep-columns"):
        assert flag in out
    assert "batchrun run samples/prompts.jsonl -o runs/demo --provider mock" in out


def test_unknown_flag_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown flag is a one-line usage error with exit 2."""
    assert main(["run", "x.jsonl", "-o", "out", "--bogus"]) == 2
    assert "--bogus" in _error_line(capsys)


def test_no_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No provider, base URL or BATCHRUN_BASE_URL: exit 2 naming the fix."""
    monkeypatch.delenv("BATCHRUN_BASE_URL", raising=False)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    assert main(["run", str(inp), "-o", str(tmp_path / "out")]) == 2
    assert "no endpoint" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_base_url_from_environment(
    sim: SimulatorHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BATCHRUN_BASE_URL stands in for --base-url."""
    monkeypatch.setenv("BATCHRUN_BASE_URL", sim.base_url)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    assert run_cli("run", inp, "-o", tmp_path / "out", "--model", "m", "--quiet") == 0
    assert sim.state.snapshot()["requests"] == 2


def test_provider_key_must_be_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--provider fireworks without FIREWORKS_API_KEY is a usage error, not a 401."""
    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    code = run_cli(
        "run", inp, "-o", tmp_path / "out", "--provider", "fireworks", "--model", "x"
    )
    assert code == 2
    assert "FIREWORKS_API_KEY is not set" in _error_line(capsys)


def test_malformed_json_line(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed line: exit 2 naming file and line; nothing is sent."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    assert run_against(sim, inp, tmp_path / "out") == 2
    line = _error_line(capsys)
    assert f"{inp}:3:" in line
    assert "malformed JSON" in line
    assert sim.state.snapshot()["requests"] == 0


def test_row_without_prompt(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row with neither prompt nor messages: exit 2 naming the line."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, {"text": "nope"}])
    assert run_against(sim, inp, tmp_path / "out") == 2
    line = _error_line(capsys)
    assert f"{inp}:2:" in line
    assert "neither 'prompt' nor 'messages'" in line
    assert sim.state.snapshot()["requests"] == 0


def test_bad_parquet_row_names_row(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In Parquet the error names the row number and the field."""
    inp = write_parquet(tmp_path / "in.parquet", [{"prompt": "a"}, {"prompt": None}])
    assert run_against(sim, inp, tmp_path / "out", "--endpoint", "completions") == 2
    line = _error_line(capsys)
    assert f"{inp} row 2: field 'prompt'" in line


def test_bad_messages(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Messages without a role are an input error naming the field."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"content": "x"}]}])
    assert run_against(sim, inp, tmp_path / "out") == 2
    assert "field 'messages': message 0 must be an object with a role" in _error_line(
        capsys
    )


def test_unreadable_file(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file or a corrupt gzip is exit 2 naming the file."""
    assert run_against(sim, tmp_path / "missing.jsonl", tmp_path / "out") == 2
    assert "missing.jsonl: no such file" in _error_line(capsys)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    assert run_against(sim, bad, tmp_path / "out2") == 2
    assert "bad.jsonl.gz: cannot read file" in _error_line(capsys)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 definitely not parquet")
    assert run_against(sim, broken, tmp_path / "out3") == 2
    assert "broken.parquet: cannot read Parquet file" in _error_line(capsys)


def test_gzip_and_blank_lines(sim: SimulatorHandle, tmp_path: Path) -> None:
    """.jsonl.gz is read; blank lines are skipped."""
    inp = tmp_path / "in.jsonl.gz"
    with gzip.open(inp, "wt") as handle:
        handle.write('{"id": "a", "prompt": "x"}\n\n  \n{"id": "b", "prompt": "y"}\n')
    assert run_against(sim, inp, tmp_path / "out") == 0
    assert [r["id"] for r in read_results(tmp_path / "out")] == ["a", "b"]


def test_parquet_directory(sim: SimulatorHandle, tmp_path: Path) -> None:
    """A directory of Parquet files is read in name order, as one input."""
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "b.parquet", prompts(3, prefix="b"))
    write_parquet(folder / "a.parquet", prompts(2, prefix="a"))
    assert run_against(sim, folder, tmp_path / "out") == 0
    assert len(read_results(tmp_path / "out")) == 5


def test_duplicate_id_names_both_rows(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A duplicate id: exit 2, naming both rows; nothing is sent."""
    rows = [
        {"id": "a", "prompt": "1"},
        {"id": "b", "prompt": "2"},
        {"id": "a", "prompt": "3"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    assert run_against(sim, inp, tmp_path / "out") == 2
    line = _error_line(capsys)
    assert f"{inp}:3:" in line
    assert f"duplicate id 'a', first at {inp}:1" in line
    assert sim.state.snapshot()["requests"] == 0


def test_duplicate_id_across_files(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ids must be unique across all inputs of a run."""
    one = write_jsonl(tmp_path / "one.jsonl", prompts(2))
    two = write_parquet(tmp_path / "two.parquet", prompts(1))
    code = run_cli(
        "run",
        one,
        two,
        "-o",
        tmp_path / "out",
        "--base-url",
        sim.base_url,
        "--model",
        "m",
        "--quiet",
    )
    assert code == 2
    assert f"{two} row 1" in _error_line(capsys)


def test_missing_template_column(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A template column missing from a row is an input error naming row and field."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"name": "a"}, {"nom": "b"}])
    assert run_against(sim, inp, tmp_path / "out", "--template", "Hi {{ name }}") == 2
    assert f"{inp}:2: field 'name'" in _error_line(capsys)


def test_template_syntax_error(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A template that does not compile is a usage error."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"name": "a"}])
    assert run_against(sim, inp, tmp_path / "out", "--template", "Hi {{ name ") == 2
    assert "template line 1" in _error_line(capsys)


def test_missing_template_file(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing --template-file is a usage error naming it."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"name": "a"}])
    assert (
        run_against(sim, inp, tmp_path / "out", "--template-file", tmp_path / "nope.j2")
        == 2
    )
    assert "nope.j2" in _error_line(capsys)


def test_model_required(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --model a row whose body names no model is an input error."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    code = run_cli(
        "run", inp, "-o", tmp_path / "out", "--base-url", sim.base_url, "--quiet"
    )
    assert code == 2
    assert "field 'model': no model" in _error_line(capsys)


def test_model_required_with_a_template(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A templated run without --model stops before any request, as a plain one
    does, instead of failing every row."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    code = run_cli(
        "run", inp, "-o", tmp_path / "out", "--base-url", sim.base_url,
        "--template", "Say {{ text }}", "--quiet",
    )  # fmt: skip
    assert code == 2
    assert f"{inp}:1: field 'model': no model" in _error_line(capsys)
    assert sim.state.request_count == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "0"], "concurrency must be"),
        (["--n", "0"], "n must be an integer"),
        (["--timeout", "0"], "timeout must be positive"),
        (["--param", "novalue"], "--param expects KEY=VALUE"),
        (["--param", "model=x"], "--param model=... is not allowed"),
        # Streamed answers failed every row after eight billed attempts each.
        (["--param", "stream=true"], "--param stream=...: streaming is not"),
    ],
)
def test_invalid_options(
    sim: SimulatorHandle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    """Invalid option values are one-line usage errors with exit 2."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    assert run_against(sim, inp, tmp_path / "out", *flags) == 2
    assert message in _error_line(capsys)


def test_other_input_into_same_output_is_refused(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another input into the same OUT is refused, naming it; --overwrite replaces."""
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "a.jsonl", prompts(3, prefix="a"))
    assert run_against(sim, first, out) == 0
    second = write_jsonl(tmp_path / "b.jsonl", prompts(2, prefix="b"))
    assert run_against(sim, second, out) == 2
    line = _error_line(capsys)
    assert "inputs was" in line
    assert "b.jsonl" in line
    assert "--overwrite" in line
    assert len(read_results(out)) == 3
    assert run_against(sim, second, out, "--overwrite") == 0
    assert [r["id"] for r in read_results(out)] == ["b-0", "b-1"]


def test_an_out_in_use_is_refused(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While a run holds OUT, a second one (even with --overwrite) stops before
    any request and leaves OUT as it was; once the first ends, it resumes."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    sent = sim.state.request_count
    lock = OutputLock.acquire(out)  # a run in progress, as far as OUT can tell
    try:
        for extra in ((), ("--overwrite",)):
            assert run_against(sim, inp, out, *extra) == 2
            line = _error_line(capsys)
            assert (
                f"{out}: another batchrun run is writing here (pid {os.getpid()})"
                in line
            )
            assert len(read_results(out)) == 3
    finally:
        lock.release()
    assert sim.state.request_count == sent
    assert run_against(sim, inp, out) == 0  # every row was done: nothing sent
    assert sim.state.request_count == sent
    assert len(read_results(out)) == 3


def test_summary_and_line_progress(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --quiet a summary goes to stderr, naming counts and the results path."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    code = run_cli(
        "run",
        inp,
        "-o",
        tmp_path / "out",
        "--base-url",
        sim.base_url,
        "--model",
        "m",
        "--progress",
        "lines",
        "--max-tokens",
        "4",
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "4 rows: 4 ok, 0 failed" in err
    assert "4 of 4 answers stopped at max_tokens (finish_reason length)" in err
    assert str(tmp_path / "out" / "results") in err


def test_lone_surrogate_is_sent_as_replacement_character(
    sim_factory: SimFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A JSONL row holding half an emoji (as Python's json writes it) is sent
    with U+FFFD in its place, and the summary says so and where."""
    sim = sim_factory(record_requests=True)
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        '{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "cut \\ud83d"}\n'
    )
    code = run_cli(
        "run", inp, "-o", tmp_path / "out", "--base-url", sim.base_url,
        "--model", "m", "--progress", "off",
    )  # fmt: skip
    assert code == 0
    assert sorted(r["prompt"] for r in sim.state.requests) == ["cut \ufffd", "fine"]
    assert [r["prompt"] for r in read_results(tmp_path / "out")] == [
        "fine",
        "cut \ufffd",
    ]
    err = capsys.readouterr().err
    assert "1 input row held lone UTF-16 surrogates" in err
    assert f"the first at {inp}:2" in err


@pytest.mark.parametrize("under", ["", "out"], ids=["a file", "under a file"])
def test_unwritable_output_exits_3(
    sim: SimulatorHandle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    under: str,
) -> None:
    """An output path that cannot be created aborts with exit 3, naming the
    file in the way (it said only "File exists" or "Not a directory")."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / under if under else blocker
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    assert run_against(sim, inp, out) == 3
    assert _error_line(capsys) == (
        f"batchrun: error: cannot write in {out}: {blocker} is a file, and the"
        " output is a directory"
    )


def test_manifest_records_options_not_key(sim: SimulatorHandle, tmp_path: Path) -> None:
    """manifest.json records inputs, request options and counts."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    assert run_against(sim, inp, tmp_path / "out", "--temperature", "0.2") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"] == [str(inp)]
    assert manifest["request"]["params"] == {"temperature": 0.2}
    assert manifest["request"]["model"] == "m"
    assert manifest["counts"]["rows"] == 2
    assert manifest["batchrun_version"]


def test_export_command(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """batchrun export writes one line per result; a bad OUT is exit 2."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    dest = tmp_path / "batch.jsonl"
    assert run_cli("export", out, "--format", "openai-batch", "-o", dest) == 0
    lines = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["row-0", "row-1", "row-2"]
    assert {line["response"]["status_code"] for line in lines} == {200}
    capsys.readouterr()
    assert run_cli("export", tmp_path / "none", "--format", "jsonl", "-o", dest) == 2
    assert "no batchrun run" in _error_line(capsys)


@pytest.mark.parametrize(("flags", "together"), [((), 4), (("--probe",), 3)])
def test_probe_flag_sends_the_first_request_alone(
    sim_factory: SimFactory, tmp_path: Path, flags: tuple[str, ...], together: int
) -> None:
    """A server on this machine gets its first requests together unless --probe.

    With --probe the first request is answered before the other three go out.
    """
    sim = sim_factory(latency_ms=150)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    assert run_against(sim, inp, tmp_path / "out", "--concurrency", "4", *flags) == 0
    assert sim.state.snapshot()["max_in_flight"] == together


def _run_limited(
    sim: SimulatorHandle, tmp_path: Path, open_files: tuple[int, int]
) -> subprocess.CompletedProcess[str]:
    """``batchrun run`` of 300 rows at concurrency 300 in a process that may
    open ``open_files`` (soft, hard) files."""
    resource = pytest.importorskip("resource")
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    return subprocess.run(
        [sys.executable, "-m", "batchrun", "run", str(inp), "-o",
         str(tmp_path / "out"), "--base-url", sim.base_url, "--model", "m",
         "--concurrency", "300", "--quiet"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_open_file_limit_is_raised_for_the_pool(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """A pool larger than the soft limit on open files gets its sockets.

    At a soft limit of 100, connections beyond it failed ("Too many open
    files") and were retried, so fewer than 100 requests were ever in flight.
    Answers take a second, so that opening 300 connections on a busy machine
    still ends before the first answers free theirs. Under the soft limit at
    most about 90 sockets fit, so more than 150 in flight proves it was
    raised, with room to spare for a machine slower still.
    """
    sim = sim_factory(latency_ms=1000)
    run = _run_limited(sim, tmp_path, (100, 1024))
    assert run.returncode == 0, run.stderr
    assert sim.state.snapshot()["max_in_flight"] > 150


def test_too_low_a_hard_limit_on_open_files_is_a_usage_error(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """When even the hard limit cannot hold the pool: one line, exit 2, and
    nothing sent or written."""
    run = _run_limited(sim, tmp_path, (100, 100))
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("batchrun: error: 300 connections need about 364 open")
    assert "lower --concurrency" in line
    assert sim.state.snapshot()["requests"] == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("progress", ["bar", "lines"])
def test_nobody_reading_stderr_changes_nothing(
    sim: SimulatorHandle, tmp_path: Path, progress: str
) -> None:
    """With stderr a pipe nobody reads (``batchrun run ... 2>&1 | head``), the
    run still sends every row and exits 0. A bar aborted the run at its first
    drawing, and the summary's failed write made the exit code 1."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(inp), "-o", str(out),
         "--base-url", sim.base_url, "--model", "m", "--progress", progress],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    process.stderr.close()
    assert process.wait(timeout=120) == 0
    assert len(read_results(out)) == 20
    assert sim.state.snapshot()["requests"] == 20


def test_status_to_a_reader_that_left(sim: SimulatorHandle, tmp_path: Path) -> None:
    """``batchrun status OUT | head -1``: a reader that stopped early gets no
    traceback, and the command still exits 0."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out"
    assert run_against(sim, inp, out) == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "status", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()
    with process.stderr:
        assert process.wait(timeout=120) == 0
        assert process.stderr.read() == b""
