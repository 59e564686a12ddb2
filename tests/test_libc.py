"""glibc's malloc controls (``batchrun._libc``), in processes of their own."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="these are glibc's malloc controls",
)

_FRAGMENT_AND_TRIM = """
import sys
from batchrun._libc import release_free_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

blocks = [bytes(2000) for _ in range(50_000)]  # malloc'd: above pymalloc's size
kept = blocks[::8]  # live blocks between the freed ones keep the heap from shrinking
del blocks
before = rss_mb()
if sys.argv[1] == "trim":
    release_free_memory()
print(before - rss_mb())
"""


def _released_mb(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _FRAGMENT_AND_TRIM, mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_release_free_memory_returns_freed_pages_between_live_blocks() -> None:
    """About 85 MB freed between live blocks stays resident until released."""
    assert _released_mb("keep") < 5
    assert _released_mb("trim") > 40


_FREE_A_LITTLE = """
from batchrun._libc import TRIM_FREE_BYTES, free_heap_bytes, release_free_memory

start = free_heap_bytes()
blocks = [bytes(2000) for _ in range(2_000)]  # 4 MB, malloc'd
kept = blocks[::8]
del blocks
freed = free_heap_bytes() - start
print(freed > 3_000_000, free_heap_bytes() < TRIM_FREE_BYTES)
print(release_free_memory(), release_free_memory(min_free=0))
"""


def test_release_free_memory_leaves_a_few_free_megabytes_alone() -> None:
    """Giving back a few MB is not worth faulting them in again: below the
    threshold nothing is trimmed, and free_heap_bytes sees what was freed."""
    done = subprocess.run(
        [sys.executable, "-c", _FREE_A_LITTLE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False", "True"]


_COUNT_ARENAS = """
import ctypes, sys, tempfile, threading
if sys.argv[1] == "command":
    from batchrun.__main__ import main
    sys.argv = ["batchrun", "status", tempfile.mkdtemp() + "/missing"]
    main()
else:
    import batchrun
    batchrun.run
gate = threading.Barrier(7)
def allocate():
    kept = [bytes(2000) for _ in range(50)]  # above pymalloc's size: malloc
    gate.wait()
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
gate.wait()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as out:
    stream = ctypes.c_void_p(libc.fopen(out.name.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(out.name).read().count("<heap nr="))
"""


def test_the_command_keeps_at_most_two_malloc_arenas() -> None:
    """Threads of the batchrun command share two malloc arenas; a program
    that imports batchrun, or sets MALLOC_ARENA_MAX itself, is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def arenas(mode: str, extra: dict[str, str] | None = None) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _COUNT_ARENAS, mode],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **(extra or {})},
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert arenas("command") == 2
    assert arenas("library") >= 6
    assert arenas("command", {"MALLOC_ARENA_MAX": "4"}) == 4
