"""What the compared client scripts share: arguments, input, the event loop and
the one JSON line each prints. Not a client itself."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

T0 = time.perf_counter()

Main = Callable[[argparse.Namespace, list[str]], Coroutine[Any, Any, None]]


def run_client(main: Main) -> None:
    """Parse ``INPUT --base-url --concurrency --model --uvloop`` and run ``main``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", default="mock-model")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    arguments = parser.parse_args()
    rows = [
        orjson.loads(line)["prompt"]
        for line in Path(arguments.input).read_bytes().splitlines()
        if line.strip()
    ]
    if arguments.uvloop:
        import uvloop

        uvloop.run(main(arguments, rows))
    else:
        asyncio.run(main(arguments, rows))


def report(
    rows: int, wall: float, first: list[tuple[float, float]], last_response_at: float
) -> None:
    """Print the run's one JSON line: rows, wall_s and request timestamps."""
    json.dump(
        {
            "rows": rows,
            "wall_s": wall,
            "first_request_s": first[0][0] - T0 if first else None,
            "first_request_at": first[0][1] if first else None,
            "last_response_at": last_response_at,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
