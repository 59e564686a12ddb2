"""The usual way: a bare aiohttp session loop with no features at all.

One ClientSession, N workers pulling prompts from a shared iterator, each
POSTing to /v1/completions and parsing the JSON answer. No retries, no rate
limits, no timeouts, no output. Prints one JSON line: rows, wall_s,
first_request_s (from the start of the script), and first_request_at /
last_response_at (Unix time).

The session is set up as well as a session can be, so that the comparison
prices batchrun's features and not aiohttp's defaults: headers given once for
the session (a ``headers=`` on each request cost about 40 thousand
instructions a request, callgrind), a URL parsed once, no cookie jar, no
decompression. A baseline does its best. (batchrun sends its requests on
aiohttp's connection pool without a session, which costs less again.)

    python benchmarks/bare_aiohttp.py INPUT.jsonl --base-url URL --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson
from clientkit import report, run_client
from yarl import URL


async def main(args: argparse.Namespace, prompts: list[str]) -> None:
    url = URL(args.base_url.rstrip("/") + "/completions")
    rows = iter(prompts)
    done = 0
    first: list[tuple[float, float]] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        for prompt in rows:
            if not first:
                first.append((time.perf_counter(), time.time()))
            body = orjson.dumps(
                {"model": args.model, "prompt": prompt, "max_tokens": 16}
            )
            async with session.post(url, data=body) as response:
                data = orjson.loads(await response.read())
            if "choices" in data:
                done += 1

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"Content-Type": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
    ) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
        last_response_at = time.time()
    report(done, wall, first, last_response_at)


if __name__ == "__main__":
    run_client(main)
