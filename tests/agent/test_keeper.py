"""The agent's renewal loops in virtual time, against a fake CA at the CA-client boundary.

The fake implements `agent.keeper.CAApi` and mints real X.509-SVIDs with the
CA's own certificate code (`tally.spiffe.x509profile`); everything inside the
boundary is the real keeper and the real Workload API backend.  Key generation
and state files run inline (the ``offload``), so no worker thread lets the
autojump clock move while work is in flight.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import trio
import trio.lowlevel
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent import state
from agent.backend import AgentBackend
from agent.ca_client import CAError, Issued
from agent.keeper import SIGN_BEFORE_PARK_S, SvidKeeper
from agent.renewal import BundleNews, EntriesPage, Entry
from tally.spiffe import pem, rotation, x509profile
from tally.spiffe.spiffeid import SpiffeId, TrustDomain

T = TypeVar("T")

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
TD = TrustDomain.parse("example.org")
SVID_TTL = 3600.0
AGENT_ID = "spiffe://example.org/tally/agent/n1"
ENTRY: dict[str, object] = {
    "id": "e1",
    "spiffe_id": "spiffe://example.org/web",
    "selectors": ["unix:uid:1000"],
    "revision": 1,
}


def clock() -> datetime:
    """Wall time derived from trio's clock, so autojump moves both (STYLE 10)."""
    return EPOCH + timedelta(seconds=trio.current_time())


def at(when: datetime) -> float:
    """The trio time of a wall-clock instant."""
    return (when - EPOCH).total_seconds()


async def inline(work: Callable[[], T]) -> T:
    return work()


class FakeCA:
    """The CA behind `CAApi`: one entry, one bundle, and a switch that makes it fail."""

    def __init__(self) -> None:
        self.key = x509profile.generate_key()
        self.root = x509profile.build_root(
            self.key, TD, EPOCH - timedelta(days=1), EPOCH + timedelta(days=3650)
        )
        self.failing = False
        self.busy = 0
        """Calls to sign still to refuse with 429 and ``Retry-After: 20``."""
        self.refusal: CAError | None = None
        """Set to make every call about the agent refuse, as the CA does for good."""
        self.sign_calls: list[float] = []
        """trio times of every sign call, failed ones included."""
        self.called = trio.Event()
        self.roots = [self.root]
        self.bundle_sequence = 1
        self.bundle_changed = trio.Event()
        self.entry_calls: list[int | None] = []
        """The bundle sequence each entries call said it held."""
        self.polls: list[tuple[float, float]] = []
        """(trio time, wait) of every entries call."""
        self.sign_delay = 0.0
        """How long a sign call takes to answer."""

    def new_root(self) -> None:
        """A root added to the bundle: parked entries polls end and carry it."""
        key = x509profile.generate_key()
        self.roots.append(
            x509profile.build_root(key, TD, EPOCH - timedelta(days=1), EPOCH + timedelta(days=3650))
        )
        self.bundle_sequence += 1
        self.bundle_changed.set()
        self.bundle_changed = trio.Event()

    def bundle_news(self, held: int | None) -> BundleNews | None:
        if held is None or held == self.bundle_sequence:
            return None
        return BundleNews(self.bundle_sequence, pem.chain_to_pem(self.roots), b'{"keys": []}')

    def leaf(self, public_key: Any, spiffe_id: str, ttl: float) -> x509.Certificate:
        now = clock()
        return x509profile.build_leaf(
            public_key,
            SpiffeId.parse(spiffe_id),
            self.root,
            self.key,
            now,
            now + timedelta(seconds=ttl),
        )

    async def renew(self, key: ec.EllipticCurvePrivateKey) -> Issued:
        leaf = self.leaf(key.public_key(), AGENT_ID, 86400)
        return Issued(AGENT_ID, format(leaf.serial_number, "x"), (leaf, self.root))

    async def entries(self, since: int = -1, wait: float = 0) -> tuple[int, list[dict[str, Any]]]:
        if self.refusal is not None:
            raise self.refusal
        if since != 1:
            return 1, [dict(ENTRY)]
        await trio.sleep(wait)  # a long poll with nothing new
        return 1, [dict(ENTRY)]

    async def entries_sync(
        self,
        since: int = -1,
        wait: float = 0,
        after: str = "",
        limit: int | None = None,
        bundle: int | None = None,
    ) -> EntriesPage:
        self.entry_calls.append(bundle)
        self.polls.append((trio.current_time(), wait))
        if self.refusal is not None:
            raise self.refusal
        if since != 1:
            return EntriesPage(1, True, (dict(ENTRY),), bundle=self.bundle_news(bundle))
        if self.bundle_news(bundle) is None:
            with trio.move_on_after(wait):  # a long poll: nothing new, or a new bundle
                await self.bundle_changed.wait()
        return EntriesPage(1, False, (), bundle=self.bundle_news(bundle))

    async def sign(self, requests: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        self.sign_calls.append(trio.current_time())
        self.called.set()
        self.called = trio.Event()
        if self.busy:
            self.busy -= 1
            raise CAError("overloaded", "the CA is busy; retry in 20s", 429, retry_after=20)
        if self.failing:
            raise CAError("unreachable", "CA at ca:8081 unreachable: connection refused")
        await trio.sleep(self.sign_delay)
        results = []
        for entry_id, csr in requests:
            assert entry_id == ENTRY["id"]
            leaf = self.leaf(
                x509profile.csr_public_key(csr.encode()), str(ENTRY["spiffe_id"]), SVID_TTL
            )
            results.append(
                {
                    "entry_id": entry_id,
                    "serial": format(leaf.serial_number, "x"),
                    "chain": (leaf, self.root),
                }
            )
        return results

    async def jwt(self, entry_id: str, audience: Sequence[str]) -> str:
        raise CAError("not_authorized", "no JWT keys in this fake")

    def set_identity(
        self, chain: Sequence[x509.Certificate], key: ec.EllipticCurvePrivateKey
    ) -> None:
        pass

    def set_roots(self, roots: Sequence[x509.Certificate]) -> None:
        pass

    async def wait_sign_calls(self, count: int) -> None:
        while len(self.sign_calls) < count:
            await self.called.wait()


@pytest.fixture
def ca() -> FakeCA:
    return FakeCA()


def make_keeper(ca: FakeCA, tmp_path) -> SvidKeeper:
    key = x509profile.generate_key()
    agent_leaf = ca.leaf(key.public_key(), AGENT_ID, 86400)
    return SvidKeeper(
        ca,
        state.AgentIdentity(key, (agent_leaf, ca.root)),
        [ca.root],
        1,
        tmp_path,
        clock=clock,
        rng=random.Random(7),
        offload=inline,
    )


def served_serial(keeper: SvidKeeper) -> int:
    """The serial the Workload API would hand the entry's workload right now."""
    backend = AgentBackend(keeper, str(TD.id()))
    snapshot = backend.snapshot_for(Entry.from_json(ENTRY).selectors)
    [item] = snapshot.svids
    return pem.chain_from_der(item.cert_chain_der)[0].serial_number


def _ceiling(attempt: int) -> float:
    """`rotation.backoff`'s ceiling while the cap is 30 s (far from any expiry)."""
    return min(30.0, 0.5 * 2**attempt)


async def test_renews_at_half_life_retries_with_backoff_and_serves_the_old_svid(
    autojump_clock, ca, tmp_path
):
    keeper = make_keeper(ca, tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await ca.wait_sign_calls(1)
        await trio.lowlevel.checkpoint()  # let the minter store what it got
        first = keeper.svids["e1"]
        assert ca.sign_calls == [0.0]
        assert served_serial(keeper) == first.chain[0].serial_number

        # Renewal is planned inside the jitter window, before half the life is gone.
        life = (first.not_after - first.chain[0].not_valid_before_utc).total_seconds()
        assert life == SVID_TTL
        low, high = rotation.WINDOW
        assert low * life <= at(first.renew_at) <= high * life < life / 2

        # The CA goes away: the first attempt comes exactly at the planned time ...
        ca.failing = True
        await ca.wait_sign_calls(2)
        assert ca.sign_calls[1] == pytest.approx(at(first.renew_at), abs=1e-3)

        # ... and retries back off, jittered, doubling up to the 30 s cap.
        recover_at = at(first.renew_at) + 600
        await trio.sleep_until(recover_at)
        attempts = ca.sign_calls[1:]
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert len(gaps) >= 20
        for attempt, gap in enumerate(gaps, start=1):
            assert _ceiling(attempt) / 2 - 1e-3 <= gap <= _ceiling(attempt) + 1e-3, attempt
        assert keeper.counters.rotation_failures == len(attempts)
        assert keeper.counters.by_reason == {"unreachable": len(attempts)}

        # Meanwhile the held SVID is served, past its half-life, not dropped early.
        assert trio.current_time() > life / 2
        assert keeper.svids["e1"] is first
        assert served_serial(keeper) == first.chain[0].serial_number
        assert keeper.at_risk() == []

        # The CA comes back: the next retry (within one capped delay) renews.
        ca.failing = False
        failed = len(ca.sign_calls)
        await ca.wait_sign_calls(failed + 1)
        await trio.lowlevel.checkpoint()
        assert ca.sign_calls[-1] - recover_at <= 30.0 + 1e-3
        second = keeper.svids["e1"]
        assert second is not first
        assert served_serial(keeper) == second.chain[0].serial_number
        assert keeper.counters.rotations == 1

        # And the successor is renewed on its own schedule, with no retries.
        await ca.wait_sign_calls(failed + 2)
        assert ca.sign_calls[-1] == pytest.approx(at(second.renew_at), abs=1e-3)
        nursery.cancel_scope.cancel()


async def test_a_stale_svid_halts_the_agent_but_is_not_eviction(
    autojump_clock, ca, tmp_path, caplog
):
    """The CA knows a newer SVID (a restored backup): say so and how to recover, once."""
    ca.refusal = CAError("stale_svid", "the CA knows a newer SVID for this agent (serial abc)")
    keeper = make_keeper(ca, tmp_path)
    with trio.move_on_after(600):
        await keeper.run()
    assert keeper.halted == "stale_svid" and keeper.stale
    assert keeper.evicted is None  # so tally_agent_evicted stays 0
    [line] = [r for r in caplog.records if r.getMessage() == "agent.stale"]
    assert not [r for r in caplog.records if r.getMessage() == "agent.evicted"]
    fields = line.tally_fields
    assert fields["serial"] == format(keeper.identity.chain[0].serial_number, "x")
    assert "(serial abc)" in fields["detail"] and "restored from a backup" in fields["detail"]
    assert f"--spiffe-id {AGENT_ID}" in fields["action"] and "--join-token" in fields["action"]


async def test_eviction_is_still_eviction(autojump_clock, ca, tmp_path, caplog):
    ca.refusal = CAError("evicted", "agent was evicted; attest again with a new join token")
    keeper = make_keeper(ca, tmp_path)
    with trio.move_on_after(600):
        await keeper.run()
    assert keeper.evicted == "evicted" and not keeper.stale
    assert [r.getMessage() for r in caplog.records].count("agent.evicted") == 1


async def test_an_overloaded_ca_is_given_its_retry_after_with_jitter(autojump_clock, tmp_path):
    """429 + Retry-After: each retry waits at least what the CA asked, up to half again
    at random, so agents refused together come back spread out."""
    gaps: list[list[float]] = []
    for seed in range(3):
        ca = FakeCA()
        ca.busy = 3
        keeper = make_keeper(ca, tmp_path)
        keeper.rng = random.Random(seed)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper.run)
            await ca.wait_sign_calls(4)
            await trio.lowlevel.checkpoint()
            assert "e1" in keeper.svids  # the fourth call was served
            nursery.cancel_scope.cancel()
        steps = [b - a for a, b in itertools.pairwise(ca.sign_calls)]
        assert all(20 <= gap <= 30 + 1e-3 for gap in steps), steps
        assert keeper.counters.by_reason == {"overloaded": 3}
        gaps.append(steps)
    assert len({round(g[0], 3) for g in gaps}) == 3  # jittered: no two agents in step


class PagedCA(FakeCA):
    """Five entries served in full pages of two, then one deletion as a delta."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, str, float]] = []
        self.deleted = trio.Event()

    def _entry(self, n: int) -> dict[str, object]:
        return {**ENTRY, "id": f"e{n}", "spiffe_id": f"spiffe://example.org/w{n}"}

    async def entries_sync(
        self,
        since: int = -1,
        wait: float = 0,
        after: str = "",
        limit: int | None = None,
        bundle: int | None = None,
    ) -> EntriesPage:
        self.calls.append((since, after, wait))
        if since < 0:
            ids = sorted(f"e{n}" for n in range(5))
            page = [i for i in ids if i > after][:2]
            more = page[-1] != ids[-1]
            entries = tuple(self._entry(int(i[1:])) for i in page)
            return EntriesPage(7, True, entries, (), more, page[-1] if more else None)
        if since == 7:
            await self.deleted.wait()
            return EntriesPage(8, False, (), ("e3",))
        await trio.sleep(wait)
        return EntriesPage(since, False, ())

    async def sign(self, requests: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        return [
            {
                "entry_id": eid,
                "serial": "1",
                "chain": (
                    self.leaf(
                        x509profile.csr_public_key(csr.encode()),
                        f"spiffe://example.org/w{eid[1:]}",
                        3600,
                    ),
                    self.root,
                ),
            }
            for eid, csr in requests
        ]


async def test_the_poll_parks_again_only_once_the_minter_has_signed(autojump_clock, ca, tmp_path):
    """Rule 6: the entries that arrive at start are signed before the poll parks, so the
    signing call can take the connection the poll left idle (one handshake, not two)."""
    ca.sign_delay = 2.0
    keeper = make_keeper(ca, tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    parked = [at for at, wait in ca.polls if wait > 0]
    assert ca.polls[0][1] == 0 and len(ca.sign_calls) == 1
    assert parked and parked[0] >= ca.sign_calls[0] + ca.sign_delay


async def test_a_ca_slow_to_sign_does_not_keep_the_poll_away(autojump_clock, ca, tmp_path):
    """Rule 6 waits for the minter at most SIGN_BEFORE_PARK_S: then the poll parks anyway."""
    ca.sign_delay = 2 * SIGN_BEFORE_PARK_S
    keeper = make_keeper(ca, tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(SIGN_BEFORE_PARK_S + 10)
        nursery.cancel_scope.cancel()
    parked = [at for at, wait in ca.polls if wait > 0]
    assert parked and parked[0] - ca.sign_calls[0] <= SIGN_BEFORE_PARK_S + 0.01


async def test_a_minter_backing_off_lets_the_poll_park(autojump_clock, ca, tmp_path):
    """Rule 6: a failed signing call holds no connection while it backs off."""
    ca.failing = True
    keeper = make_keeper(ca, tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(SIGN_BEFORE_PARK_S / 2)
        nursery.cancel_scope.cancel()
    parked = [at for at, wait in ca.polls if wait > 0]
    assert parked and parked[0] - ca.sign_calls[0] < 1


async def test_entries_arrive_in_pages_then_as_deltas(autojump_clock, tmp_path):
    ca = PagedCA()
    keeper = make_keeper(ca, tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(1)
        assert sorted(keeper.entries) == ["e0", "e1", "e2", "e3", "e4"]
        assert keeper.entries_revision == 7 and keeper.entries_synced
        # Three pages without waiting, the first from the start, then a parked delta poll.
        assert [c[:2] for c in ca.calls[:4]] == [(-1, ""), (-1, "e1"), (-1, "e3"), (7, "")]
        assert [c[2] for c in ca.calls[:4]] == [0, 0, 0, keeper.poll_wait]
        ca.deleted.set()
        await trio.sleep(1)
        assert sorted(keeper.entries) == ["e0", "e1", "e2", "e4"]
        assert "e3" not in keeper.svids and keeper.entries_revision == 8
        nursery.cancel_scope.cancel()


async def test_a_new_bundle_ends_the_one_parked_poll_and_is_trusted_at_once(
    autojump_clock, ca, tmp_path
):
    keeper = make_keeper(ca, tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(1)
        # The first poll asks for the bundle (for its JWT keys), the next ones park
        # holding its sequence; no other request is parked for the bundle.
        assert ca.entry_calls[:2] == [-1, 1]
        assert keeper.jwt_bundle is not None and keeper.roots == [ca.root]
        parked_at = trio.current_time()
        await trio.sleep(keeper.poll_wait / 2)
        ca.new_root()
        await trio.sleep(0.01)
        assert trio.current_time() - parked_at < keeper.poll_wait  # not on the next poll
        assert keeper.bundle_sequence == 2 and keeper.roots == ca.roots
        assert state.load_bundle(tmp_path) == (ca.roots, 2)
        assert ca.entry_calls[-1] == 2  # and it parks again, holding the new sequence
        nursery.cancel_scope.cancel()
