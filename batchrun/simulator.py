"""An OpenAI-compatible HTTP server that answers with deterministic fake completions.

The simulator stands in for a real endpoint in ``batchrun serve-mock``, in
``--provider mock`` runs, in every test and in the benchmarks. It serves
``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, and it can
misbehave on purpose: server-side RPM/TPM token buckets that answer 429, random
faults (5xx, dropped connections, truncated JSON, slow answers), a FIFO queue of
scripted responses, and ``[[sim:...]]`` directives embedded in the prompt text.
``GET /stats`` reports what it saw, ``POST /stats/reset`` zeroes it and
``POST /sim/script`` queues scripted responses from another process.

It does not tokenize like a real model, stream, or look at sampling parameters
beyond their types and ranges. Per-request work is kept small (answers are
cached) because the benchmarks drive it at thousands of requests per second.

Prompt directives, which work across processes:

- ``[[sim:status=400]]``: every request with this prompt gets that status.
- ``[[sim:fail=500,429,drop,malformed]]``: the k-th request with this prompt
  gets the k-th item, later ones the normal answer (``ok`` or ``200`` is a
  normal answer inside the list).
- ``[[sim:retry_after=2]]``: Retry-After for this prompt's 429s (default 1 s)
  and 503s (default none).
- ``[[sim:delay_ms=300]]``: extra latency for this prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import random
import re
import signal
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import orjson
from aiohttp import web

from .errors import ConfigError

__all__ = [
    "STATE_KEY",
    "ScriptedResponse",
    "SimulatorConfig",
    "SimulatorHandle",
    "SimulatorState",
    "count_tokens",
    "create_app",
    "run_simulator",
    "serve_in_thread",
    "start_simulator",
]

JSONObject = dict[str, Any]
Clock = Callable[[], float]
_K = TypeVar("_K")
_V = TypeVar("_V")

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_DIRECTIVE_RE = re.compile(r"\[\[sim:([^\]]*)\]\]")
_DIRECTIVE_MARK = "[[sim:"
# The largest request body served (the fast path's limit too).
MAX_BODY_BYTES = 64 << 20
_CACHE_SIZE = 4096
_JSON = "application/json"
_INVALID = "invalid_request_error"
_JSON_HEADERS = {"Content-Type": _JSON}
_WORDS = """
    the of and to in is was for on that with as by at from his it an were are which
    this be or has had not first one their its new after who they two her she been
    other when there all during into school time may years more most only over city
    some world would where later up such used many can state about national out known
    university united then made these three while people just like long day part
    between water house small light story place name year game work high number river
    field power home music back data green system group
"""
# Every word is exactly one token for count_tokens(), so a completion of L words
# costs L completion tokens.
_VOCABULARY = tuple(_WORDS.split())
_LOGPROBS = {w: -round(0.02 + (i % 23) * 0.11, 4) for i, w in enumerate(_VOCABULARY)}
# A word for each byte value: an answer's words are read off a hash of its
# prompt, which takes 2.6 us an answer, where seeding a random.Random from the
# hash and drawing from it took 7.3 us (timeit). The fast path serves
# 30,300-32,100 short completions a second to wrk instead of 23,400-24,000.
_BYTE_WORDS = tuple(_VOCABULARY[b % len(_VOCABULARY)] for b in range(256))
_MIN_WORDS, _MAX_WORDS = 8, 64


def _words(material: bytes) -> list[str]:
    """The words of an answer, the same for the same ``material``: 8 to 64."""
    digest = hashlib.shake_128(material).digest(2 + _MAX_WORDS)
    count = _MIN_WORDS + int.from_bytes(digest[:2]) % (_MAX_WORDS - _MIN_WORDS + 1)
    return list(map(_BYTE_WORDS.__getitem__, digest[2 : 2 + count]))


def count_tokens(text: str) -> int:
    """Count tokens the simulator's way: each word and each punctuation mark is one.

    Args:
        text: Any text.

    Returns:
        The number of matches of ``\\w+|[^\\w\\s]`` in ``text``.
    """
    return len(_TOKEN_RE.findall(text))


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    """How the simulator answers.

    ``latency_ms`` delays every answer that gets past validation. Rates are
    probabilities per request; their sum must not exceed 1. ``rpm``, ``tpm``
    (prompt + completion tokens) and ``completion_tpm`` are token buckets that
    hold ``limit / 60 * burst_s`` (at least one request's cost), start full and
    refill at ``limit / 60`` per second. ``api_key`` makes every ``/v1`` request
    without ``Authorization: Bearer <api_key>`` a 401; ``models`` makes any other
    model a 404. ``record_requests`` keeps each body in ``SimulatorState.requests``.
    ``header_style`` names the rate-limit headers; ``"none"`` sends none, like
    a server that states no limits and only answers 429 when one is passed.

    Raises:
        ConfigError: An option is out of range or of the wrong type.
    """

    latency_ms: float = 0.0
    seed: int = 0
    api_key: str | None = None
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    completion_tpm: int | None = None
    burst_s: float = 1.0
    header_style: Literal["openai", "fireworks", "none"] = "openai"
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 5000.0
    record_requests: bool = False

    def __post_init__(self) -> None:
        for name in ("latency_ms", "slow_ms", "burst_s"):
            if not _finite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number >= 0")
        if self.burst_s == 0:
            raise ConfigError("burst_s must be > 0")
        rates = (self.fail_rate, self.drop_rate, self.malformed_rate, self.slow_rate)
        if not all(_finite(r) and r <= 1 for r in rates) or sum(rates) > 1:
            raise ConfigError("fault rates must be in [0, 1] and add up to at most 1")
        for name in ("rpm", "tpm", "completion_tpm"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.header_style not in ("openai", "fireworks", "none"):
            raise ConfigError(f"unknown header_style {self.header_style!r}")
        if type(self.seed) is not int:
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.api_key == "":
            raise ConfigError("api_key must not be empty (use None for no check)")
        models: object = self.models
        if models is not None:
            if not isinstance(models, tuple | list) or not models:
                raise ConfigError("models must be a non-empty tuple (or None)")
            if not all(isinstance(m, str) and m for m in models):
                raise ConfigError("models must be non-empty strings")
            object.__setattr__(self, "models", tuple(models))  # a list is accepted

    def beyond_fast_path(self) -> list[str]:
        """The options set here that the fast server (``fast=True``) cannot serve."""
        return [
            name
            for name in _FAST_PATH_UNSUPPORTED
            if getattr(self, name) not in (None, 0.0)
        ]


_FAST_PATH_UNSUPPORTED = (
    "rpm",
    "tpm",
    "completion_tpm",
    "fail_rate",
    "drop_rate",
    "malformed_rate",
    "slow_rate",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScriptedResponse:
    """One canned answer, served instead of the next normal one.

    ``body`` is sent as is when it is ``str`` or ``bytes`` and JSON-encoded
    otherwise; ``None`` means the normal completion (status 200) or an OpenAI
    error body (other statuses). ``action`` truncates that body (``"malformed"``)
    or closes the connection halfway through it (``"drop"``).
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: object = None
    delay_ms: float = 0.0
    action: Literal["drop", "malformed"] | None = None

    def __post_init__(self) -> None:
        if type(self.status) is not int or not 100 <= self.status <= 599:
            raise ConfigError(f"status must be an HTTP status, got {self.status!r}")
        if not _finite(self.delay_ms):
            raise ConfigError(f"delay_ms must be >= 0, got {self.delay_ms!r}")
        if self.action not in (None, "drop", "malformed"):
            raise ConfigError(f"unknown action {self.action!r}")
        if not isinstance(self.headers, Mapping):
            raise ConfigError("headers must be a mapping")


class SimulatorState:
    """What the simulator has seen, plus the queue of scripted responses.

    Counters are plain ints and dicts, so another thread can read them.
    """

    def __init__(self, *, record_requests: bool = False) -> None:
        self.record_requests = record_requests
        self.requests: list[JSONObject] = []
        self.script: deque[ScriptedResponse] = deque()
        self.prompt_counts: dict[str, int] = {}
        self.in_flight = 0
        self.reset()

    def snapshot(self, *, prompts: bool = False) -> JSONObject:
        """Return the counters as the JSON object that ``GET /stats`` serves.

        ``requests`` counts POSTs to the completion routes. ``by_status`` counts
        complete HTTP answers (a drop is not one). ``faults`` counts drops and
        truncated bodies from any source, errors injected by ``fail_rate`` or a
        ``fail=`` directive, and slow answers. The token sums cover 200 answers
        sent with a full completion body.

        Args:
            prompts: Also return ``prompt_counts`` (prompt key -> requests).

        Returns:
            A new dict of JSON-compatible values.
        """
        snap: JSONObject = {
            "requests": self.request_count,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_status": dict(self.by_status),
            "rate_limited": self.rate_limited,
            "faults": dict(self.faults),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if prompts:
            snap["prompt_counts"] = dict(self.prompt_counts)
        return snap

    def enqueue(self, *responses: ScriptedResponse) -> None:
        """Queue answers, first in first out, for the next completion requests.

        Args:
            *responses: One per request; they take precedence over directives,
                rate limits and random faults.
        """
        self.script.extend(responses)

    def reset(self) -> None:
        """Zero the counters; forget prompts, recorded requests and queued answers."""
        self.requests.clear()
        self.script.clear()
        self.prompt_counts.clear()
        self.request_count = self.rate_limited = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.max_in_flight = self.in_flight
        self.by_status: dict[str, int] = {}
        self.faults = dict.fromkeys(("fail", "drop", "malformed", "slow"), 0)


STATE_KEY = web.AppKey("batchrun_simulator_state", SimulatorState)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorHandle:
    """A running simulator: its URL (ending in ``/v1``), live state and app
    (``None`` for the fast server)."""

    base_url: str
    state: SimulatorState
    app: web.Application | None


class _RequestError(Exception):
    """An invalid request, answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True, slots=True)
class _Request:
    chat: bool
    model: str
    key: str  # the prompt, or the chat messages as JSON
    messages: list[JSONObject] | None
    n: int
    max_tokens: int | None
    logprobs: bool


class Rejection(NamedTuple):
    """An invalid request's answer: status and OpenAI error body."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class _Completion:
    prompt_tokens: int
    completion_tokens: int
    words: list[list[str]]
    choices: list[JSONObject]
    usage: dict[str, int]


@dataclass(frozen=True, slots=True)
class _Directives:
    status: int | None
    fail: tuple[int | str, ...]
    retry_after_s: float | None
    delay_ms: float


class _LRU(OrderedDict[_K, _V]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def lookup(self, key: _K) -> _V | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def remember(self, key: _K, value: _V) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


class _Bucket:
    """Holds up to ``max(limit / 60 * burst_s, cost)``; refills ``limit / 60`` per s."""

    __slots__ = ("base", "level", "limit", "per_s", "stamp")

    def __init__(self, limit: int, burst_s: float, now: float) -> None:
        self.limit, self.per_s, self.stamp = limit, limit / 60, now
        self.base = self.per_s * burst_s
        self.level = math.inf  # full, whatever the first request costs

    def refill(self, cost: int, now: float) -> None:
        cap = max(self.base, cost)
        self.level = min(cap, self.level + (now - self.stamp) * self.per_s)
        self.stamp = now

    def remaining(self) -> str:
        return str(max(0, int(self.level)))

    def reset(self) -> str:
        return _duration(max(0.0, self.base - self.level) / self.per_s)


def _finite(value: object) -> bool:
    """Whether ``value`` is a real number in ``[0, inf)``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value < math.inf


def _error_json(
    message: str,
    *,
    kind: str = _INVALID,
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return orjson.dumps({"error": error})


def _status_json(status: int) -> bytes:
    """The error body for an injected or scripted status."""
    message = f"Simulated error (HTTP {status})"
    if status == 429:
        return _error_json(
            message, kind="rate_limit_exceeded", code="rate_limit_exceeded"
        )
    return _error_json(message, kind="server_error" if status >= 500 else _INVALID)


def _duration(seconds: float) -> str:
    """Format like OpenAI's reset headers: ``120ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    hours, minutes = divmod(minutes, 60)
    return (
        (f"{hours}h" if hours else "") + (f"{minutes}m" if ms >= 60_000 else "") + secs
    )


def _retry_headers(seconds: float) -> dict[str, str]:
    ceil_ms = math.ceil(seconds * 1000)
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(ceil_ms),
    }


def _int_field(body: JSONObject, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is not None and type(value) is not int:
        raise _RequestError(422, f"'{name}' must be an integer", name)
    if value is not None and not low <= value <= high:
        raise _RequestError(400, f"'{name}' must be between {low} and {high}", name)
    return value


def _parse(body: object, chat: bool) -> _Request:
    """Validate a request body: 400 for missing or invalid fields, 422 for types."""
    if not isinstance(body, dict):
        raise _RequestError(400, "The request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _RequestError(400, "'model' is required and must be a string", "model")
    temperature = body.get("temperature")
    if temperature is not None and (type(temperature) not in (int, float)):
        raise _RequestError(422, "'temperature' must be a number", "temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise _RequestError(400, "'temperature' must be between 0 and 2", "temperature")
    if body.get("stream"):
        raise _RequestError(400, "Streaming is not supported", "stream")
    n = _int_field(body, "n", 1, 128) or 1
    max_tokens = _int_field(body, "max_tokens", 1, 2**31)
    if not chat:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _RequestError(400, "'prompt' must be one string", "prompt")
        wants_logprobs = _int_field(body, "logprobs", 0, 20) is not None
        return _Request(False, model, prompt, None, n, max_tokens, wants_logprobs)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RequestError(400, "'messages' must be a non-empty list", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _RequestError(400, "each message needs a string 'role'", "messages")
        if not _valid_content(message.get("content", "")):
            raise _RequestError(
                400,
                "'content' must be a string, null or a list of parts with a 'type'",
                "messages",
            )
    max_tokens = max_tokens or _int_field(body, "max_completion_tokens", 1, 2**31)
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool | None):
        raise _RequestError(422, "'logprobs' must be a boolean", "logprobs")
    top = _int_field(body, "top_logprobs", 0, 20)
    if top is not None and logprobs is not True:
        raise _RequestError(
            400, "'top_logprobs' needs 'logprobs' set to true", "top_logprobs"
        )
    key = orjson.dumps(messages).decode()
    return _Request(True, model, key, messages, n, max_tokens, logprobs is True)


# What an image part counts for, as OpenAI counts a low-detail image.
_IMAGE_TOKENS = 85


def _valid_content(content: object) -> bool:
    """A message's content: text, null, or a list of parts (OpenAI's
    multimodal form: ``{"type": "text", "text": ...}``, image parts, ...)."""
    if content is None or isinstance(content, str):
        return True
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)
    )


def _content_tokens(content: object) -> int:
    """The tokens of a message's content: its text, and a fixed count per
    part that is not text."""
    if isinstance(content, str):
        return count_tokens(content)
    if not isinstance(content, list):
        return 0
    return sum(
        count_tokens(part["text"])
        if part.get("type") == "text" and isinstance(part.get("text"), str)
        else _IMAGE_TOKENS
        for part in content
    )


def _parse_directives(text: str, param: str) -> _Directives:
    status: int | None = None
    fail: tuple[int | str, ...] = ()
    retry_after_s: float | None = None
    delay_ms = 0.0
    for match in _DIRECTIVE_RE.finditer(text):
        for item in match.group(1).split(";"):
            name, _, value = (part.strip() for part in item.partition("="))
            try:
                if name == "status" and 400 <= int(value) <= 599:
                    status = int(value)
                elif name == "fail":
                    fail = tuple(_fail_item(v.strip()) for v in value.split(","))
                elif name in ("retry_after", "delay_ms") and _finite(float(value)):
                    if name == "retry_after":
                        retry_after_s = float(value)
                    else:
                        delay_ms = float(value)
                else:
                    raise ValueError(item)
            except ValueError:
                message = f"Invalid simulator directive {item!r}"
                raise _RequestError(400, message, param) from None
    return _Directives(status, fail, retry_after_s, delay_ms)


def _fail_item(value: str) -> int | str:
    if value in ("drop", "malformed", "ok"):
        return value
    if not 200 <= int(value) <= 599:
        raise ValueError(value)
    return "ok" if value == "200" else int(value)


def _logprobs(words: list[str], chat: bool, offset: int) -> JSONObject:
    tokens = [f" {w}" for w in words]
    if chat:
        return {
            "content": [
                {
                    "token": t,
                    "logprob": _LOGPROBS[w],
                    "bytes": list(t.encode()),
                    "top_logprobs": [],
                }
                for t, w in zip(tokens, words, strict=True)
            ]
        }
    return {
        "tokens": tokens,
        "token_logprobs": [_LOGPROBS[w] for w in words],
        "top_logprobs": None,
        "text_offset": list(
            itertools.accumulate(map(len, tokens[:-1]), initial=offset)
        ),
    }


async def _sleep_ms(delay_ms: float) -> None:
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)


class Simulator:
    """The request handlers and what they share: config, buckets, caches, rng."""

    def __init__(self, config: SimulatorConfig, clock: Clock) -> None:
        self.config, self.clock = config, clock
        self.state = SimulatorState(record_requests=config.record_requests)
        self.rng = random.Random(config.seed)
        self.auth = None if config.api_key is None else f"Bearer {config.api_key}"
        self.models = None if config.models is None else frozenset(config.models)
        c = config
        self.fault_rate = c.fail_rate + c.drop_rate + c.malformed_rate + c.slow_rate
        self.answers: _LRU[tuple[object, ...], _Completion] = _LRU(_CACHE_SIZE)
        self.directives: _LRU[str, _Directives] = _LRU(_CACHE_SIZE)
        self.ids = itertools.count()
        self.id_prefix = os.urandom(6).hex()
        limits = {"rpm": c.rpm, "tpm": c.tpm, "ctpm": c.completion_tpm}
        now = clock()
        self.buckets = {k: _Bucket(v, c.burst_s, now) for k, v in limits.items() if v}
        owner = {"object": "model", "created": 0, "owned_by": "batchrun-simulator"}
        data = [{"id": m} | owner for m in config.models or ("mock-model",)]
        self.models_body = orjson.dumps({"object": "list", "data": data})

    async def list_models(self, request: web.Request) -> web.Response:
        if self.auth is not None and request.headers.get("Authorization") != self.auth:
            return self._unauthorized()
        return web.Response(body=self.models_body, content_type=_JSON)

    async def stats(self, request: web.Request) -> web.Response:
        prompts = request.query.get("prompts", "") in ("1", "true", "yes")
        body = orjson.dumps(self.state.snapshot(prompts=prompts))
        return web.Response(body=body, content_type=_JSON)

    async def reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        return web.Response(body=b'{"ok":true}', content_type=_JSON)

    async def script(self, request: web.Request) -> web.Response:
        try:
            items = orjson.loads(await request.read())
            if not isinstance(items, list):
                raise TypeError("expected a JSON list of objects")
            self.state.enqueue(*(ScriptedResponse(**item) for item in items))
        except (orjson.JSONDecodeError, TypeError, ConfigError) as exc:
            return self._reply(400, _error_json(f"Invalid script: {exc}"))
        body = orjson.dumps({"queued": len(self.state.script)})
        return web.Response(body=body, content_type=_JSON)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        return await self._count(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._count(request, chat=True)

    async def _count(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        state = self.state
        state.request_count += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            return await self._handle(request, chat)
        finally:
            state.in_flight -= 1

    def accept(
        self, raw: bytes, chat: bool, authorization: str | None, *, directives: bool
    ) -> tuple[_Request, _Directives | None] | Rejection:
        """Parse and check one completion request and count its prompt.

        Returns the request and its ``[[sim:...]]`` directives (when asked for
        and present), or the status and body of the error answer.
        """
        state = self.state
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Rejection(400, _error_json("The request body is not valid JSON"))
        if state.record_requests:
            state.requests.append(body)
        if self.auth is not None and authorization != self.auth:
            message, code = "Incorrect API key provided", "invalid_api_key"
            return Rejection(401, _error_json(message, code=code))
        try:
            req = _parse(body, chat)
            marked = directives and _DIRECTIVE_MARK in req.key
            rules = self._directives(req) if marked else None
        except _RequestError as exc:
            return Rejection(exc.status, _error_json(str(exc), param=exc.param))
        if self.models is not None and req.model not in self.models:
            message = f"The model `{req.model}` does not exist"
            return Rejection(404, _error_json(message, code="model_not_found"))
        state.prompt_counts[req.key] = state.prompt_counts.get(req.key, 0) + 1
        return req, rules

    def serial(self) -> str:
        """A new unique response id suffix."""
        return f"{self.id_prefix}{next(self.ids):012x}"

    def answer(self, req: _Request) -> tuple[bytes, _Completion]:
        """The 200 body for ``req`` (no faults, no limits) and what it used."""
        done = self._completion(req)
        return self._body(req, done, self.serial()), done

    def answered(self, status: int, done: _Completion | None) -> None:
        """Count an answer sent in full."""
        state = self.state
        key = str(status)
        state.by_status[key] = state.by_status.get(key, 0) + 1
        state.rate_limited += status == 429
        if done is not None and status == 200:
            state.prompt_tokens += done.prompt_tokens
            state.completion_tokens += done.completion_tokens

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        state, config = self.state, self.config
        accepted = self.accept(
            await request.read(),
            chat,
            request.headers.get("Authorization"),
            directives=True,
        )
        if isinstance(accepted, Rejection):
            return self._reply(accepted.status, accepted.body)
        req, rules = accepted
        seen = state.prompt_counts[req.key]
        serial = self.serial()
        headers = {"Content-Type": _JSON, "x-request-id": f"req_{serial}"}
        if state.script:
            item = state.script.popleft()
            return await self._scripted(request, req, serial, headers, item)
        delay_ms, action = config.latency_ms, None
        if rules is not None:
            delay_ms += rules.delay_ms
            outcome: int | str | None = rules.status
            if outcome is None and seen <= len(rules.fail):
                outcome = rules.fail[seen - 1]
                state.faults["fail"] += isinstance(outcome, int)
            if isinstance(outcome, int):
                retry_s = rules.retry_after_s
                if outcome == 429 and retry_s is None:
                    retry_s = 1.0
                if outcome in (429, 503) and retry_s is not None:
                    headers |= _retry_headers(retry_s)
                await _sleep_ms(delay_ms)
                return self._reply(outcome, _status_json(outcome), headers)
            if outcome in ("drop", "malformed"):
                action = str(outcome)
        done = self._completion(req)
        if action is None and self.buckets:
            wait_s = self._take(done, headers)
            if wait_s is not None:
                headers |= _retry_headers(wait_s)
                if config.header_style == "fireworks":
                    headers["x-ratelimit-over-limit"] = "yes"
                await _sleep_ms(delay_ms)
                message = f"Rate limit reached. Try again in {_duration(wait_s)}."
                kind = code = "rate_limit_exceeded"
                return self._reply(
                    429, _error_json(message, kind=kind, code=code), headers
                )
        if action is None and self.fault_rate:
            # One draw per request picks at most one fault, in this order.
            draw = self.rng.random()
            if draw < config.fail_rate:
                state.faults["fail"] += 1
                await _sleep_ms(delay_ms)
                status = self.rng.choice((500, 503))
                return self._reply(status, _status_json(status), headers)
            draw -= config.fail_rate
            if draw < config.drop_rate:
                action = "drop"
            elif (draw := draw - config.drop_rate) < config.malformed_rate:
                action = "malformed"
            elif draw - config.malformed_rate < config.slow_rate:
                state.faults["slow"] += 1
                delay_ms += config.slow_ms
        await _sleep_ms(delay_ms)
        data = self._body(req, done, serial)
        return await self._send(request, 200, data, headers, action, done)

    async def _scripted(
        self,
        request: web.Request,
        req: _Request,
        serial: str,
        headers: dict[str, str],
        item: ScriptedResponse,
    ) -> web.StreamResponse:
        await _sleep_ms(self.config.latency_ms + item.delay_ms)
        headers |= item.headers
        done = None
        if item.body is None and item.status == 200:
            done = self._completion(req)
            data = self._body(req, done, serial)
        elif item.body is None:
            data = _status_json(item.status)
        elif isinstance(item.body, bytes | str):
            data = item.body.encode() if isinstance(item.body, str) else item.body
        else:
            data = orjson.dumps(item.body)
        return await self._send(request, item.status, data, headers, item.action, done)

    async def _send(
        self,
        request: web.Request,
        status: int,
        data: bytes,
        headers: dict[str, str],
        action: str | None,
        done: _Completion | None,
    ) -> web.StreamResponse:
        if action == "drop":
            self.state.faults["drop"] += 1
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            # The body stops short of its Content-Length. aiohttp's write_eof() on
            # the closed transport raises ConnectionError, which it handles as a
            # client disconnect, so nothing is logged.
            if request.transport is not None:
                request.transport.close()
            return response
        if action == "malformed":
            self.state.faults["malformed"] += 1
            data = data[: len(data) // 2]
            done = None
        return self._reply(status, data, headers, done)

    def _reply(
        self,
        status: int,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        done: _Completion | None = None,
    ) -> web.Response:
        self.answered(status, done)
        return web.Response(status=status, body=data, headers=headers or _JSON_HEADERS)

    def _unauthorized(self) -> web.Response:
        message, code = "Incorrect API key provided", "invalid_api_key"
        return self._reply(401, _error_json(message, code=code))

    def _directives(self, req: _Request) -> _Directives:
        rules = self.directives.lookup(req.key)
        if rules is None:
            rules = _parse_directives(req.key, "messages" if req.chat else "prompt")
            self.directives.remember(req.key, rules)
        return rules

    def _completion(self, req: _Request) -> _Completion:
        """The deterministic answer to ``req``, from the cache when possible."""
        seed = self.config.seed
        cache_key = (req.chat, req.key, seed, req.n, req.max_tokens)
        done = self.answers.lookup(cache_key)
        if done is not None:
            return done
        if req.messages is not None:  # 3 tokens of framing per message, 3 per reply
            contents = (m.get("content") for m in req.messages)
            prompt_tokens = 3 + sum(3 + _content_tokens(c) for c in contents)
        else:
            prompt_tokens = count_tokens(req.key)
        all_words, choices = [], []
        for index in range(req.n):
            words = _words(f"{seed}\x1f{req.key}\x1f{index}".encode())
            finish = "stop"
            if req.max_tokens is not None and req.max_tokens < len(words):
                words, finish = words[: req.max_tokens], "length"
            text = " " + " ".join(words)
            all_words.append(words)
            content: JSONObject = (
                {"message": {"role": "assistant", "content": text}}
                if req.chat
                else {"text": text}
            )
            choice = {"index": index} | content | {"finish_reason": finish}
            choices.append(choice | {"logprobs": None})
        used = sum(map(len, all_words))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": used,
            "total_tokens": prompt_tokens + used,
        }
        done = _Completion(prompt_tokens, used, all_words, choices, usage)
        self.answers.remember(cache_key, done)
        return done

    def _body(self, req: _Request, done: _Completion, serial: str) -> bytes:
        choices = done.choices
        if req.logprobs:
            choices = [
                choice | {"logprobs": _logprobs(words, req.chat, len(req.key))}
                for choice, words in zip(choices, done.words, strict=True)
            ]
        return orjson.dumps(
            {
                "id": f"chatcmpl-{serial}" if req.chat else f"cmpl-{serial}",
                "object": "chat.completion" if req.chat else "text_completion",
                "created": int(time.time()),
                "model": req.model,
                "choices": choices,
                "usage": done.usage,
            }
        )

    def _take(self, done: _Completion, headers: dict[str, str]) -> float | None:
        """Charge all buckets or none, add the headers; return the wait if refused."""
        now = self.clock()
        tokens = done.prompt_tokens + done.completion_tokens
        costs = {"rpm": 1, "tpm": tokens, "ctpm": done.completion_tokens}
        wait_s = 0.0
        for name, bucket in self.buckets.items():
            bucket.refill(costs[name], now)
            if bucket.level < costs[name]:
                wait_s = max(wait_s, (costs[name] - bucket.level) / bucket.per_s)
        if not wait_s:
            for name, bucket in self.buckets.items():
                bucket.level -= costs[name]
        if self.config.header_style == "none":
            return wait_s or None  # a server that states no limits, only 429s
        requests = self.buckets.get("rpm")
        if requests is not None:
            headers["x-ratelimit-limit-requests"] = str(requests.limit)
            headers["x-ratelimit-remaining-requests"] = requests.remaining()
        prompt, generated = self.buckets.get("tpm"), self.buckets.get("ctpm")
        if self.config.header_style == "fireworks":
            if prompt is not None:
                headers["x-ratelimit-limit-tokens-prompt"] = str(prompt.limit)
            if generated is not None:
                headers["x-ratelimit-limit-tokens-generated"] = str(generated.limit)
                remaining = generated.remaining()
                headers["x-ratelimit-remaining-tokens-generated"] = remaining
            return wait_s or None
        if requests is not None:
            headers["x-ratelimit-reset-requests"] = requests.reset()
        # OpenAI style has one token budget (prompt + completion); a
        # completion-only limit has no OpenAI header, so none is sent for it.
        if (tokens_bucket := prompt) is not None:
            headers["x-ratelimit-limit-tokens"] = str(tokens_bucket.limit)
            headers["x-ratelimit-remaining-tokens"] = tokens_bucket.remaining()
            headers["x-ratelimit-reset-tokens"] = tokens_bucket.reset()
        return wait_s or None


def create_app(
    config: SimulatorConfig | None = None, *, clock: Clock = time.monotonic
) -> web.Application:
    """Build the simulator's aiohttp application.

    Args:
        config: How to answer; the default answers every valid request with 200.
        clock: Monotonic seconds for the rate-limit buckets (injected by tests).

    Returns:
        An application whose live ``SimulatorState`` is ``app[STATE_KEY]``.
    """
    sim = Simulator(config or SimulatorConfig(), clock)
    # aiohttp refuses bodies over 1 MiB by default (413); long-context prompts
    # run past that, and real servers take them.
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = sim.state
    app.router.add_post("/v1/completions", sim.completion)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_get("/v1/models", sim.list_models)
    app.router.add_get("/stats", sim.stats)
    app.router.add_post("/stats/reset", sim.reset)
    app.router.add_post("/sim/script", sim.script)
    return app


@contextlib.asynccontextmanager
async def start_simulator(
    config: SimulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock = time.monotonic,
    fast: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[SimulatorHandle]:
    """Serve the simulator in the running event loop until the block exits.

    Args:
        config: How to answer.
        host: The interface to listen on.
        port: The TCP port; 0 picks a free one.
        clock: Monotonic seconds for the rate-limit buckets (tests share a
            virtual clock with the client).
        fast: Serve from the minimal HTTP server of ``batchrun.fastsim``
            (for benchmarks) instead of aiohttp.web.
        ssl_context: Serve https with this server context (not with ``fast``).

    Yields:
        The handle, once the server accepts connections.

    Raises:
        ConfigError: ``fast`` with options only the full server has.
    """
    config = config or SimulatorConfig()
    if fast:
        if ssl_context is not None:
            raise ConfigError("the simulator's fast path serves plain http only")
        async with _start_fast(config, host, port, clock) as handle:
            yield handle
        return
    app = create_app(config, clock=clock)
    # handler_cancellation: when a client gives up (a timeout), its handler stops,
    # so slow answers neither pile up nor hold up shutdown.
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        scheme = "http" if ssl_context is None else "https"
        url = _base_url(host, runner.addresses[0][1], scheme)
        yield SimulatorHandle(base_url=url, state=app[STATE_KEY], app=app)
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _start_fast(
    config: SimulatorConfig, host: str, port: int, clock: Clock
) -> AsyncIterator[SimulatorHandle]:
    from .fastsim import factory

    unsupported = config.beyond_fast_path()
    if unsupported:
        raise ConfigError(
            "the fast simulator has no " + ", ".join(unsupported) + "; drop --fast"
        )
    sim = Simulator(config, clock)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory(sim, config.latency_ms), host, port)
    try:
        bound = server.sockets[0].getsockname()[1]
        yield SimulatorHandle(
            base_url=_base_url(host, bound), state=sim.state, app=None
        )
    finally:
        server.close()
        # From Python 3.12 wait_closed() also waits for open connections.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)


def _base_url(host: str, port: int, scheme: str = "http") -> str:
    url_host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{url_host}:{port}/v1"


@contextlib.contextmanager
def serve_in_thread(
    config: SimulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    clock: Clock = time.monotonic,
    fast: bool = False,
) -> Iterator[SimulatorHandle]:
    """Serve the simulator on a free port from a thread with its own event loop.

    Args:
        config: How to answer.
        host: The interface to listen on.
        clock: Monotonic seconds for the rate-limit buckets.
        fast: Serve from the minimal HTTP server (see ``start_simulator``).

    Yields:
        The handle, once the server accepts connections. On exit the server
        stops and the thread is joined.

    Raises:
        OSError: The server could not listen.
    """
    ready = threading.Event()
    started: list[tuple[SimulatorHandle, asyncio.AbstractEventLoop, asyncio.Event]] = []
    failed: list[BaseException] = []

    async def serve() -> None:
        stop = asyncio.Event()
        async with start_simulator(config, host=host, clock=clock, fast=fast) as handle:
            started.append((handle, asyncio.get_running_loop(), stop))
            ready.set()
            await stop.wait()

    def target() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # re-raised in the caller's thread
            failed.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=target, name="batchrun-simulator", daemon=True)
    thread.start()
    ready.wait()
    if not started:
        thread.join()
        raise failed[0]
    handle, loop, stop = started[0]
    try:
        yield handle
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()


def run_simulator(
    config: SimulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready: Callable[[str], None] | None = None,
    fast: bool = False,
) -> None:
    """Serve the simulator until SIGINT or SIGTERM, then return normally.

    Uses uvloop when it is installed (the ``fast`` extra).

    Args:
        config: How to answer.
        host: The interface to listen on.
        port: The TCP port; 0 picks a free one.
        on_ready: Called with the base URL once the server accepts connections.
        fast: Serve from the minimal HTTP server (see ``start_simulator``).

    Raises:
        OSError: The server could not listen (for example, the port is taken).
    """

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Without loop signal handlers (Windows), Ctrl-C ends the runner with
            # KeyboardInterrupt, which is suppressed below.
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        async with start_simulator(config, host=host, port=port, fast=fast) as handle:
            if on_ready is not None:
                on_ready(handle.base_url)
            await stop.wait()

    try:
        import uvloop  # optional: the "fast" extra
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=factory) as runner,
    ):
        runner.run(serve())
