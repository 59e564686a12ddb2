"""batchrun: large batches of LLM requests against OpenAI-compatible endpoints.

Fast, inside the provider's rate limits, and never losing a paid-for result.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from .config import (
    EndpointConfig,
    OutputOptions,
    RateLimits,
    RequestOptions,
    RetryPolicy,
    RunConfig,
)
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    BatchrunError,
    CircuitBreakerError,
    ConfigError,
    FatalAPIError,
    InputError,
    MalformedResponseError,
    OutputError,
    PermanentError,
    RateLimitError,
    ServerError,
    TransientError,
)
from .records import PromptRecord, Result, Usage
from .runner import arun, run
from .stats import RunStats

try:
    __version__ = _version("batchrun")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "BatchrunError",
    "CircuitBreakerError",
    "ConfigError",
    "EndpointConfig",
    "FatalAPIError",
    "InputError",
    "MalformedResponseError",
    "OutputError",
    "OutputOptions",
    "PermanentError",
    "PromptRecord",
    "RateLimitError",
    "RateLimits",
    "RequestOptions",
    "Result",
    "RetryPolicy",
    "RunConfig",
    "RunStats",
    "ServerError",
    "TransientError",
    "Usage",
    "__version__",
    "arun",
    "run",
]
