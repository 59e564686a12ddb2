"""Run a batch: read rows, call the endpoint with N workers, write results.

::

    reader --(stream, 2N)--> N workers --(stream, 2N)--> writer --> part files

One task group owns every task; bounded streams give backpressure, so memory
does not grow with the input. Blocking work (reading and writing Parquet)
runs in threads. This module orchestrates; the pieces live in ``sources``,
``payload``, ``client``, ``sinks`` and ``stats``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .calls import Caller
from .client import APIClient
from .config import RunConfig
from .errors import (
    BatchrunError,
    CircuitBreakerError,
    FatalAPIError,
    InputError,
)
from .payload import RequestBuilder
from .ratelimit import ConcurrencyLimit, RateLimiter
from .records import PromptRecord, Result, Usage
from .retry import Retrier, Sleep
from .sinks import (
    MANIFEST_FILE,
    USAGE_FILE,
    PartWriter,
    infer_type,
    prepare_output,
    write_json,
    write_usage,
)
from .sources import IdSet, RowBatch, expand_inputs, iter_batches
from .stats import Clock, Progress, RunStats, StatsCollector, make_progress

__all__ = ["MOCK_MODEL", "arun", "run"]

MOCK_MODEL = "mock-model"
_SHUTDOWN_FLUSH_S = 10.0
_PROGRESS_TICK_S = 1.0


def _version() -> str:
    try:
        return version("batchrun")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run(config: RunConfig) -> RunStats:
    """Run a batch to completion and return its stats. Blocking.

    Raises:
        ConfigError, InputError: Before any request is sent.
        FatalAPIError: The endpoint refused the key, model or URL; run aborted.
        OutputError: Results could not be written; run aborted.
    """
    return anyio.run(arun, config, backend="asyncio")


async def arun(
    config: RunConfig,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = anyio.sleep,
) -> RunStats:
    """Run a batch inside a running event loop (e.g. a notebook).

    Args:
        config: What to run.
        clock: Monotonic seconds; with ``sleep``, injectable so that tests
            never wait out a real backoff.
        sleep: Awaitable sleep used for backoff and rate-limit waits.

    Raises:
        The same as ``run``.
    """
    try:
        return await _Run(config, clock, sleep).execute()
    except BaseExceptionGroup as group:
        raise _primary(group) from None


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _primary(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception that explains why the task group failed."""
    leaves = list(_leaves(group))
    for kind in (KeyboardInterrupt, SystemExit, FatalAPIError, BatchrunError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group


def _located(exc: InputError, batch: RowBatch, index: int) -> InputError:
    return InputError(
        exc.reason,
        path=batch.path,
        line=batch.numbers[index],
        kind=batch.kind,
        field=exc.field,
    )


class _CircuitBreaker:
    """Stops a run whose rows keep failing the same permanent way.

    A wrong model name or parameter answers every row with the same 4xx; 50
    such failures in a row (the first 50 of a run included) abort the run
    instead of burning through a million rows.
    """

    THRESHOLD = 50

    def __init__(self) -> None:
        self._error: str | None = None
        self._count = 0

    def check(self, results: Sequence[Result]) -> None:
        for result in results:
            error = result.error
            if result.status == "ok" or error is None:
                self._error, self._count = None, 0
                continue
            if not error.startswith("PermanentError"):
                continue
            if error == self._error:
                self._count += 1
            else:
                self._error, self._count = error, 1
            if self._count >= self.THRESHOLD:
                raise CircuitBreakerError(
                    f"aborting: {self._count} rows in a row failed with: {error}"
                )


@dataclasses.dataclass(frozen=True, slots=True)
class _Scan:
    total: int
    kept: dict[str, Any]


def scan_inputs(files: Sequence[Path], builder: RequestBuilder) -> _Scan:
    """One cheap pass over the input before anything is sent. Blocking.

    Validates every row, counts them, checks ids are unique and learns the
    types of kept columns.

    Raises:
        InputError: The first bad row, or a duplicate id naming both rows.
    """
    ids = IdSet()
    keep = builder.options.keep_columns
    kinds: dict[str, set[type]] = {name: set() for name in keep}
    present: set[str] = set()
    position = 0
    for batch in iter_batches(files, columns=builder.columns()):
        batch_ids = []
        for index, row in enumerate(batch.rows):
            try:
                batch_ids.append(builder.row_id(row, position))
                builder.check(row)
            except InputError as exc:
                raise _located(exc, batch, index) from None
            position += 1
            for name in keep:
                if name in row:
                    present.add(name)
                    kinds[name].add(type(row[name]))
        ids.add_many(batch_ids)
    missing = [name for name in keep if name not in present and position]
    if missing:
        raise InputError(
            "--keep-columns names a column no row has",
            path=str(files[0]),
            field=missing[0],
        )
    duplicate = ids.first_duplicate()
    if duplicate is not None:
        raise _duplicate_error(files, builder, duplicate)
    return _Scan(total=position, kept={name: infer_type(kinds[name]) for name in keep})


def _duplicate_error(
    files: Sequence[Path], builder: RequestBuilder, wanted: str
) -> InputError:
    """Find the first two rows that share ``wanted`` and name both."""
    first: str | None = None
    position = 0
    for batch in iter_batches(files, columns=builder.columns()):
        for index, row in enumerate(batch.rows):
            if builder.row_id(row, position) == wanted:
                number = batch.numbers[index]
                if first is not None:
                    return InputError(
                        f"duplicate id {wanted!r}, first at {first}",
                        path=batch.path,
                        line=number,
                        kind=batch.kind,
                        field=builder.options.id_column or "id",
                    )
                sep = ":" if batch.kind == "line" else " row "
                first = f"{batch.path}{sep}{number}"
            position += 1
    return InputError(f"duplicate id {wanted!r}")  # pragma: no cover - found above


class _Run:
    """The state of one run; ``execute`` drives it."""

    def __init__(self, config: RunConfig, clock: Clock, sleep: Sleep) -> None:
        if config.endpoint.mock and config.request.model is None:
            config = dataclasses.replace(
                config, request=dataclasses.replace(config.request, model=MOCK_MODEL)
            )
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.caller: Caller | None = None
        self.limiter = RateLimiter(config.limits, clock=clock, sleep=sleep)
        self.concurrency = ConcurrencyLimit(config.concurrency, clock=clock)
        self.circuit = _CircuitBreaker()
        self.out_dir = config.output.out_dir
        self.builder = RequestBuilder(config.request)
        self.stats = StatsCollector(clock)
        self.started_iso = _now_iso()
        self.total: int | None = None
        self.sink: PartWriter | None = None
        self.parts_written = 0
        self.progress: Progress | None = None

    async def execute(self) -> RunStats:
        cfg = self.config
        files = expand_inputs(cfg.inputs)
        scan = await anyio.to_thread.run_sync(scan_inputs, files, self.builder)
        self.total = scan.total
        self.files = files
        results_dir = prepare_output(self.out_dir, overwrite=cfg.output.overwrite)
        self.sink = PartWriter(
            results_dir, kept=scan.kept, raw_response=cfg.output.raw_response
        )
        self._write_manifest("running")
        status = "aborted"
        error: str | None = None
        try:
            async with AsyncExitStack() as stack:
                base_url = cfg.endpoint.base_url
                if cfg.endpoint.mock:
                    from .simulator import start_simulator

                    base_url = (
                        await stack.enter_async_context(start_simulator())
                    ).base_url
                assert base_url is not None
                client = await stack.enter_async_context(
                    APIClient(
                        base_url,
                        api_key=cfg.endpoint.api_key,
                        timeout_s=cfg.endpoint.timeout_s,
                        concurrency=cfg.concurrency,
                    )
                )
                self.caller = Caller(
                    client,
                    limiter=self.limiter,
                    concurrency=self.concurrency,
                    policy=cfg.retry,
                    clock=self.clock,
                    retrier=Retrier(cfg.retry, clock=self.clock, sleep=self.sleep),
                    raw_response=cfg.output.raw_response,
                )
                self.progress = make_progress(
                    cfg.progress, scan.total, clock=self.clock, note=self._note
                )
                await self._pipeline()
            status = "finished"
        except BaseException as exc:
            status = (
                "interrupted"
                if isinstance(exc, KeyboardInterrupt | anyio.get_cancelled_exc_class())
                else "aborted"
            )
            error = str(_primary(exc) if isinstance(exc, BaseExceptionGroup) else exc)
            raise
        finally:
            if self.progress is not None:
                self.progress.close(self.stats)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._finish, status, error)
        return RunStats.from_collector(self.stats, self.out_dir)

    def _finish(self, status: str, error: str | None) -> None:
        write_usage(self.out_dir / USAGE_FILE, self.stats.usage_rows())
        self._write_manifest(status, error)

    def _write_manifest(self, status: str, error: str | None = None) -> None:
        cfg = self.config
        t = self.stats.total
        write_json(
            self.out_dir / MANIFEST_FILE,
            {
                "batchrun_version": _version(),
                "status": status,
                "error": error,
                "inputs": [str(p) for p in cfg.inputs],
                "endpoint": "mock" if cfg.endpoint.mock else cfg.endpoint.base_url,
                "request": cfg.request.shaping(),
                "keep_columns": list(cfg.request.keep_columns),
                "raw_response": cfg.output.raw_response,
                "concurrency": cfg.concurrency,
                "started_at": self.started_iso,
                "finished_at": None if status == "running" else _now_iso(),
                "counts": {
                    "input_rows": self.total,
                    "rows": t.requests,
                    "succeeded": t.succeeded,
                    "failed": t.failed,
                    "attempts": t.attempts,
                    "prompt_tokens": t.prompt_tokens,
                    "completion_tokens": t.completion_tokens,
                    "total_tokens": t.total_tokens,
                },
            },
        )

    async def _pipeline(self) -> None:
        n = self.config.concurrency
        records_in, records_out = anyio.create_memory_object_stream[PromptRecord](2 * n)
        results_in, results_out = anyio.create_memory_object_stream[Result](2 * n)
        async with anyio.create_task_group() as outer:
            if self.config.progress != "off":
                outer.start_soon(self._show_progress)
            async with anyio.create_task_group() as tg:
                async with records_in, records_out, results_in:
                    tg.start_soon(self._read, records_in.clone(), results_in.clone())
                    # Twice as many workers as slots: a row waiting out its
                    # backoff holds a worker but no slot, so fresh rows keep
                    # the slots busy and retries interleave with new work.
                    for _ in range(2 * n):
                        tg.start_soon(
                            self._work, records_out.clone(), results_in.clone()
                        )
                tg.start_soon(self._write, results_out)
            outer.cancel_scope.cancel()

    async def _show_progress(self) -> None:
        progress = self.progress
        assert progress is not None
        while True:
            await anyio.sleep(_PROGRESS_TICK_S)
            progress.refresh(self.stats)

    def _next_batch(
        self, batches: Iterator[RowBatch], position: int
    ) -> tuple[list[PromptRecord | Result], int] | None:
        """Build the records of the next input batch. Runs in a thread."""
        batch = next(batches, None)
        if batch is None:
            return None
        builder = self.builder
        out: list[PromptRecord | Result] = []
        for index, row in enumerate(batch.rows):
            row_id = builder.row_id(row, position)
            position += 1
            try:
                out.append(builder.build(row, row_id))
            except InputError as exc:
                # The scan passed, so this is a render-time failure: a failed row.
                out.append(
                    self._input_failure(row_id, str(_located(exc, batch, index)))
                )
        return out, position

    def _note(self) -> str:
        """Limiter state for the progress display."""
        note = f"conc={self.concurrency.limit}"
        waiting = self.limiter.waiting()
        if waiting > 0:
            note += f" waiting {waiting:.0f}s (rate limit)"
        return note

    def _input_failure(self, row_id: str, message: str) -> Result:
        now = time.time()
        return Result(
            id=row_id,
            status="error",
            endpoint=self.config.request.endpoint or "completions",
            model=self.config.request.model or "",
            prompt="",
            completion=None,
            choices=None,
            finish_reason=None,
            usage=Usage(),
            response=None,
            http_status=None,
            attempts=0,
            latency_s=0.0,
            error=f"InputError: {message}",
            started_at=now,
            finished_at=now,
        )

    async def _read(
        self,
        records: MemoryObjectSendStream[PromptRecord],
        results: MemoryObjectSendStream[Result],
    ) -> None:
        async with records, results:
            batches = iter_batches(self.files, columns=self.builder.columns())
            position = 0
            while True:
                built = await anyio.to_thread.run_sync(
                    self._next_batch, batches, position
                )
                if built is None:
                    return
                items, position = built
                for item in items:
                    if isinstance(item, Result):
                        await results.send(item)
                    else:
                        await records.send(item)

    async def _work(
        self,
        records: MemoryObjectReceiveStream[PromptRecord],
        results: MemoryObjectSendStream[Result],
    ) -> None:
        caller = self.caller
        assert caller is not None
        async with records, results:
            async for record in records:
                await results.send(await caller.call(record))

    async def _write(self, results: MemoryObjectReceiveStream[Result]) -> None:
        sink = self.sink
        assert sink is not None
        interval = self.config.output.flush_interval_s
        limit = self.config.output.flush_rows
        deadline = anyio.current_time() + interval
        async with results:
            try:
                while True:
                    try:
                        first = await _receive(
                            results, deadline if sink.pending else None
                        )
                    except anyio.EndOfStream:
                        break
                    if first is None:  # the flush interval passed with results pending
                        await self._flush()
                        deadline = anyio.current_time() + interval
                        continue
                    batch = [first]
                    while True:
                        try:
                            batch.append(results.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    sink.add(batch)
                    self.stats.record(batch)
                    self.circuit.check(batch)
                    if sink.pending >= limit or anyio.current_time() >= deadline:
                        await self._flush()
                        deadline = anyio.current_time() + interval
                await self._flush(final=True)
            except BaseException:
                with anyio.move_on_after(_SHUTDOWN_FLUSH_S, shield=True):
                    await self._flush()
                raise

    async def _flush(self, *, final: bool = False) -> None:
        sink = self.sink
        assert sink is not None
        if not sink.pending and not (final and self.parts_written == 0):
            return
        number, rows = sink.take()
        await anyio.to_thread.run_sync(sink.write, number, rows)
        self.parts_written += 1


async def _receive(
    results: MemoryObjectReceiveStream[Result], deadline: float | None
) -> Result | None:
    """The next result, or ``None`` if ``deadline`` (event-loop time) passes first."""
    if deadline is None:
        return await results.receive()
    with anyio.move_on_after(deadline - anyio.current_time()):
        return await results.receive()
    return None
