"""Frozen configuration objects and their defaults.

Each dataclass validates itself in ``__post_init__`` and raises ``ConfigError``.
Nothing here reads the environment or the file system: ``cli.py`` does that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_FLUSH_INTERVAL_S",
    "DEFAULT_FLUSH_ROWS",
    "DEFAULT_TIMEOUT_S",
    "ENDPOINT_PATHS",
    "MOCK_MODEL",
    "PROVIDERS",
    "SAMPLING",
    "STREAM_UNSUPPORTED",
    "Endpoint",
    "EndpointConfig",
    "EventLoop",
    "OutputOptions",
    "Price",
    "ProgressMode",
    "ProviderPreset",
    "RateLimits",
    "RequestOptions",
    "RetryPolicy",
    "RunConfig",
    "Variant",
    "base_of",
    "is_loopback",
]

MOCK_MODEL = "mock-model"
Endpoint = Literal["completions", "chat"]
ProgressMode = Literal["auto", "bar", "lines", "off"]
EventLoop = Literal["auto", "asyncio", "uvloop"]

# The body fields that have options of their own (--max-tokens, ...), with
# their types; the rest go through --param.
SAMPLING: tuple[tuple[str, type], ...] = (
    ("max_tokens", int),
    ("temperature", float),
    ("top_p", float),
    ("top_k", int),
    ("min_p", float),
    ("n", int),
    ("logprobs", int),
    ("seed", int),
    ("frequency_penalty", float),
    ("presence_penalty", float),
)

DEFAULT_CONCURRENCY = 32
DEFAULT_TIMEOUT_S = 300.0
# Rows a part file holds at most. Parts of 4,000 rows cost 3.8 thousand fewer
# instructions a row to write than parts of 1,000 (30.8 against 34.6,
# callgrind), but the rows held in memory raised the peak RSS of a
# 1,000,000-row run of 500-character prompts from 144 to 175 MB.
DEFAULT_FLUSH_ROWS = 1000
DEFAULT_FLUSH_INTERVAL_S = 10.0
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_MAX_RETRY_TIME_S = 900.0
DEFAULT_MAX_RETRY_WAIT_S = 120.0
DEFAULT_BACKOFF_BASE_S = 0.5
DEFAULT_BACKOFF_MAX_S = 30.0
DEFAULT_GRACE_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderPreset:
    """Where a named provider lives and which variable holds its key."""

    base_url: str | None
    key_env: str | None


PROVIDERS: Mapping[str, ProviderPreset] = MappingProxyType(
    {
        "fireworks": ProviderPreset(
            base_url="https://api.fireworks.ai/inference/v1",
            key_env="FIREWORKS_API_KEY",
        ),
        "openai": ProviderPreset(
            base_url="https://api.openai.com/v1", key_env="OPENAI_API_KEY"
        ),
        "together": ProviderPreset(
            base_url="https://api.together.xyz/v1", key_env="TOGETHER_API_KEY"
        ),
        "vllm": ProviderPreset(base_url="http://localhost:8000/v1", key_env=None),
        "mock": ProviderPreset(base_url=None, key_env=None),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    """The server to talk to.

    Args:
        base_url: The OpenAI-compatible base URL, ending in ``/v1`` as a rule.
            ``None`` together with ``mock=True`` starts the simulator for the run.
        api_key: Sent as a bearer token. Never printed, logged or written.
        mock: Serve the requests from an in-process simulator on a free port.
        timeout_s: The limit for one request, from sending to the last byte.
        probe: Send the first request alone, so that the server's rate-limit
            headers are known before the first burst. ``None`` probes every
            server except one on this machine (a loopback address or
            ``localhost``) and the simulator: vLLM or llama.cpp serving
            locally has no provider limits to learn, and would only lose a
            round trip.
    """

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    mock: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    probe: bool | None = None

    def __post_init__(self) -> None:
        if self.mock == (self.base_url is not None):
            raise ConfigError(
                "no endpoint: give --provider or --base-url (or BATCHRUN_BASE_URL)"
                if not self.mock
                else "--provider mock cannot be combined with a base URL"
            )
        if self.base_url is not None and not self.base_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"base URL must start with http:// or https://: {self.base_url!r}"
            )
        if self.base_url is not None:
            base = base_of(self.base_url)
            if base is not None:
                raise ConfigError(
                    f"the base URL {self.base_url} names an endpoint: give"
                    f" {base}, and each request goes to its own endpoint under it"
                )
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout_s}")

    @property
    def shown_url(self) -> str | None:
        """``base_url`` as it may be shown or written: without the
        ``user:password@`` of a server behind basic auth."""
        if self.base_url is None:
            return None
        parts = urlsplit(self.base_url)
        if "@" not in parts.netloc:
            return self.base_url
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()

    @property
    def probes(self) -> bool:
        """Whether the first request goes alone (see ``probe``)."""
        if self.probe is not None:
            return self.probe
        if self.base_url is None:
            return False  # the simulator
        return not is_loopback(urlsplit(self.base_url).hostname)


# Where each endpoint is, under the base URL.
ENDPOINT_PATHS: Mapping[Endpoint, str] = MappingProxyType(
    {"completions": "/completions", "chat": "/chat/completions"}
)


def base_of(url: str) -> str | None:
    """The base URL of an endpoint's ``url``; ``None`` if it names none."""
    path = url.rstrip("/")
    # The chat path first: it ends in the completions one.
    for suffix in sorted(ENDPOINT_PATHS.values(), key=len, reverse=True):
        if path.endswith(suffix):
            return path.removesuffix(suffix)
    return None


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine: ``localhost`` or a loopback address."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Sent, a streamed answer is not one JSON body: every row failed as malformed,
# after 8 attempts that were each generated and billed.
STREAM_UNSUPPORTED = (
    "streaming is not supported (each answer is read whole, as one JSON body);"
    " leave stream out"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestOptions:
    """How each input row becomes a request body.

    Args:
        model: The model for every row whose body does not name its own.
        endpoint: Force ``completions`` or ``chat``; ``None`` infers it per row.
        template: Jinja2 source rendered with the row's columns.
        system: A system message put first in chat requests.
        prompt_column: The field that holds a raw prompt.
        messages_column: The field that holds chat messages.
        params: Extra body fields (sampling parameters and ``--param``).
        id_column: The field that holds the row id; ``None`` picks ``id``,
            then ``custom_id``, then the row position.
        keep_columns: Input fields copied into the results.
    """

    model: str | None = None
    endpoint: Endpoint | None = None
    template: str | None = None
    system: str | None = None
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    params: Mapping[str, Any] = field(default_factory=dict)
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.endpoint not in (None, "completions", "chat"):
            raise ConfigError(
                f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}"
            )
        for name, instead in (
            ("model", "--model"),
            ("prompt", "the input rows"),
            ("messages", "the input rows"),
        ):
            if name in self.params:
                raise ConfigError(f"--param {name}=... is not allowed; use {instead}")
        if self.params.get("stream"):
            raise ConfigError(f"--param stream=...: {STREAM_UNSUPPORTED}")
        for key, low, high in (("n", 1, 128), ("max_tokens", 1, None)):
            value = self.params.get(key)
            if value is None:
                continue
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < low
                or (high is not None and value > high)
            ):
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        if not self.prompt_column or not self.messages_column:
            raise ConfigError("--prompt-column and --messages-column must not be empty")

    def shaping(self) -> dict[str, Any]:
        """The options that decide what is sent, as plain JSON data."""
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "template": self.template,
            "system": self.system,
            "prompt_column": self.prompt_column,
            "messages_column": self.messages_column,
            "params": dict(self.params),
            "id_column": self.id_column,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputOptions:
    """Where and how results are written.

    Args:
        out_dir: The output directory (results/, usage.parquet, manifest.json).
        overwrite: Delete earlier results in ``out_dir`` first.
        raw_response: Keep the raw response body in the ``response`` column.
        flush_rows: Write a part file at least every this many results.
        flush_interval_s: ... and at least this often while results arrive.
        skip_failed: On resume, keep earlier error rows instead of retrying.
        fsync: Force each journal write to disk (power loss), not just to
            the operating system (process crash).
    """

    out_dir: Path
    overwrite: bool = False
    raw_response: bool = True
    flush_rows: int = DEFAULT_FLUSH_ROWS
    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    skip_failed: bool = False
    fsync: bool = False

    def __post_init__(self) -> None:
        if self.flush_rows < 1:
            raise ConfigError(f"flush_rows must be >= 1, got {self.flush_rows}")
        if not self.flush_interval_s > 0:
            raise ConfigError(
                f"flush_interval_s must be positive, got {self.flush_interval_s}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimits:
    """Client-side budgets per minute; ``None`` means no limit of that kind.

    The limiter also follows the server's rate-limit headers; these values stay
    the ceiling.

    Args:
        rpm: Requests per minute.
        tpm: Prompt plus completion tokens per minute.
        prompt_tpm: Prompt tokens per minute.
        completion_tpm: Completion (generated) tokens per minute.
    """

    rpm: float | None = None
    tpm: float | None = None
    prompt_tpm: float | None = None
    completion_tpm: float | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "prompt_tpm", "completion_tpm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how long to retry a transient failure.

    The wait before attempt k+1 is the server's ``Retry-After`` when it sent
    one (at most ``max_retry_wait_s``), else full jitter:
    ``uniform(0, min(backoff_max_s, backoff_base_s * 2 ** (k - 1)))``.

    Args:
        max_attempts: Attempts per row, the first included.
        max_retry_time_s: Give up on a row once this long has passed since its
            first attempt.
        max_retry_wait_s: The longest ``Retry-After`` honoured.
        backoff_base_s: The first backoff's upper bound.
        backoff_max_s: The cap on any backoff.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_retry_time_s: float = DEFAULT_MAX_RETRY_TIME_S
    max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in (
            "max_retry_time_s",
            "max_retry_wait_s",
            "backoff_base_s",
            "backoff_max_s",
        ):
            if not getattr(self, name) >= 0:
                raise ConfigError(
                    f"{name} must not be negative, got {getattr(self, name)}"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    """One cell of a sweep: overrides applied to every input row.

    Args:
        name: Stable and readable, e.g. ``model=m1,temperature=0.7,template=a``.
        model: Overrides the model.
        template: Overrides the template (its text).
        params: Overrides or adds body fields.
        columns: Result columns that identify the cell (``model`` aside):
            ``template`` (its name) and each swept parameter.
    """

    name: str
    model: str | None = None
    template: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    columns: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a sweep variant needs a name")

    def apply(self, base: RequestOptions) -> RequestOptions:
        """``base`` with this variant's overrides."""
        return replace(
            base,
            model=self.model if self.model is not None else base.model,
            template=self.template if self.template is not None else base.template,
            params={**base.params, **self.params},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per million tokens."""

    input_per_m: float
    output_per_m: float

    def __post_init__(self) -> None:
        if not (self.input_per_m >= 0 and self.output_per_m >= 0):
            raise ConfigError("prices must not be negative")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The cost in USD of these tokens."""
        return (
            prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m
        ) / 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything one run needs.

    Args:
        inputs: JSONL (``.jsonl``, ``.json``, ``.jsonl.gz``) or Parquet files,
            or directories of Parquet files, read in order.
        output: Where results go.
        endpoint: The server.
        request: How rows become request bodies.
        concurrency: The most requests in flight at once; the connection pool
            matches it. The adaptive limiter starts lower and grows to it.
        limits: Client-side rate limits.
        retry: The retry policy.
        progress: ``auto`` (a bar on a terminal, else a line every 10 s),
            ``bar``, ``lines`` or ``off``.
        grace_s: On SIGINT/SIGTERM or an abort, how long requests in flight
            may finish before they are cancelled.
        event_loop: ``auto`` uses uvloop when it is installed (the ``fast``
            extra), else asyncio's own loop. Only ``run`` uses it; ``arun``
            runs in the caller's loop.
        variants: Sweep cells; every row is sent once per variant. Empty
            means one plain request per row.
        pricing: USD per million tokens by model; ``"*"`` applies to models
            not listed. Used for ``cost_usd`` in the usage table.
        limit: Send only the first this many input rows (each once per
            variant). It is not part of what a resume compares: the same run
            without it goes on to the rest.
    """

    inputs: tuple[Path, ...]
    output: OutputOptions
    endpoint: EndpointConfig
    request: RequestOptions = field(default_factory=RequestOptions)
    concurrency: int = DEFAULT_CONCURRENCY
    limits: RateLimits = field(default_factory=RateLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress: ProgressMode = "auto"
    grace_s: float = DEFAULT_GRACE_S
    event_loop: EventLoop = "auto"
    variants: tuple[Variant, ...] = ()
    pricing: Mapping[str, Price] = field(default_factory=dict)
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError(
                f"event_loop must be auto, asyncio or uvloop, got {self.event_loop!r}"
            )
        if not self.grace_s >= 0:
            raise ConfigError(f"grace must not be negative, got {self.grace_s}")
        if not self.inputs:
            raise ConfigError("no input files given")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ConfigError("two sweep variants have the same name")
        if not 1 <= self.concurrency <= 100_000:
            raise ConfigError(
                f"concurrency must be between 1 and 100000, got {self.concurrency}"
            )
        if self.limit is not None and not self.limit >= 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if self.progress not in ("auto", "bar", "lines", "off"):
            raise ConfigError(
                f"progress must be auto, bar, lines or off, got {self.progress!r}"
            )

    def with_mock_model(self) -> RunConfig:
        """This config, with ``MOCK_MODEL`` for a run on the simulator that
        names no model (``run`` and ``estimate`` alike)."""
        if self.endpoint.mock and self.request.model is None:
            return replace(self, request=replace(self.request, model=MOCK_MODEL))
        return self
