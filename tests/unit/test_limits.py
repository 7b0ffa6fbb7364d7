"""The token bucket and the stream counter, with an injected clock."""

from __future__ import annotations

import pytest

from discovery.security.limits import RateLimiter, StreamLimiter, StreamSlot
from discovery.security.policy import UNLIMITED, Limits

TEN = Limits(writes_per_second=10.0, write_burst=5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate() -> None:
    clock = Clock()
    rl = RateLimiter(clock=clock)
    assert [rl.take("a", TEN) for _ in range(5)] == [0.0] * 5
    assert rl.take("a", TEN) == pytest.approx(0.1)
    clock.now += 0.05
    assert rl.take("a", TEN) == pytest.approx(0.05)  # a refused take spends nothing
    clock.now += 0.05
    assert rl.take("a", TEN) == 0.0
    assert rl.take("a", TEN) == pytest.approx(0.1)
    clock.now += 10
    assert [rl.take("a", TEN) for _ in range(6)] == [0.0] * 5 + [pytest.approx(0.1)]  # refill caps at the burst


def test_identities_are_independent() -> None:
    rl = RateLimiter(clock=Clock())
    for _ in range(5):
        rl.take("noisy", TEN)
    assert rl.take("noisy", TEN) > 0
    assert rl.take("quiet", TEN) == 0.0


def test_explicit_now_overrides_the_clock() -> None:
    rl = RateLimiter(clock=lambda: 0.0)
    for _ in range(5):
        rl.take("a", TEN, now=50.0)
    assert rl.take("a", TEN, now=50.0) == pytest.approx(0.1)
    assert rl.take("a", TEN, now=50.1) == 0.0


def test_cost() -> None:
    clock = Clock()
    rl = RateLimiter(clock=clock)
    assert rl.take("a", TEN, cost=3) == 0.0
    assert rl.take("a", TEN, cost=3) == pytest.approx(0.1)  # 2 left, 3 needed
    clock.now += 10
    assert rl.take("a", TEN, cost=50) == 0.0  # capped at the burst: waits for a full bucket, not forever
    assert rl.take("a", TEN, cost=50) == pytest.approx(0.5)


def test_zero_rate_is_no_limit_and_zero_burst_counts_as_one() -> None:
    rl = RateLimiter(clock=Clock())
    assert all(rl.take("a", UNLIMITED) == 0.0 for _ in range(1000))
    assert len(rl) == 0
    one = Limits(writes_per_second=2.0, write_burst=0)
    assert rl.take("b", one) == 0.0
    assert rl.take("b", one) == pytest.approx(0.5)


def test_a_lowered_burst_applies_at_once() -> None:
    clock = Clock()
    rl = RateLimiter(clock=clock)
    rl.take("a", Limits(writes_per_second=1.0, write_burst=100))
    low = Limits(writes_per_second=1.0, write_burst=2)
    assert [rl.take("a", low) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_idle_identities_are_forgotten() -> None:
    clock = Clock()
    rl = RateLimiter(clock=clock)
    for i in range(1000):
        rl.take(f"id{i}", TEN)
    assert len(rl) == 1000
    clock.now += 1  # every bucket is full again after burst/rate = 0.5 s
    for _ in range(24):
        rl.take("busy", TEN)
        clock.now += 0.1
    assert len(rl) <= 2


def test_memory_is_bounded_even_when_all_are_busy() -> None:
    rl = RateLimiter(max_identities=10, clock=Clock())
    for i in range(100):
        rl.take(f"id{i}", TEN)
    assert len(rl) <= 10
    assert rl.take("id99", TEN) == 0.0  # the most recent kept their buckets


def test_streams() -> None:
    sl = StreamLimiter()
    a = sl.acquire("a", 2)
    b = sl.acquire("a", 2)
    assert isinstance(a, StreamSlot) and isinstance(b, StreamSlot)
    assert sl.acquire("a", 2) is None
    assert sl.acquire("b", 2) is not None  # other identities are unaffected
    assert sl.count("a") == 2
    a.release()
    a.release()  # idempotent: a double release must not free someone else's slot
    assert sl.count("a") == 1
    c = sl.acquire("a", 2)
    assert c is not None and sl.acquire("a", 2) is None
    with c:
        pass
    b.release()
    assert sl.count("a") == 0 and "a" not in sl._open


def test_stream_released_when_the_block_raises() -> None:
    sl = StreamLimiter()
    slot = sl.acquire("a", 1)
    assert slot is not None
    with pytest.raises(RuntimeError), slot:
        raise RuntimeError("stream broke")
    assert sl.count("a") == 0 and len(sl) == 0


def test_zero_streams_is_no_limit_but_counted() -> None:
    sl = StreamLimiter()
    slots = [sl.acquire("a", 0) for _ in range(500)]
    assert all(s is not None for s in slots) and sl.count("a") == 500
