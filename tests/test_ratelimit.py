"""Unit tests for ``batchrun.ratelimit``: pacers, header limits, the rate limiter
and the adaptive concurrency cap, all on a fake clock that only moves when
something sleeps on it.
"""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import pytest

from batchrun.config import RateLimits
from batchrun.ratelimit import (
    DEFAULT_BURST_S,
    SAFETY,
    ConcurrencyLimit,
    Cost,
    Pacer,
    RateLimiter,
    Slot,
    limits_from_headers,
)

from .helpers import FakeTime

ONE_REQUEST = Cost(0, 0)


def make_limiter(limits: RateLimits, ft: FakeTime) -> RateLimiter:
    """A limiter on the fake clock."""
    return RateLimiter(limits, clock=ft.clock, sleep=ft.sleep)


def admitted_now(pacer: Pacer, now: float) -> int:
    """How many one-unit requests the pacer admits at ``now`` without waiting."""
    count = 0
    while pacer.delay(now) == 0.0:
        pacer.take(1, now)
        count += 1
    return count


# --- Pacer -------------------------------------------------------------------


def test_pacer_rate_is_per_minute_times_safety() -> None:
    """The steady rate is ``per_minute * SAFETY / 60`` units per second."""
    pacer = Pacer(600)
    assert pacer.rate == pytest.approx(600 * SAFETY / 60)
    assert pacer.rate == pytest.approx(9.9)


def test_pacer_bursts_then_paces_steadily() -> None:
    """A fresh pacer admits a burst of ``burst_s`` worth, then one per 1/rate."""
    pacer = Pacer(600)
    interval = 1 / pacer.rate
    burst = admitted_now(pacer, 0.0)
    # Admitted while the backlog k/rate is at most burst_s, i.e. k = 0, 1, 2.
    assert burst == math.floor(DEFAULT_BURST_S * pacer.rate) + 1 == 3
    assert pacer.delay(0.0) == pytest.approx(burst * interval - DEFAULT_BURST_S)
    now = pacer.delay(0.0)
    for _ in range(10):
        assert pacer.delay(now) == pytest.approx(0.0, abs=1e-9)
        pacer.take(1, now)
        assert pacer.delay(now) == pytest.approx(interval)
        now += pacer.delay(now)


def test_pacer_idle_time_does_not_bank_more_than_the_burst() -> None:
    """After a long idle spell the pacer again admits only one burst."""
    pacer = Pacer(600)
    admitted_now(pacer, 0.0)
    assert admitted_now(pacer, 1000.0) == 3


def test_pacer_give_back_returns_reserved_units() -> None:
    """``give_back`` undoes a reservation: the next request may go at once."""
    pacer = Pacer(60)
    pacer.take(100, 0.0)
    assert pacer.delay(0.0) == pytest.approx(100 / pacer.rate - DEFAULT_BURST_S)
    pacer.give_back(90)
    assert pacer.delay(0.0) == pytest.approx(10 / pacer.rate - DEFAULT_BURST_S)
    pacer.give_back(10)
    assert pacer.delay(0.0) == 0.0


def test_pacer_set_limit_changes_the_steady_pace() -> None:
    """``set_limit`` updates ``per_minute`` and ``rate``; later takes use it."""
    pacer = Pacer(600)
    pacer.set_limit(60)
    assert pacer.per_minute == 60
    assert pacer.rate == pytest.approx(60 * SAFETY / 60)
    pacer.take(1, 0.0)
    assert pacer.delay(0.0) == pytest.approx(1 / 0.99 - DEFAULT_BURST_S)


# --- limits_from_headers -----------------------------------------------------


def test_limits_from_openai_headers() -> None:
    """OpenAI's request and token limit headers map to ``rpm`` and ``tpm``."""
    headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-requests": "499",
    }
    assert limits_from_headers(headers) == {"rpm": 500.0, "tpm": 30000.0}


def test_limits_from_fireworks_headers() -> None:
    """Fireworks' prompt and generated token limits map to their own budgets."""
    headers = {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-limit-tokens-prompt": "60000",
        "x-ratelimit-limit-tokens-generated": "12000.5",
    }
    assert limits_from_headers(headers) == {
        "rpm": 600.0,
        "prompt_tpm": 60000.0,
        "completion_tpm": 12000.5,
    }


@pytest.mark.parametrize("value", ["", "abc", "12 rpm", "0", "-5", "nan", "0.0"])
def test_limits_from_headers_ignores_garbage_and_non_positive(value: str) -> None:
    """Unparsable, zero, negative and NaN values are ignored, not raised."""
    headers = {
        "x-ratelimit-limit-requests": value,
        "x-ratelimit-limit-tokens": "1000",
    }
    assert limits_from_headers(headers) == {"tpm": 1000.0}


def test_limits_from_headers_without_limit_headers_is_empty() -> None:
    """Responses without rate-limit headers announce nothing."""
    assert limits_from_headers({"content-type": "application/json"}) == {}


# --- RateLimiter ---------------------------------------------------------------


async def test_acquire_without_limits_returns_at_once() -> None:
    """With no budgets and no pause, ``acquire`` never sleeps."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    for _ in range(1000):
        await limiter.acquire(Cost(10_000, 10_000))
    assert ft.sleeps == []
    assert ft.now == 0.0
    assert limiter.limits() == {}


async def test_acquire_paces_at_the_rpm_with_one_sleep_per_wait() -> None:
    """100 requests at 600 rpm take ~100/9.9 s, each wait a single computed sleep."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(rpm=600), ft)
    n = 100
    for _ in range(n):
        await limiter.acquire(ONE_REQUEST)
    rate = 600 * SAFETY / 60
    # The last request goes once the backlog of the other n - 1 is down to burst_s.
    assert ft.now == pytest.approx((n - 1) / rate - DEFAULT_BURST_S)
    assert abs(ft.now - n / rate) < 0.5
    assert len(ft.sleeps) <= n
    assert all(s > 0 for s in ft.sleeps)


async def test_acquire_sleeps_at_most_once_per_request_at_awkward_rates() -> None:
    """Rounding never turns one computed wait into a second, tiny sleep."""
    for rpm in (7.0, 61.0, 599.0, 997.0, 1234.5):
        ft = FakeTime(now=12345.678)
        limiter = make_limiter(RateLimits(rpm=rpm, tpm=rpm * 37), ft)
        for i in range(200):
            await limiter.acquire(Cost(i % 13, i % 7))
        assert len(ft.sleeps) <= 200, rpm
        assert min(ft.sleeps) > 1e-9, rpm


async def test_acquire_charges_every_budget() -> None:
    """A request's token cost paces the tpm budget as well as the rpm one."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(rpm=6000, tpm=600), ft)
    await limiter.acquire(Cost(60, 39))  # 99 tokens: 10 s at 9.9 tokens/s
    await limiter.acquire(Cost(1, 0))
    assert ft.now == pytest.approx(99 / 9.9 - DEFAULT_BURST_S)
    assert len(ft.sleeps) == 1


def test_too_big_refuses_a_cost_above_a_minutes_budget() -> None:
    """A cost over one minute's budget is refused with a reason naming it."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(tpm=1000, prompt_tpm=800), ft)
    reason = limiter.too_big(Cost(600, 401))
    assert reason is not None
    assert "tpm" in reason
    assert "1000" in reason
    prompt_reason = limiter.too_big(Cost(801, 0))
    assert prompt_reason is not None
    assert "prompt_tpm" in prompt_reason


def test_too_big_is_none_when_the_cost_fits() -> None:
    """Costs up to a whole minute's budget, or with no budgets, are accepted."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(rpm=1, tpm=1000), ft)
    assert limiter.too_big(Cost(600, 400)) is None
    assert limiter.too_big(Cost(0, 0)) is None
    assert make_limiter(RateLimits(), ft).too_big(Cost(10**9, 10**9)) is None


@pytest.mark.parametrize("limits", [RateLimits(), RateLimits(rpm=600)])
async def test_pause_holds_the_next_acquire_once(limits: RateLimits) -> None:
    """``pause(5)`` makes the next acquire sleep ~5 s in one go, then no more."""
    ft = FakeTime()
    limiter = make_limiter(limits, ft)
    limiter.pause(5)
    assert limiter.rate_limited == 1
    await limiter.acquire(ONE_REQUEST)
    assert ft.sleeps == [pytest.approx(5.0)]
    assert ft.now == pytest.approx(5.0)
    await limiter.acquire(ONE_REQUEST)
    assert len(ft.sleeps) == 1


async def test_pause_keeps_the_later_deadline() -> None:
    """A shorter pause does not cut a longer one short."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    limiter.pause(5)
    limiter.pause(2)
    assert limiter.rate_limited == 2
    await limiter.acquire(ONE_REQUEST)
    assert ft.now == pytest.approx(5.0)


def test_waiting_counts_down_the_pause() -> None:
    """``waiting()`` is the time left in a pause, and 0 outside one."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    assert limiter.waiting() == 0.0
    limiter.pause(5)
    assert limiter.waiting() == pytest.approx(5.0)
    ft.now = 2.0
    assert limiter.waiting() == pytest.approx(3.0)
    ft.now = 6.0
    assert limiter.waiting() == 0.0


async def test_settle_gives_back_unused_tokens() -> None:
    """Settling below the estimate lets the next request go sooner."""

    async def second_wait(prompt: int | None, completion: int | None) -> float:
        ft = FakeTime()
        limiter = make_limiter(RateLimits(tpm=600), ft)
        reserved = await limiter.acquire(Cost(100, 100))
        limiter.settle(reserved, prompt, completion)
        await limiter.acquire(Cost(1, 1))
        return ft.now

    rate = 600 * SAFETY / 60
    unsettled = await second_wait(None, None)
    settled = await second_wait(10, 10)
    assert unsettled == pytest.approx(200 / rate - DEFAULT_BURST_S)
    assert settled == pytest.approx(20 / rate - DEFAULT_BURST_S)
    assert settled < unsettled


async def test_settle_above_the_estimate_charges_the_difference() -> None:
    """Usage above the estimate is charged, so later requests wait longer."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(tpm=600), ft)
    reserved = await limiter.acquire(Cost(10, 10))
    limiter.settle(reserved, 50, 49)
    await limiter.acquire(Cost(1, 0))
    assert ft.now == pytest.approx(99 / 9.9 - DEFAULT_BURST_S)


async def test_settle_never_gives_back_the_request() -> None:
    """A request counts against rpm even if it used no tokens."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(rpm=60), ft)
    reserved = await limiter.acquire(ONE_REQUEST)
    limiter.settle(reserved, 0, 0)
    await limiter.acquire(ONE_REQUEST)
    assert ft.now == pytest.approx(1 / 0.99 - DEFAULT_BURST_S)


async def test_settle_gives_back_only_what_was_reserved() -> None:
    """Settling a request admitted before a budget existed refunds nothing there."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    early = await limiter.acquire(Cost(50, 50))  # no budgets yet: nothing reserved
    limiter.follow({"x-ratelimit-limit-tokens": "600"})
    await limiter.acquire(Cost(50, 50))  # reserves 100 of the new tpm budget
    limiter.settle(early, 0, 0)  # must not erase the reservation above
    await limiter.acquire(Cost(1, 0))
    # Only the second request's 100 tokens are outstanding at 9.9 tokens/s.
    assert ft.now == pytest.approx(100 / 9.9 - DEFAULT_BURST_S), (
        "settle() refunded tokens that were never reserved in the tpm budget"
    )


def test_follow_creates_budgets_from_headers() -> None:
    """Headers announce budgets the limiter did not have."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    limiter.follow(
        {"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "90000"}
    )
    assert limiter.limits() == {"rpm": 600.0, "tpm": 90000.0}


async def test_follow_budgets_pace_later_requests() -> None:
    """A budget learned from headers makes later acquisitions wait."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    limiter.follow({"x-ratelimit-limit-requests": "60"})
    await limiter.acquire(ONE_REQUEST)
    await limiter.acquire(ONE_REQUEST)
    assert ft.now == pytest.approx(1 / 0.99 - DEFAULT_BURST_S)


def test_follow_keeps_the_user_limit_as_ceiling() -> None:
    """A header above the user's limit is capped; a lower one is adopted."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(rpm=100), ft)
    limiter.follow({"x-ratelimit-limit-requests": "600"})
    assert limiter.limits() == {"rpm": 100}
    ft.now += 0.25
    limiter.follow({"x-ratelimit-limit-requests": "50"})
    assert limiter.limits() == {"rpm": 50}
    ft.now += 0.25
    limiter.follow({"x-ratelimit-limit-requests": "600"})
    assert limiter.limits() == {"rpm": 100}


def test_follow_reads_headers_four_times_a_second_or_at_once_on_request() -> None:
    """Between reads headers are skipped; ``now=True`` (a 429's) reads them."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    limiter.follow({"x-ratelimit-limit-requests": "600"})
    assert limiter.limits() == {"rpm": 600}
    ft.now += 0.1
    limiter.follow({"x-ratelimit-limit-requests": "300"})
    assert limiter.limits() == {"rpm": 600}
    limiter.follow({"x-ratelimit-limit-requests": "300"}, now=True)
    assert limiter.limits() == {"rpm": 300}
    ft.now += 0.1
    limiter.follow({"x-ratelimit-limit-requests": "200"})
    assert limiter.limits() == {"rpm": 300}
    ft.now += 0.25
    limiter.follow({"x-ratelimit-limit-requests": "200"})
    assert limiter.limits() == {"rpm": 200}


def test_follow_ignores_garbage_headers() -> None:
    """Unparsable or non-positive header values leave the limits unchanged."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(rpm=100), ft)
    limiter.follow(
        {"x-ratelimit-limit-requests": "zero", "x-ratelimit-limit-tokens": "-1"}
    )
    assert limiter.limits() == {"rpm": 100}


async def test_acquire_admits_waiters_in_call_order() -> None:
    """Concurrent waiters are admitted first come, first served."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(rpm=60), ft)
    called: list[int] = []
    admitted: list[int] = []
    queued_at_admission: list[int] = []

    async def worker(i: int) -> None:
        called.append(i)
        await limiter.acquire(ONE_REQUEST)
        admitted.append(i)
        queued_at_admission.append(len(called))

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(worker, i)
    assert sorted(called) == list(range(6))
    assert admitted == called
    # Everyone had queued before the second request was admitted: real contention.
    assert queued_at_admission[1:] == [6] * 5
    assert len(ft.sleeps) == 5


# --- ConcurrencyLimit ------------------------------------------------------------


def test_concurrency_starts_at_initial_within_maximum() -> None:
    """The limit starts at ``initial``, clipped to ``[1, maximum]``."""
    ft = FakeTime()
    assert ConcurrencyLimit(32, initial=8, clock=ft.clock).limit == 8
    assert ConcurrencyLimit(4, initial=8, clock=ft.clock).limit == 4
    assert ConcurrencyLimit(4, initial=0, clock=ft.clock).limit == 1


def test_concurrency_slow_start_grows_by_two_per_success() -> None:
    """Below the threshold each success adds two slots, up to the maximum."""
    ft = FakeTime()
    limit = ConcurrencyLimit(25, initial=8, clock=ft.clock)
    for expected in [10, 12, 14, 16, 18, 20, 22, 24, 25, 25]:
        limit.on_success()
        assert limit.limit == expected


def test_probe_opens_slow_start() -> None:
    """One request alone; its success starts slow start at ``initial`` (the
    limit is not told whether the server stated a budget), and only the
    probe's answer does so."""
    ft = FakeTime()
    limit = ConcurrencyLimit(64, initial=8, clock=ft.clock, probe=True)
    assert limit.limit == 1
    limit.on_success()
    assert limit.limit == 8
    limit.on_success()
    assert limit.limit == 10
    not_probing = ConcurrencyLimit(64, initial=8, clock=ft.clock)
    not_probing.on_success()
    assert not_probing.limit == 10


def test_a_permanent_error_ends_the_probe_into_slow_start() -> None:
    """A 4xx says nothing about limits: slow start, not the whole pool."""
    ft = FakeTime()
    limit = ConcurrencyLimit(64, initial=8, clock=ft.clock, probe=True)
    limit.end_probe()
    assert limit.limit == 8


def test_concurrency_grows_by_one_per_window_above_threshold() -> None:
    """At the threshold growth slows to one slot per ``limit`` successes."""
    ft = FakeTime()
    limit = ConcurrencyLimit(100, initial=16, clock=ft.clock)
    limit.on_rate_limited()  # 16 -> 8; the threshold becomes 8
    assert limit.limit == 8
    for _ in range(7):
        limit.on_success()
    assert limit.limit == 8
    limit.on_success()
    assert limit.limit == 9
    for _ in range(8):
        limit.on_success()
    assert limit.limit == 9
    limit.on_success()
    assert limit.limit == 10


def test_concurrency_never_exceeds_maximum() -> None:
    """However many successes, the limit stays at most ``maximum``."""
    ft = FakeTime()
    limit = ConcurrencyLimit(12, initial=2, clock=ft.clock)
    for _ in range(500):
        limit.on_success()
        assert limit.limit <= 12
    assert limit.limit == 12


def test_concurrency_rate_limited_halves_once_per_second() -> None:
    """A burst of 429s within a second halves the limit only once."""
    ft = FakeTime()
    limit = ConcurrencyLimit(64, initial=32, clock=ft.clock)
    limit.on_rate_limited()
    assert limit.limit == 16
    ft.now = 0.5
    limit.on_rate_limited()
    limit.on_rate_limited()
    assert limit.limit == 16
    ft.now = 1.0
    limit.on_rate_limited()
    assert limit.limit == 8
    ft.now = 1.9
    limit.on_rate_limited()
    assert limit.limit == 8


def test_a_429_with_no_budget_known_goes_back_to_one_request() -> None:
    """With nothing pacing the requests, a 429 leaves one in flight for a
    second, then slow start climbs back towards half the old limit."""
    ft = FakeTime()
    limit = ConcurrencyLimit(64, initial=32, clock=ft.clock)
    limit.on_rate_limited(limits_known=False)
    assert limit.limit == 1
    limit.on_success()
    assert limit.limit == 1  # held for the second after the 429
    ft.now = 1.0
    for _ in range(20):
        limit.on_success()
    assert limit.limit == 16  # +2 a success, up to half of 32, then +1 a window


def test_a_blind_429_does_not_shorten_an_overload_hold() -> None:
    """Growth held for 5 s by an overload stays held after a later 429."""
    ft = FakeTime()
    limit = overloading(64, 32, ft)
    limit.on_overload()  # held until 5.0
    ft.now = 1.0
    limit.on_rate_limited(limits_known=False)  # would hold until 2.0 alone
    ft.now = 3.0
    limit.on_success()
    assert limit.limit == 1


def test_concurrency_rate_limited_never_below_one() -> None:
    """Halving stops at one slot."""
    ft = FakeTime()
    limit = ConcurrencyLimit(4, initial=1, clock=ft.clock)
    for second in range(5):
        ft.now = float(second)
        limit.on_rate_limited()
    assert limit.limit == 1


def overloading(maximum: int, initial: int, ft: FakeTime) -> ConcurrencyLimit:
    """A limit that has seen two 5xx and nothing else: the next is an overload
    (at least three 5xx, a fifth or more of recent answers)."""
    limit = ConcurrencyLimit(maximum, initial=initial, clock=ft.clock)
    limit.on_overload()
    limit.on_overload()
    assert limit.limit == initial  # not yet
    return limit


def test_concurrency_overload_cuts_by_a_fifth() -> None:
    """A 5xx overload cuts the limit by 20 %."""
    ft = FakeTime()
    limit = overloading(64, 20, ft)
    limit.on_overload()
    assert limit.limit == 16
    ft.now = 1.0
    limit.on_overload()
    assert limit.limit in (12, 13)  # 16 * 0.8 = 12.8, rounded either way


@pytest.mark.parametrize("start", [2, 3, 4])
def test_concurrency_overload_cuts_small_limits(start: int) -> None:
    """At a small limit an overload still gives up at least one slot."""
    ft = FakeTime()
    limit = overloading(64, start, ft)
    limit.on_overload()
    assert limit.limit < start, (
        f"on_overload() left the limit at {limit.limit} (from {start}); "
        "ceil(limit * 0.8) never cuts a limit of 2, 3 or 4"
    )


def test_concurrency_overload_holds_growth_for_five_seconds() -> None:
    """After an overload, successes do not grow the limit for 5 s."""
    ft = FakeTime()
    limit = overloading(64, 10, ft)
    limit.on_overload()
    after_cut = limit.limit
    ft.now = 4.9
    for _ in range(50):
        limit.on_success()
    assert limit.limit == after_cut
    ft.now = 5.0
    for _ in range(after_cut):
        limit.on_success()
    assert limit.limit == after_cut + 1


def test_concurrency_overload_within_a_second_only_extends_the_hold() -> None:
    """A second overload inside the gap holds growth but does not cut again."""
    ft = FakeTime()
    limit = overloading(64, 20, ft)
    limit.on_overload()
    ft.now = 0.5
    limit.on_overload()
    assert limit.limit == 16
    ft.now = 5.2
    limit.on_success()
    assert limit.limit == 16
    ft.now = 5.5
    for _ in range(16):
        limit.on_success()
    assert limit.limit == 17


def _answers_with_5xx(
    limit: ConcurrencyLimit, ft: FakeTime, seconds: int, per_s: int, ok_per_5xx: int
) -> None:
    """``per_s`` times a second for ``seconds``: ``ok_per_5xx`` successes, a 5xx."""
    for second in range(seconds):
        ft.now = float(second)
        for _ in range(per_s):
            for _ in range(ok_per_5xx):
                limit.on_success()
            limit.on_overload()


def test_scattered_5xx_leave_the_limit_alone() -> None:
    """One 5xx in twenty answers, for a long time, never cuts the limit.

    Cutting on each (at most once a second, with growth held after every
    cut) took a run at concurrency 64 down to 1 within a minute.
    """
    ft = FakeTime()
    limit = ConcurrencyLimit(64, initial=64, clock=ft.clock)
    _answers_with_5xx(limit, ft, seconds=120, per_s=1, ok_per_5xx=19)
    assert limit.limit == 64


def test_a_fifth_of_answers_5xx_is_an_overload() -> None:
    """When 5xx become a quarter of the answers, the limit comes down."""
    ft = FakeTime()
    limit = ConcurrencyLimit(64, initial=64, clock=ft.clock)
    for _ in range(100):
        limit.on_success()
    _answers_with_5xx(limit, ft, seconds=30, per_s=5, ok_per_5xx=3)
    assert limit.limit < 32


async def test_concurrency_acquire_blocks_when_full_and_release_wakes_fifo() -> None:
    """With every slot taken, waiters block and are admitted in arrival order."""
    ft = FakeTime()
    limit = ConcurrencyLimit(2, initial=2, clock=ft.clock)
    await limit.acquire()
    await limit.acquire()
    assert limit.in_flight == 2
    called: list[int] = []
    admitted: list[int] = []

    async def worker(i: int) -> None:
        called.append(i)
        await limit.acquire()
        admitted.append(i)
        limit.release()

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(worker, i)
        await anyio.wait_all_tasks_blocked()
        assert admitted == []
        assert sorted(called) == list(range(5))
        limit.release()
        await anyio.wait_all_tasks_blocked()
        limit.release()
    assert admitted == called
    assert limit.in_flight == 0


async def test_concurrency_cancelled_waiter_does_not_leak_a_slot() -> None:
    """A waiter cancelled while queued leaves no slot taken."""
    ft = FakeTime()
    limit = ConcurrencyLimit(1, initial=1, clock=ft.clock)
    await limit.acquire()
    scope = anyio.CancelScope()
    outcome: list[str] = []

    async def waiter() -> None:
        with scope:
            await limit.acquire()
            outcome.append("admitted")
        outcome.append("cancelled" if scope.cancelled_caught else "done")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
    assert outcome == ["cancelled"]
    limit.release()
    assert limit.in_flight == 0
    await limit.acquire()  # the fast path is open again: no waiter is left behind
    assert limit.in_flight == 1


async def test_concurrency_waiter_granted_while_cancelled_returns_its_slot() -> None:
    """A waiter granted a slot just as it is cancelled hands the slot back."""
    ft = FakeTime()
    limit = ConcurrencyLimit(1, initial=1, clock=ft.clock)
    await limit.acquire()
    scope = anyio.CancelScope()

    async def waiter() -> None:
        with scope:
            await limit.acquire()
            limit.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()  # the cancellation is on its way to the waiter...
        limit.release()  # ...when the freed slot is granted to it
    assert scope.cancelled_caught
    assert limit.in_flight == 0
    await limit.acquire()
    assert limit.in_flight == 1


async def test_concurrency_growth_wakes_blocked_waiters() -> None:
    """A success that raises the limit admits a waiter without any release."""
    ft = FakeTime()
    limit = ConcurrencyLimit(4, initial=1, clock=ft.clock)
    await limit.acquire()
    admitted: list[int] = []

    async def worker(i: int) -> None:
        await limit.acquire()
        admitted.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(worker, i)
        await anyio.wait_all_tasks_blocked()
        assert admitted == []
        limit.on_success()  # 1 -> 3: both waiters fit
        await anyio.wait_all_tasks_blocked()
        assert admitted == [0, 1]
    assert limit.in_flight == 3


async def test_a_row_in_hand_gets_the_next_slot_before_a_new_row() -> None:
    """Slots go first to rows already taken, then to workers taking new rows."""
    ft = FakeTime()
    limit = ConcurrencyLimit(1, initial=1, clock=ft.clock)
    holder = Slot(limit)
    await holder.hold()
    order: list[str] = []

    async def wait(name: str, slot: Slot, new_row: bool) -> None:
        await slot.hold(new_row=new_row)
        order.append(name)
        slot.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "new row", Slot(limit), True)
        await anyio.lowlevel.checkpoint()
        tg.start_soon(wait, "row in hand", Slot(limit), False)
        await anyio.lowlevel.checkpoint()
        assert limit.rows_waiting
        # The holder keeps its slot for the row it has...
        await holder.hold()
        assert holder.held
        assert order == []
        # ...but gives it up rather than take a new row while a taken row
        # waits, and queues behind the worker that was first to want one.
        await holder.hold(new_row=True)
        assert holder.held
        assert order == ["row in hand", "new row"]
        holder.release()
    assert limit.in_flight == 0


def _answers(limiter: RateLimiter, ft: FakeTime, seconds: float, per_s: int) -> None:
    """``per_s`` successful answers a second, without headers, for ``seconds``."""
    for _ in range(round(seconds * per_s)):
        ft.now += 1 / per_s
        limiter.answered({})


def test_a_429_without_a_stated_budget_learns_one() -> None:
    """The answer rate less a tenth; cut by a fifth a second; raised by a
    twentieth after 5 s without a 429."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    _answers(limiter, ft, 2.0, 10)
    limiter.throttled()
    assert limiter.limits()["rpm"] == pytest.approx(540, rel=0.02)
    limiter.throttled()  # the same second: one cut at most
    assert limiter.limits()["rpm"] == pytest.approx(540, rel=0.02)
    _answers(limiter, ft, 1.0, 10)
    limiter.throttled()
    assert limiter.limits()["rpm"] == pytest.approx(432, rel=0.02)
    _answers(limiter, ft, 4.9, 10)
    assert limiter.limits()["rpm"] == pytest.approx(432, rel=0.02)
    _answers(limiter, ft, 0.5, 10)
    assert limiter.limits()["rpm"] == pytest.approx(432 * 1.05, rel=0.02)


def test_a_429_before_a_second_of_answers_learns_nothing() -> None:
    """Too short a history gives no rate; the pause and concurrency act alone."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    _answers(limiter, ft, 0.5, 10)
    limiter.throttled()
    assert "rpm" not in limiter.limits()


def _refusals(limiter: RateLimiter, ft: FakeTime, seconds: int) -> None:
    """A 429 a second, and no answer, for ``seconds``."""
    for _ in range(seconds):
        ft.now += 1
        limiter.follow({}, now=True)
        limiter.throttled()


def test_429s_without_answers_teach_no_rate() -> None:
    """A server refusing every request (an outage, a model loading) shows no
    rate: none is learned from it, and a learned one is not cut through it.
    Cut each second, a learned rate fell to one request a minute, and grew
    back by a twentieth every 5 s."""
    ft = FakeTime()
    limiter = make_limiter(RateLimits(), ft)
    _refusals(limiter, ft, 5)
    assert "rpm" not in limiter.limits()
    _answers(limiter, ft, 2.0, 10)
    limiter.throttled()
    learned = limiter.limits()["rpm"]
    _refusals(limiter, ft, 30)
    assert limiter.limits()["rpm"] == learned
    _answers(limiter, ft, 1.0, 10)
    limiter.throttled()  # answers again, and a 429 among them: a real cut
    assert limiter.limits()["rpm"] == pytest.approx(learned * 0.8)


def test_a_stated_budget_is_never_replaced_by_a_learned_one() -> None:
    """The user's --rpm, or the server's header once it states one, rules."""
    ft = FakeTime()
    given = make_limiter(RateLimits(rpm=100), ft)
    _answers(given, ft, 2.0, 10)
    given.throttled()
    assert given.limits()["rpm"] == 100
    learned = make_limiter(RateLimits(), ft)
    _answers(learned, ft, 2.0, 10)
    learned.throttled()
    learned.follow({"x-ratelimit-limit-requests": "300"}, now=True)
    assert learned.limits()["rpm"] == 300
    ft.now += 2
    learned.throttled()
    assert learned.limits()["rpm"] == 300
