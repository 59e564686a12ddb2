"""glibc's malloc controls (``batchrun._libc``), in processes of their own."""

from __future__ import annotations

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
