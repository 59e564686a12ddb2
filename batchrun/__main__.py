"""``python -m batchrun`` and the ``batchrun`` command."""

from __future__ import annotations

import gc
import os
import sys

from ._libc import limit_arenas

_FILES_AT_START = 1024


def main() -> int:
    """Run the command line in a process of its own; returns the exit code."""
    # Off while modules load; cli._settle turns it back on once they are.
    gc.disable()
    # pyarrow imports NumPy whenever it is installed, and nothing the command
    # line does needs it: hiding it saves about 0.15 s of CPU at every start,
    # a third of batchrun's start-up (pyarrow works without NumPy from 18 on).
    # Only the command's own process does this; ``import batchrun`` in a
    # program of yours leaves NumPy alone.
    if "numpy" not in sys.modules:
        sys.modules["numpy"] = None  # type: ignore[assignment]
    # Every row allocates a few short-lived dicts and lists, so with the
    # default threshold (700) the cyclic collector ran every 75 rows or so:
    # 0.16-0.26 s of CPU on 20,000 rows (measured with gc.callbacks), against
    # 0.02 s at 10,000. Reference counting frees nearly all of it anyway.
    gc.set_threshold(10_000)
    # Arrow's bundled allocator (mimalloc or jemalloc) keeps memory it has
    # freed: a 1,000,000-row run peaked at 188 MB with it and at 146 MB with
    # the system allocator, which also used less CPU (166 s against 189 s).
    # An ARROW_DEFAULT_MEMORY_POOL of your own still wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    # glibc gives each new thread a malloc arena of its own, up to eight per
    # core, and memory freed in one is not reused by the others: the reader,
    # the part writer and the scan each run in threads. Peak RSS of a
    # 100,000-row run of 500-character prompts was 139-143 MB with the default
    # and 121-123 MB with two arenas (three runs each). A MALLOC_ARENA_MAX of
    # your own still wins.
    if "MALLOC_ARENA_MAX" not in os.environ:
        limit_arenas(2)
    # Room in the table of open files for the usual ``ulimit -n``, while this
    # is the only thread: growing it later, mid-wave, stalls the event loop
    # (see grow_descriptor_table). The table costs 8 bytes an entry.
    from .client import grow_descriptor_table

    grow_descriptor_table(_FILES_AT_START)
    from .cli import main as cli_main

    return cli_main(own_process=True)


if __name__ == "__main__":
    raise SystemExit(main())
