import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from tally.spiffe.rotation import WINDOW, backoff, renewal_time

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@given(st.integers(2, 10**7), st.integers(0, 2**32))
def test_renewal_lands_before_half_life(life, seed):
    not_after = T0 + timedelta(seconds=life)
    at = renewal_time(T0, not_after, random.Random(seed))
    assert T0 + timedelta(seconds=life * WINDOW[0]) - timedelta(microseconds=1) <= at
    assert at < T0 + timedelta(seconds=life / 2)


def test_renewal_is_spread_across_a_fleet():
    rng = random.Random(7)
    times = {renewal_time(T0, T0 + timedelta(hours=1), rng) for _ in range(1000)}
    spread = (max(times) - min(times)).total_seconds()
    assert spread > 3600 * 0.08  # most of the 10% window is used


@given(st.integers(0, 100), st.integers(0, 2**32))
def test_backoff_is_capped_and_grows(attempt, seed):
    delay = backoff(attempt, random.Random(seed), base=0.5, cap=30)
    assert 0.25 <= delay <= 30
    if attempt >= 10:
        assert delay >= 15
