"""Processes and measurements shared by the benchmark scenarios in ``run.py``.

The simulator runs in its own process pinned to core 1 (``serve``). Each client
run is a process pinned to core 0, measured with ``os.wait4`` by ``spawn.py``
(``measure_run``). wrk, which is none of the compared clients, measures what the
server alone can answer (``server_capacity``). This module runs things and
returns numbers; it does not judge them or write the report.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from throughput import free_port, pinned, start_server

HERE = Path(__file__).resolve().parent
MODEL = "mock-model"
MAX_TOKENS = 16

# Scenario settings, shared by run.py (which runs them) and report.py.
CONCURRENCIES = (64, 256)
LATENCY_MS = 500
LATENCY_CONCURRENCY = 256
MEMORY_CONCURRENCY = 64
STARTUP_CONCURRENCY = 64
# Scenario 5 counts the instructions of runs on two inputs: what a request
# costs is the difference between them over the rows between them, so that
# start-up and shutdown cancel out.
INSTRUCTION_ROWS = (2_000, 6_000)

# wrk sends a distinct prompt per request: the simulator caches its last 4,096
# answers, and the clients never repeat a prompt, so neither may the load
# generator.
WRK_SCRIPT = """\
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"model": "MODEL", "prompt": "Capacity prompt ' .. counter
    .. ':", "max_tokens": MAX_TOKENS}'
  return wrk.format("POST", "/v1/completions",
    {["Content-Type"] = "application/json"}, body)
end
""".replace("MODEL", MODEL).replace("MAX_TOKENS", str(MAX_TOKENS))


@dataclass(frozen=True, slots=True)
class Measurement:
    """One client run: what ``os.wait4``, the client and the server reported.

    Attributes:
        client: The client's name.
        rows: Rows the client finished successfully.
        wall_s: From just before ``Popen`` until the process was reaped.
        cpu_s: The client's user + system CPU seconds.
        rss_mb: The client's peak resident set size (``ru_maxrss``), in MiB.
        first_request_s: From just before ``Popen`` to the first request sent.
        window_s: From the first request sent to the last response received.
        own_first_request_s: The client's own ``first_request_s`` (from the
            start of its script), when it reports one.
        server_busy: Server CPU seconds over ``wall_s``: 1.0 is a saturated core.
        server_requests: Completion requests the server counted during the run.
        server_peak_in_flight: Most requests the server held at once.
    """

    client: str
    rows: int
    wall_s: float
    cpu_s: float
    rss_mb: float
    first_request_s: float
    window_s: float
    own_first_request_s: float | None
    server_busy: float
    server_requests: int
    server_peak_in_flight: int

    @property
    def rps(self) -> float:
        """Throughput over the whole process lifetime: rows / wall seconds."""
        return self.rows / self.wall_s

    @property
    def cpu_per_1k(self) -> float:
        """Client CPU seconds per 1,000 requests."""
        return self.cpu_s / self.rows * 1000


class Server:
    """The simulator process, with its counters and its CPU clock."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        # The fast path: the same answers without aiohttp.web, so that the
        # server is never what limits a client (see the capacity section).
        self.proc = start_server(self.port, latency_ms, ["--fast"])

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far."""
        # taskset execs the server, so the pid is the server's own.
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def reset(self) -> None:
        """Zero the simulator's counters (``POST /stats/reset``)."""
        url = f"http://127.0.0.1:{self.port}/stats/reset"
        request = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stats(self) -> dict[str, Any]:
        """The simulator's counters (``GET /stats``)."""
        url = f"http://127.0.0.1:{self.port}/stats"
        with urllib.request.urlopen(url, timeout=10) as response:
            data: dict[str, Any] = json.load(response)
            return data

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@contextmanager
def serve(latency_ms: float) -> Iterator[Server]:
    """Run the simulator with ``latency_ms`` for the duration of the block."""
    server = Server(latency_ms)
    try:
        yield server
    finally:
        server.close()


def batchrun_argv(
    inp: Path, out: Path, base_url: str, concurrency: int, event_loop: str
) -> list[str]:
    """The ``batchrun run`` command line measured in every scenario."""
    return [
        sys.executable, "-m", "batchrun", "run", str(inp), "-o", str(out),
        "--base-url", base_url, "--model", MODEL,
        "--max-tokens", str(MAX_TOKENS), "--concurrency", str(concurrency),
        "--progress", "lines", "--event-loop", event_loop,
    ]  # fmt: skip


def script_argv(
    script: str, inp: Path, base_url: str, concurrency: int, event_loop: str
) -> list[str]:
    """The command line of a comparison client (``bare_aiohttp.py`` and alike)."""
    argv = [sys.executable, str(HERE / script), str(inp), "--base-url", base_url,
            "--concurrency", str(concurrency), "--model", MODEL]  # fmt: skip
    return [*argv, "--uvloop"] if event_loop == "uvloop" else argv


def measure_run(
    server: Server, client: str, argv: list[str], results: Path | None = None
) -> Measurement:
    """Run one client on core 0 against ``server`` and measure it.

    The client starts from ``spawn.py``, a small process, so that its peak RSS
    is its own (see there).

    Args:
        server: The simulator; its counters are reset before the run.
        client: The name the report uses.
        argv: The client's command line, without the pinning.
        results: batchrun's ``OUT/results`` directory, read for its row count
            and timestamps; ``None`` for clients that print one JSON line.

    Raises:
        SystemExit: The client failed.
    """
    server.reset()
    server_cpu = server.cpu_s()
    with tempfile.TemporaryDirectory() as tmp:
        spawn = Path(tmp) / "spawn.json"
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            subprocess.run(
                [sys.executable, str(HERE / "spawn.py"), str(spawn),
                 *pinned(0, argv)],
                stdout=stdout, stderr=stderr, check=True,
            )  # fmt: skip
        busy_s = server.cpu_s() - server_cpu
        process = json.loads(spawn.read_text())
        if process["returncode"] != 0:
            raise SystemExit(
                f"{client} failed ({process['returncode']}): {err.read_text()[-800:]}"
            )
        printed = out.read_text()
    if results is None:
        report = json.loads(printed.splitlines()[-1])
        rows = report["rows"]
        first, last = report["first_request_at"], report["last_response_at"]
        own_first = report["first_request_s"]
    else:
        rows, first, last = read_results(results)
        own_first = None
    stats = server.stats()
    return Measurement(
        client=client,
        rows=rows,
        wall_s=process["wall_s"],
        cpu_s=process["cpu_s"],
        rss_mb=process["rss_mb"],
        first_request_s=first - process["popen_at"],
        window_s=last - first,
        own_first_request_s=own_first,
        server_busy=busy_s / process["wall_s"],
        server_requests=stats["requests"],
        server_peak_in_flight=stats["max_in_flight"],
    )


def read_results(results: Path) -> tuple[int, float, float]:
    """Rows ok, first ``started_at`` and last ``finished_at`` (Unix seconds)."""
    table = ds.dataset(results, format="parquet").to_table(
        columns=["status", "started_at", "finished_at"]
    )
    ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
    started = pc.min(table["started_at"].cast(pa.int64())).as_py()
    finished = pc.max(table["finished_at"].cast(pa.int64())).as_py()
    return ok, started / 1e6, finished / 1e6


def server_capacity(
    server: Server, connections: int, seconds: int, repeats: int, work: Path
) -> float | None:
    """Median requests/s wrk gets from ``server`` alone; ``None`` without wrk.

    wrk runs one thread pinned to core 0, like the clients. A 2-second run
    first opens the connections and warms the server; it is not counted.
    """
    if shutil.which("wrk") is None:
        return None
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    url = f"{server.base_url}/completions"

    def wrk(duration: int) -> float:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s",
                str(script), url]  # fmt: skip
        done = subprocess.run(
            pinned(0, argv), capture_output=True, text=True, check=True
        )
        if "Non-2xx" in done.stdout:
            raise SystemExit(f"wrk saw error answers:\n{done.stdout}")
        found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
        if found is None:
            raise SystemExit(f"unexpected wrk output:\n{done.stdout}")
        return float(found.group(1))

    wrk(2)
    return statistics.median(wrk(seconds) for _ in range(repeats))


def count_instructions(
    server: Server, client: str, argv: list[str], rows: int, work: Path
) -> int:
    """Instructions one client run executes, counted by valgrind's callgrind.

    The client runs pinned to core 0 with ``PYTHONHASHSEED=0``, as in the
    other scenarios except for valgrind itself, which runs the client about
    fifty times slower and counts every instruction of every thread.

    Raises:
        SystemExit: The client failed, or the server did not count exactly one
            request per row.
    """
    server.reset()
    profile = work / "callgrind.out"
    done = subprocess.run(
        pinned(0, ["valgrind", "--tool=callgrind",
                   f"--callgrind-out-file={profile}", *argv]),
        capture_output=True, text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    profile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise SystemExit(f"{client} under valgrind failed: {done.stderr[-800:]}")
    requests = server.stats()["requests"]
    if requests != rows:
        raise SystemExit(
            f"{client}: the server counted {requests} requests for {rows} rows"
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{done.stderr[-800:]}")
    return int(found.group(1))


def write_jsonl(path: Path, rows: int) -> Path:
    """Short completion prompts, ``{"id": ..., "prompt": ...}`` per line."""
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(
                json.dumps({"id": f"r{i}", "prompt": f"Benchmark prompt {i}:"}) + "\n"
            )
    return path


def write_parquet(path: Path, rows: int, batch_rows: int = 50_000) -> Path:
    """``id`` and ``prompt`` (about 500 characters) columns, written in batches.

    Prompts are a row number and one of 1,000 seeded texts, so every prompt is
    distinct while only one batch is ever held in memory.
    """
    rng = random.Random(0)
    text = "the of and a to in is you that it he was for on are with his they"
    words = text.split()
    texts = [" ".join(rng.choice(words) for _ in range(160))[:490] for _ in range(1000)]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for begin in range(0, rows, batch_rows):
            span = range(begin, min(begin + batch_rows, rows))
            ids = [f"r{i}" for i in span]
            prompts = [f"{i:07d}: {texts[i % len(texts)]}" for i in span]
            writer.write_batch(
                pa.record_batch([ids, prompts], schema=schema), row_group_size=10_000
            )
    return path


def median_of(runs: Sequence[Measurement], attribute: str) -> float:
    """The median of one attribute (or property) over runs."""
    return statistics.median(float(getattr(run, attribute)) for run in runs)
