"""batchrun: large batches of LLM requests against OpenAI-compatible endpoints.

Fast, inside the provider's rate limits, and never losing a paid-for result.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

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
from .records import PromptRecord, Result, Usage

if _typing.TYPE_CHECKING:
    from .estimate import Estimate, estimate_run
    from .export import export_results
    from .runner import arun, run
    from .stats import RunStats

# These pull in pyarrow and aiohttp, so they load on first use: the command
# line decides what its process imports before they do (see __main__.py).
_LAZY = {
    "Estimate": "estimate",
    "estimate_run": "estimate",
    "export_results": "export",
    "arun": "runner",
    "run": "runner",
    "RunStats": "stats",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
