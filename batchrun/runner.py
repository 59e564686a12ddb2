"""Run a batch: read rows, call the endpoint with N workers, write results.

::

    reader --(stream, 2N)--> 2N workers (N in flight) --(stream, 2N)--> writer
                                                                 |
                                         journal (every result) -+- part files

One task group owns every task; bounded streams give backpressure, so memory
does not grow with the input. The writer appends every result to the journal
before counting it, and rolls the journal into atomically written part files.
Running the same command again resumes. This module orchestrates; the pieces
live in ``scan``, ``payload``, ``calls``, ``journal``, ``sinks``, ``resume``
and ``stats``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._libc import release_free_memory
from ._version import __version__
from .calls import Caller, RowAbandoned, failed_result
from .client import APIClient, make_room_for
from .config import MOCK_MODEL, RunConfig, Variant
from .errors import (
    BatchrunError,
    CircuitBreakerError,
    ConfigError,
    FatalAPIError,
    InputError,
    OutputError,
)
from .journal import JOURNAL_DIR, Journal, read_segment, segments
from .payload import RequestBuilder, cells, columns_of
from .ratelimit import INITIAL_CONCURRENCY, ConcurrencyLimit, RateLimiter, Slot
from .records import PromptRecord, Result
from .resume import (
    CompletedIndex,
    check_compatible,
    input_fingerprint,
    load_manifest,
    request_fingerprint,
)
from .retry import Retrier, Sleep
from .scan import Scan, locate, scan_inputs
from .sinks import (
    MANIFEST_FILE,
    USAGE_FILE,
    CompactionStopped,
    OutputLock,
    PartWriter,
    Row,
    clear_output,
    compact,
    has_output,
    infer_type,
    list_parts,
    open_output,
    result_row,
    write_json,
    write_usage,
)
from .sources import RowBatch, expand_inputs, iter_batches
from .stats import (
    Clock,
    Progress,
    RunStats,
    StatsCollector,
    live_note,
    make_progress,
    say,
)

__all__ = ["MOCK_MODEL", "arun", "run"]

T = TypeVar("T")

_SHUTDOWN_FLUSH_S = 10.0
_PROGRESS_TICK_S = 1.0
_GATHER_S = 0.002
# A part also ends once its rows take this much as JSON, however few they are:
# with prompts of 200 KB, parts of 1,000 rows took the peak RSS to 1.7 GB.
_PART_BYTES = 16 << 20
_SLOW_S = 1.0
# With nothing succeeded this long into a run, the display says why.
_FIRST_ANSWER_S = 10.0
_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run(config: RunConfig) -> RunStats:
    """Run a batch to completion (or a graceful stop) and return its stats.

    Blocking. From the main thread, SIGINT and SIGTERM stop the run gracefully
    (see ``arun``).

    Raises:
        ConfigError, InputError: Before any request is sent. Also when this
            thread runs an event loop already (a notebook): use ``arun``.
        FatalAPIError: The endpoint refused the key, model or URL; run aborted.
        OutputError: Results could not be written; run aborted.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise ConfigError(
            "batchrun.run() blocks, and this thread runs an event loop already"
            " (a notebook, or async code): use 'await batchrun.arun(config)'"
        )
    main = threading.current_thread() is threading.main_thread()
    return anyio.run(
        _arun_signals if main else arun,
        config,
        backend="asyncio",
        backend_options={"use_uvloop": _use_uvloop(config.event_loop)},
    )


def _use_uvloop(choice: str) -> bool:
    """Whether to run on uvloop: asked for, or ``auto`` and installed."""
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401  (only probing whether it is installed)
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "--event-loop uvloop needs uvloop: pip install 'batchrun[fast]'"
            ) from None
        return False
    return True


async def _arun_signals(config: RunConfig) -> RunStats:
    return await arun(config, handle_signals=True)


async def arun(
    config: RunConfig,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = anyio.sleep,
    handle_signals: bool = False,
) -> RunStats:
    """Run a batch inside a running event loop (e.g. a notebook).

    Args:
        config: What to run.
        clock: Monotonic seconds; with ``sleep``, injectable so that tests
            never wait out a real backoff.
        sleep: Awaitable sleep used for backoff and rate-limit waits.
        handle_signals: Stop gracefully on SIGINT/SIGTERM: take no new rows,
            let requests in flight finish for ``config.grace_s``, flush, and
            return with ``stopped_by`` set. A second signal stops at once
            (everything finished is already in the journal).

    Raises:
        The same as ``run``.
    """
    try:
        return await _Run(config, clock, sleep).execute(handle_signals)
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


class _CircuitBreaker:
    """Stops a run whose rows keep failing the same way.

    A wrong model name or parameter answers every row with the same 4xx; an
    endpoint that went away refuses every connection; a spent quota answers
    429 to every attempt. 50 rows in a row that end with the same error
    (after all their retries, for retryable ones; the first 50 of a run
    included) abort the run instead of burning through a million rows: the
    rows done are saved, and the failed ones are retried when it resumes.
    """

    THRESHOLD = 50

    def __init__(self) -> None:
        self._error: str | None = None
        self._count = 0

    def check(self, rows: list[Row]) -> None:
        for row in rows:
            error = row["error"]
            if error is None:
                self._error, self._count = None, 0
                continue
            if error == self._error:
                self._count += 1
            else:
                self._error, self._count = error, 1
            if self._count >= self.THRESHOLD:
                raise CircuitBreakerError(
                    f"aborting: {self._count} rows in a row failed with: {error}"
                )


class _Run:
    """The state of one run; ``execute`` drives it."""

    def __init__(self, config: RunConfig, clock: Clock, sleep: Sleep) -> None:
        config = config.with_mock_model()
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.out_dir = config.output.out_dir
        self.builder = RequestBuilder(config.request)
        # One builder per sweep cell; a plain run is a single cell.
        self.cells = cells(config.request, config.variants)
        self.cell_values = {v.name: dict(v.columns) for v in config.variants}
        self.stats = StatsCollector(clock, pricing=config.pricing)
        self.limiter = RateLimiter(config.limits, clock=clock, sleep=sleep)
        probe = config.endpoint.probes
        # Without a probe there are no server headers to wait for; with no
        # limit of the user's either, there is nothing to ramp towards, so the
        # pool opens at once (as it does after a probe that found no limit).
        ramp = probe or self.limiter.limited
        self.concurrency = ConcurrencyLimit(
            config.concurrency,
            initial=INITIAL_CONCURRENCY if ramp else config.concurrency,
            clock=clock,
            probe=probe,
        )
        self.circuit = _CircuitBreaker()
        self.caller: Caller | None = None
        self.progress: Progress | None = None
        self.started_iso = _now_iso()
        self.files: list[Path] = []
        self.scan: Scan | None = None
        self.sink: PartWriter | None = None
        self.journal: Journal | None = None
        self.index: CompletedIndex | None = None
        self.buffer: list[Row] = []
        self.handed_over = 0
        self.durable_stats: dict[str, Any] = self.stats.dump()
        self.parts_through = -1
        self.manifest: dict[str, Any] = {}
        self.resumed = False
        self.skipped = self.retried = self.new = 0
        self.stopped_by: str | None = None
        self.fatal: FatalAPIError | None = None
        self.last_failure: str | None = None  # of an attempt to be retried
        self.outer: anyio.abc.TaskGroup | None = None
        self.abandon = False
        self.reader_scope = anyio.CancelScope()
        self.workers_scope = anyio.CancelScope()

    # -- setting up ---------------------------------------------------------

    async def execute(self, handle_signals: bool) -> RunStats:
        cfg = self.config
        # The simulator in this process holds the other end of each connection.
        make_room_for(cfg.concurrency * (2 if cfg.endpoint.mock else 1))
        self.files = expand_inputs(cfg.inputs)
        with self._if_slow("checking every input row before the first request"):
            self.scan = scan = await self._scan()
        lock = await anyio.to_thread.run_sync(OutputLock.acquire, self.out_dir)
        try:
            return await self._execute_locked(scan, handle_signals)
        finally:
            lock.release()

    async def _execute_locked(self, scan: Scan, handle_signals: bool) -> RunStats:
        cfg = self.config
        with self._if_slow(f"reading what {self.out_dir} holds already"):
            await anyio.to_thread.run_sync(self._open_output, scan)
        status, error = "aborted", None
        try:
            async with AsyncExitStack() as stack:
                base_url = cfg.endpoint.base_url
                if cfg.endpoint.mock:
                    from .simulator import start_simulator

                    sim = await stack.enter_async_context(start_simulator())
                    base_url = sim.base_url
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
                    sleep=self.sleep,
                    retrier=Retrier(
                        cfg.retry,
                        clock=self.clock,
                        sleep=self.sleep,
                        on_retry=self._note_retry,
                    ),
                    raw_response=cfg.output.raw_response,
                )
                self.progress = make_progress(
                    cfg.progress, scan.total, clock=self.clock, note=self._note
                )
                await self._pipeline(handle_signals)
            status = "interrupted" if self.stopped_by else "finished"
        except BaseException as exc:
            interrupted = KeyboardInterrupt | anyio.get_cancelled_exc_class()
            status = "interrupted" if isinstance(exc, interrupted) else "aborted"
            error = str(_primary(exc) if isinstance(exc, BaseExceptionGroup) else exc)
            raise
        finally:
            if self.progress is not None:
                self.progress.close(self.stats)
            if self.journal is not None:
                self.journal.close()
            if not self.abandon:
                try:
                    await self._finish_in_thread(status, error)
                except OutputError:
                    if error is None:
                        raise
                    # The run's own error says what went wrong first; a full
                    # disk that stopped the journal also stops usage.parquet,
                    # and its error hid the journal's. The journal keeps the
                    # rows: a run of the same command writes both again.
        return RunStats.from_collector(
            self.stats,
            self.out_dir,
            skipped=self.skipped,
            retried=self.retried,
            new=self.new,
            stopped_by=self.stopped_by,
            repaired=scan.repaired,
            first_repaired=scan.first_repaired,
        )

    @contextmanager
    def _if_slow(self, doing: str) -> Iterator[None]:
        """Say what the run is ``doing`` if it takes over a second and no
        progress is shown yet: the scan of ten million rows takes about 10 s."""
        if self.config.progress == "off":
            yield
            return
        timer = asyncio.get_running_loop().call_later(_SLOW_S, say, f"{doing}...")
        try:
            yield
        finally:
            timer.cancel()

    async def _scan(self) -> Scan:
        """The validation pass, in a thread; a cancellation (Ctrl-C) stops it
        at its next batch instead of waiting for the whole input."""
        stop = threading.Event()
        try:
            return await anyio.to_thread.run_sync(
                scan_inputs,
                self.files,
                self.builder,
                [b for _, b in self.cells],
                stop,
                self.config.limit,
                abandon_on_cancel=True,
            )
        except anyio.get_cancelled_exc_class():
            stop.set()
            raise

    def _open_output(self, scan: Scan) -> None:
        """Start afresh or resume; roll any leftover journal into parts. Blocking."""
        cfg = self.config
        out = self.out_dir
        fingerprint = request_fingerprint(cfg)
        inputs = input_fingerprint(self.files)
        previous = None
        if cfg.output.overwrite:
            clear_output(out)
        else:
            previous = load_manifest(out)
            if previous is None and has_output(out):
                raise InputError(
                    f"{out} holds results but no manifest.json; pass --overwrite"
                )
        if previous is not None:
            check_compatible(
                previous, fingerprint, inputs, positional=scan.positional, out_dir=out
            )
        results_dir = open_output(out)
        self.sink = PartWriter(
            results_dir, kept=scan.kept, cell_columns=_cell_types(cfg.variants)
        )
        self.manifest = {
            "batchrun_version": __version__,
            "status": "running",
            "error": None,
            "pid": os.getpid(),
            "inputs": [str(p) for p in cfg.inputs],
            "request": cfg.request.shaping(),
            "keep_columns": list(cfg.request.keep_columns),
            "variants": [variant.name for variant in cfg.variants],
            "fingerprint": fingerprint,
            "input_files": inputs,
            "endpoint": "mock" if cfg.endpoint.mock else cfg.endpoint.shown_url,
            "raw_response": cfg.output.raw_response,
            "concurrency": cfg.concurrency,
            "first_started_at": self.started_iso,
            "started_at": self.started_iso,
            "finished_at": None,
            "runs": 1,
            "resumed": False,
            "parts_through": -1,
        }
        if previous is not None:
            self.resumed = True
            self.stats.restore(previous.get("stats", {}))
            self.durable_stats = self.stats.dump()
            self.parts_through = int(previous.get("parts_through", -1))
            self.manifest["first_started_at"] = previous.get(
                "first_started_at", self.started_iso
            )
            self.manifest["runs"] = int(previous.get("runs", 1)) + 1
            self.manifest["resumed"] = True
        next_part = self._recover_journal()
        if self.resumed:
            self.index = CompletedIndex(results_dir)
        self.journal = Journal(out / JOURNAL_DIR, next_part, fsync=cfg.output.fsync)
        self._write_manifest("running")

    def _recover_journal(self) -> int:
        """Roll journal segments not yet in parts into parts; the next number."""
        sink = self.sink
        assert sink is not None
        journal_dir = self.out_dir / JOURNAL_DIR
        for number, path in segments(journal_dir):
            if number > self.parts_through:
                rows = list(read_segment(path))
                if rows:
                    sink.write(number, rows)
                    self.stats.record_earlier(rows)
                    self.parts_through = number
                    self.durable_stats = self.stats.dump()
                    self._write_manifest("running")
            path.unlink()
        last = max((n for n, _ in list_parts(sink.results_dir)), default=-1)
        self.parts_through = max(self.parts_through, last)
        return self.parts_through + 1

    async def _finish_in_thread(self, status: str, error: str | None) -> None:
        """``_finish``, shielded from the run's own cancellation.

        A Ctrl-C once the run's signal handling has ended (asyncio's own
        handler cancels the main task, which a shield does not hold) stops
        compaction at its next batch: the thread is not waited for, and
        without this it went on for up to a minute at ten million rows.
        """
        stop = threading.Event()
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._finish, status, error, stop)
            except anyio.get_cancelled_exc_class():
                stop.set()
                raise

    def _finish(
        self, status: str, error: str | None, stop: threading.Event | None = None
    ) -> None:
        """Compact a complete run, then write usage and the manifest. Blocking.

        A compaction stopped by ``stop`` leaves the parts as they were and the
        run ``interrupted``: running it again finds every row done, and
        compacts.
        """
        sink = self.sink
        if sink is None:
            return  # failed before the output was opened
        if status == "finished":
            try:
                compact(
                    sink.results_dir,
                    sink.schema,
                    dedupe=self.resumed,
                    announce=self._announce_compaction,
                    stop=stop,
                )
            except CompactionStopped:
                status = "interrupted"
            last = max((n for n, _ in list_parts(sink.results_dir)), default=-1)
            self.parts_through = max(self.parts_through, last)
        write_usage(self.out_dir / USAGE_FILE, self.stats.usage_rows())
        self._write_manifest(status, error)

    def _announce_compaction(self, parts: int) -> None:
        if self.progress is not None:
            self.progress.message(
                f"all rows done; compacting {parts} part files into a few large ones"
            )

    def _write_manifest(self, status: str, error: str | None = None) -> None:
        t = self.stats.total
        scan = self.scan
        self.manifest.update(
            status=status,
            error=error,
            finished_at=None if status == "running" else _now_iso(),
            parts_through=self.parts_through,
            # The counts of rows in part files only: on resume, rows still in
            # the journal are rolled into parts and counted then.
            stats=self.durable_stats,
            counts={
                "input_rows": None if scan is None else scan.total,
                "skipped": self.skipped,
                "retried": self.retried,
                "new": self.new,
                "rows": t.requests,
                "succeeded": t.succeeded,
                "failed": t.failed,
                "attempts": t.attempts,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "total_tokens": t.total_tokens,
            },
        )
        write_json(self.out_dir / MANIFEST_FILE, self.manifest)

    # -- the pipeline -------------------------------------------------------

    async def _pipeline(self, handle_signals: bool) -> None:
        n = self.config.concurrency
        records_in, records_out = anyio.create_memory_object_stream[PromptRecord](2 * n)
        results_in, results_out = anyio.create_memory_object_stream[Result](2 * n)
        async with anyio.create_task_group() as outer:
            self.outer = outer
            if self.config.progress != "off":
                outer.start_soon(self._show_progress)
            if handle_signals:
                outer.start_soon(self._watch_signals, outer)
            async with anyio.create_task_group() as tg:
                async with records_in, records_out, results_in:
                    # The workers start once the first rows are ready. Started
                    # together, each of them found the stream empty, let its
                    # slot go and waited for a row without one: twice
                    # --concurrency rows were taken at once, and the reader
                    # built its second batch, holding the GIL, while the first
                    # requests were still connecting.
                    await tg.start(self._read, records_in.clone(), results_in.clone())
                    tg.start_soon(
                        self._work_all, records_out.clone(), results_in.clone()
                    )
                tg.start_soon(self._write, results_out)
            outer.cancel_scope.cancel()
        if self.fatal is not None:
            raise self.fatal

    async def _work_all(
        self,
        records: MemoryObjectReceiveStream[PromptRecord],
        results: MemoryObjectSendStream[Result],
    ) -> None:
        """The workers, in a scope that a graceful stop cancels after the grace."""
        with self.workers_scope:
            async with records, results, anyio.create_task_group() as tg:
                # Twice as many workers as slots: a row waiting out its backoff
                # holds a worker but no slot, so new rows keep the slots busy
                # and retries interleave with new work (ahead of it: see
                # Slot.hold).
                for _ in range(2 * self.config.concurrency):
                    tg.start_soon(self._work, records.clone(), results.clone())

    async def _watch_signals(self, outer: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stopped_by is not None:
                    # A second signal: stop now. Every finished result is
                    # already in the journal; the next run rolls it into parts.
                    self.abandon = True
                    outer.cancel_scope.cancel()
                    return
                self._stop(_SIGNAL_NAMES.get(signum, str(signum)), outer)

    def _stop(self, reason: str, outer: anyio.abc.TaskGroup) -> None:
        """Take no new rows; let the requests in flight finish within the grace."""
        if self.stopped_by is not None:
            return
        self.stopped_by = reason
        self.reader_scope.cancel()
        if self.caller is not None:
            self.caller.abandon_waits()
        outer.start_soon(self._end_grace)

    def _abort(self, error: FatalAPIError) -> None:
        """Stop for ``error`` as for a signal, then raise it once the pipeline
        has drained: answers that arrive meanwhile are paid for, and are
        journaled. Raised at once, the error cancelled the writer, and the
        results waiting for it were lost (4 of 60 in a test)."""
        if self.fatal is not None:
            return
        self.fatal = error
        assert self.outer is not None
        self._stop("aborting", self.outer)
        self.outer.start_soon(self._tell_why_still_going)

    async def _tell_why_still_going(self) -> None:
        """A second into an abort with requests still in flight, say what it
        waits for (the error itself is told when the run ends)."""
        await self.sleep(_SLOW_S)  # injected: tests need not wait it out
        if self.concurrency.in_flight and self.progress is not None:
            self.progress.message(
                f"aborting ({self.fatal}); keeping the answers of the requests"
                f" in flight (waiting up to {self.config.grace_s:g} s, --grace)"
            )

    async def _end_grace(self) -> None:
        await anyio.sleep(self.config.grace_s)
        self.workers_scope.cancel()

    async def _show_progress(self) -> None:
        progress = self.progress
        assert progress is not None
        first_answer_due: float | None = self.clock() + _FIRST_ANSWER_S
        while True:
            await anyio.sleep(_PROGRESS_TICK_S)
            progress.refresh(self.stats)
            if first_answer_due is not None and self.clock() >= first_answer_due:
                first_answer_due = None
                self._tell_if_unanswered(progress)

    def _note_retry(self, error: BaseException, wait: float) -> None:
        self.last_failure = f"{type(error).__name__}: {error}"

    def _tell_if_unanswered(self, progress: Progress) -> None:
        """Say why, if nothing has succeeded yet: a server that takes
        connections and never answers (a wrong port behind a proxy, a model
        still loading) showed only "in flight 8/8", and one that refuses every
        connection only a growing count of retries."""
        caller = self.caller
        if caller is None or self.stats.session.succeeded:
            return
        errors, _ = self.stats.errors.top(1)
        failure = self.last_failure or (errors[0][0] if errors else None)
        if failure is not None:
            progress.message(
                f"nothing has succeeded in {_FIRST_ANSWER_S:g} s; the latest"
                f" failure: {failure}"
            )
            return
        waiting = self.concurrency.in_flight
        if not waiting:
            return
        limit = self.config.endpoint.timeout_s
        out = "1 request" if waiting == 1 else f"{waiting} requests"
        progress.message(
            f"no answer yet from {caller.client.base_url} after"
            f" {_FIRST_ANSWER_S:g} s ({out} out); a request gives up after"
            f" {limit:g} s (--timeout)"
        )

    def _note(self) -> str:
        """The pool's state for the progress display."""
        caller = self.caller
        return live_note(
            in_flight=self.concurrency.in_flight,
            limit=self.concurrency.limit,
            retries=0 if caller is None else caller.retries,
            rate_limited=self.limiter.rate_limited,
            backing_off=0 if caller is None else caller.backing_off,
            waiting_s=self.limiter.waiting(),
            learned_rpm=self.limiter.learned_rpm,
            stopping=self.stopped_by,
            oldest_s=0.0 if caller is None else caller.client.oldest_in_flight_s(),
            timeout_s=self.config.endpoint.timeout_s,
        )

    def _next_batch(
        self, batches: Iterator[RowBatch], position: int
    ) -> tuple[list[PromptRecord | Result], int] | None:
        """Build the records of the next input batch, minus done ones. In a thread."""
        batch = next(batches, None)
        if batch is None:
            return None
        builder = self.builder
        index = self.index
        skip_failed = self.config.output.skip_failed
        out: list[PromptRecord | Result] = []
        for offset, row in enumerate(batch.rows):
            row_id = builder.row_id(row, position)
            # One request per sweep cell, row by row: a partial sweep stays
            # balanced across the cells.
            for variant, cell in self.cells:
                name = None if variant is None else variant.name
                try:
                    record = cell.build(row, row_id)
                except InputError as exc:
                    # The scan passed, so this failed while rendering: a failed row.
                    message = str(locate(exc, batch, offset))
                    out.append(self._input_failure(row_id, position, message, name))
                    continue
                record.variant = name
                record.row = position
                if self._skip(index, record, skip_failed):
                    continue
                out.append(record)
            position += 1
        return out, position

    def _skip(
        self, index: CompletedIndex | None, record: PromptRecord, skip_failed: bool
    ) -> bool:
        """Whether ``record`` is already done (and count it either way)."""
        if index is not None:
            prior = index.lookup(record.id, record.variant)
            if prior is not None:
                same = prior.request_hash == record.request_hash
                if same and (prior.ok or skip_failed):
                    self.skipped += 1
                    return True
                self.retried += 1
                return False
        self.new += 1
        return False

    def _input_failure(
        self, row_id: str, position: int, message: str, variant: str | None
    ) -> Result:
        request = self.config.request
        body = {} if request.model is None else {"model": request.model}
        record = PromptRecord(row_id, request.endpoint or "completions", body, "")
        record.variant = variant
        record.row = position
        return failed_result(record, f"InputError: {message}")

    async def _read(
        self,
        records: MemoryObjectSendStream[PromptRecord],
        results: MemoryObjectSendStream[Result],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Build the records batch by batch, in a thread, and queue them.

        Reports itself started once the first batch is built (or the reader
        stops or fails first), so that the workers find rows to take.
        """
        with self.reader_scope:
            async with records, results:
                # Every cell's columns: a sweep's templates name their own.
                # Reading the base request's only, every row of a templated
                # sweep over Parquet failed as "'review' is undefined".
                columns = columns_of([self.builder, *(b for _, b in self.cells)])
                batches = iter_batches(
                    self.files, columns=columns, limit=self.config.limit
                )
                built = None
                try:
                    built = await anyio.to_thread.run_sync(self._next_batch, batches, 0)
                finally:
                    task_status.started()
                while built is not None:
                    items, position = built
                    self.stats.skipped = self.skipped
                    for item in items:
                        if isinstance(item, Result):
                            await _put(results, item)
                        else:
                            await _put(records, item)
                    built = await anyio.to_thread.run_sync(
                        self._next_batch, batches, position
                    )

    async def _work(
        self,
        records: MemoryObjectReceiveStream[PromptRecord],
        results: MemoryObjectSendStream[Result],
    ) -> None:
        caller = self.caller
        assert caller is not None
        slot = Slot(self.concurrency)
        try:
            async with records, results:
                while True:
                    # A slot first, then a row: a row taken without one could
                    # wait unsent for as long as other workers keep theirs.
                    await slot.hold(new_row=True)
                    try:
                        record = records.receive_nowait()
                    except anyio.WouldBlock:
                        # Nothing queued: let the slot go while waiting, so a
                        # row coming out of its backoff is not held up. The
                        # row that comes then waits for a slot, ahead of any
                        # new row.
                        slot.release()
                        try:
                            record = await records.receive()
                        except anyio.EndOfStream:
                            return
                        await slot.hold()
                    except anyio.EndOfStream:
                        return
                    if self.stopped_by is not None:
                        continue  # stopping: rows not yet started wait for the resume
                    try:
                        result = await caller.call(record, slot)
                    except RowAbandoned:
                        continue  # stopping: the resumed run sends it again
                    except FatalAPIError as exc:
                        slot.release()  # this request is over; others may not be
                        self._abort(exc)  # the row has no result: sent again
                        continue
                    await _put(results, result)
        finally:
            slot.release()

    # -- writing ------------------------------------------------------------

    async def _write(self, results: MemoryObjectReceiveStream[Result]) -> None:
        """Journal every result as it arrives; hand full buffers to the roller.

        Part files are written by ``_roll_parts`` while journaling goes on, so
        a slow part write never delays making a result durable.
        """
        sink, journal = self.sink, self.journal
        assert sink is not None
        assert journal is not None
        interval = self.config.output.flush_interval_s
        limit = self.config.output.flush_rows
        raw = self.config.output.raw_response
        kept_names = sink.kept_names
        cells = self.cell_values
        deadline = anyio.current_time() + interval
        rolls_in, rolls_out = anyio.create_memory_object_stream[_Roll](1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._roll_parts, rolls_out)
            async with rolls_in, results:
                while True:
                    try:
                        first = await _receive(
                            results, deadline if self.buffer else None
                        )
                    except anyio.EndOfStream:
                        break
                    if first is None:  # the flush interval passed with rows pending
                        await self._hand_over(rolls_in)
                        deadline = anyio.current_time() + interval
                        continue
                    # Let a few more results arrive before writing: one
                    # journal write and one wake-up per batch instead of per
                    # row. A result waits at most _GATHER_S before it is on disk.
                    await anyio.sleep(_GATHER_S)
                    batch = [first]
                    while True:
                        try:
                            batch.append(results.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    rows = [
                        result_row(r, raw=raw, kept_names=kept_names, cells=cells)
                        for r in batch
                    ]
                    # On disk (to the OS) before anything counts it as done.
                    journal.append(rows)
                    self.buffer.extend(rows)
                    self.stats.record(rows)
                    try:
                        self.circuit.check(rows)
                    except CircuitBreakerError as exc:
                        self._abort(exc)
                    if (
                        len(self.buffer) >= limit
                        or journal.size >= _PART_BYTES
                        or anyio.current_time() >= deadline
                    ):
                        await self._hand_over(rolls_in)
                        deadline = anyio.current_time() + interval
                await self._hand_over(rolls_in, final=True)

    async def _hand_over(
        self, rolls: MemoryObjectSendStream[_Roll], *, final: bool = False
    ) -> None:
        """Close the current journal segment and queue its rows for a part."""
        journal = self.journal
        assert journal is not None
        empty_output = final and self.handed_over == 0 and self.parts_through < 0
        if not self.buffer and not empty_output:
            return
        rows, self.buffer = self.buffer, []
        number = journal.number
        journal.rotate(number + 1)
        self.handed_over += 1
        await rolls.send((number, rows, self.stats.dump()))

    async def _roll_parts(self, rolls: MemoryObjectReceiveStream[_Roll]) -> None:
        async with rolls:
            async for number, rows, snapshot in rolls:
                await anyio.to_thread.run_sync(self._roll, number, rows, snapshot)

    def _roll(self, number: int, rows: list[Row], snapshot: dict[str, Any]) -> None:
        """Part file, then manifest, then drop the segment. In a thread.

        The order makes every crash recoverable: a segment whose part exists is
        either rewritten identically or, once the manifest counts it, deleted.
        """
        sink, journal = self.sink, self.journal
        assert sink is not None
        assert journal is not None
        sink.write(number, rows)
        release_free_memory()
        self.parts_through = number
        self.durable_stats = snapshot
        self._write_manifest("running")
        journal.discard(number)


_Roll = tuple[int, list[Row], dict[str, Any]]


def _cell_types(variants: tuple[Variant, ...]) -> dict[str, Any]:
    """The Arrow type of each sweep cell column, from the variants' values."""
    names: dict[str, set[type]] = {}
    for variant in variants:
        for name, value in variant.columns.items():
            names.setdefault(name, set()).add(type(value))
    return {name: infer_type(kinds) for name, kinds in names.items()}


# anyio's send() and receive() yield to the event loop once even when they need
# not wait; on the per-row path that costs a loop cycle per row (about 7 % of
# the client's CPU at 3,000 rows/s). These try the non-blocking call first and
# wait only when they must; every worker yields on its HTTP call anyway.


async def _put(stream: MemoryObjectSendStream[T], item: T) -> None:
    """Send ``item``, waiting only if the buffer is full."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


async def _take(stream: MemoryObjectReceiveStream[T]) -> T:
    """Receive an item, waiting only if none is buffered."""
    try:
        return stream.receive_nowait()
    except anyio.WouldBlock:
        return await stream.receive()


async def _receive(
    results: MemoryObjectReceiveStream[Result], deadline: float | None
) -> Result | None:
    """The next result, or ``None`` if ``deadline`` (event-loop time) passes first."""
    if deadline is None:
        return await _take(results)
    with anyio.move_on_after(deadline - anyio.current_time()):
        return await _take(results)
    return None
