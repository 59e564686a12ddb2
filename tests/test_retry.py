"""Unit tests for ``batchrun.retry.Retrier`` on a fake clock: which errors are
retried, how long each wait is, and when retrying stops.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest

from batchrun.config import RetryPolicy
from batchrun.errors import (
    APIError,
    FatalAPIError,
    PermanentError,
    RateLimitError,
    ServerError,
    TransientError,
)
from batchrun.retry import Retrier

from .helpers import FakeTime


class ScriptedCall:
    """A call that raises or returns the scripted outcomes in order."""

    def __init__(
        self, *outcomes: APIError | str, ft: FakeTime, takes_s: float = 0.0
    ) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.raised: list[APIError] = []
        self._ft = ft
        self._takes_s = takes_s

    async def __call__(self) -> str:
        self.calls += 1
        self._ft.now += self._takes_s
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, APIError):
            self.raised.append(outcome)
            raise outcome
        return outcome


def make_retrier(
    policy: RetryPolicy,
    ft: FakeTime,
    *,
    seed: int = 0,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> Retrier:
    """A retrier on the fake clock with seeded jitter."""
    return Retrier(
        policy,
        clock=ft.clock,
        sleep=ft.sleep,
        rng=random.Random(seed),
        on_retry=on_retry,
    )


def server_error(n: int) -> ServerError:
    """A distinguishable 500."""
    return ServerError(f"boom {n}", status=500)


async def run(
    retrier: Retrier, call: Callable[[], Awaitable[str]], failure: TransientError
) -> str:
    """Retry after a first failure at fake time 0."""
    return await retrier.retry(call, failure, 0.0)


async def test_two_server_errors_then_success_returns_the_value() -> None:
    """500, 500, 200 succeeds on attempt 3; the call itself runs twice."""
    ft = FakeTime()
    attempts: list[float] = []
    retrier = make_retrier(
        RetryPolicy(max_attempts=5), ft, on_retry=lambda _e, w: attempts.append(w)
    )
    call = ScriptedCall(server_error(2), "ok", ft=ft)
    assert await run(retrier, call, server_error(1)) == "ok"
    assert call.calls == 2
    assert len(attempts) == 2  # one retry after each of attempts 1 and 2
    assert len(ft.sleeps) == 2


async def test_success_on_the_first_retry_sleeps_once() -> None:
    """If the first retry succeeds, the call runs once after a single wait."""
    ft = FakeTime()
    retrier = make_retrier(RetryPolicy(), ft)
    call = ScriptedCall("ok", ft=ft)
    assert await run(retrier, call, server_error(1)) == "ok"
    assert call.calls == 1
    assert len(ft.sleeps) == 1


async def test_retry_after_sets_the_wait_exactly() -> None:
    """A 429's ``retry_after`` is the wait, not a jittered backoff."""
    ft = FakeTime()
    retrier = make_retrier(RetryPolicy(max_retry_wait_s=120), ft)
    call = ScriptedCall("ok", ft=ft)
    await run(retrier, call, RateLimitError("slow down", retry_after=7))
    assert ft.sleeps == [7.0]


async def test_server_error_retry_after_is_honoured() -> None:
    """A 503 carrying ``retry_after`` waits exactly that long too."""
    ft = FakeTime()
    retrier = make_retrier(RetryPolicy(), ft)
    call = ScriptedCall("ok", ft=ft)
    await run(retrier, call, ServerError("busy", status=503, retry_after=2.5))
    assert ft.sleeps == [2.5]


async def test_retry_after_is_capped_by_max_retry_wait() -> None:
    """A ``retry_after`` above ``max_retry_wait_s`` waits only the cap."""
    ft = FakeTime()
    retrier = make_retrier(RetryPolicy(max_retry_wait_s=3), ft)
    call = ScriptedCall(RateLimitError("again", retry_after=600), "ok", ft=ft)
    await run(retrier, call, RateLimitError("slow down", retry_after=7))
    assert ft.sleeps == [3.0, 3.0]


@pytest.mark.parametrize("seed", [0, 1, 42])
async def test_backoff_is_capped_full_jitter(seed: int) -> None:
    """Without retry_after the k-th wait is uniform in [0, min(max, base*2**(k-1))]."""
    policy = RetryPolicy(max_attempts=7, backoff_base_s=0.5, backoff_max_s=3.0)
    ft = FakeTime()
    retrier = make_retrier(policy, ft, seed=seed)
    failures = [server_error(n) for n in range(2, 8)]
    call = ScriptedCall(*failures, ft=ft)
    with pytest.raises(ServerError):
        await run(retrier, call, server_error(1))
    ceilings = [min(3.0, 0.5 * 2 ** (k - 1)) for k in range(1, 7)]
    assert ceilings == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert len(ft.sleeps) == len(ceilings)
    for wait, ceiling in zip(ft.sleeps, ceilings, strict=True):
        assert 0.0 <= wait <= ceiling
    replica = random.Random(seed)
    assert ft.sleeps == [replica.uniform(0.0, c) for c in ceilings]


async def test_backoff_differs_between_seeds() -> None:
    """The jitter comes from the injected generator, so seeds give other waits."""
    policy = RetryPolicy(max_attempts=4)
    waits: list[list[float]] = []
    for seed in (1, 2):
        ft = FakeTime()
        call = ScriptedCall(server_error(2), server_error(3), server_error(4), ft=ft)
        with pytest.raises(ServerError):
            await run(make_retrier(policy, ft, seed=seed), call, server_error(1))
        waits.append(ft.sleeps)
    assert waits[0] != waits[1]


async def test_exhausted_attempts_reraise_the_last_error() -> None:
    """When ``max_attempts`` run out, the last failure itself is raised."""
    ft = FakeTime()
    retrier = make_retrier(RetryPolicy(max_attempts=3), ft)
    call = ScriptedCall(server_error(2), server_error(3), "never", ft=ft)
    with pytest.raises(ServerError) as info:
        await run(retrier, call, server_error(1))
    assert info.value is call.raised[-1]
    assert str(info.value) == "boom 3"
    assert call.calls == 2
    assert len(ft.sleeps) == 2


async def test_single_attempt_reraises_the_first_failure() -> None:
    """With ``max_attempts=1`` the replayed failure is raised and nothing runs."""
    ft = FakeTime()
    retrier = make_retrier(RetryPolicy(max_attempts=1), ft)
    call = ScriptedCall("never", ft=ft)
    first = RateLimitError("slow down", retry_after=1)
    with pytest.raises(RateLimitError) as info:
        await run(retrier, call, first)
    assert info.value is first
    assert call.calls == 0
    assert ft.sleeps == []


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("bad request", status=400),
        FatalAPIError("bad key", status=401),
    ],
)
async def test_non_transient_error_propagates_at_once(error: APIError) -> None:
    """A 400 or 401 from a later attempt is raised with no further attempts."""
    ft = FakeTime()
    retrier = make_retrier(RetryPolicy(max_attempts=8), ft)
    call = ScriptedCall(server_error(2), error, "never", ft=ft)
    with pytest.raises(type(error)) as info:
        await run(retrier, call, server_error(1))
    assert info.value is error
    assert call.calls == 2
    assert len(ft.sleeps) == 2


async def test_retry_time_already_spent_stops_at_once() -> None:
    """A first failure already past ``max_retry_time_s`` is not retried."""
    ft = FakeTime(now=100.0)
    retrier = make_retrier(RetryPolicy(max_retry_time_s=10), ft)
    call = ScriptedCall("never", ft=ft)
    first = server_error(1)
    with pytest.raises(ServerError) as info:
        await retrier.retry(call, first, 89.0)
    assert info.value is first
    assert call.calls == 0
    assert ft.sleeps == []


@pytest.mark.parametrize(("max_retry_time_s", "calls"), [(10.0, 1), (100.0, 5)])
async def test_max_retry_time_stops_once_the_clock_passes_it(
    max_retry_time_s: float, calls: int
) -> None:
    """No attempt follows a failure seen after ``started + max_retry_time_s``."""
    ft = FakeTime()
    retrier = make_retrier(
        RetryPolicy(max_attempts=100, max_retry_time_s=max_retry_time_s), ft
    )
    # Each attempt takes 20 s of fake time and fails; waits are 1 s each.
    failures = [RateLimitError(f"slow {n}", retry_after=1) for n in range(2, 10)]
    call = ScriptedCall(*failures, ft=ft, takes_s=20.0)
    with pytest.raises(RateLimitError) as info:
        await run(retrier, call, RateLimitError("slow 1", retry_after=1))
    assert call.calls == calls
    assert info.value is call.raised[-1]
    # The last attempt began before the deadline and failed after it.
    assert ft.now - 21.0 < max_retry_time_s <= ft.now


async def test_on_retry_gets_the_error_and_wait_before_each_sleep() -> None:
    """``on_retry`` sees each failure and its wait, just before the sleep."""
    ft = FakeTime()
    events: list[str] = []
    retries: list[tuple[BaseException, float]] = []

    def on_retry(error: BaseException, wait: float) -> None:
        events.append("retry")
        retries.append((error, wait))

    async def logged_sleep(seconds: float) -> None:
        events.append("sleep")
        await ft.sleep(seconds)

    retrier = Retrier(
        RetryPolicy(max_attempts=5),
        clock=ft.clock,
        sleep=logged_sleep,
        rng=random.Random(0),
        on_retry=on_retry,
    )
    first = RateLimitError("slow down", retry_after=4)
    second = server_error(2)
    call = ScriptedCall(second, "ok", ft=ft)
    assert await run(retrier, call, first) == "ok"
    assert events == ["retry", "sleep", "retry", "sleep"]
    assert retries == [(first, 4.0), (second, ft.sleeps[1])]
    assert retries[0][0] is first
    assert retries[1][0] is second
    assert ft.sleeps[0] == 4.0
