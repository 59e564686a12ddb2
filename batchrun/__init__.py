"""batchrun: large batches of LLM requests against OpenAI-compatible endpoints.

Fast, inside the provider's rate limits, and never losing a paid-for result.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from .config import (
    EndpointConfig,
    OutputOptions,
    Price,
    RateLimits,
    RequestOptions,
    RetryPolicy,
    RunConfig,
    Variant,
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
from .estimate import Estimate, estimate_run
from .export import export_results
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
    "Estimate",
    "FatalAPIError",
    "InputError",
    "MalformedResponseError",
    "OutputError",
    "OutputOptions",
    "PermanentError",
    "Price",
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
    "Variant",
    "__version__",
    "arun",
    "estimate_run",
    "export_results",
    "run",
]
