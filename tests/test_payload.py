"""Tests for ``batchrun.payload``: rows in, request records out."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from batchrun.config import RequestOptions
from batchrun.errors import ConfigError, InputError
from batchrun.payload import (
    RequestBuilder,
    TokenEstimator,
    endpoint_from_url,
    is_batch_row,
)


def _builder(**options: Any) -> RequestBuilder:
    options.setdefault("model", "m")
    return RequestBuilder(RequestOptions(**options))


def _batch_row(
    body: dict[str, Any],
    *,
    url: str = "/v1/chat/completions",
    custom_id: str = "req-1",
    **extra: Any,
) -> dict[str, Any]:
    return {"custom_id": custom_id, "url": url, "body": body, **extra}


# --- endpoint inference and forcing -------------------------------------------


def test_prompt_row_is_a_completion() -> None:
    """A row with a prompt becomes a completions request with model and prompt."""
    record = _builder().build({"prompt": "Say hi"}, "r1")
    assert record.id == "r1"
    assert record.endpoint == "completions"
    assert record.body == {"model": "m", "prompt": "Say hi"}
    assert record.prompt == "Say hi"
    assert record.extra is None


def test_messages_row_is_a_chat() -> None:
    """A row with messages becomes a chat request carrying those messages."""
    messages = [{"role": "user", "content": "Hello"}]
    record = _builder().build({"messages": messages}, "r1")
    assert record.endpoint == "chat"
    assert record.body == {"model": "m", "messages": messages}
    assert orjson.loads(record.prompt) == messages


def test_custom_prompt_and_messages_columns() -> None:
    """prompt_column and messages_column name the fields that are read."""
    builder = _builder(prompt_column="text", messages_column="conv")
    assert builder.build({"text": "a"}, "1").body["prompt"] == "a"
    conv = [{"role": "user", "content": "b"}]
    assert builder.build({"conv": conv}, "2").body["messages"] == conv


def test_forced_chat_wraps_prompt_as_user_message() -> None:
    """endpoint='chat' turns a prompt row into a single user message."""
    record = _builder(endpoint="chat").build({"prompt": "Say hi"}, "r1")
    assert record.endpoint == "chat"
    assert record.body["messages"] == [{"role": "user", "content": "Say hi"}]
    assert "prompt" not in record.body


def test_forced_completions_rejects_messages_row() -> None:
    """endpoint='completions' with a messages-only row is an InputError on messages."""
    builder = _builder(endpoint="completions")
    with pytest.raises(InputError) as info:
        builder.build({"messages": [{"role": "user", "content": "x"}]}, "r1")
    assert info.value.field == "messages"


def test_row_without_prompt_or_messages_is_rejected() -> None:
    """A row with neither prompt nor messages is an InputError."""
    with pytest.raises(InputError) as info:
        _builder().build({"other": 1}, "r1")
    assert info.value.reason == "row has neither 'prompt' nor 'messages'"


@pytest.mark.parametrize(
    ("row", "hint"),
    [
        (
            {"id": "a", "text": "Hello", "n": 1},
            " (it has text in 'text': name it with --prompt-column text, or build"
            " a prompt with --template)",
        ),
        (
            {"id": "a", "question": "Why?", "context": "Because."},
            " (it has text in 'question', 'context': pick one with"
            " --prompt-column, or combine them with --template)",
        ),
    ],
)
def test_a_row_without_a_prompt_names_its_text_fields(
    row: dict[str, object], hint: str
) -> None:
    """Datasets often call the prompt text, question or instruction: the error
    names the row's text fields (not its id) and the option that reads one."""
    with pytest.raises(InputError) as info:
        _builder().build(row, "r1")
    assert info.value.reason == f"row has neither 'prompt' nor 'messages'{hint}"
    with pytest.raises(InputError) as info:
        _builder(endpoint="completions").build(row, "r1")
    assert info.value.field == "prompt"
    assert info.value.reason == f"is missing{hint}"


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [(None, "is null, and the row has no 'messages'"), ("completions", "is null")],
)
def test_null_prompt_is_named_as_null(endpoint: str | None, message: str) -> None:
    """A prompt column holding null (a Parquet gap) is named as null, not as
    a row without a prompt."""
    with pytest.raises(InputError) as info:
        _builder(endpoint=endpoint).build({"prompt": None}, "r1")
    assert info.value.reason == message
    assert info.value.field == "prompt"


@pytest.mark.parametrize(
    ("prompt", "got"),
    [
        (5, "got a number"),
        (["a"], "got an array"),
        (b"hi", "got binary data: store the column as strings"),
    ],
)
def test_non_string_prompt_is_rejected(prompt: object, got: str) -> None:
    """A prompt that is not a string is an InputError naming the prompt field
    and what it holds instead."""
    with pytest.raises(InputError) as info:
        _builder().build({"prompt": prompt}, "r1")
    assert info.value.field == "prompt"
    assert info.value.reason == f"must be a string, {got}"


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"content": "no role"}], [{"role": "wizard", "content": "x"}]],
)
def test_invalid_messages_are_rejected(messages: object) -> None:
    """Empty, non-list, role-less or unknown-role messages are InputErrors."""
    with pytest.raises(InputError) as info:
        _builder().build({"messages": messages}, "r1")
    assert info.value.field == "messages"


def test_missing_model_is_rejected() -> None:
    """Without options.model a plain row is an InputError on field model."""
    builder = RequestBuilder(RequestOptions())
    with pytest.raises(InputError) as info:
        builder.build({"prompt": "x"}, "r1")
    assert info.value.field == "model"


# --- system message -----------------------------------------------------------


def test_system_message_goes_first() -> None:
    """The system option is prepended to the chat messages."""
    messages = [{"role": "user", "content": "Hi"}]
    record = _builder(system="Be brief.").build({"messages": messages}, "r1")
    assert record.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_system_message_first_for_forced_chat_prompt() -> None:
    """A prompt wrapped for chat also gets the system message first."""
    record = _builder(endpoint="chat", system="S").build({"prompt": "P"}, "r1")
    assert record.body["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "P"},
    ]


def test_system_message_not_doubled() -> None:
    """A row that already starts with a system message keeps only its own."""
    messages = [
        {"role": "system", "content": "Row system"},
        {"role": "user", "content": "Hi"},
    ]
    record = _builder(system="Option system").build({"messages": messages}, "r1")
    assert record.body["messages"] == messages


def test_system_ignored_for_completions() -> None:
    """The system option does not change a completions body."""
    record = _builder(system="S").build({"prompt": "P"}, "r1")
    assert record.body == {"model": "m", "prompt": "P"}


# --- templates ----------------------------------------------------------------


def test_template_renders_columns() -> None:
    """The template is rendered with the row's columns into the prompt."""
    builder = _builder(template="Translate {{ text }} to {{ lang }}.")
    record = builder.build({"text": "cat", "lang": "French"}, "r1")
    assert record.endpoint == "completions"
    assert record.body["prompt"] == "Translate cat to French."
    assert record.prompt == "Translate cat to French."


def test_template_with_chat_endpoint_is_a_user_message() -> None:
    """With endpoint='chat' the rendered template becomes the user message."""
    builder = _builder(template="Q: {{ q }}", endpoint="chat", system="S")
    record = builder.build({"q": "why?"}, "r1")
    assert record.body["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q: why?"},
    ]


def test_template_missing_column_names_the_field() -> None:
    """Rendering with an undefined column is an InputError whose field is it."""
    builder = _builder(template="Hello {{ name }}")
    with pytest.raises(InputError) as info:
        builder.build({"other": 1}, "r1")
    assert "name" in str(info.value)
    assert info.value.field == "name", (
        f"InputError.field should name the missing template column, "
        f"got {info.value.field!r} ({info.value})"
    )


def test_template_runtime_python_error_is_input_error() -> None:
    """A template that fails on a row's values gives an InputError, not a crash."""
    builder = _builder(template="{{ count + 1 }}")
    assert builder.build({"count": 1}, "r1").body["prompt"] == "2"
    with pytest.raises(InputError):
        builder.build({"count": "one"}, "r2")


def test_messages_held_as_json_text_are_named_as_such() -> None:
    """Messages stored as JSON text (as a CSV-made Parquet file has them) are
    refused with a hint, not just 'must be a list'."""
    row = {"messages": '[{"role": "user", "content": "hi"}]'}
    with pytest.raises(InputError, match="got text: store the list itself") as info:
        _builder(model="m").build(row, "r1")
    assert info.value.field == "messages"


def test_check_catches_missing_template_column() -> None:
    """check() reports a column the template uses but the row lacks."""
    builder = _builder(template="{{ a }} and {{ b }}")
    builder.check({"a": 1, "b": 2})
    with pytest.raises(InputError) as info:
        builder.check({"a": 1})
    assert info.value.field == "b"


def test_check_does_not_render() -> None:
    """check() only looks at column names: a row that fails to render passes it."""
    builder = _builder(template="{{ a.missing_attribute }}")
    row = {"a": "text"}
    builder.check(row)
    with pytest.raises(InputError):
        builder.build(row, "r1")


def test_template_syntax_error_is_config_error() -> None:
    """A template that does not compile is a ConfigError at construction."""
    with pytest.raises(ConfigError, match="template line 1"):
        _builder(template="Hello {{ name ")


def test_template_sandbox_blocks_internals() -> None:
    """A template reaching for Python internals raises InputError, exposing nothing."""
    builder = _builder(template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(InputError, match="unsafe") as info:
        builder.build({}, "r1")
    assert "<class" not in str(info.value)


def test_template_fields_and_columns() -> None:
    """columns() lists template fields, keep columns and the id column."""
    builder = _builder(
        template="{{ title }}: {{ body_text }}",
        keep_columns=("lang", "source"),
        id_column="uid",
    )
    assert builder.template_fields == frozenset({"title", "body_text"})
    columns = builder.columns()
    assert {"title", "body_text", "lang", "source", "uid"} <= columns
    assert {"prompt", "messages", "id", "custom_id", "body", "url"} <= columns
    assert "unrelated" not in columns


# --- params -------------------------------------------------------------------


def test_params_go_into_the_body() -> None:
    """Extra params are merged into completions and chat bodies."""
    builder = _builder(params={"temperature": 0.5, "max_tokens": 16})
    completion = builder.build({"prompt": "x"}, "1").body
    assert completion == {
        "model": "m",
        "prompt": "x",
        "temperature": 0.5,
        "max_tokens": 16,
    }
    chat = builder.build({"messages": [{"role": "user", "content": "x"}]}, "2").body
    assert chat["temperature"] == 0.5
    assert chat["max_tokens"] == 16


@pytest.mark.parametrize(
    ("params", "chat"),
    [
        ({"logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
        ({"logprobs": 0}, {"logprobs": True, "top_logprobs": 0}),
        ({"logprobs": 3, "top_logprobs": 1}, {"logprobs": True, "top_logprobs": 1}),
        ({"logprobs": True}, {"logprobs": True}),
    ],
)
def test_logprobs_take_the_chat_apis_form_in_chat_requests(
    params: dict[str, Any], chat: dict[str, Any]
) -> None:
    """--logprobs N is the number for completions; chat takes a switch and
    top_logprobs (sent as N, every chat row failed); a batch row's own body
    is sent as it is."""
    builder = _builder(params=params)
    completion = builder.build({"prompt": "x"}, "1").body
    assert {k: v for k, v in completion.items() if "logprobs" in k} == params
    messages = [{"role": "user", "content": "x"}]
    body = builder.build({"messages": messages}, "2").body
    assert {k: v for k, v in body.items() if "logprobs" in k} == chat
    batch = builder.build(_batch_row({"messages": messages}), "3").body
    assert {k: v for k, v in batch.items() if "logprobs" in k} == chat


def test_a_batch_row_that_asks_to_stream_is_refused() -> None:
    """A streamed answer is not one JSON body: such a row failed as malformed
    after eight attempts, each one generated and billed."""
    row = _batch_row({"messages": [{"role": "user", "content": "x"}], "stream": True})
    with pytest.raises(InputError, match="streaming is not supported") as info:
        _builder().check(row)
    assert info.value.field == "body.stream"
    row["body"]["stream"] = False
    _builder().check(row)


def test_a_batch_bodys_own_logprobs_get_no_top_logprobs() -> None:
    """A batch row's body naming logprobs wins whole: false with a
    top_logprobs from --logprobs would be refused."""
    row = _batch_row(
        {"messages": [{"role": "user", "content": "x"}], "logprobs": False}
    )
    body = _builder(params={"logprobs": 3}).build(row, "1").body
    assert {k: v for k, v in body.items() if "logprobs" in k} == {"logprobs": False}


# --- batch rows ---------------------------------------------------------------


def test_is_batch_row() -> None:
    """A row is a batch line only with both custom_id and body."""
    assert is_batch_row({"custom_id": "a", "body": {}})
    assert not is_batch_row({"custom_id": "a"})
    assert not is_batch_row({"body": {}})
    assert not is_batch_row({"prompt": "x"})


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("https://api.example.com/v1/chat/completions/", "chat"),
        ("/v1/completions?x=1", "completions"),
    ],
)
def test_endpoint_from_url(url: str, endpoint: str) -> None:
    """The batch url's path decides the endpoint."""
    assert endpoint_from_url(url) == endpoint


@pytest.mark.parametrize("url", ["/v1/embeddings", None, 3])
def test_endpoint_from_url_rejects_others(url: object) -> None:
    """Any other url is an InputError on field url."""
    with pytest.raises(InputError) as info:
        endpoint_from_url(url)
    assert info.value.field == "url"


def test_batch_body_fields_win_over_params() -> None:
    """A batch body's own fields override params; other params are added."""
    builder = _builder(params={"temperature": 0.1, "top_p": 0.9})
    messages = [{"role": "user", "content": "x"}]
    row = _batch_row({"model": "body-model", "messages": messages, "temperature": 0.7})
    record = builder.build(row, "req-1")
    assert record.endpoint == "chat"
    assert record.body["temperature"] == 0.7
    assert record.body["top_p"] == 0.9
    assert record.body["model"] == "body-model"


def test_batch_row_uses_options_model_when_body_has_none() -> None:
    """A batch body without a model gets options.model."""
    row = _batch_row({"prompt": "x"}, url="/v1/completions")
    record = _builder(model="opt-model").build(row, "req-1")
    assert record.endpoint == "completions"
    assert record.body == {"prompt": "x", "model": "opt-model"}
    assert record.prompt == "x"


def test_batch_url_decides_endpoint_over_forced_endpoint() -> None:
    """The url of a batch line decides the endpoint, whatever options.endpoint is."""
    row = _batch_row({"prompt": "x"}, url="/v1/completions")
    record = _builder(endpoint="chat").build(row, "req-1")
    assert record.endpoint == "completions"
    assert "messages" not in record.body


def test_batch_row_method_must_be_post() -> None:
    """A batch line with a method other than POST is rejected on field method."""
    row = _batch_row({"prompt": "x"}, url="/v1/completions", method="GET")
    with pytest.raises(InputError) as info:
        _builder().build(row, "req-1")
    assert info.value.field == "method"


def test_batch_row_explicit_post_is_accepted() -> None:
    """method='POST' is accepted."""
    row = _batch_row({"prompt": "x"}, url="/v1/completions", method="POST")
    assert _builder().build(row, "req-1").endpoint == "completions"


def test_batch_row_without_any_model_is_rejected() -> None:
    """No model in the body and options.model None is an InputError on model."""
    row = _batch_row({"prompt": "x"}, url="/v1/completions")
    with pytest.raises(InputError) as info:
        RequestBuilder(RequestOptions()).build(row, "req-1")
    assert info.value.field == "model"


def test_batch_row_body_must_be_object() -> None:
    """A batch body that is not an object is rejected on field body."""
    row = _batch_row({}, url="/v1/completions") | {"body": "text"}
    with pytest.raises(InputError) as info:
        _builder().build(row, "req-1")
    assert info.value.field == "body"


def test_batch_row_checks_prompt_and_messages() -> None:
    """A batch body lacking its prompt or messages names body.prompt/body.messages."""
    with pytest.raises(InputError) as info:
        _builder().build(_batch_row({}, url="/v1/completions"), "a")
    assert info.value.field == "body.prompt"
    with pytest.raises(InputError) as info:
        _builder().build(_batch_row({}, url="/v1/chat/completions"), "b")
    assert info.value.field == "body.messages"


def test_check_validates_batch_rows() -> None:
    """check() runs the full build for batch rows, even with a template."""
    builder = _builder(template="{{ x }}")
    with pytest.raises(InputError) as info:
        builder.check(_batch_row({"prompt": "x"}, url="/v1/embeddings"))
    assert info.value.field == "url"


_CHECK_ROWS: list[dict[str, Any]] = [
    {"prompt": "hi"},
    {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]},
    {"prompt": "hi", "messages": "not a list"},
    {"prompt": "hi", "messages": []},
    {"prompt": 7},
    {"prompt": None},
    {"messages": [{"role": "user", "content": "x"}]},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"other": 1},
    _batch_row({"prompt": "hi"}, url="/v1/completions"),
    _batch_row({"messages": "x"}, prompt="hi"),
    {"prompt": "hi", "custom_id": "c", "body": {}},
]


def _outcome(action: Any) -> str | None:
    try:
        action()
    except InputError as exc:
        return f"{exc.field}: {exc.reason}"
    return None


@pytest.mark.parametrize("endpoint", [None, "completions", "chat"])
@pytest.mark.parametrize("model", ["m", None])
@pytest.mark.parametrize("row", _CHECK_ROWS, ids=range(len(_CHECK_ROWS)))
def test_check_rejects_exactly_the_rows_build_rejects(
    row: dict[str, Any], endpoint: str | None, model: str | None
) -> None:
    """Without a template, check() (with its shortcut for text prompts) fails
    on the same rows as build(), naming the same field and reason."""
    builder = _builder(endpoint=endpoint, model=model)
    expected = _outcome(lambda: builder.build(row, "r1"))
    assert _outcome(lambda: builder.check(row)) == expected


# --- ids ----------------------------------------------------------------------


def test_row_id_prefers_id_then_custom_id_then_position() -> None:
    """row_id takes id, else custom_id, else the position."""
    builder = _builder()
    assert builder.row_id({"id": "a", "custom_id": "b"}, 7) == "a"
    assert builder.row_id({"custom_id": "b"}, 7) == "b"
    assert builder.row_id({"prompt": "x"}, 7) == "7"
    assert builder.row_id({"id": None, "custom_id": "b"}, 7) == "b"


def test_row_id_from_id_column() -> None:
    """With id_column only that column counts; a missing one is an InputError."""
    builder = _builder(id_column="uid")
    assert builder.row_id({"uid": "u1", "id": "ignored"}, 0) == "u1"
    with pytest.raises(InputError) as info:
        builder.row_id({"id": "a"}, 0)
    assert info.value.field == "uid"


@pytest.mark.parametrize(("value", "expected"), [(42, "42"), (0, "0"), (1.5, "1.5")])
def test_numeric_ids_are_stringified(value: object, expected: str) -> None:
    """Integer and float ids become strings."""
    assert _builder().row_id({"id": value}, 99) == expected


@pytest.mark.parametrize("value", [["a", "b"], {"k": 1}, True])
def test_non_scalar_id_is_rejected(value: object) -> None:
    """A list, object or boolean id is an InputError naming the id field."""
    with pytest.raises(InputError) as info:
        _builder().row_id({"id": value}, 0)
    assert info.value.field == "id"


def test_list_custom_id_names_custom_id() -> None:
    """A bad custom_id is reported on field custom_id."""
    with pytest.raises(InputError) as info:
        _builder().row_id({"custom_id": [1]}, 0)
    assert info.value.field == "custom_id"


# --- keep_columns -------------------------------------------------------------


def test_keep_columns_become_extra() -> None:
    """keep_columns are copied into record.extra, missing ones as None."""
    builder = _builder(keep_columns=("lang", "absent"))
    record = builder.build({"prompt": "x", "lang": "de", "noise": 1}, "r1")
    assert record.extra == {"lang": "de", "absent": None}


def test_keep_columns_on_chat_and_batch_rows() -> None:
    """extra is filled for chat rows and batch rows too."""
    builder = _builder(keep_columns=("tag",))
    chat = builder.build(
        {"messages": [{"role": "user", "content": "x"}], "tag": "c"}, "1"
    )
    assert chat.extra == {"tag": "c"}
    row = _batch_row({"prompt": "x"}, url="/v1/completions", tag="b")
    assert builder.build(row, "2").extra == {"tag": "b"}


# --- what is sent, and its hash ----------------------------------------------


def test_the_body_is_encoded_once_with_sorted_keys() -> None:
    """The payload is the body as sent; the same request hashes the same however
    its keys were ordered, and a changed parameter changes the hash."""
    builder = _builder()
    url = "/v1/completions"
    one = builder.build(
        _batch_row({"prompt": "Hi", "model": "m", "max_tokens": 5}, url=url), "a"
    )
    two = builder.build(
        _batch_row({"max_tokens": 5, "prompt": "Hi", "model": "m"}, url=url), "b"
    )
    other = builder.build(
        _batch_row({"prompt": "Hi", "model": "m", "max_tokens": 6}, url=url), "c"
    )
    assert one.payload == b'{"max_tokens":5,"model":"m","prompt":"Hi"}'
    assert orjson.loads(one.payload) == one.body
    assert two.payload == one.payload
    assert two.request_hash == one.request_hash
    assert other.request_hash != one.request_hash


def test_the_request_hash_is_stable_across_releases() -> None:
    """Outputs written earlier resume without re-running their rows: the hash
    of a given request never changes."""
    builder = _builder(params={"max_tokens": 5})
    assert builder.build({"prompt": "Hello"}, "x").request_hash == -7598511719510822734
    chat = _builder(params={"max_tokens": 5}, endpoint="chat")
    assert chat.build({"prompt": "Hello"}, "x").request_hash == 1113665783927558201


def test_a_record_built_only_to_check_is_not_encoded() -> None:
    """The scan's records are never sent: no payload, no hash."""
    record = _builder().build({"prompt": "Hello"}, "x", hashed=False)
    assert (record.payload, record.request_hash) == (b"", 0)


def test_an_image_is_not_estimated_by_its_base64_text() -> None:
    """A multimodal message's image part counts as a low-detail image (85
    tokens), not as its data: a 1 MB image was estimated at 250,000 tokens,
    and failed as too large for a token budget."""
    url = "data:image/png;base64," + "A" * 1_000_000
    image = {"type": "image_url", "image_url": {"url": url}}
    text = {"type": "text", "text": "What is in this picture?" * 4}
    row = {"messages": [{"role": "user", "content": [text, image]}]}
    record = _builder().build(row, "r1")
    estimator = TokenEstimator()
    assert estimator.prompt_tokens(record) == math.ceil((96 + 340) / 4)
    plain = _builder().build({"messages": [{"role": "user", "content": "hi"}]}, "r2")
    assert estimator.prompt_tokens(plain) == math.ceil(len(plain.prompt) / 4)
    # What it learns from such a row is on the same footing.
    estimator.observe(record, 200, 10)
    assert estimator.chars_per_token == (96 + 340) / 200
