"""Helpers for tests: input writers, result readers, the in-process CLI."""

from __future__ import annotations

import heapq
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from batchrun.cli import main
from batchrun.records import AttemptLog, PromptRecord, Result, Usage
from batchrun.simulator import SimulatorHandle
from batchrun.sinks import result_row

Rows = Sequence[dict[str, Any]]
SimFactory = Callable[..., SimulatorHandle]
LocalSimFactory = Callable[..., Awaitable[SimulatorHandle]]
WriteInput = Callable[..., Path]


def write_jsonl(path: Path, rows: Rows) -> Path:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: Rows) -> Path:
    """Write rows as a Parquet file."""
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


def prompts(n: int, *, prefix: str = "row") -> list[dict[str, Any]]:
    """``n`` completions rows with ids ``<prefix>-<i>``."""
    return [{"id": f"{prefix}-{i}", "prompt": f"Prompt number {i}:"} for i in range(n)]


def read_results(out: Path) -> list[dict[str, Any]]:
    """All result rows of a run, in id order."""
    table = ds.dataset(out / "results", format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: str(r["id"]))


def closed_port_url() -> str:
    """A ``/v1`` base URL on a local port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def run_cli(*args: str | Path) -> int:
    """Run the CLI in-process; returns the exit code."""
    return main([str(a) for a in args])


class VirtualTime:
    """A clock that sleeping moves forward at once: no test waits out a backoff.

    Pass ``clock`` to the simulator and ``clock``/``sleep`` to ``arun``: both
    then agree on how much time has passed.

    Sleepers wake in order of their wake-up time, as they would in real time,
    and each moves the clock forward only after the event loop has had
    ``SETTLE_YIELDS`` turns, so that requests already sent reach the simulator
    first. Moving it at once let a pacer's waits run ahead of the requests
    they spaced, which then arrived together.
    """

    SETTLE_YIELDS = 16

    def __init__(self) -> None:
        self.offset = 0.0
        self.slept: list[float] = []
        self._sleepers: list[tuple[float, int]] = []
        self._count = itertools.count()

    def clock(self) -> float:
        """Real monotonic time plus every virtual advance so far."""
        return time.monotonic() + self.offset

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of virtual time, letting the event loop run first."""
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        self.slept.append(seconds)
        entry = (self.clock() + seconds, next(self._count))
        heapq.heappush(self._sleepers, entry)
        try:
            while True:
                for _ in range(self.SETTLE_YIELDS):
                    await anyio.lowlevel.checkpoint()
                if self._sleepers[0] == entry:
                    break
        except BaseException:
            self._sleepers.remove(entry)
            heapq.heapify(self._sleepers)
            raise
        heapq.heappop(self._sleepers)
        self.offset += max(0.0, entry[0] - self.clock())


class SimProcess:
    """``batchrun serve-mock`` in its own process, for tests that kill clients."""

    def __init__(self, *flags: str) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchrun", "serve-mock", "--port", "0", *flags],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if "serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.base_url = line.rsplit(" ", 1)[-1].strip()

    def stats(self, *, prompts: bool = False) -> dict[str, Any]:
        """The simulator's /stats."""
        import urllib.request

        url = (
            self.base_url.removesuffix("/v1")
            + "/stats"
            + ("?prompts=1" if prompts else "")
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            data: dict[str, Any] = json.load(response)
            return data

    def close(self) -> None:
        """Stop the simulator."""
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def run_against(sim: SimulatorHandle, inp: Path, out: Path, *extra: str | Path) -> int:
    """``batchrun run INP -o OUT`` against ``sim`` with model ``m``, quietly."""
    return run_cli(
        "run", inp, "-o", out, "--base-url", sim.base_url, "--model", "m", "--quiet",
        *extra,
    )  # fmt: skip


class FakeTime:
    """A clock that moves only when a task sleeps on it; records every sleep."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        """The current fake time in seconds."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Advance the clock at once and let other tasks run."""
        self.now += seconds
        self.sleeps.append(seconds)
        await anyio.lowlevel.checkpoint()


def make_row(
    row_id: str,
    status: str = "ok",
    *,
    completion: str = "c",
    variant: str | None = None,
    started_at: float = 1.0,
    log: AttemptLog | None = None,
    position: int | None = None,
) -> dict[str, Any]:
    """A result row as the runner journals it and writes it to parts;
    ``position`` is its ``row``, the input row it answers."""
    ok = status == "ok"
    answer = {"choices": [{"index": 0, "text": completion, "finish_reason": "stop"}]}
    result = Result(
        record=PromptRecord(row_id, "completions", {"model": "m"}, "p", row=position),
        status=status,
        usage=Usage(1, 2, 3) if ok else Usage(),
        http_status=200 if ok else 400,
        attempts=1,
        latency_s=0.1,
        started_at=started_at,
        finished_at=started_at + 0.5,
        error=None if ok else "PermanentError: HTTP 400: bad request",
        body=answer if ok else None,
        response=json.dumps({"id": f"cmpl-{row_id}", "text": completion})
        if ok
        else json.dumps({"error": {"message": "bad request"}}),
        log=log,
    )
    row = result_row(result, raw=True, kept_names={})
    row["variant"] = variant
    return row
