"""One row's request, start to finish: estimate, wait for room, attempt, retry.

``Caller.call`` turns a ``PromptRecord`` into a ``Result`` and never raises
for a failed row (a failed record is data). It raises only what must stop the
run: ``FatalAPIError``. The rate limiter and the adaptive concurrency limit are
fed every outcome here, so a 429 pauses the whole pool once and a success
lets it grow.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from .client import APIClient, Reply
from .config import RetryPolicy
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    FatalAPIError,
    MalformedResponseError,
    PermanentError,
    RateLimitError,
    ServerError,
    TransientError,
)
from .payload import TokenEstimator
from .ratelimit import ConcurrencyLimit, Cost, RateLimiter, Slot
from .records import AttemptLog, PromptRecord, Result, Usage
from .retry import Retrier, Sleep

__all__ = ["Caller", "RowAbandoned", "failed_result"]


class RowAbandoned(Exception):
    """A stopping run gave up on a row in its backoff: it has no result, so
    the resumed run sends it again."""


_NO_TOKENS = Cost(0, 0)
_FIREWORKS = "api.fireworks.ai"
# A 429 without Retry-After still pauses the pool this long.
DEFAULT_RATE_LIMIT_PAUSE_S = 1.0


def failed_result(
    record: PromptRecord,
    error: str,
    *,
    log: AttemptLog | None = None,
    status: int | None = None,
    response: str | None = None,
    started: float | None = None,
    latency: float = 0.0,
) -> Result:
    """An error row for ``record``."""
    started = time.time() if started is None else started
    return Result(
        record=record,
        status="error",
        usage=Usage(),
        http_status=status,
        attempts=0 if log is None else log.attempts,
        latency_s=latency,
        started_at=started,
        finished_at=started + latency,
        error=" ".join(error.split()),
        response=response,
        log=log,
    )


class Caller:
    """Makes the requests of a run, inside its limits.

    Args:
        client: The open HTTP client.
        limiter: Per-minute budgets, shared by every worker.
        concurrency: The adaptive cap on requests in flight.
        policy: The retry policy.
        clock: Monotonic seconds.
        sleep: Awaitable sleep for backoffs.
        retrier: Retries transient failures.
        raw_response: Keep the raw response body in results.
    """

    def __init__(
        self,
        client: APIClient,
        *,
        limiter: RateLimiter,
        concurrency: ConcurrencyLimit,
        policy: RetryPolicy,
        clock: Callable[[], float],
        sleep: Sleep,
        retrier: Retrier,
        raw_response: bool,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.concurrency = concurrency
        self.policy = policy
        self.estimator = TokenEstimator()
        self._clock = clock
        self._sleep = sleep
        self._retrier = retrier
        self._raw = raw_response
        self._waits: set[anyio.CancelScope] = set()
        self._abandoning = False
        self.retries = 0

    @property
    def backing_off(self) -> int:
        """Rows waiting out a retry backoff now."""
        return len(self._waits)

    def abandon_waits(self) -> None:
        """End every backoff now, and every later one at once: the run is stopping.

        The rows in those backoffs raise ``RowAbandoned``, so a stop waits for
        requests in flight, never for a backoff of up to 30 s.
        """
        self._abandoning = True
        for scope in list(self._waits):
            scope.cancel()

    async def _back_off(self, seconds: float) -> None:
        if not self._abandoning:
            with anyio.CancelScope() as scope:
                self._waits.add(scope)
                try:
                    await self._sleep(seconds)
                finally:
                    self._waits.discard(scope)
        if self._abandoning:
            raise RowAbandoned

    async def call(self, record: PromptRecord, slot: Slot) -> Result:
        """Request ``record`` until it succeeds, fails for good, or retries run out.

        Args:
            record: What to send.
            slot: The worker's concurrency slot, held on entry; let go during
                backoffs, so other rows use it meanwhile, and held again for
                each retry.

        Raises:
            FatalAPIError: The key, model or URL is wrong; the run must stop.
            RowAbandoned: The run is stopping and the row was waiting to retry.
        """
        limiter = self.limiter
        if limiter.counts_tokens:
            estimator = self.estimator
            cost = Cost(
                estimator.prompt_tokens(record), estimator.completion_tokens(record)
            )
            too_big = limiter.too_big(cost)
            if too_big is not None:
                return failed_result(record, f"RequestTooLargeError: {too_big}")
        else:
            cost = _NO_TOKENS  # no token budget to reserve from
        log = AttemptLog()
        try:
            try:
                reply, usage = await self._attempt(record, cost, log)
            except TransientError as failure:
                reply, usage = await self._retry(record, cost, log, slot, failure)
        except (TransientError, PermanentError) as exc:
            return self._failure(record, exc, log)
        latency = self._clock() - log.first_sent
        finished = time.time()
        return Result(
            record=record,
            status="ok",
            usage=usage,
            http_status=reply.status,
            attempts=log.attempts,
            latency_s=latency,
            started_at=finished - latency,
            finished_at=finished,
            body=reply.data,
            response=reply.raw if self._raw else None,
            log=log if log.attempts > 1 else None,
        )

    async def _retry(
        self,
        record: PromptRecord,
        cost: Cost,
        log: AttemptLog,
        slot: Slot,
        failure: TransientError,
    ) -> tuple[Reply, Usage]:
        """Retry after a first attempt failed; the slot is let go in backoffs."""

        async def attempt() -> tuple[Reply, Usage]:
            await slot.hold()
            self.retries += 1
            return await self._attempt(record, cost, log)

        async def backoff(seconds: float) -> None:
            slot.release()
            await self._back_off(seconds)

        return await self._retrier.retry(
            attempt, failure, log.first_sent, sleep=backoff
        )

    def _failure(self, record: PromptRecord, exc: APIError, log: AttemptLog) -> Result:
        latency = self._clock() - log.first_sent
        return failed_result(
            record,
            f"{type(exc).__name__}: {exc}",
            log=log,
            status=exc.status,
            response=exc.body if self._raw else None,
            started=time.time() - latency,
            latency=latency,
        )

    async def _attempt(
        self, record: PromptRecord, cost: Cost, log: AttemptLog
    ) -> tuple[Reply, Usage]:
        """One HTTP attempt inside the rate budgets (the caller holds a slot)."""
        log.attempts += 1
        limiter = self.limiter
        concurrency = self.concurrency
        reserved = await limiter.acquire(cost)
        if log.attempts == 1:
            # A row's time counts from here: waits for a slot or for the rate
            # budget before its first attempt are the run's queue, not its own.
            log.first_sent = self._clock()
        try:
            reply = await self.client.post(
                record.endpoint, record.payload or record.body
            )
        except RateLimitError as exc:
            log.rate_limited += 1
            limiter.settle(reserved, 0, 0)
            if exc.headers is not None:
                limiter.follow(exc.headers, now=True)
            limiter.throttled()
            wait = exc.retry_after
            limiter.pause(
                min(
                    DEFAULT_RATE_LIMIT_PAUSE_S if wait is None else wait,
                    self.policy.max_retry_wait_s,
                )
            )
            concurrency.on_rate_limited(limits_known=limiter.limited)
            raise
        except ServerError:
            log.server_errors += 1
            limiter.settle(reserved, 0, 0)
            concurrency.on_overload()
            raise
        except APITimeoutError:
            log.timeouts += 1
            raise
        except APIConnectionError:
            log.connection_errors += 1
            raise
        except PermanentError:
            concurrency.end_probe()  # a real answer, if not a useful one
            raise
        except FatalAPIError as exc:
            model = record.model
            if exc.status == 404 and model:
                # Fireworks answers "Model not found, inaccessible, and/or not
                # deployed": in a sweep over models, it did not say which.
                hint = ""
                if _FIREWORKS in self.client.base_url and "/" not in model:
                    hint = f" (Fireworks names it accounts/fireworks/models/{model})"
                raise FatalAPIError(
                    f"{exc}; the request's model is {model!r}{hint}",
                    status=exc.status,
                    body=exc.body,
                    request_id=exc.request_id,
                ) from exc
            raise
        except MalformedResponseError as exc:
            log.malformed += 1
            if exc.data is not None:
                log.bill(Usage.from_response(dict(exc.data)))
            raise
        usage = Usage.from_response(reply.data)
        log.bill(usage)
        limiter.settle(reserved, usage.prompt_tokens, usage.completion_tokens)
        limiter.answered(reply.headers)
        self.estimator.observe(record, usage.prompt_tokens, usage.completion_tokens)
        concurrency.on_success()
        return reply, usage
