"""Kill it any time: the CLI in a subprocess, killed and resumed, loses nothing.

The simulator runs in its own process (20 ms latency); the client runs 20,000
rows at concurrency 64 and is killed with SIGKILL, SIGINT or SIGTERM, then the
same command resumes it. The simulator's per-prompt counts show what was sent
twice.
"""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from batchrun.journal import read_segment, segments
from batchrun.sinks import list_parts, read_parts

from .helpers import SimProcess, read_results, write_jsonl

ROWS = 20_000
CONCURRENCY = 64


def _command(sim: SimProcess, inp: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "batchrun", "run", str(inp), "-o", str(out),
        "--base-url", sim.base_url, "--model", "m", "--max-tokens", "8",
        "--concurrency", str(CONCURRENCY), "--progress", "off",
    ]  # fmt: skip


def _input(tmp_path: Path) -> Path:
    rows = [
        {"id": f"r{i:05d}", "prompt": f"Crash test prompt {i}:"} for i in range(ROWS)
    ]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def _durable_ids(out: Path) -> set[str]:
    """Ids whose result is in a part file or the journal right now."""
    ids: set[str] = set()
    for table in read_parts(out / "results", ["id"]):
        ids.update(table.column("id").to_pylist())
    for _, path in segments(out / "journal"):
        ids.update(row["id"] for row in read_segment(path))
    return ids


def _wait_for_progress(out: Path, proc: subprocess.Popen[bytes], delay: float) -> None:
    """Sleep ``delay`` seconds after the first result reaches the journal."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if list_parts(out / "results") or any(
            p.stat().st_size for _, p in segments(out / "journal")
        ):
            break
        time.sleep(0.05)
    time.sleep(delay)


def _finish(
    sim: SimProcess, inp: Path, out: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run the same command to the end."""
    final = subprocess.run(_command(sim, inp, out), stderr=subprocess.PIPE, check=False)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    return final


def _check_complete(out: Path) -> None:
    results = read_results(out)
    assert len(results) == ROWS
    assert Counter(r["id"] for r in results).most_common(1)[0][1] == 1
    assert {r["status"] for r in results} == {"ok"}


def test_kill_9_five_times_then_resume(
    sim_process: Callable[..., SimProcess], tmp_path: Path
) -> None:
    """SIGKILL at five random moments: every id once, nothing journaled is re-sent."""
    sim = sim_process("--latency-ms", "20")
    inp, out = _input(tmp_path), tmp_path / "out"
    rng = random.Random(20)
    by_id = {f"r{i:05d}": f"Crash test prompt {i}:" for i in range(ROWS)}
    # For each id made durable before a kill: the times its prompt had been
    # requested then. It must never be requested again afterwards.
    requested_when_durable: dict[str, int] = {}
    for _ in range(5):
        proc = subprocess.Popen(_command(sim, inp, out), stderr=subprocess.DEVNULL)
        _wait_for_progress(out, proc, rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        counts = sim.stats(prompts=True)["prompt_counts"]
        for row_id in _durable_ids(out) - requested_when_durable.keys():
            requested_when_durable[row_id] = counts[by_id[row_id]]
    assert 0 < len(requested_when_durable) < ROWS
    # A torn last line, as a kill in the middle of a write leaves it: its
    # batch of rows was never acknowledged.
    torn: set[str] = set()
    last = max(segments(out / "journal"), default=None)
    if last is not None and last[1].stat().st_size > 5:
        line = last[1].read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        torn = {row["id"] for row in orjson.loads(line)}
        with last[1].open("r+b") as handle:
            handle.truncate(last[1].stat().st_size - 5)
    final = _finish(sim, inp, out)
    _check_complete(out)
    seen = sim.stats(prompts=True)
    counts = seen["prompt_counts"]
    resent = [
        row_id
        for row_id, before in requested_when_durable.items()
        if counts[by_id[row_id]] != before
    ]
    # Only the rows whose journal line was torn above may be sent again.
    assert set(resent) <= torn, sorted(set(resent) - torn)[:10]
    assert final.returncode == 0
    assert seen["requests"] <= ROWS + 5 * 2 * CONCURRENCY + 1


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_graceful_stop_then_resume_resends_nothing(
    sim_process: Callable[..., SimProcess],
    tmp_path: Path,
    signum: signal.Signals,
    code: int,
) -> None:
    """SIGINT or SIGTERM: exit 130 or 143, then resuming re-sends nothing."""
    sim = sim_process("--latency-ms", "20")
    inp, out = _input(tmp_path), tmp_path / "out"
    proc = subprocess.Popen(_command(sim, inp, out), stderr=subprocess.PIPE)
    _wait_for_progress(out, proc, 0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()[-2000:]
    text = err.decode()
    assert "Resume with:" in text
    assert "batchrun run" in text
    done = len(read_results(out))
    assert 0 < done < ROWS
    assert not [r for _, p in segments(out / "journal") for r in read_segment(p)]
    final = _finish(sim, inp, out)
    assert f"{done} already done and skipped" in final.stderr.decode()
    _check_complete(out)
    seen = sim.stats(prompts=True)
    assert seen["requests"] == ROWS
    assert max(seen["prompt_counts"].values()) == 1


def test_a_stop_does_not_wait_out_backoffs(
    sim_process: Callable[..., SimProcess], tmp_path: Path
) -> None:
    """Rows waiting to retry are given up at once on SIGTERM, not after --grace."""
    sim = sim_process("--fail-rate", "1.0")  # every answer a 500 or 503
    inp, out = _input(tmp_path), tmp_path / "out"
    command = [*_command(sim, inp, out), "--max-attempts", "50", "--grace", "30"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    # More requests than slots: rows have failed and are in their backoffs.
    deadline = time.monotonic() + 30
    while sim.stats()["requests"] <= CONCURRENCY and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None
    assert sim.stats()["requests"] > CONCURRENCY
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert time.monotonic() - start < 10, "the stop waited out the backoffs"
    # No row got a result, so none is recorded: the resumed run sends them all.
    assert not _durable_ids(out)


def _file_size_limit(limit: int) -> Callable[[], None]:
    """For ``preexec_fn``: writes past ``limit`` bytes fail with EFBIG, as
    writes to a full disk fail with ENOSPC (SIGXFSZ would kill instead)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    return apply


def test_a_journal_that_cannot_grow_is_the_error_and_the_run_resumes(
    sim_process: Callable[..., SimProcess], tmp_path: Path
) -> None:
    """The journal's write failing aborts the run naming the journal, though
    usage.parquet then fails too (its error hid the journal's), and the same
    command resumes to every row once."""
    sim = sim_process("--latency-ms", "5")
    rows = [{"id": f"r{i:03d}", "prompt": f"Prompt {i}:"} for i in range(300)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    failed = subprocess.run(
        # Two at a time: the journal's first lines, a row or two each, fit.
        [*_command(sim, inp, out), "--concurrency", "2"],
        stderr=subprocess.PIPE,
        preexec_fn=_file_size_limit(4096),
        check=False,
    )
    assert failed.returncode == 3
    assert failed.stderr.decode().splitlines()[-1] == (
        f"batchrun: error: cannot write the journal in {out / 'journal'}:"
        " File too large"
    )
    assert not (out / "usage.parquet").exists()  # it failed as well
    done = len(_durable_ids(out))
    assert 0 < done < len(rows)
    final = _finish(sim, inp, out)
    assert f"{done} already done and skipped" in final.stderr.decode()
    results = read_results(out)
    assert sorted(r["id"] for r in results) == [row["id"] for row in rows]
