"""Rotation policy at the proxy: the pure judgement, its properties, and the compliance histograms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from tally.ops.metrics import Histogram, histogram
from tally.spiffe.peer_policy import (
    LIFETIME_EXCEEDS_POLICY,
    STALE_CERTIFICATE,
    RotationPolicy,
    judge,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
bounds = st.none() | st.integers(1, 10**7).map(float)
seconds = st.integers(-(10**7), 10**7)
positive = st.integers(1, 10**8)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


@given(bounds, bounds, seconds, positive, seconds)
def test_the_verdict_is_exactly_the_two_bounds(max_lifetime, max_age, nb, life, now):
    policy = RotationPolicy(max_lifetime, max_age)
    v = judge(policy, at(nb), at(nb + life), at(now))
    too_long = max_lifetime is not None and life > max_lifetime
    too_old = max_age is not None and now - nb > max_age
    if too_long:
        assert v.reason == LIFETIME_EXCEEDS_POLICY  # lifetime wins: it never changes (rule 2)
    elif too_old:
        assert v.reason == STALE_CERTIFICATE
    else:
        assert v.admitted and v.detail == ""


@given(bounds, bounds, seconds, positive, seconds)
def test_the_deadline_is_expiry_or_max_age_whichever_first(max_lifetime, max_age, nb, life, now):
    v = judge(RotationPolicy(max_lifetime, max_age), at(nb), at(nb + life), at(now))
    want = nb + life if max_age is None else min(nb + life, nb + max_age)
    assert v.deadline == at(want)
    assert v.deadline <= at(nb + life)


@given(bounds, bounds, seconds, positive, seconds, st.integers(0, 10**7))
def test_a_refusal_never_turns_into_admission_as_time_passes(
    max_lifetime, max_age, nb, life, now, later
):
    """Time only makes a leaf older: once refused, refused for ever (no flapping)."""
    policy = RotationPolicy(max_lifetime, max_age)
    first = judge(policy, at(nb), at(nb + life), at(now))
    second = judge(policy, at(nb), at(nb + life), at(now + later))
    if not first.admitted:
        assert not second.admitted


@given(bounds, bounds, seconds, positive, seconds)
def test_an_admitted_leaf_is_admitted_until_its_deadline(max_lifetime, max_age, nb, life, now):
    policy = RotationPolicy(max_lifetime, max_age)
    v = judge(policy, at(nb), at(nb + life), at(now))
    if v.admitted and v.deadline >= at(now):
        assert judge(policy, at(nb), at(nb + life), v.deadline).admitted
        after = judge(policy, at(nb), at(nb + life), v.deadline + timedelta(seconds=1))
        assert after.admitted == (max_age is None or nb + life < nb + max_age)


@given(seconds, positive, seconds)
def test_no_policy_admits_everything(nb, life, now):
    policy = RotationPolicy()
    assert policy.empty
    v = judge(policy, at(nb), at(nb + life), at(now))
    assert v.admitted and v.deadline == at(nb + life)


def test_details_name_the_setting_and_the_numbers():
    policy = RotationPolicy(max_lifetime=3600, max_age=600)
    long = judge(policy, at(0), at(86400), at(1))
    assert long.reason == LIFETIME_EXCEEDS_POLICY
    assert "86400s" in long.detail and "max_peer_lifetime 3600s" in long.detail
    old = judge(policy, at(0), at(3600), at(900))
    assert old.reason == STALE_CERTIFICATE
    assert "900s ago" in old.detail and "max_peer_age 600s" in old.detail


@given(st.lists(st.floats(-1e9, 1e9, allow_nan=False), max_size=50))
def test_histogram_buckets_are_cumulative_and_count_everything(values):
    h = Histogram((60, 3600, 86400))
    for v in values:
        h.observe(v)
    family = histogram("x_seconds", "doc", h)
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets["+Inf"] == len(values)
    assert buckets["60"] <= buckets["3600"] <= buckets["86400"] <= buckets["+Inf"]
    assert buckets["3600"] == sum(1 for v in values if v <= 3600)
    count = next(s.value for s in family.samples if s.name == "x_seconds_count")
    assert count == len(values)
