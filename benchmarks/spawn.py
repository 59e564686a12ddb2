"""Run one command; write its wall time, CPU time and peak RSS as JSON.

    python benchmarks/spawn.py REPORT.json COMMAND [ARG ...]

Linux keeps a process's peak RSS (``ru_maxrss``) across ``exec``, and a child
begins as a copy of its parent. A client started straight from ``run.py``, which
has pyarrow loaded and has written the inputs, would therefore report at least
``run.py``'s own peak. Started from this small process, the figure is the
client's. The command's stdout and stderr are this process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> None:
    report, argv = sys.argv[1], sys.argv[2:]
    popen_at = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(report, "w") as handle:
        json.dump(
            {
                "returncode": proc.returncode,
                "popen_at": popen_at,
                "wall_s": wall,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "rss_mb": usage.ru_maxrss / 1024,
            },
            handle,
        )


if __name__ == "__main__":
    main()
