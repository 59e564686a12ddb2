"""The simulator's fast path (``serve-mock --fast``): same answers, less HTTP."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batchrun.errors import ConfigError
from batchrun.simulator import (
    SimulatorConfig,
    SimulatorHandle,
    serve_in_thread,
    start_simulator,
)

from .helpers import prompts, read_results, run_against, write_jsonl

VOLATILE = ("id", "created")


@pytest.fixture
def fast() -> Iterator[SimulatorHandle]:
    with serve_in_thread(SimulatorConfig(seed=7), fast=True) as handle:
        yield handle


@pytest.fixture
def full() -> Iterator[SimulatorHandle]:
    with serve_in_thread(SimulatorConfig(seed=7)) as handle:
        yield handle


def root(handle: SimulatorHandle) -> str:
    return handle.base_url.removesuffix("/v1")


async def post(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(url, data=data) as response:
        return response.status, orjson.loads(await response.read())


def stable(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in VOLATILE}


REQUESTS = [
    ("/completions", {"model": "m", "prompt": "Say something", "max_tokens": 5}),
    ("/completions", {"model": "m", "prompt": "Two please", "n": 2, "logprobs": 1}),
    (
        "/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    ),
    ("/completions", {"model": "m"}),  # 400: no prompt
    ("/completions", {"model": "m", "prompt": "x", "max_tokens": -1}),
    ("/completions", b"{not json"),
]


async def test_answers_match_the_full_server(
    fast: SimulatorHandle, full: SimulatorHandle
) -> None:
    async with aiohttp.ClientSession() as session:
        for path, body in REQUESTS:
            a_status, a = await post(session, fast.base_url + path, body)
            b_status, b = await post(session, full.base_url + path, body)
            assert a_status == b_status, (path, body)
            assert stable(a) == stable(b), (path, body)
    assert fast.state.request_count == len(REQUESTS)
    assert fast.state.by_status == full.state.by_status
    assert fast.state.prompt_tokens == full.state.prompt_tokens > 0
    assert fast.state.completion_tokens == full.state.completion_tokens > 0


async def test_stats_reset_models_and_unknown_paths(fast: SimulatorHandle) -> None:
    async with aiohttp.ClientSession() as session:
        await post(session, fast.base_url + "/completions", REQUESTS[0][1])
        async with session.get(root(fast) + "/stats?prompts=1") as response:
            stats = await response.json()
        assert stats["requests"] == 1
        assert stats["prompt_counts"] == {"Say something": 1}
        async with session.post(root(fast) + "/stats/reset") as response:
            assert response.status == 200
        assert fast.state.request_count == 0
        async with session.get(fast.base_url + "/models") as response:
            models = await response.json()
        assert [m["id"] for m in models["data"]] == ["mock-model"]
        async with session.get(root(fast) + "/nowhere") as response:
            assert response.status == 404
        async with session.get(fast.base_url + "/completions") as response:
            assert response.status == 405


async def test_latency_holds_every_request_in_flight_at_once() -> None:
    config = SimulatorConfig(latency_ms=100)
    async with (
        start_simulator(config, fast=True) as handle,
        aiohttp.ClientSession() as session,
    ):
        bodies = [{"model": "m", "prompt": f"p{i}"} for i in range(8)]
        url = handle.base_url + "/completions"
        answers = await asyncio.gather(*(post(session, url, b) for b in bodies))
        assert [status for status, _ in answers] == [200] * 8
        assert handle.state.max_in_flight == 8
        assert handle.state.in_flight == 0


def raw_exchange(handle: SimulatorHandle, data: bytes) -> bytes:
    host, port = handle.base_url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def request(body: bytes, *extra: str) -> bytes:
    head = ["POST /v1/completions HTTP/1.1", "Host: x", *extra]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_back_to_back_requests_on_one_connection_answer_in_order(
    fast: SimulatorHandle,
) -> None:
    first = request(b'{"model": "m", "prompt": "first"}')
    second = request(b'{"model": "m", "prompt": "second"}', "Connection: close")
    answers = raw_exchange(fast, first + second).split(b"HTTP/1.1 200 OK")[1:]
    assert len(answers) == 2
    assert b"Connection: close" not in answers[0]
    assert b"Connection: close" in answers[1]
    assert fast.state.prompt_counts == {"first": 1, "second": 1}


def test_chunked_bodies_are_refused(fast: SimulatorHandle) -> None:
    head = "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = raw_exchange(fast, head.encode() + b"5\r\nhello\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 501 ")
    assert fast.state.request_count == 0


def test_a_batch_runs_against_it(fast: SimulatorHandle, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    assert run_against(fast, inp, tmp_path / "out", "--concurrency", "32") == 0
    rows = read_results(tmp_path / "out")
    assert len(rows) == 300
    assert {r["status"] for r in rows} == {"ok"}
    assert fast.state.request_count == 300


def test_options_only_the_full_server_has_are_refused() -> None:
    config = SimulatorConfig(rpm=60, fail_rate=0.1)
    assert config.beyond_fast_path() == ["rpm", "fail_rate"]
    with (
        pytest.raises(ConfigError, match="rpm, fail_rate"),
        serve_in_thread(config, fast=True),
    ):
        pass  # pragma: no cover - never starts
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchrun",
            "serve-mock",
            "--fast",
            "--drop-rate",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "batchrun: error: --fast cannot serve --drop-rate"


@pytest.mark.parametrize("flags", [[], ["--fast"]])
def test_a_taken_port_is_one_line_and_exit_2(flags: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "batchrun",
                "serve-mock",
                "--port",
                str(port),
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.startswith(f"batchrun: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
