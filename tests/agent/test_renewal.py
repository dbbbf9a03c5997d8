"""The agent's pure renewal decisions, with ``now`` passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent import renewal
from agent.renewal import Entry, HeldSvid
from tally.spiffe import x509profile
from tally.spiffe.spiffeid import SpiffeId, TrustDomain

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
TD = TrustDomain.parse("example.org")
ROOT_KEY = x509profile.generate_key()
ROOT = x509profile.build_root(ROOT_KEY, TD, T0 - timedelta(days=1), T0 + timedelta(days=365))


def entry(eid: str = "e1", revision: int = 1, **extra: object) -> dict[str, object]:
    return {
        "id": eid,
        "spiffe_id": f"spiffe://example.org/{eid}",
        "selectors": ["unix:uid:1000"],
        "revision": revision,
        **extra,
    }


def held(raw: dict[str, object], *, ttl: timedelta = HOUR, renew_after: float = 0.4) -> HeldSvid:
    key = x509profile.generate_key()
    parsed = Entry.from_json(raw)
    leaf = x509profile.build_leaf(
        key.public_key(), SpiffeId.parse(parsed.spiffe_id), ROOT, ROOT_KEY, T0, T0 + ttl
    )
    return HeldSvid(parsed, key, (leaf,), "1", T0 + ttl, T0 + ttl * renew_after)


def test_entries_new_changed_removed_and_ignored():
    first = renewal.compare_entries({}, [entry("e1"), entry("e2")])
    assert set(first.entries) == {"e1", "e2"}
    assert first.changed and first.removed == frozenset() and first.ignored == ()

    same = renewal.compare_entries(first.entries, [entry("e1"), entry("e2")])
    assert not same.changed and same.removed == frozenset()

    later = renewal.compare_entries(
        first.entries, [entry("e1", revision=2), {"id": "bad", "selectors": ["nocolon"]}]
    )
    assert later.changed
    assert later.removed == frozenset({"e2"})
    assert set(later.entries) == {"e1"}
    [(eid, why)] = later.ignored
    assert eid == "bad" and why


def test_due_when_missing_changed_or_at_its_renewal_time():
    entries = renewal.compare_entries({}, [entry("e1"), entry("e2"), entry("e3")]).entries
    e1 = held(entry("e1"))
    e2_old = held(entry("e2", revision=0))  # minted for an older revision of e2
    svids = {"e1": e1, "e2": e2_old}
    assert [e.id for e in renewal.due(entries, svids, T0)] == ["e2", "e3"]
    assert [e.id for e in renewal.due(entries, svids, e1.renew_at)] == ["e1", "e2", "e3"]


def test_next_wake_is_the_soonest_renewal_or_expiry():
    a, b = held(entry("e1"), renew_after=0.45), held(entry("e2"), renew_after=0.4)
    assert renewal.next_wake({"e1": a, "e2": b}, T0) == b.renew_at
    assert renewal.next_wake({}, T0) == T0 + HOUR


def test_an_svid_leaves_only_at_its_not_after():
    svid = held(entry("e1"))
    assert renewal.expired({"e1": svid}, svid.not_after - timedelta(seconds=1)) == []
    assert renewal.expired({"e1": svid}, svid.not_after) == ["e1"]


def test_at_risk_in_the_last_quarter_of_its_life():
    svid = held(entry("e1"))
    assert renewal.at_risk({"e1": svid}, T0 + HOUR * 0.74) == []
    assert renewal.at_risk({"e1": svid}, T0 + HOUR * 0.76) == ["spiffe://example.org/e1"]


def test_soonest_expiry_includes_the_agents_own_svid():
    svid = held(entry("e1"))
    agent_leaf = held(entry("agent"), ttl=timedelta(minutes=10)).chain[0]
    assert renewal.soonest_expiry({"e1": svid}, agent_leaf) == T0 + timedelta(minutes=10)
    assert renewal.soonest_expiry({}, held(entry("x")).chain[0]) == T0 + HOUR


@pytest.mark.parametrize(
    ("left_s", "waiting", "cap"),
    [(3600, False, 30.0), (3600, True, 5.0), (80, False, 10.0), (4, False, 1.0), (-60, True, 1.0)],
)
def test_retry_cap_follows_what_is_at_stake(left_s, waiting, cap):
    assert renewal.retry_cap(T0, T0 + timedelta(seconds=left_s), waiting) == cap
