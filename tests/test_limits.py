"""Token bucket, command rate limiter and connection counters, on a fake clock."""

from __future__ import annotations

from herald.limits import CommandRateLimiter, ConnectionCounter, RateVerdict, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.1  # one token back at 10/s
    assert bucket.take()
    assert not bucket.take()
    clock.now += 100  # refill is capped at the burst
    assert bucket.tokens == 5


def test_disabled_bucket_never_limits() -> None:
    bucket = TokenBucket(rate=0, burst=1, clock=Clock())
    assert not bucket.enabled
    assert all(bucket.take() for _ in range(10_000))


def test_rate_limiter_limits_then_reports_abuse() -> None:
    clock = Clock()
    limiter = CommandRateLimiter(rate=10, burst=3, strikes=4, clock=clock)
    verdicts = [limiter.check() for _ in range(3 + 4 + 1)]
    assert verdicts[:3] == [RateVerdict.OK] * 3
    assert verdicts[3:7] == [RateVerdict.LIMITED] * 4
    assert verdicts[7] is RateVerdict.ABUSE


def test_rate_limiter_forgives_a_short_burst() -> None:
    clock = Clock()
    limiter = CommandRateLimiter(rate=10, burst=2, strikes=2, clock=clock)
    assert [limiter.check() for _ in range(4)] == [
        RateVerdict.OK,
        RateVerdict.OK,
        RateVerdict.LIMITED,
        RateVerdict.LIMITED,
    ]
    clock.now += 10  # strikes refill at strikes/10 per second: all back after 10 s
    assert [limiter.check() for _ in range(4)] == [
        RateVerdict.OK,
        RateVerdict.OK,
        RateVerdict.LIMITED,
        RateVerdict.LIMITED,
    ]


def test_rate_limiter_off() -> None:
    limiter = CommandRateLimiter(rate=0, burst=1, strikes=1, clock=Clock())
    assert all(limiter.check() is RateVerdict.OK for _ in range(1000))


def test_connection_counter_enforces_limit_and_forgets_released_keys() -> None:
    counter = ConnectionCounter(limit=2)
    assert counter.acquire("1.2.3.4") and counter.acquire("1.2.3.4")
    assert not counter.acquire("1.2.3.4")
    assert counter.count("1.2.3.4") == 2  # the refused one was not counted
    assert counter.acquire("5.6.7.8")
    counter.release("1.2.3.4")
    assert counter.acquire("1.2.3.4")
    for _ in range(2):
        counter.release("1.2.3.4")
    counter.release("5.6.7.8")
    assert len(counter) == 0  # no memory kept for IPs that left


def test_connection_counter_unlimited_still_counts() -> None:
    counter = ConnectionCounter(limit=0)
    assert all(counter.acquire("a") for _ in range(500))
    assert counter.count("a") == 500


def test_connection_counter_limit_given_per_call_wins() -> None:
    counter = ConnectionCounter(limit=0)  # as herald.leases keeps one per kind of key
    assert counter.acquire("a", 2) and counter.acquire("a", 2)
    assert not counter.acquire("a", 2) and counter.acquire("a", 3)
    assert counter.acquire("a") and counter.count("a") == 4  # the counter's own: unlimited
    one = ConnectionCounter(limit=1)
    assert one.acquire("b", 0) and one.acquire("b", 0)  # 0 given: unlimited


# ---------------------------------------------------------------- guards found by mutation testing


def test_bucket_holds_at_least_one_token() -> None:
    for burst in (0, 0.5, 1):
        bucket = TokenBucket(rate=10, burst=burst, clock=Clock())
        assert bucket.burst == 1.0
        assert [bucket.take() for _ in range(2)] == [True, False]


def test_slow_rates_still_limit_and_detect_abuse() -> None:
    clock = Clock()
    limiter = CommandRateLimiter(rate=0.5, burst=1, strikes=1, clock=clock)
    assert [limiter.check() for _ in range(3)] == [RateVerdict.OK, RateVerdict.LIMITED, RateVerdict.ABUSE]


def test_strikes_refill_at_a_tenth_of_their_capacity_per_second() -> None:
    clock = Clock()
    limiter = CommandRateLimiter(rate=0.01, burst=1, strikes=4, clock=clock)
    assert [limiter.check() for _ in range(6)] == [RateVerdict.OK] + [RateVerdict.LIMITED] * 4 + [
        RateVerdict.ABUSE
    ]
    clock.now += 2  # 0.8 strike back: not yet one
    assert limiter.check() is RateVerdict.ABUSE
    clock.now += 0.5  # 1.0
    assert limiter.check() is RateVerdict.LIMITED
    one = CommandRateLimiter(rate=0.01, burst=1, strikes=1, clock=clock)
    assert [one.check() for _ in range(3)] == [RateVerdict.OK, RateVerdict.LIMITED, RateVerdict.ABUSE]
    clock.now += 7  # one strike refills in 10 s
    assert one.check() is RateVerdict.ABUSE
    clock.now += 3
    assert one.check() is RateVerdict.LIMITED


def test_connection_counter_with_a_limit_of_one() -> None:
    counter = ConnectionCounter(limit=1)
    assert counter.acquire("a") and not counter.acquire("a")
    assert counter.count("a") == 1


def test_connection_counter_release_counts_down_one() -> None:
    counter = ConnectionCounter(limit=10)
    for _ in range(3):
        counter.acquire("a")
    counter.release("a")
    assert counter.count("a") == 2
    counter.release("a")
    assert counter.count("a") == 1 and len(counter) == 1
    counter.release("a")
    assert counter.count("a") == 0 and len(counter) == 0
    counter.release("never-seen")  # a release without an acquire is harmless
    assert counter.count("never-seen") == 0 and len(counter) == 0
