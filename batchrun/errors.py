"""The exception tree of batchrun.

A failed *record* is data: it becomes a row with ``status == "error"``. A failed
*run* is an exception from this module. Nothing here does I/O.

::

    BatchrunError
    ├── ConfigError          invalid options or CLI input (exit 2)
    ├── InputError           unreadable source or bad row (.path, .line; exit 2)
    ├── OutputError          results cannot be written (exit 3)
    └── APIError             .status .body .request_id
        ├── TransientError   retried
        │   ├── RateLimitError      429 (.retry_after)
        │   ├── ServerError         5xx, 408, 409, 425
        │   ├── APIConnectionError  refused, reset, dropped mid-response
        │   ├── APITimeoutError     no complete answer within the timeout
        │   └── MalformedResponseError  200 whose body is not a completion
        ├── PermanentError   other 4xx: a failed row, never retried
        └── FatalAPIError    401/403, 404 for the endpoint or model, quota used up
                             (402, or 429 insufficient_quota), TLS that cannot
                             work (untrusted certificate), a host name that does
                             not exist: aborts the run
            └── CircuitBreakerError  50 rows in a row failed the same permanent way

``PermanentError`` and ``FatalAPIError`` are siblings, so ``except PermanentError``
can never swallow a fatal error.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "BatchrunError",
    "CircuitBreakerError",
    "ConfigError",
    "FatalAPIError",
    "InputError",
    "MalformedResponseError",
    "OutputError",
    "PermanentError",
    "RateLimitError",
    "ServerError",
    "TransientError",
]


class BatchrunError(Exception):
    """Base class of every error batchrun raises on purpose."""


class ConfigError(BatchrunError):
    """Raised when options are invalid or contradict each other."""


class InputError(BatchrunError):
    """Raised when an input file cannot be read or one of its rows is invalid.

    Args:
        message: What is wrong, without the location.
        path: The input file.
        line: The 1-based line (JSONL) or row (Parquet) number, if known.
        kind: ``"line"`` or ``"row"``, how ``line`` is counted.
        field: The field at fault, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        kind: str = "line",
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.kind = kind
        self.field = field
        self.reason = message
        where = path or "<input>"
        if line is not None:
            where = f"{where}:{line}" if kind == "line" else f"{where} row {line}"
        self.where = where
        if field is not None:
            message = f"field {field!r}: {message}"
        super().__init__(f"{where}: {message}")


class OutputError(BatchrunError):
    """Raised when results cannot be written; the run aborts, flushed parts stay."""

    @classmethod
    def writing(cls, target: str, exc: BaseException) -> OutputError:
        """``cannot write TARGET: why``, saying plainly when the disk is full.

        pyarrow words a full disk as "[Errno 28] Error writing bytes to file.
        Detail: [errno 28] No space left on device"; what to do about it
        matters more than its wording.
        """
        code = getattr(exc, "errno", None)
        if code in _FULL_DISK:
            return cls(
                f"cannot write {target}: {_FULL_DISK[code]}; free some space and"
                " run the same command again (what is written is kept)"
            )
        reason = getattr(exc, "strerror", None) if isinstance(exc, OSError) else None
        return cls(f"cannot write {target}: {reason or exc}")


_FULL_DISK = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
}


class APIError(BatchrunError):
    """Raised for an unsuccessful answer (or no answer) from the endpoint.

    Args:
        message: A one-line description.
        status: The HTTP status, or ``None`` when no response arrived.
        body: The response body text, shortened.
        request_id: The provider's request id header, if any.
        headers: The response headers, if a response arrived.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.request_id = request_id
        self.headers = headers
        super().__init__(message)


class TransientError(APIError):
    """Raised for failures that may succeed when tried again.

    ``retry_after`` is the wait in seconds the server asked for (429 and 5xx
    answers may carry ``Retry-After``), or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message, status=status, body=body, request_id=request_id, headers=headers
        )
        self.retry_after = retry_after


class RateLimitError(TransientError):
    """Raised on HTTP 429."""


class ServerError(TransientError):
    """Raised on HTTP 5xx, 408, 409 and 425."""


class APIConnectionError(TransientError):
    """Raised when the connection is refused, reset or dropped mid-response."""


class APITimeoutError(TransientError):
    """Raised when no complete response arrives within the request timeout."""


class MalformedResponseError(TransientError):
    """Raised on a 2xx response whose body is not valid JSON or has no choices.

    ``data`` is the parsed body when it was JSON, so its usage can still be
    counted: the server may have billed it.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str | None = None,
        data: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.data = data


class PermanentError(APIError):
    """Raised on a 4xx that retrying cannot fix (400, 413, 422, ...)."""


class FatalAPIError(APIError):
    """Raised on 401/403, a 404 for the endpoint or model, an account out of
    quota (402, or a 429 ``insufficient_quota``), or TLS that cannot work (an
    untrusted certificate, a server without TLS): the whole run aborts."""


class CircuitBreakerError(FatalAPIError):
    """Raised when many rows in a row fail with the same permanent error.

    A wrong model name or parameter would otherwise burn through every row.
    """
