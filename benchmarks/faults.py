"""Fault acceptance: every row ends ok, exactly once, under injected faults.

Starts ``batchrun serve-mock`` with 10 % 500/503, 5 % dropped connections,
2 % truncated bodies and 1 % answers slower than the client's timeout, runs
the CLI over ``--rows`` rows, then checks the results against the simulator's
own per-prompt request counts.

    python benchmarks/faults.py --rows 5000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import free_port, pinned, start_server

FAULTS = [
    "--fail-rate", "0.10", "--drop-rate", "0.05", "--malformed-rate", "0.02",
    "--slow-rate", "0.01", "--slow-ms", "3000", "--seed", "1",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchrun-faults-"))
    inp = work / "in.jsonl"
    with inp.open("w") as handle:
        for i in range(args.rows):
            handle.write(
                json.dumps({"id": f"r{i}", "prompt": f"Fault test {i}:"}) + "\n"
            )
    port = free_port()
    server = start_server(port, 0.0, FAULTS)
    try:
        argv = [sys.executable, "-m", "batchrun", "run", str(inp),
                "-o", str(work / "out"), "--model", "m",
                "--base-url", f"http://127.0.0.1:{port}/v1",
                "--max-tokens", "16", "--quiet", "--concurrency", "64",
                "--timeout", "1", "--max-attempts", "15"]  # fmt: skip
        code = subprocess.run(pinned(0, argv), check=False).returncode
        url = f"http://127.0.0.1:{port}/stats?prompts=1"
        with urllib.request.urlopen(url, timeout=10) as response:
            seen = json.load(response)
    finally:
        server.terminate()
        server.wait()
    rows = ds.dataset(work / "out" / "results").to_table().to_pylist()
    shutil.rmtree(work, ignore_errors=True)
    ids = Counter(r["id"] for r in rows)
    attempts = {r["prompt"]: r["attempts"] for r in rows}
    over = [p for p, n in seen["prompt_counts"].items() if n > attempts.get(p, 0)]
    print(f"exit code {code}; {len(rows)} result rows for {args.rows} inputs")
    print(f"status: {dict(Counter(r['status'] for r in rows))}")
    print(f"ids seen more than once: {sum(1 for n in ids.values() if n > 1)}")
    print(f"server: {seen['requests']} requests, faults {seen['faults']}")
    print(f"client attempts: {sum(attempts.values())}")
    print(f"prompts requested more often than their attempts explain: {len(over)}")


if __name__ == "__main__":
    main()
