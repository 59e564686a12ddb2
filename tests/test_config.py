"""Tests for ``batchrun.config``: every validator, and the valid shapes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from batchrun.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_FLUSH_ROWS,
    DEFAULT_TIMEOUT_S,
    PROVIDERS,
    EndpointConfig,
    OutputOptions,
    RateLimits,
    RequestOptions,
    RetryPolicy,
    RunConfig,
)
from batchrun.errors import ConfigError


def _run_config(**overrides: Any) -> RunConfig:
    options: dict[str, Any] = {
        "inputs": (Path("in.jsonl"),),
        "output": OutputOptions(out_dir=Path("out")),
        "endpoint": EndpointConfig(mock=True),
    }
    options.update(overrides)
    return RunConfig(**options)


# --- EndpointConfig -----------------------------------------------------------


def test_endpoint_needs_base_url_or_mock() -> None:
    """Neither a base URL nor mock is a ConfigError."""
    with pytest.raises(ConfigError, match="no endpoint"):
        EndpointConfig()


def test_endpoint_mock_and_base_url_conflict() -> None:
    """mock together with a base URL is a ConfigError."""
    with pytest.raises(ConfigError, match="cannot be combined"):
        EndpointConfig(mock=True, base_url="http://localhost:8000/v1")


@pytest.mark.parametrize(
    "url", ["localhost:8000/v1", "ftp://example.com/v1", "", "HTTPS//x"]
)
def test_endpoint_bad_scheme(url: str) -> None:
    """A base URL without http:// or https:// is a ConfigError."""
    with pytest.raises(ConfigError, match="must start with http"):
        EndpointConfig(base_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.fireworks.ai/inference/v1/chat/completions",
        "https://api.fireworks.ai/inference/v1/completions/",
    ],
)
def test_a_base_url_naming_an_endpoint_says_which_to_give(url: str) -> None:
    """A full endpoint URL pasted as the base URL is refused before anything
    is sent, with the base URL to give: it was a 404 for
    .../chat/completions/completions."""
    with pytest.raises(ConfigError) as info:
        EndpointConfig(base_url=url)
    assert str(info.value) == (
        f"the base URL {url} names an endpoint: give"
        " https://api.fireworks.ai/inference/v1, and each request goes to its own"
        " endpoint under it"
    )


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, math.nan])
def test_endpoint_timeout_must_be_positive(timeout_s: float) -> None:
    """A zero, negative or NaN timeout is a ConfigError."""
    with pytest.raises(ConfigError, match="timeout"):
        EndpointConfig(mock=True, timeout_s=timeout_s)


def test_endpoint_valid() -> None:
    """Valid endpoint configs construct with their defaults."""
    remote = EndpointConfig(base_url="https://api.example.com/v1", api_key="k")
    assert remote.timeout_s == DEFAULT_TIMEOUT_S
    assert remote.mock is False
    mock = EndpointConfig(mock=True, timeout_s=0.5)
    assert mock.base_url is None
    assert mock.timeout_s == 0.5
    assert EndpointConfig(base_url="http://localhost:8000/v1").api_key is None


def test_endpoint_repr_hides_api_key() -> None:
    """The API key does not appear in the repr."""
    config = EndpointConfig(base_url="https://x/v1", api_key="sk-secret-value")
    assert "sk-secret-value" not in repr(config)


def test_providers_have_http_urls() -> None:
    """Every preset with a URL passes EndpointConfig validation; mock has none."""
    for name, preset in PROVIDERS.items():
        if name == "mock":
            assert preset.base_url is None
        else:
            assert preset.base_url is not None
            EndpointConfig(base_url=preset.base_url)


# --- RequestOptions -----------------------------------------------------------


def test_request_options_bad_endpoint() -> None:
    """An endpoint other than completions/chat is a ConfigError."""
    with pytest.raises(ConfigError, match="endpoint must be"):
        RequestOptions(endpoint="embeddings")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["model", "prompt", "messages"])
def test_request_options_reserved_params(name: str) -> None:
    """params may not set model, prompt or messages."""
    with pytest.raises(ConfigError, match=f"--param {name}="):
        RequestOptions(params={name: "x"})


@pytest.mark.parametrize("value", [0, -1, 129, True, 2.0, "3"])
def test_request_options_n_range(value: object) -> None:
    """n must be an integer in 1..128."""
    with pytest.raises(ConfigError, match="n must be an integer"):
        RequestOptions(params={"n": value})


@pytest.mark.parametrize("value", [0, -5, False, 1.5, "16"])
def test_request_options_max_tokens_range(value: object) -> None:
    """max_tokens must be an integer >= 1."""
    with pytest.raises(ConfigError, match="max_tokens must be an integer"):
        RequestOptions(params={"max_tokens": value})


@pytest.mark.parametrize(
    "params", [{"n": 1}, {"n": 128}, {"max_tokens": 1}, {"max_tokens": 10**9}]
)
def test_request_options_range_edges_accepted(params: dict[str, Any]) -> None:
    """The edges of the n and max_tokens ranges are accepted."""
    assert RequestOptions(params=params).params == params


@pytest.mark.parametrize("columns", [{"prompt_column": ""}, {"messages_column": ""}])
def test_request_options_empty_columns(columns: dict[str, Any]) -> None:
    """An empty prompt or messages column name is a ConfigError."""
    with pytest.raises(ConfigError, match="must not be empty"):
        RequestOptions(**columns)


def test_request_options_valid() -> None:
    """Valid request options construct, with documented defaults."""
    options = RequestOptions(
        model="m",
        endpoint="chat",
        template="{{ x }}",
        system="S",
        params={"temperature": 0.2, "n": 2, "max_tokens": None},
        id_column="uid",
        keep_columns=("a",),
    )
    assert options.endpoint == "chat"
    defaults = RequestOptions()
    assert defaults.model is None
    assert defaults.endpoint is None
    assert defaults.prompt_column == "prompt"
    assert defaults.messages_column == "messages"
    assert dict(defaults.params) == {}
    assert defaults.keep_columns == ()


def test_request_options_shaping() -> None:
    """shaping() returns the request-shaping options as plain data."""
    params = {"temperature": 0.2, "stop": ["\n"]}
    options = RequestOptions(
        model="m",
        endpoint="completions",
        template="T {{ x }}",
        system="S",
        prompt_column="p",
        messages_column="msgs",
        params=params,
        id_column="uid",
        keep_columns=("k",),
    )
    shaping = options.shaping()
    assert shaping == {
        "model": "m",
        "endpoint": "completions",
        "template": "T {{ x }}",
        "system": "S",
        "prompt_column": "p",
        "messages_column": "msgs",
        "params": {"temperature": 0.2, "stop": ["\n"]},
        "id_column": "uid",
    }
    assert type(shaping["params"]) is dict
    shaping["params"]["temperature"] = 1.0
    assert options.params["temperature"] == 0.2


def test_request_options_shaping_defaults() -> None:
    """shaping() of the defaults has None for unset options and empty params."""
    assert RequestOptions().shaping() == {
        "model": None,
        "endpoint": None,
        "template": None,
        "system": None,
        "prompt_column": "prompt",
        "messages_column": "messages",
        "params": {},
        "id_column": None,
    }


# --- OutputOptions ------------------------------------------------------------


@pytest.mark.parametrize("flush_rows", [0, -1])
def test_output_flush_rows(flush_rows: int) -> None:
    """flush_rows below 1 is a ConfigError."""
    with pytest.raises(ConfigError, match="flush_rows"):
        OutputOptions(out_dir=Path("out"), flush_rows=flush_rows)


@pytest.mark.parametrize("interval", [0.0, -2.0, math.nan])
def test_output_flush_interval(interval: float) -> None:
    """A flush interval that is not positive is a ConfigError."""
    with pytest.raises(ConfigError, match="flush_interval_s"):
        OutputOptions(out_dir=Path("out"), flush_interval_s=interval)


def test_output_valid() -> None:
    """Valid output options construct, with their defaults."""
    options = OutputOptions(out_dir=Path("out"))
    assert options.flush_rows == DEFAULT_FLUSH_ROWS
    assert options.flush_interval_s == DEFAULT_FLUSH_INTERVAL_S
    assert options.overwrite is False
    tight = OutputOptions(out_dir=Path("o"), flush_rows=1, flush_interval_s=0.01)
    assert tight.flush_rows == 1


# --- RateLimits ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["rpm", "tpm", "prompt_tpm", "completion_tpm"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan])
def test_rate_limits_must_be_positive(name: str, value: float) -> None:
    """A zero, negative or NaN rate limit is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=f"{name} must be positive"):
        RateLimits(**{name: value})


def test_rate_limits_valid() -> None:
    """Positive limits construct; every limit defaults to None (unlimited)."""
    limits = RateLimits(rpm=60, tpm=1e6, prompt_tpm=0.5, completion_tpm=10)
    assert limits.rpm == 60
    assert RateLimits() == RateLimits(
        rpm=None, tpm=None, prompt_tpm=None, completion_tpm=None
    )


# --- RetryPolicy ----------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, -3])
def test_retry_policy_max_attempts(attempts: int) -> None:
    """max_attempts below 1 is a ConfigError."""
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=attempts)


@pytest.mark.parametrize(
    "name",
    ["max_retry_time_s", "max_retry_wait_s", "backoff_base_s", "backoff_max_s"],
)
def test_retry_policy_negative_durations(name: str) -> None:
    """A negative retry duration is a ConfigError naming it."""
    kwargs: dict[str, Any] = {name: -0.1}
    with pytest.raises(ConfigError, match=f"{name} must not be negative"):
        RetryPolicy(**kwargs)


def test_retry_policy_valid() -> None:
    """Zero durations (no backoff) and one attempt are accepted."""
    policy = RetryPolicy(
        max_attempts=1,
        max_retry_time_s=0,
        max_retry_wait_s=0,
        backoff_base_s=0,
        backoff_max_s=0,
    )
    assert policy.max_attempts == 1
    assert RetryPolicy().max_attempts >= 1


# --- RunConfig ----------------------------------------------------------------


def test_run_config_needs_inputs() -> None:
    """An empty input list is a ConfigError."""
    with pytest.raises(ConfigError, match="no input files"):
        _run_config(inputs=())


@pytest.mark.parametrize("concurrency", [0, -1, 100_001])
def test_run_config_concurrency_range(concurrency: int) -> None:
    """Concurrency outside 1..100000 is a ConfigError."""
    with pytest.raises(ConfigError, match="concurrency"):
        _run_config(concurrency=concurrency)


@pytest.mark.parametrize("concurrency", [1, 100_000])
def test_run_config_concurrency_edges(concurrency: int) -> None:
    """Concurrency 1 and 100000 are accepted."""
    assert _run_config(concurrency=concurrency).concurrency == concurrency


@pytest.mark.parametrize("limit", [0, -3])
def test_run_config_limit_must_be_positive(limit: int) -> None:
    """A limit of no rows is a ConfigError; one row is fine."""
    with pytest.raises(ConfigError, match="limit must be at least 1"):
        _run_config(limit=limit)
    assert _run_config(limit=1).limit == 1


def test_run_config_progress_mode() -> None:
    """An unknown progress mode is a ConfigError."""
    with pytest.raises(ConfigError, match="progress"):
        _run_config(progress="fancy")


@pytest.mark.parametrize("progress", ["auto", "bar", "lines", "off"])
def test_run_config_valid(progress: str) -> None:
    """A valid run config constructs with each progress mode and defaults."""
    config = _run_config(progress=progress)
    assert config.progress == progress
    assert config.concurrency == DEFAULT_CONCURRENCY
    assert config.request == RequestOptions()
    assert config.limits == RateLimits()
    assert config.retry == RetryPolicy()


def test_configs_are_frozen() -> None:
    """Config objects cannot be changed after construction."""
    config = _run_config()
    with pytest.raises(AttributeError):
        config.concurrency = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("base_url", "probes"),
    [
        ("https://api.fireworks.ai/inference/v1", True),
        ("http://10.0.0.7:8000/v1", True),
        ("http://localhost:8000/v1", False),
        ("http://LOCALHOST:8000/v1", False),
        ("http://127.0.0.1:8000/v1", False),
        ("http://127.1.2.3/v1", False),
        ("http://[::1]:8000/v1", False),
    ],
)
def test_probe_by_default_except_on_this_machine(base_url: str, probes: bool) -> None:
    """The first request goes alone unless the server is on a loopback address."""
    assert EndpointConfig(base_url=base_url).probes is probes


def test_probe_setting_wins() -> None:
    """An explicit setting overrides the address rule; the simulator never probes."""
    assert EndpointConfig(base_url="http://127.0.0.1/v1", probe=True).probes
    assert not EndpointConfig(base_url="https://api.openai.com/v1", probe=False).probes
    assert not EndpointConfig(mock=True).probes
