"""Shared fixtures: a real simulator on an ephemeral port, and input writers.

Every test talks to ``batchrun.simulator`` over a socket; nothing in aiohttp or
the runner is mocked. ``sim_factory`` runs the simulator in its own thread and
event loop, so that synchronous CLI tests (``main([...])``) can use it too;
``local_sim`` runs it in the async test's own loop, for tests whose client and
simulator share a ``VirtualTime``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from batchrun.simulator import (
    SimulatorConfig,
    SimulatorHandle,
    serve_in_thread,
    start_simulator,
)

from .helpers import (
    LocalSimFactory,
    Rows,
    SimFactory,
    SimProcess,
    WriteInput,
    write_jsonl,
    write_parquet,
)


@pytest.fixture
def sim_factory() -> Iterator[SimFactory]:
    """Start simulators with a given config; all are stopped after the test."""
    stack: list[Any] = []

    def start(
        clock: Callable[[], float] | None = None, **options: Any
    ) -> SimulatorHandle:
        manager = serve_in_thread(
            SimulatorConfig(**options), clock=clock or time.monotonic
        )
        handle = manager.__enter__()
        stack.append(manager)
        return handle

    yield start
    for manager in reversed(stack):
        manager.__exit__(None, None, None)


@pytest.fixture
async def local_sim() -> AsyncIterator[LocalSimFactory]:
    """Start simulators in the test's own event loop (async tests only).

    Client and simulator then take turns in one loop, so a ``VirtualTime``
    they share moves only after requests already sent have reached the
    simulator; one in its own thread reads them whenever that thread runs.
    """
    async with AsyncExitStack() as stack:

        async def start(
            clock: Callable[[], float] | None = None, **options: Any
        ) -> SimulatorHandle:
            config = SimulatorConfig(**options)
            return await stack.enter_async_context(
                start_simulator(config, clock=clock or time.monotonic)
            )

        yield start


@pytest.fixture
def sim(sim_factory: SimFactory) -> SimulatorHandle:
    """A simulator with default settings."""
    return sim_factory()


@pytest.fixture(params=["jsonl", "parquet"])
def write_input(request: pytest.FixtureRequest, tmp_path: Path) -> WriteInput:
    """Write rows in each input format in turn (the test runs once per format)."""
    fmt: str = request.param

    def write(rows: Rows, name: str = "input") -> Path:
        if fmt == "jsonl":
            return write_jsonl(tmp_path / f"{name}.jsonl", rows)
        return write_parquet(tmp_path / f"{name}.parquet", rows)

    return write


@pytest.fixture
def sim_process() -> Iterator[Callable[..., SimProcess]]:
    """Start simulators in their own processes; all are stopped after the test."""
    started: list[SimProcess] = []

    def start(*flags: str) -> SimProcess:
        started.append(SimProcess(*flags))
        return started[-1]

    yield start
    for process in started:
        process.close()
