"""Rate-limit acceptance: how close to the server's limit, and how many 429s.

Each scenario starts ``batchrun serve-mock`` with a server-side limit in its own
process, runs the ``batchrun run`` CLI against it for about ``--minutes``, then
reports the achieved rate after ramp-up (from the results' timestamps) as a
fraction of the server's limit, and the share of requests answered 429 (from
the simulator's own ``/stats``).

    python benchmarks/ratelimits.py --minutes 3
    python benchmarks/ratelimits.py --minutes 1 --only rpm-given
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import free_port, pinned, start_server

RAMP_S = 15.0
MAX_TOKENS = 16

# name: (server flags, client flags, budget name, limit per minute)
SCENARIOS: dict[str, tuple[list[str], list[str], str, int]] = {
    "rpm-adaptive": (["--rpm", "600"], [], "requests", 600),
    "rpm-given": (["--rpm", "600"], ["--rpm", "600"], "requests", 600),
    # A server that states no limit: only its 429s and Retry-After tell.
    "rpm-unstated": (["--rpm", "600", "--header-style", "none"], [], "requests", 600),
    "completion-tpm-given": (
        ["--completion-tpm", "6000"],
        ["--completion-tpm", "6000"],
        "completion tokens",
        6000,
    ),
}


def stats(port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{port}/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        data: dict[str, int] = json.load(response)
        return data


def run_scenario(name: str, minutes: float, work: Path) -> str:
    server_flags, client_flags, budget, limit = SCENARIOS[name]
    per_row = 1 if budget == "requests" else MAX_TOKENS * 0.75
    rows = int(limit * minutes / per_row * 1.05)
    inp = work / f"{name}.jsonl"
    with inp.open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": str(i), "prompt": f"Question {i}:"}) + "\n")
    port = free_port()
    server = start_server(port, 0.0, server_flags)
    out = work / name
    try:
        argv = [
            sys.executable,
            "-m",
            "batchrun",
            "run",
            str(inp),
            "-o",
            str(out),
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--model",
            "m",
            "--max-tokens",
            str(MAX_TOKENS),
            "--quiet",
            "--concurrency",
            "64",
            "--max-attempts",
            "20",
            # The simulator stands in for a remote provider, whose first
            # request batchrun sends alone; on this machine it would not.
            "--probe",
            *client_flags,
        ]
        subprocess.run(pinned(0, argv), check=False, timeout=minutes * 60 * 3 + 60)
        seen = stats(port)
    finally:
        server.terminate()
        server.wait()
    table = ds.dataset(out / "results").to_table().to_pylist()
    ok = [r for r in table if r["status"] == "ok"]
    start = min(r["started_at"] for r in table).timestamp()
    end = max(r["finished_at"] for r in ok).timestamp()
    window = [r for r in ok if r["finished_at"].timestamp() >= start + RAMP_S]
    span_min = (end - (start + RAMP_S)) / 60
    used = (
        len(window)
        if budget == "requests"
        else sum(r["completion_tokens"] for r in window)
    )
    achieved = used / span_min
    share_429 = seen["rate_limited"] / max(seen["requests"], 1)
    return (
        f"{name:<22} {len(table):>6} rows  {len(ok):>6} ok  "
        f"{achieved:>8.0f} {budget}/min = {achieved / limit:6.1%} of {limit}  "
        f"429s {seen['rate_limited']:>4} of {seen['requests']:>6} requests"
        f" = {share_429:.2%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--only", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchrun-limits-"))
    try:
        for name in [args.only] if args.only else list(SCENARIOS):
            print(run_scenario(name, args.minutes, work), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
