"""Tests for ``batchrun.stats``: histogram, collector, progress displays."""

from __future__ import annotations

import fcntl
import io
import os
import random
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from batchrun.config import Endpoint
from batchrun.records import PromptRecord, Result, Usage
from batchrun.sinks import LOG_KEY, Row, result_row
from batchrun.stats import (
    ErrorTally,
    LatencyHistogram,
    LineProgress,
    NullProgress,
    RunStats,
    StatsCollector,
    SturdyProgress,
    TqdmProgress,
    live_note,
    make_progress,
)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _result(
    *,
    model: str = "m",
    endpoint: Endpoint = "completions",
    status: str = "ok",
    usage: Usage | None = None,
    attempts: int = 1,
    latency_s: float = 0.5,
    finish_reason: str = "stop",
    error: str = "PermanentError: HTTP 400",
) -> Row:
    ok = status == "ok"
    result = Result(
        record=PromptRecord("r", endpoint, {"model": model}, "p"),
        status=status,
        usage=usage or Usage(),
        http_status=200 if ok else 400,
        attempts=attempts,
        latency_s=latency_s,
        started_at=0.0,
        finished_at=latency_s,
        error=None if ok else error,
        body={"choices": [{"text": "c", "finish_reason": finish_reason}]}
        if ok
        else None,
    )
    return result_row(result, raw=True, kept_names={})


def _exact(values: list[float], q: float) -> float:
    """The same rank rule as the histogram, on the exact sorted values."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


# --- LatencyHistogram ---------------------------------------------------------


def test_histogram_empty_is_none() -> None:
    """An empty histogram has no quantiles."""
    histogram = LatencyHistogram()
    assert histogram.count == 0
    assert histogram.quantile(0.5) is None
    assert histogram.quantile(0.0) is None


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_histogram_uniform_quantiles(q: float) -> None:
    """Quantiles of 0.01..10 s are within 1% of the exact ones."""
    values = [i / 100 for i in range(1, 1001)]
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(value)
    assert histogram.count == 1000
    got = histogram.quantile(q)
    assert got is not None
    assert got == pytest.approx(_exact(values, q), rel=0.01)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_histogram_lognormal_quantiles(q: float) -> None:
    """Quantiles of a skewed (log-normal) sample are within 1% of exact."""
    rng = random.Random(1234)
    values = [rng.lognormvariate(-1.0, 1.0) for _ in range(20_000)]
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(value)
    got = histogram.quantile(q)
    assert got is not None
    assert got == pytest.approx(_exact(values, q), rel=0.01)


def test_histogram_single_value() -> None:
    """With one value every quantile is that value (within 1%)."""
    histogram = LatencyHistogram()
    histogram.add(2.0)
    assert histogram.quantile(0.0) == pytest.approx(2.0, rel=0.01)
    assert histogram.quantile(1.0) == pytest.approx(2.0, rel=0.01)


def test_histogram_merge() -> None:
    """Merging adds the other histogram's counts."""
    low, high = LatencyHistogram(), LatencyHistogram()
    for _ in range(10):
        low.add(0.1)
        high.add(10.0)
    low.merge(high)
    assert low.count == 20
    assert low.quantile(0.0) == pytest.approx(0.1, rel=0.01)
    assert low.quantile(1.0) == pytest.approx(10.0, rel=0.01)


# --- StatsCollector -----------------------------------------------------------


def test_collector_counts_a_batch_as_row_by_row() -> None:
    """A mixed batch (two groups, retried rows, a row never sent) gives the same
    counters and latencies as recording its rows one at a time."""
    rng = random.Random(7)
    rows = []
    for i in range(60):
        row = _result(
            model="ab"[i % 2],
            usage=Usage(i, 2 * i, 3 * i) if i % 3 else Usage(),
            attempts=0 if i == 5 else 1 + (i % 4 == 0),
            latency_s=rng.uniform(0.001, 30.0),
            status="error" if i % 7 == 0 else "ok",
        )
        if i % 4 == 0 and i != 0:
            row[LOG_KEY] = [1, i % 2, 0, i + 100, i + 200]  # retried: what was billed
        rows.append(row)
    clock = FakeClock()
    batched, one_by_one = StatsCollector(clock=clock), StatsCollector(clock=clock)
    batched.record(rows)
    for row in rows:
        one_by_one.record([row])
    assert batched.usage_rows() == one_by_one.usage_rows()
    total = batched.total
    assert total.requests == 60
    assert total.latencies.count == 59  # the row never sent has no latency
    assert total.retries == 14
    assert total.rate_limited == 14
    assert total.prompt_tokens == sum(
        row[LOG_KEY][3] if LOG_KEY in row else row["prompt_tokens"] or 0 for row in rows
    )


def test_collector_groups_and_totals() -> None:
    """usage_rows has one row per (model, endpoint), sorted, then a summed '*' row."""
    clock = FakeClock()
    stats = StatsCollector(clock=clock)
    stats.record(
        [
            _result(model="b", usage=Usage(10, 5, 15), latency_s=1.0),
            _result(model="a", endpoint="chat", usage=Usage(3, 2, 5), attempts=2),
            _result(model="b", status="error", attempts=3),
        ]
    )
    stats.record([_result(model="b", usage=Usage(1, 1, 2))])
    clock.advance(2.0)
    rows = stats.usage_rows()
    assert [(r["model"], r["endpoint"]) for r in rows] == [
        ("a", "chat"),
        ("b", "completions"),
        ("*", "*"),
    ]
    a, b, total = rows
    assert (a["requests"], a["succeeded"], a["failed"], a["attempts"]) == (1, 1, 0, 2)
    assert (b["requests"], b["succeeded"], b["failed"], b["attempts"]) == (3, 2, 1, 5)
    assert (b["prompt_tokens"], b["completion_tokens"], b["total_tokens"]) == (
        11,
        6,
        17,
    )
    for key in (
        "requests",
        "succeeded",
        "failed",
        "attempts",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ):
        assert total[key] == a[key] + b[key], key
    assert total["wall_s"] == 2.0
    assert total["requests_per_s"] == 2.0
    assert total["completion_tokens_per_s"] == 4.0
    assert a["latency_p50_s"] == pytest.approx(0.5, rel=0.01)


def test_collector_separates_endpoints_of_one_model() -> None:
    """The same model on two endpoints gives two groups."""
    stats = StatsCollector(clock=FakeClock())
    stats.record([_result(endpoint="chat"), _result(endpoint="completions")])
    keys = [(r["model"], r["endpoint"]) for r in stats.usage_rows()]
    assert keys == [("m", "chat"), ("m", "completions"), ("*", "*")]


def test_collector_skips_latency_without_attempts() -> None:
    """Results that made no request add no latency sample."""
    stats = StatsCollector(clock=FakeClock())
    stats.record([_result(status="error", attempts=0, latency_s=0.0)])
    assert stats.total.requests == 1
    assert stats.total.latencies.count == 0
    assert stats.usage_rows()[-1]["latency_p50_s"] is None


def test_collector_empty_run() -> None:
    """With no results there is only the '*' row, all zero, and no rates."""
    stats = StatsCollector(clock=FakeClock())
    (total,) = stats.usage_rows()
    assert total["model"] == "*"
    assert total["requests"] == 0
    assert total["requests_per_s"] == 0.0
    assert total["latency_p99_s"] is None


def test_run_stats_from_collector(tmp_path: Path) -> None:
    """RunStats freezes the collector's totals and wall time."""
    clock = FakeClock()
    stats = StatsCollector(clock=clock)
    stats.record([_result(usage=Usage(4, 6, 10)), _result(status="error")])
    clock.advance(4.0)
    run = RunStats.from_collector(stats, tmp_path)
    assert (run.rows, run.succeeded, run.failed, run.attempts) == (2, 1, 1, 2)
    assert (run.prompt_tokens, run.completion_tokens, run.total_tokens) == (4, 6, 10)
    assert run.wall_s == 4.0
    assert run.requests_per_s == 0.5
    assert "2 rows: 1 ok, 1 failed" in run.summary()


def test_answers_stopped_at_max_tokens_are_counted() -> None:
    """Rows whose answer ran into max_tokens are counted per group, kept across
    a resume, and named in the summary only when there are some."""
    clock = FakeClock()
    stats = StatsCollector(clock=clock)
    rows = [_result(finish_reason="length") for _ in range(3)]
    rows += [_result(), _result(), _result(status="error")]
    stats.record(rows)
    assert stats.total.truncated == 3
    assert stats.usage_rows()[-1]["truncated"] == 3
    summary = RunStats.from_collector(stats, Path("out")).summary()
    assert "3 of 5 answers stopped at max_tokens" in summary
    resumed = StatsCollector(clock=clock)
    resumed.restore(stats.dump())
    assert resumed.total.truncated == 3
    assert resumed.session.truncated == 0
    assert "max_tokens" not in RunStats.from_collector(resumed, Path("out")).summary()


def test_answers_without_usage_are_counted_and_named() -> None:
    """Answers the server reported no usage for (some servers and gateways
    leave it out) are counted, kept across a resume and named: the token
    counts and the cost read as complete without them."""
    clock = FakeClock()
    stats = StatsCollector(clock=clock)
    rows = [_result(usage=Usage(4, 6, 10)), _result(), _result()]
    rows += [_result(status="error")]
    stats.record(rows)
    assert stats.total.no_usage == 2
    assert stats.usage_rows()[-1]["no_usage"] == 2
    summary = RunStats.from_collector(stats, Path("out")).summary()
    assert (
        "2 of 3 answers came without token usage: the token counts and the cost"
        " leave them out"
    ) in summary.splitlines()
    resumed = StatsCollector(clock=clock)
    resumed.restore(stats.dump())
    assert (resumed.total.no_usage, resumed.session.no_usage) == (2, 0)
    assert (
        "without token usage"
        not in RunStats.from_collector(resumed, Path("out")).summary()
    )


def test_summary_says_why_rows_failed() -> None:
    """The summary counts this run's failed rows by error, the three most
    common first; rows an earlier run left in its journal are not counted."""
    stats = StatsCollector(clock=FakeClock())
    stats.record_earlier([_result(status="error", error="Old: error")] * 9)
    errors = ["A: x"] * 5 + ["B: y"] * 12 + ["C: z"] * 2 + ["D: w", "E: v"]
    stats.record([_result()] + [_result(status="error", error=e) for e in errors])
    summary = RunStats.from_collector(stats, Path("out")).summary()
    assert (
        "failed rows, by error:\n"
        "  12 x B: y\n"
        "   5 x A: x\n"
        "   2 x C: z\n"
        "   2 x other errors\n"
    ) in summary
    assert "Old" not in summary
    clean = StatsCollector(clock=FakeClock())
    clean.record([_result()])
    assert "by error" not in RunStats.from_collector(clean, Path("out")).summary()


def test_error_tally_is_bounded() -> None:
    """Errors naming something of their own row are told apart up to a bound,
    and counted together past it; a long error is cut."""
    tally = ErrorTally()
    tally.add(
        [{"error": f"E: prompt {i}" + "x" * 500} for i in range(ErrorTally.KEEP + 10)]
    )
    tally.add([{"error": None}, {"error": f"E: prompt 0{'x' * 500}"}])
    assert len(tally.counts) == ErrorTally.KEEP
    assert tally.others == 10
    top, rest = tally.top(1)
    assert top == [(f"E: prompt 0{'x' * 500}"[:197] + "...", 2)]
    assert rest == ErrorTally.KEEP - 1 + 10


# --- progress -----------------------------------------------------------------


def test_line_progress_prints_after_interval() -> None:
    """LineProgress prints nothing before its interval, then one line per interval."""
    clock = FakeClock()
    stats = StatsCollector(clock=clock)
    out = io.StringIO()
    progress = LineProgress(10, out, interval_s=10.0, clock=clock)
    stats.record([_result(usage=Usage(1, 3, 4))] * 4)
    clock.advance(9.9)
    progress.refresh(stats)
    assert out.getvalue() == ""
    clock.advance(0.1)
    progress.refresh(stats)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("batchrun: 4/10 rows, ok=4 failed=0")
    assert "eta" in lines[0]
    clock.advance(5.0)
    progress.refresh(stats)
    assert len(out.getvalue().splitlines()) == 1
    clock.advance(5.0)
    progress.refresh(stats)
    assert len(out.getvalue().splitlines()) == 2


def test_line_progress_without_total() -> None:
    """Without a total the line has no '/total' and no eta."""
    clock = FakeClock()
    stats = StatsCollector(clock=clock)
    out = io.StringIO()
    progress = LineProgress(None, out, interval_s=1.0, clock=clock)
    stats.record([_result()])
    clock.advance(1.0)
    progress.refresh(stats)
    line = out.getvalue()
    assert line.startswith("batchrun: 1 rows,")
    assert "eta" not in line
    progress.close(stats)
    assert out.getvalue() == line


def test_live_note() -> None:
    """The pool's state: requests in flight always, the rest only when it applies."""
    assert live_note(in_flight=3, limit=32) == "retries=0 429s=0 in flight 3/32"
    note = live_note(
        in_flight=0,
        limit=16,
        retries=7,
        rate_limited=9,
        backing_off=2,
        waiting_s=4.6,
        learned_rpm=59.6,
        stopping="SIGINT",
    )
    assert note == (
        "retries=7 429s=9 in flight 0/16, 2 backing off, waiting 5s (rate limit),"
        " paced to 60/min (learned from 429s), stopping (SIGINT)"
    )


@pytest.mark.parametrize(
    ("oldest_s", "timeout_s", "shown"),
    [
        (9.9, 300.0, ""),
        (10.2, 300.0, ", the oldest out 10s (--timeout 300)"),
        (1.4, 3.0, ""),
        (1.5, 3.0, ", the oldest out 2s (--timeout 3)"),
    ],
)
def test_live_note_names_a_request_out_long(
    oldest_s: float, timeout_s: float, shown: str
) -> None:
    """A request out 10 s, or half its time limit if less, is named: the
    last rows held by slow answers showed "eta 0s" and nothing else."""
    note = live_note(in_flight=2, limit=8, oldest_s=oldest_s, timeout_s=timeout_s)
    assert note == "retries=0 429s=0 in flight 2/8" + shown


def test_make_progress_off() -> None:
    """Mode 'off' gives a NullProgress that writes nothing."""
    out = io.StringIO()
    clock = FakeClock()
    progress = make_progress("off", 5, stream=out, clock=clock)
    assert isinstance(progress, NullProgress)
    stats = StatsCollector(clock=clock)
    stats.record([_result()])
    clock.advance(100.0)
    progress.refresh(stats)
    progress.close(stats)
    assert out.getvalue() == ""


def test_make_progress_auto_on_non_tty_is_lines() -> None:
    """Mode 'auto' on a stream that is not a terminal gives line progress."""
    clock = FakeClock()
    out = io.StringIO()
    progress = make_progress("auto", None, stream=out, interval_s=2.0, clock=clock)
    assert isinstance(progress, SturdyProgress)
    assert isinstance(progress.display, LineProgress)
    stats = StatsCollector(clock=clock)
    clock.advance(2.0)
    progress.refresh(stats)
    assert out.getvalue().startswith("batchrun: 0 rows")


@pytest.mark.parametrize(
    ("lines", "columns", "kind"),
    [(24, 0, LineProgress), (0, 80, LineProgress), (24, 80, TqdmProgress)],
)
def test_make_progress_auto_on_a_terminal_needs_its_size(
    lines: int, columns: int, kind: type
) -> None:
    """On a terminal without a width or a height (tqdm draws nothing there:
    with 0 lines it hides its bar as below the screen) 'auto' falls back to
    lines; on one with both it draws a bar."""
    main, side = os.openpty()
    size = struct.pack("HHHH", lines, columns, 0, 0)
    fcntl.ioctl(side, termios.TIOCSWINSZ, size)
    with os.fdopen(side, "w") as terminal:
        progress = make_progress("auto", 3, stream=terminal, clock=FakeClock())
        assert isinstance(progress, SturdyProgress)
        assert isinstance(progress.display, kind)
        progress.close(StatsCollector(clock=FakeClock()))
    os.close(main)


class _Gone(io.StringIO):
    """A stream nobody reads any more: every write fails, as on a closed pipe."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("mode", ["lines", "bar"])
def test_a_display_that_fails_is_dropped(mode: str) -> None:
    """A display whose stream fails is dropped at the first failure and never
    raises: lines at their first line, a bar at its first drawing (no display
    at all)."""
    clock = FakeClock()
    progress = make_progress(mode, 3, stream=_Gone(), interval_s=1.0, clock=clock)
    if mode == "bar":
        assert isinstance(progress, NullProgress)
    else:
        assert isinstance(progress, SturdyProgress)
        assert isinstance(progress.display, LineProgress)
    stats = StatsCollector(clock=clock)
    clock.advance(2.0)
    progress.refresh(stats)
    progress.message("compacting")
    progress.close(stats)
    if isinstance(progress, SturdyProgress):
        assert progress.display is None


def test_tqdm_is_imported_only_for_a_bar() -> None:
    """Plain lines (logs, pipes, --quiet) never pay tqdm's import."""
    script = (
        "import io, sys\n"
        "import batchrun.cli, batchrun.runner\n"
        "from batchrun.stats import make_progress\n"
        "make_progress('lines', 3, stream=io.StringIO())\n"
        "before = 'tqdm' in sys.modules\n"
        "make_progress('bar', 3, stream=io.StringIO())\n"
        "print(before, 'tqdm' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_make_progress_bar() -> None:
    """Mode 'bar' gives a tqdm bar that writes to the given stream."""
    out = io.StringIO()
    clock = FakeClock()
    progress = make_progress("bar", 3, stream=out, clock=clock)
    assert isinstance(progress, SturdyProgress)
    assert isinstance(progress.display, TqdmProgress)
    stats = StatsCollector(clock=clock)
    stats.record([_result(), _result(status="error")])
    clock.advance(1.0)
    progress.close(stats)
    text = out.getvalue()
    assert "2/3" in text
    assert "failed=1" in text


def test_bar_message_mid_run_keeps_the_bar() -> None:
    """A message while the bar is up is written above it and the bar drawn
    again below; once closed, a message is a line of its own."""
    out = io.StringIO()
    progress = TqdmProgress(10, out)
    progress.message("no answer yet")
    mid = out.getvalue()
    assert "batchrun: no answer yet\n" in mid
    assert mid.rindex("0/10") > mid.index("batchrun: no answer yet")
    progress.close(StatsCollector(FakeClock()))
    progress.message("compacting")
    assert out.getvalue().endswith("\nbatchrun: compacting\n")
