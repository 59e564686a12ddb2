"""Client-side rate limits and adaptive concurrency.

Two mechanisms, both waiting by computing a wake-up time (never polling):

* ``RateLimiter`` paces requests inside per-minute budgets (requests, total
  tokens, prompt tokens, completion tokens). Each budget is a GCRA pacer: a
  request of cost ``c`` is admitted while the backlog ``tat - now`` is at most
  ``burst_s``, and then moves the theoretical arrival time
  ``tat = max(tat, now) + c / rate``. Reservations are estimates; ``settle``
  gives back what the server's reported usage shows was not used. A 429 pauses
  every worker once, until its ``Retry-After``. Budgets follow the server's
  ``x-ratelimit-limit-*`` headers; user limits stay the ceiling.
* ``ConcurrencyLimit`` caps requests in flight and adapts it: slow start
  from 32 (+2 per success, tripling per round trip), then additive increase (+1 per
  ``limit`` successes); a 429 halves it, a 5xx overload cuts it by a fifth and
  holds growth for a while.

No HTTP and no tenacity here; the runner feeds outcomes in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio

from .config import RateLimits

__all__ = [
    "BUDGETS",
    "INITIAL_CONCURRENCY",
    "ConcurrencyLimit",
    "Cost",
    "Pacer",
    "RateLimiter",
    "Reservation",
    "Slot",
    "limits_from_headers",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

BUDGETS = ("rpm", "tpm", "prompt_tpm", "completion_tpm")
# Pace a little under the limit: the server's bucket must never run dry from
# timing jitter alone (at 99 % it refills by 1 % of its rate while we send).
SAFETY = 0.99
DEFAULT_BURST_S = 0.25
_DECREASE_GAP_S = 1.0
# Slow start begins here when limits are known: gentle on a provider that
# punishes fast ramps, yet at 500 ms latency it reaches 256 in two round trips
# after the probe.
INITIAL_CONCURRENCY = 32
_OVERLOAD_HOLD_S = 5.0
# A 5xx counts as overload only when 5xx are this share of recent answers.
# Every decrease on scattered errors alone ratchets the limit down, since
# growth is held after each: with 5 % random 503s at 50 ms latency, a run at
# concurrency 64 fell to 1 and to 16 requests a second within a minute.
_OVERLOAD_SHARE = 0.2
# Recent answers: the counts are halved each time this many have been seen,
# and no fewer than _OVERLOAD_MIN_ERRORS 5xx among them make an overload.
_OUTCOME_WINDOW = 200
_OVERLOAD_MIN_ERRORS = 3
_FOLLOW_EVERY_S = 0.25
# A server that states no request budget gets one learned from its 429s: the
# rate of answers over the last _RATE_WINDOW_S (at least a second of it), less
# a tenth; cut by a fifth at each later 429 (at most once a second); raised by
# a twentieth every _RAISE_EVERY_S without one, so that it finds a higher limit.
_RATE_WINDOW_S = 10.0
_LEARNED_START = 0.9
_LEARNED_CUT = 0.8
_LEARNED_RAISE = 1.05
_RAISE_EVERY_S = 5.0


# Reservation and Cost are made for every request that a budget applies to;
# like the records, they are not frozen (a frozen dataclass sets each field
# through object.__setattr__) and are treated as immutable by convention.


@dataclass(slots=True)
class Reservation:
    """What ``acquire`` charged: the cost, and the budgets it was charged to."""

    cost: Cost
    charged: tuple[tuple[str, Pacer], ...]


@dataclass(slots=True)
class Cost:
    """What one request will use of each budget (token counts are estimates)."""

    prompt_tokens: int
    completion_tokens: int

    def amount(self, budget: str) -> int:
        """The cost against ``budget`` (one of ``BUDGETS``)."""
        if budget == "rpm":
            return 1
        if budget == "prompt_tpm":
            return self.prompt_tokens
        if budget == "completion_tpm":
            return self.completion_tokens
        return self.prompt_tokens + self.completion_tokens


class Pacer:
    """A GCRA pacer for ``per_minute`` units, allowing ``burst_s`` of backlog."""

    __slots__ = ("burst_s", "per_minute", "rate", "tat")

    def __init__(self, per_minute: float, *, burst_s: float = DEFAULT_BURST_S) -> None:
        self.per_minute = per_minute
        self.rate = per_minute * SAFETY / 60.0
        self.burst_s = burst_s
        self.tat = -math.inf

    def delay(self, now: float) -> float:
        """Seconds until a request may be admitted (0 when it may go now)."""
        return max(0.0, self.tat - self.burst_s - now)

    def take(self, amount: float, now: float) -> None:
        """Admit a request of ``amount`` units."""
        self.tat = max(self.tat, now) + amount / self.rate

    def give_back(self, amount: float) -> None:
        """Return units that were reserved but not used."""
        self.tat -= amount / self.rate

    def set_limit(self, per_minute: float) -> None:
        """Change the rate; the schedule already booked keeps its length in time."""
        self.per_minute = per_minute
        self.rate = per_minute * SAFETY / 60.0


_NOTHING = Reservation(Cost(0, 0), ())


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 else None


def limits_from_headers(headers: Mapping[str, str]) -> dict[str, float]:
    """Per-minute limits announced by the server (OpenAI and Fireworks styles)."""
    found: dict[str, float] = {}
    for budget, name in (
        ("rpm", "x-ratelimit-limit-requests"),
        ("tpm", "x-ratelimit-limit-tokens"),
        ("prompt_tpm", "x-ratelimit-limit-tokens-prompt"),
        ("completion_tpm", "x-ratelimit-limit-tokens-generated"),
    ):
        value = _header_number(headers, name)
        if value is not None:
            found[budget] = value
    return found


class RateLimiter:
    """Admits requests inside the per-minute budgets, FIFO.

    Args:
        limits: User limits; also the ceiling for limits learned from headers.
        clock: Monotonic seconds.
        sleep: Awaitable sleep (injected in tests).
        burst_s: How far ahead of the steady pace a burst may run.
    """

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Clock,
        sleep: Sleep,
        burst_s: float = DEFAULT_BURST_S,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._burst_s = burst_s
        self._ceilings: dict[str, float] = {
            name: value
            for name in BUDGETS
            if (value := getattr(limits, name)) is not None
        }
        self._pacers: dict[str, Pacer] = {
            name: Pacer(value, burst_s=burst_s)
            for name, value in self._ceilings.items()
        }
        self._lock = anyio.Lock()
        self.paused_until = -math.inf
        self.rate_limited = 0
        self._next_follow = -math.inf
        self._answered = 0
        # (clock, answers so far), one every _FOLLOW_EVERY_S: the answer rate.
        self._history: deque[tuple[float, int]] = deque(
            maxlen=int(_RATE_WINDOW_S / _FOLLOW_EVERY_S) + 8
        )
        self._next_sample = -math.inf
        self._learned = False  # the request budget comes from 429s
        self._next_cut = -math.inf
        self._answered_at_cut = 0  # answers when the learned rate last moved down
        self._next_raise = math.inf

    @property
    def limited(self) -> bool:
        """Whether any budget is in force (the user's or the server's)."""
        return bool(self._pacers)

    @property
    def counts_tokens(self) -> bool:
        """Whether any token budget is in force (then requests need estimates)."""
        return len(self._pacers) > ("rpm" in self._pacers)

    @property
    def learned_rpm(self) -> float | None:
        """The request rate learned from 429s, if that is what paces requests."""
        return self._pacers["rpm"].per_minute if self._learned else None

    def limits(self) -> dict[str, float]:
        """The per-minute limits in force now."""
        return {name: pacer.per_minute for name, pacer in self._pacers.items()}

    def too_big(self, cost: Cost) -> str | None:
        """Why ``cost`` can never fit (it exceeds a whole minute's budget), or None."""
        for name, pacer in self._pacers.items():
            amount = cost.amount(name)
            # A request budget paces any single request; only token budgets
            # can be too small for one request.
            if name != "rpm" and amount > pacer.per_minute:
                return (
                    f"the request needs about {amount} tokens, more than the whole"
                    f" {name} budget of {pacer.per_minute:g} per minute"
                )
        return None

    def waiting(self) -> float:
        """Seconds left in a rate-limit pause (0 when not paused)."""
        return max(0.0, self.paused_until - self._clock())

    async def acquire(self, cost: Cost) -> Reservation:
        """Wait until ``cost`` fits every budget and no pause is on, then take it.

        Returns:
            What was charged, for ``settle``: budgets learned from headers
            later never had this request charged to them.
        """
        if not self._pacers and self.paused_until <= self._clock():
            return _NOTHING
        async with self._lock:
            while True:
                now = self._clock()
                wait = self.paused_until - now
                for pacer in self._pacers.values():
                    wait = max(wait, pacer.delay(now))
                if wait <= 0:
                    break
                # Sleep to the computed moment; loop only if a pause or a lower
                # limit arrived meanwhile.
                await self._sleep(wait)
            charged = tuple(self._pacers.items())
            for name, pacer in charged:
                pacer.take(cost.amount(name), now)
        return Reservation(cost, charged)

    def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """Reconcile a reservation with the usage the server reported.

        ``None`` keeps the estimate; ``0, 0`` (a refused request) gives back
        every reserved token.
        """
        if not reservation.charged:
            return
        cost = reservation.cost
        actual = Cost(
            cost.prompt_tokens if prompt_tokens is None else prompt_tokens,
            cost.completion_tokens if completion_tokens is None else completion_tokens,
        )
        for name, pacer in reservation.charged:
            if name != "rpm":
                pacer.give_back(cost.amount(name) - actual.amount(name))

    def pause(self, seconds: float) -> None:
        """Hold every new request for ``seconds`` (a 429's Retry-After)."""
        self.rate_limited += 1
        self.paused_until = max(self.paused_until, self._clock() + seconds)

    def answered(self, headers: Mapping[str, str]) -> None:
        """A successful answer: count it and follow the limits it states."""
        self._answered += 1
        self.follow(headers)

    def follow(self, headers: Mapping[str, str], *, now: bool = False) -> None:
        """Adopt the limits the server announces, never above the user's own.

        Limits change rarely, and reading four headers costs about 1 us a
        response (0.7 % of the client's CPU at full speed), so headers are
        read at most every ``_FOLLOW_EVERY_S``, or at once with ``now``
        (a 429's headers).
        """
        clock = self._clock()
        if not now and clock < self._next_follow:
            return
        self._next_follow = clock + _FOLLOW_EVERY_S
        if clock >= self._next_sample:  # not at every 429 of a burst
            self._history.append((clock, self._answered))
            self._next_sample = clock + _FOLLOW_EVERY_S
        for name, value in limits_from_headers(headers).items():
            ceiling = self._ceilings.get(name)
            if ceiling is not None:
                value = min(value, ceiling)
            if name == "rpm":
                self._learned = False  # stated now
            pacer = self._pacers.get(name)
            if pacer is None:
                self._pacers[name] = Pacer(value, burst_s=self._burst_s)
            elif pacer.per_minute != value:
                pacer.set_limit(value)
        if self._learned and clock >= self._next_raise:
            pacer = self._pacers["rpm"]
            pacer.set_limit(pacer.per_minute * _LEARNED_RAISE)
            self._next_raise = clock + _RAISE_EVERY_S

    def throttled(self) -> None:
        """A 429 arrived (after ``follow`` read its headers).

        Unless a request budget is stated (by the user or the server), one is
        learned: see ``_RATE_WINDOW_S``. Concurrency alone cannot keep a fast
        server's requests under its rate: at zero latency against 600 a
        minute stated nowhere, 80 % of requests were 429s without this.

        A rate is learned, or cut, only from 429s among answers: a server
        that refuses every request (an outage, a model still loading) shows
        no rate, and the pause and the concurrency limit hold the requests
        back meanwhile. Cut once a second through such a spell, the learned
        rate fell from 6,565 to 7 a minute in 50 s, and it is raised only by
        a twentieth every 5 s: a run that had lived through it crawled on.
        """
        pacer = self._pacers.get("rpm")
        if pacer is not None and not self._learned:
            return
        now = self._clock()
        self._next_raise = now + _RAISE_EVERY_S
        if now < self._next_cut:
            return
        if pacer is not None:
            if self._answered > self._answered_at_cut:
                self._next_cut = now + _DECREASE_GAP_S
                self._answered_at_cut = self._answered
                pacer.set_limit(max(1.0, pacer.per_minute * _LEARNED_CUT))
            return
        rate = self._answer_rate(now)
        if rate:
            self._next_cut = now + _DECREASE_GAP_S
            self._answered_at_cut = self._answered
            start = max(1.0, rate * _LEARNED_START)
            self._pacers["rpm"] = Pacer(start, burst_s=self._burst_s)
            self._learned = True

    def _answer_rate(self, now: float) -> float | None:
        """Answers a minute over the last ``_RATE_WINDOW_S``; ``None`` before a
        second of it has passed."""
        for then, answered in self._history:
            if now - then <= _RATE_WINDOW_S:
                if now - then < 1.0:
                    return None
                return (self._answered - answered) / (now - then) * 60.0
        return None


class Slot:
    """One worker's claim on a ``ConcurrencyLimit`` slot, kept across requests.

    A worker that finishes a request keeps its slot for the next one, so the
    steady state costs no hand-over between tasks. It lets go while it waits
    for input or sits out a backoff, when the limit shrinks below the slots in
    use, and before a new row when a row already taken is waiting for a slot.
    """

    __slots__ = ("_limit", "held")

    def __init__(self, limit: ConcurrencyLimit) -> None:
        self._limit = limit
        self.held = False

    async def hold(self, *, new_row: bool = False) -> None:
        """Have a slot: keep the one held if the limit still allows it.

        Args:
            new_row: The slot is for a row not yet taken. Rows already taken
                (one coming out of its backoff, or one that arrived while
                every slot was busy) get free slots first, so the held slot
                is given up while one of them waits (see
                ``ConcurrencyLimit.acquire``).
        """
        limit = self._limit
        if self.held:
            if limit.in_flight <= limit.limit and not (new_row and limit.rows_waiting):
                return
            self.release()
        await limit.acquire(new_row=new_row)
        self.held = True

    def release(self) -> None:
        """Let the slot go (if held)."""
        if self.held:
            self.held = False
            self._limit.release()


class ConcurrencyLimit:
    """An adaptive cap on requests in flight (AIMD with slow start).

    With ``probe``, the first request goes alone: its response carries the
    server's rate-limit headers, which the rate limiter follows before a
    burst can overrun them. Slow start begins once it answers.

    Args:
        maximum: The user's ``--concurrency``; the limit never exceeds it.
        initial: Where slow start begins, after the probe.
        clock: Monotonic seconds.
        probe: Send one request alone first.
    """

    def __init__(
        self,
        maximum: int,
        *,
        initial: int = INITIAL_CONCURRENCY,
        clock: Clock,
        probe: bool = False,
    ) -> None:
        self.maximum = maximum
        self._initial = max(1, min(initial, maximum))
        self._probing = probe
        self.limit = 1 if probe else self._initial
        self.in_flight = 0
        self._clock = clock
        self._threshold = maximum
        self._successes = 0
        self._hold_until = -math.inf
        self._next_decrease = -math.inf
        self._answers = 0  # recent answers (decayed, see _OUTCOME_WINDOW)
        self._errors = 0  # 5xx among them
        # Workers waiting with a row in hand, served first; then workers
        # waiting to take a new row. Each queue is FIFO.
        self._rows: deque[anyio.Event] = deque()
        self._new_rows: deque[anyio.Event] = deque()

    @property
    def rows_waiting(self) -> bool:
        """Whether a row already taken is waiting for a slot."""
        return bool(self._rows)

    async def acquire(self, *, new_row: bool = False) -> None:
        """Wait for a free slot.

        Args:
            new_row: The slot is for a row not yet taken; it waits until every
                row already taken has a slot.
        """
        queue = self._new_rows if new_row else self._rows
        if self.in_flight < self.limit and not self._rows and not queue:
            self.in_flight += 1
            return
        event = anyio.Event()
        queue.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # granted just as we were cancelled
            else:
                queue.remove(event)
            raise

    def release(self) -> None:
        """Free a slot."""
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self.in_flight < self.limit:
            queue = self._rows or self._new_rows
            if not queue:
                return
            self.in_flight += 1
            queue.popleft().set()

    def end_probe(self) -> None:
        """The server answered (its headers are known): start the slow start.

        Also when it states no limit: opening the whole pool at once then sent
        a server with a limit it does not state a burst of --concurrency, and
        all but its own burst came back 429 (262 of 892 requests in a minute
        at concurrency 256 against ``serve-mock --rpm 600 --header-style
        none``, 78 of 708 with slow start). A server with no limit at all
        pays about two round trips once (0.9 s of an 11 s run at 500 ms).
        """
        if self._probing:
            self._probing = False
            self.limit = max(self.limit, self._initial)
            self._wake()

    def on_success(self) -> None:
        """Grow: +2 per success below the threshold, else +1 per window.

        The probe's success ends the probe (see ``end_probe``).
        """
        self._count(error=False)
        if self._probing:
            self.end_probe()
            return
        if self.limit >= self.maximum or self._clock() < self._hold_until:
            return
        if self.limit < self._threshold:
            # Slow start: +2 a success triples the limit each round trip.
            self.limit = min(self.limit + 2, self._threshold, self.maximum)
        else:
            self._successes += 1
            if self._successes >= self.limit:
                self._successes = 0
                self.limit += 1
        self._wake()

    def on_rate_limited(self, *, limits_known: bool = True) -> None:
        """Halve, at most once per second (one burst of 429s is one event).

        With ``limits_known=False`` (no budget stated, set or learned yet)
        nothing paces the requests, and at low latency the limit on requests
        in flight does not bound their rate: every pause ended with all of
        them sent at once and all but one refused. So go back to one request
        in flight for a second, until the rate limiter has learned a budget,
        then slow-start towards half the old limit. Against ``serve-mock --rpm
        600 --header-style none``, 600 rows at concurrency 32 drew 167 429s
        before this (165 of them in the first 5 s) and 61-62 after it, in
        the same 60 s.
        """
        now = self._clock()
        if now < self._next_decrease:
            return
        self._next_decrease = now + _DECREASE_GAP_S
        self._probing = False
        if limits_known:
            self.limit = max(1, self.limit // 2)
            self._threshold = self.limit
        else:
            self._threshold = max(1, self.limit // 2)
            self.limit = 1
            self._hold_until = max(self._hold_until, now + _DECREASE_GAP_S)
        self._successes = 0

    def _count(self, *, error: bool) -> None:
        self._answers += 1
        self._errors += error
        if self._answers >= _OUTCOME_WINDOW:
            self._answers //= 2
            self._errors //= 2

    def on_overload(self) -> None:
        """A 5xx: if 5xx are a fifth of recent answers or more, back off gently
        and hold growth for a few seconds; scattered ones change nothing."""
        self._count(error=True)
        errors = self._errors
        if errors < _OVERLOAD_MIN_ERRORS or errors < self._answers * _OVERLOAD_SHARE:
            return
        now = self._clock()
        self._hold_until = now + _OVERLOAD_HOLD_S
        if now < self._next_decrease:
            return
        self._next_decrease = now + _DECREASE_GAP_S
        # At least one slot less, even where 80 % rounds back up (2, 3, 4).
        self.limit = max(1, min(self.limit - 1, math.ceil(self.limit * 0.8)))
        self._threshold = min(self._threshold, self.limit)
