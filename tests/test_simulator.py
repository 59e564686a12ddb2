"""The simulator, exercised over real sockets with an aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import test_utils

from batchrun.errors import ConfigError
from batchrun.simulator import (
    STATE_KEY,
    ScriptedResponse,
    SimulatorConfig,
    SimulatorState,
    _duration,
    count_tokens,
    create_app,
    serve_in_thread,
    start_simulator,
)

ROOT = Path(__file__).resolve().parents[1]
HEX24 = "[0-9a-f]{24}"


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    """A complete HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Client:
    """An aiohttp session aimed at one simulator, plus its live state."""

    session: aiohttp.ClientSession
    root: str
    state: SimulatorState

    async def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        payload = orjson.dumps(body) if data is None and body is not None else data
        async with self.session.request(
            method, self.root + path, data=payload, headers=headers
        ) as response:
            return Reply(response.status, response.headers, await response.read())

    async def complete(self, prompt: str = "Say hi.", **fields: object) -> Reply:
        body = {"model": "m", "prompt": prompt, **fields}
        return await self.call("POST", "/v1/completions", body)

    async def chat(self, messages: list[dict[str, Any]], **fields: object) -> Reply:
        body = {"model": "m", "messages": messages, **fields}
        return await self.call("POST", "/v1/chat/completions", body)

    async def stats(self, query: str = "") -> dict[str, Any]:
        stats: dict[str, Any] = (await self.call("GET", "/stats" + query)).json()
        return stats


@contextlib.asynccontextmanager
async def serve(
    config: SimulatorConfig | None = None, clock: FakeClock | None = None
) -> AsyncIterator[Client]:
    """Serve ``create_app(config, clock)`` on a free port and yield a client."""
    app = create_app(config, clock=clock or time.monotonic)
    async with test_utils.TestServer(app) as server, aiohttp.ClientSession() as s:
        yield Client(s, str(server.make_url("")).rstrip("/"), app[STATE_KEY])


def error_of(reply: Reply) -> dict[str, Any]:
    """The ``error`` object of an OpenAI error body."""
    error: dict[str, Any] = reply.json()["error"]
    return error


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"latency_ms": -1},
        {"slow_ms": math.inf},
        {"burst_s": 0},
        {"fail_rate": 1.5},
        {"drop_rate": -0.1},
        {"fail_rate": 0.6, "slow_rate": 0.6},
        {"rpm": 0},
        {"tpm": -5},
        {"completion_tpm": 1.5},
        {"rpm": True},
        {"header_style": "azure"},
        {"seed": "1"},
        {"api_key": ""},
        {"models": ()},
        {"models": ("",)},
        {"models": "gpt"},
    ],
)
def test_config_rejects_invalid_options(options: dict[str, Any]) -> None:
    """Each invalid option raises ConfigError."""
    with pytest.raises(ConfigError):
        SimulatorConfig(**options)


def test_config_stores_models_as_tuple() -> None:
    """A list of models is accepted and stored as a tuple."""
    assert SimulatorConfig(models=["a", "b"]).models == ("a", "b")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"status": 99},
        {"delay_ms": -1},
        {"action": "explode"},
        {"headers": [("a", "b")]},
    ],
)
def test_scripted_response_rejects_invalid_fields(options: dict[str, Any]) -> None:
    """An invalid scripted response raises ConfigError."""
    with pytest.raises(ConfigError):
        ScriptedResponse(**options)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("hello world", 2), ("Hello, world!", 4), ("don't  stop\n", 4)],
)
def test_count_tokens(text: str, tokens: int) -> None:
    """Words and punctuation marks count one token each."""
    assert count_tokens(text) == tokens


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.12, "120ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_duration_format(seconds: float, text: str) -> None:
    """Reset durations use OpenAI's compact format."""
    assert _duration(seconds) == text


# -- completions and chat -----------------------------------------------------


async def test_completion_shape() -> None:
    """A completion has the OpenAI fields, ids, and usage that matches its text."""
    async with serve() as client:
        reply = await client.complete("Hello there, friend.")
    assert reply.status == 200
    assert re.fullmatch(f"req_{HEX24}", reply.headers["x-request-id"])
    body = reply.json()
    assert re.fullmatch(f"cmpl-{HEX24}", body["id"])
    assert body["object"] == "text_completion"
    assert abs(body["created"] - time.time()) < 60
    assert body["model"] == "m"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    text = choice["text"]
    assert text.startswith(" ")
    assert 8 <= len(text.split()) <= 64
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": count_tokens(text),
        "total_tokens": 5 + count_tokens(text),
    }


async def test_answers_are_deterministic() -> None:
    """The same request gets the same text; another prompt or seed changes it."""
    async with serve() as client:
        first = (await client.complete("alpha")).json()["choices"][0]["text"]
        again = (await client.complete("alpha")).json()["choices"][0]["text"]
        other = (await client.complete("beta")).json()["choices"][0]["text"]
    async with serve(SimulatorConfig(seed=7)) as client:
        seeded = (await client.complete("alpha")).json()["choices"][0]["text"]
    assert first == again
    assert other != first
    assert seeded != first


async def test_answer_lengths_span_8_to_64_words() -> None:
    """Across prompts, answers run from 8 words to 64, neither end favoured:
    a client's batching and token counting see short and long answers alike."""
    async with serve() as client:
        lengths = [
            len(
                (await client.complete(f"prompt {i}"))
                .json()["choices"][0]["text"]
                .split()
            )
            for i in range(400)
        ]
    assert min(lengths) == 8
    assert max(lengths) == 64
    assert 30 <= sum(lengths) / len(lengths) <= 42  # 36 on average


async def test_max_tokens_cuts_the_text() -> None:
    """max_tokens below the natural length gives that many words and 'length'."""
    async with serve() as client:
        cut = (await client.complete("cut", max_tokens=3)).json()
        full = (await client.complete("cut", max_tokens=1000)).json()
    assert len(cut["choices"][0]["text"].split()) == 3
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 3
    assert full["choices"][0]["finish_reason"] == "stop"
    assert full["choices"][0]["text"].startswith(cut["choices"][0]["text"])


async def test_n_choices() -> None:
    """n gives n indexed choices and their summed completion tokens."""
    async with serve() as client:
        body = (await client.complete("many", n=3)).json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["text"] for c in choices}) == 3
    total = sum(count_tokens(c["text"]) for c in choices)
    assert body["usage"]["completion_tokens"] == total


async def test_completion_logprobs() -> None:
    """logprobs gives one token, logprob and offset per completion word."""
    prompt = "Count with me:"
    async with serve() as client:
        choice = (await client.complete(prompt, logprobs=1)).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"])
    assert all(lp < 0 for lp in logprobs["token_logprobs"])
    assert logprobs["top_logprobs"] is None
    assert logprobs["text_offset"][0] == len(prompt)
    full = prompt + choice["text"]
    offsets = zip(logprobs["text_offset"], logprobs["tokens"], strict=True)
    assert all(full[o:].startswith(t) for o, t in offsets)


async def test_chat_shape_and_prompt_tokens() -> None:
    """Chat answers as an assistant message; prompt tokens include the framing."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": None},
    ]
    async with serve() as client:
        reply = await client.chat(messages)
    body = reply.json()
    assert reply.status == 200
    assert re.fullmatch(f"chatcmpl-{HEX24}", body["id"])
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith(" ")
    assert choice["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == 3 + (3 + 4) + (3 + 3) + 3


async def test_chat_takes_content_parts() -> None:
    """Multimodal content (a list of parts, as OpenAI's vision models take)
    is answered: its text counted, an image part as 85 tokens. It was refused
    with a 400 that no real server gives."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    parts = [{"type": "text", "text": "What is this?"}, image]
    async with serve() as client:
        reply = await client.chat([{"role": "user", "content": parts}])
    assert reply.status == 200
    assert reply.json()["usage"]["prompt_tokens"] == 3 + (3 + 4 + 85)


async def test_chat_max_completion_tokens_and_logprobs() -> None:
    """Chat honours max_completion_tokens and returns chat-style logprobs."""
    async with serve() as client:
        body = (
            await client.chat(
                [{"role": "user", "content": "x"}],
                max_completion_tokens=4,
                logprobs=True,
            )
        ).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    assert len(content) == 4


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": 3, "prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "m"}, 400, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": ["a"]}, 400, "prompt"),
        ("/v1/completions", [1, 2], 400, None),
        ("/v1/chat/completions", {"model": "m", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": ["hi"]}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"content": "x"}]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": [{"t": 1}]}]},
            400,
            "messages",
        ),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": 129}, 400, "n"),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": "2"}, 422, "n"),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "max_tokens": 1.5},
            422,
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "temperature": "hot"},
            422,
            "temperature",
        ),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "temperature": 3},
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "stream": True},
            400,
            "stream",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user"}], "logprobs": 2},
            422,
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "m",
                "messages": [{"role": "user"}],
                "logprobs": True,
                "top_logprobs": 21,
            },
            400,
            "top_logprobs",
        ),
    ],
)
async def test_invalid_requests(
    path: str, body: object, status: int, param: str | None
) -> None:
    """Missing or invalid fields give 400, wrong types 422, with an OpenAI error."""
    async with serve() as client:
        reply = await client.call("POST", path, body)
        assert reply.status == status
        error = error_of(reply)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
        assert error["code"] is None
        assert (await client.stats())["by_status"] == {str(status): 1}


async def test_malformed_json_body() -> None:
    """A body that is not JSON gives 400 and still counts as a request."""
    async with serve() as client:
        reply = await client.call("POST", "/v1/completions", data=b'{"model": ')
        assert reply.status == 400
        assert error_of(reply)["type"] == "invalid_request_error"
        assert (await client.stats())["requests"] == 1


async def test_models_route() -> None:
    """/v1/models lists the configured models, or mock-model."""
    async with serve() as client:
        default = (await client.call("GET", "/v1/models")).json()
    async with serve(SimulatorConfig(models=("a", "b"))) as client:
        listed = (await client.call("GET", "/v1/models")).json()
    assert default == {
        "object": "list",
        "data": [
            {
                "id": "mock-model",
                "object": "model",
                "created": 0,
                "owned_by": "batchrun-simulator",
            }
        ],
    }
    assert [m["id"] for m in listed["data"]] == ["a", "b"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "sekrit-key"])
async def test_wrong_api_key_is_401(authorization: str | None) -> None:
    """Without the right bearer key the answer is 401, and the key is not echoed."""
    headers = {} if authorization is None else {"Authorization": authorization}
    async with serve(SimulatorConfig(api_key="sekrit-key")) as client:
        body = {"model": "m", "prompt": "x"}
        reply = await client.call("POST", "/v1/completions", body, headers=headers)
        models = await client.call("GET", "/v1/models", headers=headers)
    assert reply.status == 401
    assert models.status == 401
    assert error_of(reply) == {
        "message": "Incorrect API key provided",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert b"sekrit" not in reply.body
    assert not any("sekrit" in v for v in reply.headers.values())


async def test_right_api_key_is_accepted() -> None:
    """The configured bearer key is accepted."""
    headers = {"Authorization": "Bearer sekrit-key"}
    async with serve(SimulatorConfig(api_key="sekrit-key")) as client:
        body = {"model": "m", "prompt": "x"}
        assert (
            await client.call("POST", "/v1/completions", body, headers=headers)
        ).status == 200
        assert (await client.call("GET", "/v1/models", headers=headers)).status == 200


async def test_unknown_model_is_404() -> None:
    """A model outside config.models gives 404 model_not_found."""
    async with serve(SimulatorConfig(models=("known",))) as client:
        reply = await client.call(
            "POST", "/v1/completions", {"model": "nope", "prompt": "x"}
        )
        ok = await client.call(
            "POST", "/v1/completions", {"model": "known", "prompt": "x"}
        )
    assert reply.status == 404
    error = error_of(reply)
    assert error["code"] == "model_not_found"
    assert error["message"] == "The model `nope` does not exist"
    assert ok.status == 200


# -- stats, recording and scripting --------------------------------------------


async def test_stats_and_reset() -> None:
    """/stats counts statuses, tokens and prompts; /stats/reset zeroes them."""
    messages = [{"role": "user", "content": "hello"}]
    async with serve() as client:
        first = (await client.complete("one")).json()
        second = (await client.chat(messages)).json()
        await client.complete("one", n=0)
        stats = await client.stats()
        with_prompts = await client.stats("?prompts=1")
        assert stats == client.state.snapshot()
        await client.call("POST", "/stats/reset")
        after = await client.stats("?prompts=1")
    assert stats["requests"] == 3
    assert stats["in_flight"] == 0
    assert stats["max_in_flight"] == 1
    assert stats["by_status"] == {"200": 2, "400": 1}
    assert stats["rate_limited"] == 0
    assert stats["faults"] == {"fail": 0, "drop": 0, "malformed": 0, "slow": 0}
    prompt = first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    completion = (
        first["usage"]["completion_tokens"] + second["usage"]["completion_tokens"]
    )
    assert stats["prompt_tokens"] == prompt
    assert stats["completion_tokens"] == completion
    assert stats["total_tokens"] == prompt + completion
    assert "prompt_counts" not in stats
    chat_key = orjson.dumps(messages).decode()
    assert with_prompts["prompt_counts"] == {"one": 1, chat_key: 1}
    assert after["requests"] == 0
    assert after["by_status"] == {}
    assert after["total_tokens"] == 0
    assert after["prompt_counts"] == {}


async def test_record_requests() -> None:
    """record_requests keeps every parsed request body."""
    async with serve(SimulatorConfig(record_requests=True)) as client:
        await client.complete("a", max_tokens=5)
        await client.chat([{"role": "user", "content": "b"}])
        assert [r.get("prompt") for r in client.state.requests] == ["a", None]
        assert client.state.requests[0]["max_tokens"] == 5


async def test_in_flight_counts_concurrent_requests() -> None:
    """max_in_flight sees requests that overlap; in_flight returns to zero."""
    async with serve(SimulatorConfig(latency_ms=30)) as client:
        await asyncio.gather(*(client.complete(f"p{i}") for i in range(5)))
        stats = await client.stats()
    assert stats["max_in_flight"] == 5
    assert stats["in_flight"] == 0


async def test_scripted_responses_are_fifo() -> None:
    """Queued responses are served in order, then normal answers resume."""
    async with serve() as client:
        client.state.enqueue(
            ScriptedResponse(status=503, headers={"Retry-After": "7"}),
            ScriptedResponse(),
            ScriptedResponse(status=200, body={"custom": True}),
            ScriptedResponse(status=418, body="teapot"),
        )
        replies = [await client.complete("s") for _ in range(5)]
    assert [r.status for r in replies] == [503, 200, 200, 418, 200]
    assert replies[0].headers["Retry-After"] == "7"
    assert error_of(replies[0])["type"] == "server_error"
    assert replies[1].json()["object"] == "text_completion"
    assert replies[2].json() == {"custom": True}
    assert replies[3].body == b"teapot"
    assert (
        replies[4].json()["choices"][0]["text"]
        == replies[1].json()["choices"][0]["text"]
    )


async def test_script_route() -> None:
    """POST /sim/script queues responses; an invalid script is a 400."""
    async with serve() as client:
        queued = await client.call(
            "POST",
            "/sim/script",
            [{"status": 429, "headers": {"Retry-After": "3"}}, {}],
        )
        bad = await client.call("POST", "/sim/script", [{"status": "x"}])
        first, second = await client.complete(), await client.complete()
    assert queued.json() == {"queued": 2}
    assert bad.status == 400
    assert (first.status, first.headers["Retry-After"]) == (429, "3")
    assert second.status == 200


async def test_scripted_delay() -> None:
    """A scripted delay_ms holds the answer back."""
    async with serve() as client:
        client.state.enqueue(ScriptedResponse(delay_ms=20))
        start = time.perf_counter()
        await client.complete()
    assert time.perf_counter() - start >= 0.02


async def test_scripted_malformed_and_drop() -> None:
    """Scripted actions truncate the body or drop the connection."""
    async with serve() as client:
        client.state.enqueue(
            ScriptedResponse(action="malformed"), ScriptedResponse(action="drop")
        )
        malformed = await client.complete()
        with pytest.raises(
            (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)
        ):
            await client.complete()
        faults = (await client.stats())["faults"]
    assert malformed.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        malformed.json()
    assert faults["malformed"] == faults["drop"] == 1


# -- prompt directives ---------------------------------------------------------


async def test_status_directive() -> None:
    """[[sim:status=N]] answers every request with that prompt with N."""
    async with serve() as client:
        replies = [await client.complete("bad [[sim:status=400]]") for _ in range(3)]
        fine = await client.complete("good")
    assert [r.status for r in replies] == [400, 400, 400]
    assert error_of(replies[0])["type"] == "invalid_request_error"
    assert fine.status == 200


async def test_fail_directive_sequence() -> None:
    """[[sim:fail=...]] gives the k-th request the k-th outcome, then 200s."""
    prompt = "flaky [[sim:fail=500,503,429,malformed]]"
    async with serve() as client:
        replies = [await client.complete(prompt) for _ in range(6)]
        stats = await client.stats()
    assert [r.status for r in replies] == [500, 503, 429, 200, 200, 200]
    assert "Retry-After" not in replies[1].headers
    assert replies[2].headers["Retry-After"] == "1"
    assert replies[2].headers["retry-after-ms"] == "1000"
    with pytest.raises(orjson.JSONDecodeError):
        replies[3].json()
    assert replies[4].json()["object"] == "text_completion"
    assert stats["faults"] == {"fail": 3, "drop": 0, "malformed": 1, "slow": 0}
    assert stats["rate_limited"] == 1


async def test_fail_directive_drop_in_chat() -> None:
    """Directives also work in chat message content; drop closes the connection."""
    messages = [{"role": "user", "content": "[[sim:fail=drop]] hi"}]
    async with serve() as client:
        with pytest.raises(
            (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)
        ):
            await client.chat(messages)
        assert (await client.chat(messages)).status == 200


async def test_retry_after_directive() -> None:
    """[[sim:retry_after=S]] sets Retry-After on this prompt's 429 and 503 answers."""
    async with serve() as client:
        limited = await client.complete("[[sim:fail=429,503]][[sim:retry_after=2.5]]")
        unavailable = await client.complete(
            "[[sim:fail=429,503]][[sim:retry_after=2.5]]"
        )
    assert (limited.status, unavailable.status) == (429, 503)
    for reply in (limited, unavailable):
        assert reply.headers["Retry-After"] == "3"
        assert reply.headers["retry-after-ms"] == "2500"


async def test_delay_directive() -> None:
    """[[sim:delay_ms=N]] delays only that prompt."""
    async with serve() as client:
        start = time.perf_counter()
        await client.complete("slow [[sim:delay_ms=25]]")
    assert time.perf_counter() - start >= 0.025


async def test_invalid_directive_is_400() -> None:
    """An unknown or malformed directive is a 400 naming the prompt."""
    async with serve() as client:
        unknown = await client.complete("[[sim:explode=1]]")
        bad_status = await client.complete("[[sim:status=200]]")
    assert unknown.status == bad_status.status == 400
    assert error_of(unknown)["param"] == "prompt"


async def test_script_comes_before_directives() -> None:
    """A scripted response wins over a directive, and still counts as a request."""
    async with serve() as client:
        client.state.enqueue(ScriptedResponse(status=502))
        replies = [await client.complete("[[sim:fail=500]]") for _ in range(2)]
    assert [r.status for r in replies] == [502, 200]


# -- server-side rate limits ---------------------------------------------------


async def test_rpm_bucket_and_headers() -> None:
    """RPM allows a burst, then 429s with exact waits until the bucket refills."""
    clock = FakeClock()
    async with serve(SimulatorConfig(rpm=60, burst_s=2), clock) as client:
        ok = [await client.complete() for _ in range(2)]
        limited = await client.complete()
        clock.now += 1.0
        after_wait = await client.complete()
        again = await client.complete()
        stats = await client.stats()
    assert [r.status for r in ok] == [200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "60"
    assert ok[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert ok[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert ok[1].headers["x-ratelimit-reset-requests"] == "2s"
    assert "x-ratelimit-limit-tokens" not in ok[0].headers
    assert limited.status == 429
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["retry-after-ms"] == "1000"
    assert error_of(limited)["type"] == "rate_limit_exceeded"
    assert after_wait.status == 200
    assert again.status == 429
    assert stats["rate_limited"] == 2
    assert stats["by_status"] == {"200": 3, "429": 2}


async def test_tpm_bucket_counts_prompt_and_completion() -> None:
    """TPM charges prompt plus completion tokens and reports the tokens headers."""
    clock = FakeClock()
    async with serve(SimulatorConfig(tpm=600), clock) as client:
        first = await client.complete("hi", max_tokens=5)  # costs 1 + 5 of 10
        limited = await client.complete("hi", max_tokens=5)
        clock.now += 0.25
        refilled = await client.complete("hi", max_tokens=5)
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "600"
    assert first.headers["x-ratelimit-remaining-tokens"] == "4"
    assert first.headers["x-ratelimit-reset-tokens"] == "600ms"
    assert "x-ratelimit-limit-requests" not in first.headers
    assert limited.status == 429
    assert limited.headers["retry-after-ms"] == "200"
    assert refilled.status == 200


async def test_request_larger_than_the_bucket_still_fits_when_full() -> None:
    """A request costing more than the burst is served once the bucket is full."""
    clock = FakeClock()
    async with serve(SimulatorConfig(tpm=60), clock) as client:
        first = await client.complete("hi", max_tokens=5)
        limited = await client.complete("hi", max_tokens=5)
        clock.now += 6
        refilled = await client.complete("hi", max_tokens=5)
    assert (first.status, limited.status, refilled.status) == (200, 429, 200)
    assert limited.headers["retry-after"] == "6"
    assert limited.headers["retry-after-ms"] == "6000"


async def test_completion_tpm_has_no_openai_tokens_header() -> None:
    """OpenAI's tokens headers count prompt + completion; a completion-only limit
    is not announced under them, or a client would pace the wrong budget."""
    async with serve(SimulatorConfig(completion_tpm=6000), FakeClock()) as client:
        reply = await client.complete("hi", max_tokens=5)
    assert reply.status == 200
    assert "x-ratelimit-limit-tokens" not in reply.headers


async def test_fireworks_headers() -> None:
    """header_style='fireworks' sends Fireworks' header names and over-limit."""
    config = SimulatorConfig(
        rpm=60, tpm=60_000, completion_tpm=6000, header_style="fireworks"
    )
    async with serve(config, FakeClock()) as client:
        ok = await client.complete("hi", max_tokens=5)
        limited = await client.complete("hi", max_tokens=5)
    assert ok.status == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "60"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    assert ok.headers["x-ratelimit-limit-tokens-prompt"] == "60000"
    assert ok.headers["x-ratelimit-limit-tokens-generated"] == "6000"
    assert ok.headers["x-ratelimit-remaining-tokens-generated"] == "95"
    assert "x-ratelimit-over-limit" not in ok.headers
    assert "x-ratelimit-reset-requests" not in ok.headers
    assert limited.status == 429
    assert limited.headers["x-ratelimit-over-limit"] == "yes"


async def test_header_style_none_states_no_limits() -> None:
    """header_style='none' keeps the limit but announces nothing: only a 429
    and its Retry-After tell the client."""
    config = SimulatorConfig(rpm=60, header_style="none")
    async with serve(config, FakeClock()) as client:
        ok = await client.complete("hi", max_tokens=5)
        limited = await client.complete("hi", max_tokens=5)
    assert ok.status == 200
    assert limited.status == 429
    assert limited.headers["retry-after"] == "1"
    for reply in (ok, limited):
        assert not [name for name in reply.headers if name.startswith("x-ratelimit")]


async def test_no_rate_limit_headers_without_limits() -> None:
    """Without configured limits no rate-limit headers are sent."""
    async with serve() as client:
        reply = await client.complete()
    assert not any(k.lower().startswith("x-ratelimit") for k in reply.headers)


# -- random faults and latency --------------------------------------------------


async def test_fail_rate_gives_500_or_503() -> None:
    """fail_rate=1 answers every request with 500 or 503."""
    async with serve(SimulatorConfig(fail_rate=1.0)) as client:
        statuses = {(await client.complete()).status for _ in range(20)}
        faults = (await client.stats())["faults"]
    assert statuses == {500, 503}
    assert faults["fail"] == 20


async def test_faults_follow_the_seed() -> None:
    """The same seed injects the same faults in the same order."""
    config = SimulatorConfig(fail_rate=0.3, malformed_rate=0.3, seed=3)
    runs = []
    for _ in range(2):
        async with serve(config) as client:
            runs.append([(await client.complete()).status for _ in range(20)])
    assert runs[0] == runs[1]
    assert {500, 503} & set(runs[0])
    assert 200 in runs[0]


async def test_malformed_rate() -> None:
    """malformed_rate=1 sends a complete 200 whose JSON is cut short."""
    async with serve(SimulatorConfig(malformed_rate=1.0)) as client:
        reply = await client.complete()
        stats = await client.stats()
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    with pytest.raises(orjson.JSONDecodeError):
        reply.json()
    assert stats["faults"]["malformed"] == 1
    assert stats["total_tokens"] == 0


async def test_drop_rate_closes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """drop_rate=1 cuts the body short: the client errors, the server logs nothing."""
    caplog.set_level(logging.WARNING)
    async with serve(SimulatorConfig(drop_rate=1.0)) as client:
        for _ in range(3):
            with pytest.raises(
                (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)
            ):
                await client.complete()
        stats = await client.stats()
    assert stats["faults"]["drop"] == 3
    assert stats["by_status"] == {}
    assert stats["in_flight"] == 0
    assert caplog.records == []


async def test_slow_rate_and_latency() -> None:
    """slow_rate delays by slow_ms and latency_ms delays every answer."""
    async with serve(
        SimulatorConfig(slow_rate=1.0, slow_ms=15, latency_ms=10)
    ) as client:
        start = time.perf_counter()
        reply = await client.complete()
        elapsed = time.perf_counter() - start
        stats = await client.stats()
    assert reply.status == 200
    assert elapsed >= 0.025
    assert stats["faults"]["slow"] == 1


# -- serving helpers -----------------------------------------------------------


async def test_start_simulator() -> None:
    """start_simulator listens on a free port and yields a /v1 base URL."""
    async with start_simulator() as handle, aiohttp.ClientSession() as session:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", handle.base_url)
        async with session.get(handle.base_url + "/models") as response:
            assert response.status == 200
    assert handle.app is not None
    assert handle.state is handle.app[STATE_KEY]


async def test_serve_in_thread() -> None:
    """serve_in_thread serves from another thread and stops cleanly."""
    with serve_in_thread(SimulatorConfig(seed=1)) as handle:
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "prompt": "threaded"}
            async with session.post(handle.base_url + "/completions", json=body) as r:
                assert r.status == 200
        assert handle.state.snapshot()["requests"] == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_run_simulator_exits_cleanly_on_signal(signum: int) -> None:
    """run_simulator serves until SIGINT/SIGTERM and then exits 0 without output."""
    code = (
        "from batchrun.simulator import run_simulator\n"
        "run_simulator(port=0, on_ready=lambda url: print(url, flush=True))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    url = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
    async with aiohttp.ClientSession() as session, session.get(url + "/models") as r:
        assert r.status == 200
    process.send_signal(signum)
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    assert stderr == b""
