"""Turn one input row into one request: id, endpoint, body and prompt text.

Pure functions of the row and the ``RequestOptions``: no I/O, no network. Errors
are ``InputError``s that name the field; the caller adds the file and line.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from .config import STREAM_UNSUPPORTED, Endpoint, RequestOptions, Variant
from .errors import ConfigError, InputError
from .jsontext import kind_of
from .records import JSONObject, PromptRecord

if TYPE_CHECKING:
    import jinja2

__all__ = [
    "RequestBuilder",
    "TokenEstimator",
    "cells",
    "columns_of",
    "endpoint_from_url",
    "is_batch_row",
    "listed",
    "request_hash",
    "text_hint",
]

_UNDEFINED = re.compile(r"'([^']+)' is undefined")
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})


def is_batch_row(row: Mapping[str, Any]) -> bool:
    """Whether a row is an OpenAI Batch API input line."""
    return "body" in row and "custom_id" in row


def endpoint_from_url(url: object) -> Endpoint:
    """Map a batch line's ``url`` to an endpoint.

    Raises:
        InputError: The URL names neither completions endpoint.
    """
    if isinstance(url, str):
        path = url.split("?", 1)[0].rstrip("/")
        if path.endswith("/chat/completions"):
            return "chat"
        if path.endswith("/completions"):
            return "completions"
    raise InputError(
        f"url must be /v1/completions or /v1/chat/completions, got {url!r}", field="url"
    )


def encode_body(body: JSONObject) -> bytes:
    """The request body as sent: JSON with its keys sorted, so that equal
    requests are equal bytes whatever order their keys came in."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def request_hash(endpoint: Endpoint, payload: bytes) -> int:
    """A stable 64-bit hash of what is sent (``payload`` from ``encode_body``):
    BLAKE2b-64 of the endpoint, a NUL byte and the payload."""
    hasher = _HASHERS[endpoint].copy()
    hasher.update(payload)
    value: int = _UNPACK_INT64(hasher.digest())[0]
    return value


def _prefixed_hasher(endpoint: str) -> hashlib.blake2b:
    hasher = hashlib.blake2b(digest_size=8)
    hasher.update(endpoint.encode() + b"\0")
    return hasher


# Copying a hasher that has taken the prefix already gives the same digest as
# hashing prefix and payload afresh, in 4.3 instead of 7.5 thousand
# instructions a row (callgrind); the reader hashes every request.
_HASHERS = {
    endpoint: _prefixed_hasher(endpoint) for endpoint in ("completions", "chat")
}
_UNPACK_INT64 = struct.Struct("<q").unpack


def _record(
    row_id: str,
    endpoint: Endpoint,
    body: JSONObject,
    prompt: str,
    extra: JSONObject | None,
    hashed: bool,
) -> PromptRecord:
    if not hashed:  # only checked, never sent
        return PromptRecord(row_id, endpoint, body, prompt, extra)
    # Encoded once, here: the same bytes are hashed and sent.
    payload = encode_body(body)
    digest = request_hash(endpoint, payload)
    return PromptRecord(row_id, endpoint, body, prompt, extra, digest, payload=payload)


def _not_a_string(value: object, field: str) -> InputError:
    hint = ": store the column as strings" if isinstance(value, bytes) else ""
    return InputError(f"must be a string, got {kind_of(value)}{hint}", field=field)


_ID_FIELDS = ("id", "custom_id")


def _text_fields(row: Mapping[str, Any], opts: RequestOptions) -> str:
    """A hint naming the row's text fields, for a row without the prompt's:
    datasets often call it ``text``, ``question`` or ``instruction``."""
    return text_hint([k for k, v in row.items() if isinstance(v, str)], opts)


def text_hint(names: list[str], opts: RequestOptions) -> str:
    """`` (it has text in ...: name it with --prompt-column ...)``, naming the
    text fields or columns ``names`` other than the id; empty if none."""
    ids = (*_ID_FIELDS, opts.id_column)
    names = [name for name in names if name not in ids]
    if not names:
        return ""
    if len(names) == 1:
        return (
            f" (it has text in {names[0]!r}: name it with --prompt-column"
            f" {names[0]}, or build a prompt with --template)"
        )
    return (
        f" (it has text in {listed(names, 5)}: pick one with --prompt-column,"
        " or combine them with --template)"
    )


def listed(names: Iterable[str], limit: int | None = None) -> str:
    """``'a', 'b', ...``: the names quoted, the first ``limit`` of them."""
    names = list(names)
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (", ..." if limit is not None and len(names) > limit else "")


def _check_messages(messages: object, field: str) -> list[JSONObject]:
    if not isinstance(messages, list) or not messages:
        hint = ""
        if isinstance(messages, str):  # JSON text, as a CSV-made Parquet holds it
            hint = ", got text: store the list itself, not its JSON"
        raise InputError(
            f"must be a non-empty list of {{role, content}}{hint}", field=field
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(
                f"message {index} must be an object with a role", field=field
            )
        if message["role"] not in _ROLES:
            raise InputError(
                f"message {index} has unknown role {message['role']!r}", field=field
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InputError(f"message {index} content must be text", field=field)
    return messages


class RequestBuilder:
    """Builds ``PromptRecord``s from rows, following ``RequestOptions``.

    Args:
        options: How rows become requests.

    Raises:
        ConfigError: The template does not compile.
    """

    def __init__(self, options: RequestOptions) -> None:
        self.options = options
        self._params = dict(options.params)
        self._chat_params = _for_chat(self._params)
        self._template: jinja2.Template | None = None
        self._undefined_error: type[Exception] = Exception
        self.template_fields: frozenset[str] = frozenset()
        # A row with a text prompt needs no check beyond its type when there
        # is no template and the model is known: the scan's check then costs
        # a dict lookup instead of building a request (about 7 of its 21 thousand
        # instructions a row, measured with callgrind).
        self._plain = options.template is None and bool(options.model)
        self._prompt_column = options.prompt_column
        # Whether a row's messages column can turn its request into a chat one.
        self._messages_matter = options.endpoint == "chat"
        if options.template is not None:
            # Imported only for templated runs: 30 ms of start-up otherwise.
            import jinja2
            import jinja2.meta
            from jinja2.sandbox import SandboxedEnvironment

            self._undefined_error = jinja2.UndefinedError
            env = SandboxedEnvironment(
                undefined=jinja2.StrictUndefined,
                keep_trailing_newline=True,
                autoescape=False,
            )
            try:
                self.template_fields = frozenset(
                    jinja2.meta.find_undeclared_variables(env.parse(options.template))
                )
                self._template = env.from_string(options.template)
            except jinja2.TemplateSyntaxError as exc:
                raise ConfigError(f"template line {exc.lineno}: {exc.message}") from exc

    def columns(self) -> set[str]:
        """The input columns a row may need; Parquet reads only these."""
        opts = self.options
        wanted = {opts.prompt_column, opts.messages_column, "id", "custom_id"}
        wanted.update(("body", "url", "method"))
        wanted.update(self.template_fields)
        wanted.update(opts.keep_columns)
        if opts.id_column is not None:
            wanted.add(opts.id_column)
        return wanted

    def row_id(self, row: Mapping[str, Any], position: int) -> str:
        """The row's id as a string.

        Args:
            row: The input row.
            position: Its 0-based position across all inputs.

        Raises:
            InputError: The id column is missing or holds a non-scalar.
        """
        column = self.options.id_column
        if column is not None:
            value = row.get(column)
            if value is None:
                raise InputError("id column is missing", field=column)
        else:
            value = row.get("id")
            column = "id"
            if value is None:
                value = row.get("custom_id")
                column = "custom_id"
            if value is None:
                return str(position)
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise InputError(f"id must be a string or number, got {value!r}", field=column)

    def is_positional(self, row: Mapping[str, Any]) -> bool:
        """Whether ``row_id`` falls back to the row's position for this row."""
        if self.options.id_column is not None:
            return False
        return row.get("id") is None and row.get("custom_id") is None

    def check(self, row: Mapping[str, Any]) -> None:
        """Validate a row cheaply, without rendering its template."""
        if (
            self._plain
            and isinstance(row.get(self._prompt_column), str)
            and not (
                self._messages_matter
                and row.get(self.options.messages_column) is not None
            )
            and not is_batch_row(row)
        ):
            return  # build() would succeed
        if self._template is not None and not is_batch_row(row):
            self._model()  # a templated row names no model of its own
            for name in self.template_fields:
                if name not in row:
                    raise InputError(
                        "column used by the template is missing"
                        f" (the row has {listed(row, 8) or 'no fields'})",
                        field=name,
                    )
            return
        self.build(row, "", hashed=False)

    def build(
        self, row: Mapping[str, Any], row_id: str, *, hashed: bool = True
    ) -> PromptRecord:
        """Make the request for one row.

        Args:
            row: The input row.
            row_id: Its id.
            hashed: Encode the body and compute ``request_hash``; the scan's
                checks, whose records are never sent, skip both.

        Raises:
            InputError: The row lacks what its request needs.
        """
        opts = self.options
        if is_batch_row(row):
            return self._build_batch(row, row_id, hashed)
        if self._template is not None:
            try:
                text = self._template.render(row)
            except self._undefined_error as exc:
                message = str(exc)
                name = _UNDEFINED.match(message)
                raise InputError(
                    f"template: {message}", field=name.group(1) if name else None
                ) from exc
            except Exception as exc:
                # The template is user code: whatever it raises (TypeError,
                # ZeroDivisionError, a sandbox refusal) is this row's failure.
                raise InputError(
                    f"template failed: {type(exc).__name__}: {exc}"
                ) from exc
            if opts.endpoint == "chat":
                user = [{"role": "user", "content": text}]
                return self._chat(row, row_id, user, hashed)
            return self._completion(row, row_id, text, hashed)
        prompt = row.get(opts.prompt_column)
        messages = row.get(opts.messages_column)
        endpoint = opts.endpoint
        if endpoint is None:
            endpoint = "completions" if prompt is not None else "chat"
        if endpoint == "chat":
            if messages is not None:
                checked = _check_messages(messages, opts.messages_column)
                return self._chat(row, row_id, checked, hashed)
            if isinstance(prompt, str):
                user = [{"role": "user", "content": prompt}]
                return self._chat(row, row_id, user, hashed)
            if prompt is None:
                if opts.prompt_column in row:
                    raise InputError(
                        f"is null, and the row has no {opts.messages_column!r}",
                        field=opts.prompt_column,
                    )
                raise InputError(
                    f"row has neither {opts.prompt_column!r}"
                    f" nor {opts.messages_column!r}{_text_fields(row, opts)}"
                )
            raise _not_a_string(prompt, opts.prompt_column)
        if not isinstance(prompt, str):
            if prompt is None and messages is not None:
                raise InputError(
                    "holds chat messages but --endpoint is completions; "
                    "use --endpoint chat or a --template",
                    field=opts.messages_column,
                )
            if prompt is None:
                if opts.prompt_column in row:
                    raise InputError("is null", field=opts.prompt_column)
                raise InputError(
                    f"is missing{_text_fields(row, opts)}", field=opts.prompt_column
                )
            raise _not_a_string(prompt, opts.prompt_column)
        return self._completion(row, row_id, prompt, hashed)

    def _model(self, body_model: object = None) -> str:
        model = body_model if body_model is not None else self.options.model
        if not isinstance(model, str) or not model:
            raise InputError(
                "no model: pass --model or put one in the body", field="model"
            )
        return model

    def _extra(self, row: Mapping[str, Any]) -> JSONObject | None:
        keep = self.options.keep_columns
        if not keep:
            return None
        return {name: row.get(name) for name in keep}

    def _completion(
        self, row: Mapping[str, Any], row_id: str, prompt: str, hashed: bool
    ) -> PromptRecord:
        body: JSONObject = {"model": self._model(), "prompt": prompt, **self._params}
        return _record(row_id, "completions", body, prompt, self._extra(row), hashed)

    def _chat(
        self,
        row: Mapping[str, Any],
        row_id: str,
        messages: list[JSONObject],
        hashed: bool,
    ) -> PromptRecord:
        system = self.options.system
        if system is not None and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}, *messages]
        body: JSONObject = {
            "model": self._model(),
            "messages": messages,
            **self._chat_params,
        }
        text = orjson.dumps(messages).decode()
        return _record(row_id, "chat", body, text, self._extra(row), hashed)

    def _build_batch(
        self, row: Mapping[str, Any], row_id: str, hashed: bool
    ) -> PromptRecord:
        method = row.get("method", "POST")
        if method != "POST":
            raise InputError(f"method must be POST, got {method!r}", field="method")
        endpoint = endpoint_from_url(row.get("url"))
        given = row.get("body")
        if not isinstance(given, dict):
            raise InputError("must be a JSON object", field="body")
        if given.get("stream"):
            raise InputError(STREAM_UNSUPPORTED, field="body.stream")
        # Fields in the batch body win over command-line parameters.
        # A body naming its own logprobs gets no top_logprobs from --logprobs.
        chat = endpoint == "chat" and "logprobs" not in given
        params = self._chat_params if chat else self._params
        body: JSONObject = {**params, **given}
        body["model"] = self._model(given.get("model"))
        if endpoint == "chat":
            messages = _check_messages(body.get("messages"), "body.messages")
            text = orjson.dumps(messages).decode()
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise _not_a_string(prompt, "body.prompt")
            text = prompt
        return _record(row_id, endpoint, body, text, self._extra(row), hashed)


def _for_chat(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` as the chat API takes them: there, ``logprobs`` is a switch
    and ``top_logprobs`` the number of alternatives, where completions take
    the number as ``logprobs``. Sent as given, ``--logprobs 2`` failed every
    chat row with a 400 or 422."""
    number = params.get("logprobs")
    if not isinstance(number, int) or isinstance(number, bool):
        return dict(params)
    return {"top_logprobs": number, **params, "logprobs": True}


# Before any usage is seen: English text runs about four characters a token.
DEFAULT_CHARS_PER_TOKEN = 4.0
DEFAULT_COMPLETION_TOKENS = 256


class TokenEstimator:
    """Estimates a request's prompt and completion tokens, offline.

    Prompt tokens come from the text length and a characters-per-token ratio
    learned from the usage the server reports; completion tokens are
    ``max_tokens * n`` when given, else the running mean seen so far.
    """

    __slots__ = ("_chars", "_completion", "_replies", "_tokens")

    def __init__(self) -> None:
        self._chars = 0
        self._tokens = 0
        self._completion = 0
        self._replies = 0

    @property
    def chars_per_token(self) -> float:
        """The learned ratio (the default until usage has been seen)."""
        if self._tokens < 100:
            return DEFAULT_CHARS_PER_TOKEN
        return self._chars / self._tokens

    def prompt_tokens(self, record: PromptRecord) -> int:
        """Estimated prompt tokens."""
        return max(1, math.ceil(_text_length(record) / self.chars_per_token))

    def completion_tokens(self, record: PromptRecord) -> int:
        """Reserved completion tokens."""
        body = record.body
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        n = body.get("n", 1)
        n = n if isinstance(n, int) and n > 0 else 1
        if isinstance(limit, int) and limit > 0:
            return limit * n
        if self._replies:
            return math.ceil(self._completion / self._replies)
        return DEFAULT_COMPLETION_TOKENS * n

    def observe(
        self,
        record: PromptRecord,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """Learn from one response's reported usage."""
        if prompt_tokens:
            self._chars += _text_length(record)
            self._tokens += prompt_tokens
        if completion_tokens is not None:
            self._completion += completion_tokens
            self._replies += 1


# What an image part of a message counts for, in characters: OpenAI counts a
# low-detail image as 85 tokens.
_IMAGE_CHARS = int(85 * DEFAULT_CHARS_PER_TOKEN)


def _text_length(record: PromptRecord) -> int:
    """The length of a request's prompt for estimating its tokens.

    Multimodal chat content (a list of parts) counts its text, and each other
    part (an image) as ``_IMAGE_CHARS``: counted as its base64 data, an image
    of 1 MB was 250,000 tokens, more than many a whole minute's budget, and
    the row failed as too large. Other prompts count their text as sent.
    """
    messages = record.body.get("messages") if record.endpoint == "chat" else None
    if not isinstance(messages, list):
        return len(record.prompt)
    total, multimodal = 0, False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            multimodal = True
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                total += len(text) if isinstance(text, str) else _IMAGE_CHARS
    return total if multimodal else len(record.prompt)


def columns_of(builders: Iterable[RequestBuilder]) -> set[str]:
    """The input columns any of ``builders`` may need: what Parquet reads."""
    return set().union(*(builder.columns() for builder in builders))


def cells(
    base: RequestOptions, variants: tuple[Variant, ...]
) -> list[tuple[Variant | None, RequestBuilder]]:
    """One builder per sweep cell; a run without a sweep is one cell.

    Raises:
        ConfigError: A variant's template does not compile.
    """
    if not variants:
        return [(None, RequestBuilder(base))]
    return [(variant, RequestBuilder(variant.apply(base))) for variant in variants]
