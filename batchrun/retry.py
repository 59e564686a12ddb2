"""Retries of transient failures, built on tenacity from a ``RetryPolicy``.

The only module that imports tenacity. It decides *whether* to try again and
*how long* to wait; what counts as transient is the ``TransientError`` branch
of the error tree, so a 400 is never retried and a 503 always is. Time is
injected: ``clock`` and ``sleep`` come from the caller.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from .config import RetryPolicy
from .errors import TransientError

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = ["Retrier", "Sleep"]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
OnRetry = Callable[[BaseException, float], None]


# tenacity takes any callable as a wait or a stop condition: these need no
# tenacity base class, so tenacity itself is loaded only when a row is first
# retried (see Retrier.retry).


class _Wait:
    """The server's Retry-After when given (capped), else capped full jitter."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        policy = self._policy
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        after = getattr(error, "retry_after", None)
        if isinstance(after, int | float):
            return min(float(after), policy.max_retry_wait_s)
        ceiling = policy.backoff_base_s * 2 ** (retry_state.attempt_number - 1)
        return self._rng.uniform(0.0, min(policy.backoff_max_s, ceiling))


class _Stop:
    """Stop after the last attempt allowed, or when the next one would start
    after a deadline (injected clock)."""

    def __init__(
        self, attempts: int, clock: Callable[[], float], deadline: float
    ) -> None:
        self._attempts = attempts
        self._clock = clock
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        if retry_state.attempt_number >= self._attempts:
            return True
        # tenacity computes the wait before asking whether to stop: a retry
        # that would only start after the deadline is not made.
        return self._clock() + retry_state.upcoming_sleep >= self._deadline


class Retrier:
    """Retries a failed call until it succeeds or the policy gives up.

    Args:
        policy: Attempts, total time and backoff.
        clock: Monotonic seconds.
        sleep: Awaitable sleep in seconds (tests pass a virtual one).
        rng: Source of jitter.
        on_retry: Called with the failure and the wait before each retry.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float],
        sleep: Sleep,
        rng: random.Random | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._sleep = sleep
        self._wait = _Wait(policy, rng or random.Random())
        self._on_retry = on_retry

    def _before_sleep(self, retry_state: RetryCallState) -> None:
        if self._on_retry is None or retry_state.outcome is None:
            return
        error = retry_state.outcome.exception()
        if error is not None:
            self._on_retry(error, retry_state.upcoming_sleep)

    async def retry(
        self,
        call: Callable[[], Awaitable[T]],
        failure: TransientError,
        started: float,
        *,
        sleep: Sleep | None = None,
    ) -> T:
        """Carry on after a first attempt failed with ``failure``.

        The first attempt is made by the caller without tenacity, so the common
        case (success at once) costs nothing here; its failure is replayed as
        attempt 1 so that attempt counting and backoff are tenacity's own.

        Args:
            call: Makes one more attempt.
            failure: The first attempt's error.
            started: When the first attempt started (``clock`` time).
            sleep: Sleep to use for this call's backoffs instead of the default.

        Returns:
            The first successful attempt's value.

        Raises:
            TransientError: The last failure, once attempts or time run out.
            PermanentError, FatalAPIError: At once, never retried.
        """
        # Here, not at the top: importing tenacity took 20 ms of CPU (median
        # of 15 runs of `python -c`), paid at every start whether or not a row
        # failed; a 10-row run took 0.450 s of CPU so, against 0.464 s.
        from tenacity import AsyncRetrying, retry_if_exception_type

        replay: list[BaseException] = [failure]

        async def attempt() -> T:
            if replay:
                raise replay.pop()
            return await call()

        policy = self.policy
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=_Stop(
                policy.max_attempts, self._clock, started + policy.max_retry_time_s
            ),
            wait=self._wait,
            sleep=sleep or self._sleep,
            reraise=True,
            before_sleep=self._before_sleep,
        )
        return await retrying(attempt)
