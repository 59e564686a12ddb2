"""Throughput of batchrun against a bare aiohttp loop, side by side.

Starts ``batchrun serve-mock --fast`` in its own process (pinned to one core where
``taskset`` exists), writes a JSONL input, then runs the clients in turns
(A B A B ...) pinned to the other core, and prints the median requests/s and
client CPU per 1,000 requests of each, plus their ratio.

    python benchmarks/throughput.py --rows 20000 --concurrency 64 --rounds 3
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def compile_batchrun() -> None:
    """Byte-compile batchrun the way ``pip install`` does.

    An editable install (or ``PYTHONDONTWRITEBYTECODE``) leaves no ``.pyc``
    files, and every run would then compile the package first: about 55 ms of
    CPU here that an installed batchrun never spends.
    """
    spec = importlib.util.find_spec("batchrun")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("batchrun is not installed: pip install -e .")
    for location in spec.submodule_search_locations:
        compileall.compile_dir(location, quiet=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(core: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core), *argv]
    return argv


def start_server(
    port: int, latency_ms: float, extra: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the simulator pinned to core 1 and wait until it answers."""
    argv = [
        sys.executable,
        "-m",
        "batchrun",
        "serve-mock",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
        *(extra or []),
    ]
    proc = subprocess.Popen(pinned(1, argv), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/v1/models", timeout=1
            ):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the simulator did not start")


def measure(argv: list[str]) -> dict[str, float]:
    """Run a client; return wall seconds, CPU seconds and peak RSS (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        pinned(0, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(
            f"{argv[:4]} failed ({proc.returncode}): {err.decode()[-500:]}"
        )
    _ = out
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--uvloop", action="store_true", help="also on uvloop")
    parser.add_argument(
        "--full-server",
        action="store_true",
        help="serve from the aiohttp.web simulator instead of serve-mock --fast",
    )
    args = parser.parse_args()
    compile_batchrun()
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    work = Path(tempfile.mkdtemp(prefix="batchrun-bench-"))
    inp = work / "in.jsonl"
    with inp.open("w") as handle:
        for i in range(args.rows):
            handle.write(
                json.dumps({"id": f"r{i}", "prompt": f"Benchmark prompt {i}:"}) + "\n"
            )
    bare = [sys.executable, str(HERE / "bare_aiohttp.py"), str(inp), "--base-url", base,
            "--concurrency", str(args.concurrency)]  # fmt: skip

    def batchrun(loop: str) -> Callable[[int], list[str]]:
        return lambda n: [
            sys.executable, "-m", "batchrun", "run", str(inp),
            "-o", str(work / f"out{n}"), "--base-url", base, "--model", "mock-model",
            "--max-tokens", "16", "--quiet", "--concurrency", str(args.concurrency),
            "--event-loop", loop,
        ]  # fmt: skip

    clients: dict[str, Callable[[int], list[str]]] = {
        "bare aiohttp": lambda n: bare,
        "batchrun": batchrun("asyncio"),
    }
    if args.uvloop:
        clients["bare+uvloop"] = lambda n: [*bare, "--uvloop"]
        clients["batchrun+uvloop"] = batchrun("uvloop")
    server = start_server(port, args.latency_ms, [] if args.full_server else ["--fast"])
    results: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    try:
        for n in range(args.rounds):
            for name, argv in clients.items():
                results[name].append(measure(argv(n)))
                shutil.rmtree(work / f"out{n}", ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.rows} rows, concurrency {args.concurrency},"
        f" latency {args.latency_ms:g} ms, {args.rounds} rounds (medians)"
    )
    print(f"{'client':<16} {'req/s':>8} {'CPU s/1k req':>13} {'peak RSS MB':>12}")
    summary = {}
    for name, runs in results.items():
        rps = statistics.median(args.rows / r["wall_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] / args.rows * 1000 for r in runs)
        rss = statistics.median(r["rss_mb"] for r in runs)
        summary[name] = (rps, cpu)
        print(f"{name:<16} {rps:>8.0f} {cpu:>13.3f} {rss:>12.0f}")
    baseline, ours = summary["bare aiohttp"], summary["batchrun"]
    print(
        f"batchrun/bare throughput ratio: {ours[0] / baseline[0]:.2f}; "
        f"CPU per request ratio: {ours[1] / baseline[1]:.2f}"
    )


if __name__ == "__main__":
    main()
