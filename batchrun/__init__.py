"""batchrun: large batches of LLM requests against OpenAI-compatible endpoints.

Fast, inside the provider's rate limits, and never losing a paid-for result.
"""

from __future__ import annotations

from ._version import __version__
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
