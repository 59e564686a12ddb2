"""The common way to do it: the official openai SDK, a semaphore and gather.

``AsyncOpenAI`` with retries off, ``asyncio.Semaphore(N)`` around
``client.completions.create`` and one ``asyncio.gather`` over every row. The
SDK's default connection pool keeps at most 100 idle connections, which would
make it reconnect above concurrency 100, so the pool is sized to N. No output.
Prints one JSON line like ``bare_aiohttp.py``: rows, wall_s, first_request_s,
first_request_at and last_response_at.

    python benchmarks/openai_sdk.py INPUT.jsonl --base-url URL --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import time

from openai import AsyncOpenAI

try:  # openai 3.x ships its own fork of httpx under this name
    import httpx2 as httpx
except ImportError:
    import httpx
from clientkit import report, run_client


async def main(args: argparse.Namespace, prompts: list[str]) -> None:
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    client = AsyncOpenAI(
        base_url=args.base_url,
        api_key="x",
        max_retries=0,
        http_client=httpx.AsyncClient(limits=limits),
    )
    semaphore = asyncio.Semaphore(args.concurrency)
    first: list[tuple[float, float]] = []

    async def one(prompt: str) -> bool:
        async with semaphore:
            if not first:
                first.append((time.perf_counter(), time.time()))
            completion = await client.completions.create(
                model=args.model, prompt=prompt, max_tokens=16
            )
            return bool(completion.choices)

    async with client:
        start = time.perf_counter()
        done = await asyncio.gather(*(one(prompt) for prompt in prompts))
        wall = time.perf_counter() - start
        last_response_at = time.time()
    report(sum(done), wall, first, last_response_at)


if __name__ == "__main__":
    run_client(main)
