"""Plain data carried between the stages of a run: prompts in, results out.

No I/O and no behaviour beyond small derived values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .config import Endpoint

__all__ = ["AttemptLog", "JSONObject", "PromptRecord", "Result", "Usage"]

JSONObject = dict[str, Any]


# Usage, PromptRecord and Result are made once per row on the hot path, and a
# frozen dataclass sets each field through object.__setattr__: 2.3 us more per
# Result (measured when it had 21 fields), 0.35 us more per Usage. So they are
# plain slotted dataclasses, treated as immutable by convention.


@dataclass(slots=True)
class Usage:
    """Token counts as the server reported them; ``None`` when it reported none."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    @classmethod
    def from_response(cls, data: JSONObject) -> Usage:
        """Read the ``usage`` object of a response body, tolerating its absence."""
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return cls()
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        total = usage.get("total_tokens")
        if type(prompt) is type(completion) is type(total) is int:
            return cls(prompt, completion, total)  # the usual case, checked at once
        return cls(_int_or_none(prompt), _int_or_none(completion), _int_or_none(total))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(slots=True)
class PromptRecord:
    """One request to make.

    Attributes:
        id: The stable row id (a string).
        endpoint: ``completions`` or ``chat``.
        body: The JSON request body, model included.
        prompt: The rendered prompt, or the messages as JSON text.
        extra: Input columns to carry into the result (``--keep-columns``).
        request_hash: A 64-bit hash of endpoint and payload; resume re-runs a
            row whose request changed since it was answered.
        variant: The sweep cell this request belongs to, if any.
        payload: ``body`` encoded as sent (``payload.encode_body``); empty
            for a record built only to be checked, which is never sent.
        row: The row's position in the input, from 0, counted through every
            input file in order.
    """

    id: str
    endpoint: Endpoint
    body: JSONObject
    prompt: str
    extra: JSONObject | None = None
    request_hash: int = 0
    variant: str | None = None
    payload: bytes = b""
    row: int | None = None

    @property
    def model(self) -> str:
        """The model named in the body."""
        return str(self.body.get("model", ""))


@dataclass(slots=True)
class AttemptLog:
    """What happened across one row's attempts, beyond its final outcome.

    ``billed_*`` count the usage of every response the server reported,
    including ones that were discarded and retried. ``first_sent`` is when the
    first attempt went out (the caller's monotonic clock): a row's latency and
    its retry time count from there.
    """

    attempts: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    malformed: int = 0
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0
    first_sent: float = 0.0

    def bill(self, usage: Usage) -> None:
        """Count a response's reported usage."""
        self.billed_prompt_tokens += usage.prompt_tokens or 0
        self.billed_completion_tokens += usage.completion_tokens or 0


@dataclass(slots=True)
class Result:
    """The outcome of one record; ``sinks.result_row`` makes it a results row.

    It keeps its record rather than copies of seven of its fields, and a
    success keeps the answer as it came (``body`` parsed, ``response`` the
    bytes received), whose choices are read once, when the row is made. A
    request cost 562.3 thousand instructions so, against 566.7 thousand with
    every field copied into a Result of 20 (callgrind, 2,000 and 6,000 rows
    at concurrency 64).

    Attributes:
        record: The request this answers.
        status: ``ok`` or ``error``.
        usage: What the last answer reported.
        http_status: The last answer's status, if one came.
        attempts: Attempts made.
        latency_s: From the first attempt's start to the end.
        started_at: Epoch seconds.
        finished_at: Epoch seconds.
        error: Why it failed (``Type: message``); ``None`` for a success.
        body: A success's parsed answer.
        response: The raw answer: the bytes received for a success, or the
            error body's text (scrubbed, cut short) for a failure.
        log: What the retries met, when there were any.
    """

    record: PromptRecord
    status: str
    usage: Usage
    http_status: int | None
    attempts: int
    latency_s: float
    started_at: float
    finished_at: float
    error: str | None = None
    body: JSONObject | None = None
    response: bytes | str | None = None
    log: AttemptLog | None = None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.status == "ok"

    def choices(self) -> list[JSONObject] | None:
        """Every choice of a success as ``{index, text, finish_reason}``."""
        if self.body is None:
            return None
        return _read_choices(self.body, self.record.endpoint == "chat")

    def reasoning(self) -> str | None:
        """The first choice's reasoning, where the server returns a reasoning
        model's thinking apart from its answer: ``reasoning_content`` (as
        DeepSeek's API and vLLM name it) or ``reasoning`` (as OpenRouter
        does). Kept only in the raw response, ``--no-raw`` lost it."""
        message = self._message()
        text = message.get("reasoning_content") or message.get("reasoning")
        return text if isinstance(text, str) else None

    def tool_calls(self) -> str | None:
        """The first choice's ``tool_calls``, as JSON text: a chat answer
        that calls a tool has no content, so ``--no-raw`` lost the answer."""
        calls = self._message().get("tool_calls")
        return orjson.dumps(calls).decode() if calls else None

    def _message(self) -> JSONObject:
        """A chat success's first message; empty for anything else."""
        if self.record.endpoint != "chat":
            return _NO_CHOICE
        message = _first_choice(self.body).get("message")
        return message if isinstance(message, dict) else _NO_CHOICE

    def logprobs(self) -> str | None:
        """The first choice's ``logprobs``, as JSON text: their shape differs
        between completions and chat answers, and from server to server."""
        found = _first_choice(self.body).get("logprobs")
        return None if found is None else orjson.dumps(found).decode()


_NO_CHOICE: JSONObject = {}  # read only


def _first_choice(body: JSONObject | None) -> JSONObject:
    """A success's first choice (its ``choices`` were checked to be a list
    when it arrived); empty when there is none."""
    if body is None:
        return _NO_CHOICE
    choices = body["choices"]
    first = choices[0] if choices else None
    return first if isinstance(first, dict) else _NO_CHOICE


def _read_choices(data: JSONObject, chat: bool) -> list[JSONObject]:
    """The ``choices`` of an answer body (checked to be a list) as
    ``{index, text, finish_reason}``: the message content for chat."""
    choices: list[JSONObject] = []
    for index, choice in enumerate(data["choices"]):
        if not isinstance(choice, dict):
            continue
        if chat:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        position = choice.get("index")
        reason = choice.get("finish_reason")
        choices.append(
            {
                "index": position if isinstance(position, int) else index,
                "text": text if isinstance(text, str) else None,
                "finish_reason": reason if isinstance(reason, str) else None,
            }
        )
    return choices
