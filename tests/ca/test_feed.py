"""The change feed: a change wakes only the long polls it concerns.

The fleet tests run the real agent API handlers (`ca.api.AgentApi`) over the
real `Authority` and SQLite store, with hundreds of polls parked in one trio
run.  Store calls run inline (as in the parser property tests), so every
handler is parked or done whenever `wait_all_tasks_blocked` returns and the
counts can be read exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlencode

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agent.ca_client import make_csr
from ca.api import AdminApi, AgentApi, AgentPeer
from ca.authority import Authority
from ca.feed import BUNDLE, ChangeFeed, concerned_agents
from ca.store import EntryRecord
from tally.spiffe.spiffeid import SpiffeId
from tally.spiffe.x509profile import generate_key
from tally.wire import http

T = TypeVar("T")
AGENTS = [f"spiffe://example.org/agent/a{i}" for i in range(4)]


async def inline(fn: Callable[[], T]) -> T:
    return fn()


def _entry(eid: str, parent: str, rev: int) -> EntryRecord:
    return EntryRecord(
        eid, "spiffe://example.org/w", parent, ("unix:uid:1",), None, (), "", rev, 0, 0
    )


def _view(entries: dict[str, EntryRecord], agent: str) -> frozenset[EntryRecord]:
    """What `Authority.entries_for` serves an agent: the entries it parents."""
    return frozenset(e for e in entries.values() if e.parent_id == agent)


@given(
    st.dictionaries(st.sampled_from("abcdef"), st.sampled_from(AGENTS), max_size=6),
    st.sampled_from("abcdefg"),
    st.one_of(st.none(), st.sampled_from(AGENTS)),
)
def test_concerned_agents_are_exactly_those_whose_view_changes(
    held: dict[str, str], eid: str, new_parent: str | None
) -> None:
    """Create, update (same or another parent) or delete one entry: the agents
    `concerned_agents` names are exactly the agents whose served set differs."""
    before = {k: _entry(k, parent, 1) for k, parent in held.items()}
    after = dict(before)
    if new_parent is None:
        after.pop(eid, None)
    else:
        after[eid] = _entry(eid, new_parent, 2)  # every change bumps the entry's revision
    concerned = concerned_agents(before.get(eid), after.get(eid))
    differs = {a for a in AGENTS if _view(before, a) != _view(after, a)}
    assert concerned == differs


async def test_a_key_wakes_its_own_polls_only(autojump_clock: trio.testing.MockClock) -> None:
    feed = ChangeFeed()
    news = {"a": False, "b": False}
    done: list[str] = []

    async def poll(key: str) -> None:
        async def changed() -> bool:
            return news[key]

        await feed.wait_until(key, changed, 30)
        done.append(f"{key}@{trio.current_time():g}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll, "a")
        nursery.start_soon(poll, "b")
        await trio.sleep(1)
        assert (feed.parked, feed.checks) == (2, 2)
        news["a"] = True
        assert feed.wake(["a", "nobody"]) == 1
        await trio.sleep(1)
        assert done == ["a@1"]
        assert (feed.parked, feed.checks, feed.wakeups) == (1, 3, 1)
    assert done == ["a@1", "b@30"]  # b ran to its deadline, never checked again
    assert feed.checks == 3


async def test_stop_answers_parked_polls_and_refuses_to_park() -> None:
    feed = ChangeFeed()

    async def never() -> bool:
        return False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.wait_until, BUNDLE, never, 30)
        await trio.testing.wait_all_tasks_blocked()
        feed.stop()
    with trio.fail_after(1):
        await feed.wait_until(BUNDLE, never, 30)


class Fleet:
    """N attested agents of one real Authority, each with its own SVID serial."""

    def __init__(self, authority: Authority, n: int) -> None:
        self.authority = authority
        self.entries = ChangeFeed()
        self.bundle = ChangeFeed()
        self.api = AgentApi(authority, inline, self.entries, self.bundle)

        async def keys_changed() -> None:
            return None

        self.admin = AdminApi(
            authority, inline, self.entries.wake, keys_changed, lambda: {"status": "ok"}
        )
        self.peers: list[AgentPeer] = []
        for i in range(n):
            sid = SpiffeId.parse(f"spiffe://example.org/agent/n{i}")
            token = authority.create_token(sid, None, "admin:uid=0").token
            issued = authority.attest(token, make_csr(generate_key()), "10.0.0.1:1").svid
            self.peers.append(AgentPeer(sid, issued.serial, "10.0.0.1:1"))

    async def call(
        self, i: int, method: str, target: str, body: object = None
    ) -> dict[str, object]:
        raw = b"" if body is None else http.Response.json(body).body
        resp = await self.api.handle(self.peers[i], http.Request(method, target, (), raw))
        assert resp.status == 200, resp.body
        data = http.ClientResponse(resp.status, (), resp.body).json()
        assert isinstance(data, dict)
        return data

    async def admin_call(self, method: str, target: str, body: object = None) -> dict[str, object]:
        raw = b"" if body is None else http.Response.json(body).body
        resp = await self.admin.handle(0, http.Request(method, target, (), raw))
        assert resp.status < 300, resp.body
        data = http.ClientResponse(resp.status, (), resp.body).json()
        assert isinstance(data, dict)
        return data

    def poll_target(self, since: int) -> str:
        return "/v1/entries?" + urlencode({"since": since, "wait": 50, "delta": 1})


async def test_500_parked_polls_one_renewal_checks_no_other_agent(authority: Authority) -> None:
    n = 500
    fleet = Fleet(authority, n)
    revision = authority.store.entries_revision()
    answers: dict[int, dict[str, object]] = {}

    async def poll(i: int, since: int = revision) -> None:
        answers[i] = await fleet.call(i, "GET", fleet.poll_target(since))

    feed = fleet.entries
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(poll, i)
        await trio.testing.wait_all_tasks_blocked()
        assert (feed.parked, feed.checks, feed.wakeups) == (n, n, 0)

        # One agent renews: its own poll wakes (its certificate is now the previous
        # one) and nobody else's is checked.
        await fleet.call(0, "POST", "/v1/agent/renew", {"csr": make_csr(generate_key())})
        await trio.testing.wait_all_tasks_blocked()
        assert (feed.checks - n, feed.wakeups, feed.parked) == (1, 1, n - 1)
        assert list(answers) == [0]

        # Signing wakes nobody; an entry for agent 7 wakes agent 7 and sends it one entry.
        created = await fleet.admin_call(
            "POST",
            "/v1/entries",
            {
                "spiffe_id": "spiffe://example.org/web",
                "parent_id": str(fleet.peers[7].spiffe_id),
                "selectors": ["unix:uid:1000"],
            },
        )
        await fleet.call(
            7,
            "POST",
            "/v1/svids",
            {"csrs": [{"entry_id": created["id"], "csr": make_csr(generate_key())}]},
        )
        await trio.testing.wait_all_tasks_blocked()
        assert (feed.checks - n, feed.wakeups, feed.parked) == (2, 2, n - 2)
        assert sorted(answers) == [0, 7]
        assert answers[7]["full"] is False
        assert [e["id"] for e in answers[7]["entries"]] == [created["id"]]  # type: ignore[attr-defined]

        # Moving the entry from agent 7 to agent 8 concerns both; 7 polls again first.
        nursery.start_soon(poll, 7, int(str(answers.pop(7)["revision"])))
        await trio.testing.wait_all_tasks_blocked()
        assert feed.parked == n - 1
        checks = feed.checks
        await fleet.admin_call(
            "PATCH", f"/v1/entries/{created['id']}", {"parent_id": str(fleet.peers[8].spiffe_id)}
        )
        await trio.testing.wait_all_tasks_blocked()
        assert feed.checks - checks == 2
        assert answers[7]["deleted"] == [created["id"]] and answers[7]["entries"] == []
        assert [e["id"] for e in answers[8]["entries"]] == [created["id"]]  # type: ignore[attr-defined]
        assert feed.parked == n - 3  # 0 and 8 answered, 7 answered again
        nursery.cancel_scope.cancel()


async def test_a_bundle_change_wakes_every_bundle_poll_once(authority: Authority) -> None:
    fleet = Fleet(authority, 50)
    sequence = authority.bundle().sequence
    feed = fleet.bundle
    answered: list[int] = []

    async def poll(i: int) -> None:
        await fleet.call(i, "GET", f"/v1/bundle?since={sequence}&wait=50")
        answered.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(poll, i)
        await trio.testing.wait_all_tasks_blocked()
        assert feed.parked == 50
        await fleet.call(0, "POST", "/v1/agent/renew", {"csr": make_csr(generate_key())})
        await trio.testing.wait_all_tasks_blocked()
        assert feed.wakeups == 0  # a renewal is no bundle change
        authority.keys.rotate_root("admin:uid=0")
        assert feed.wake_all() == 50
        await trio.testing.wait_all_tasks_blocked()
    assert len(answered) == 50 and feed.wakeups == 50 and feed.parked == 0


async def test_a_bundle_change_ends_every_entries_poll_holding_the_old_sequence(
    authority: Authority,
) -> None:
    """The merged poll (``ca.api`` rule 7): agents park one entries poll holding their
    bundle sequence; a renewal wakes only its own, a new root wakes each once, and
    each answer carries the new bundle."""
    n = 50
    fleet = Fleet(authority, n)
    revision = authority.store.entries_revision()
    sequence = authority.bundle().sequence
    answers: dict[int, dict[str, object]] = {}

    async def poll(i: int) -> None:
        query = {"since": revision, "wait": 50, "delta": 1, "bundle": sequence}
        answers[i] = await fleet.call(i, "GET", "/v1/entries?" + urlencode(query))

    feed = fleet.entries
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(poll, i)
        await trio.testing.wait_all_tasks_blocked()
        assert feed.parked == n and fleet.bundle.parked == 0
        await fleet.call(0, "POST", "/v1/agent/renew", {"csr": make_csr(generate_key())})
        await trio.testing.wait_all_tasks_blocked()
        assert list(answers) == [0] and "bundle" not in answers[0]  # no new bundle for it
        authority.keys.rotate_root("admin:uid=0")
        assert feed.wake_all("bundle") == n - 1  # as the server does on a bundle change
        await trio.testing.wait_all_tasks_blocked()
    assert feed.parked == 0 and feed.wakeups_by["bundle"] == n - 1
    new = authority.bundle()
    assert new.sequence != sequence
    for i in range(1, n):
        assert answers[i]["bundle_sequence"] == new.sequence
        assert answers[i]["bundle"] == new.to_pem().decode() and "jwt_bundle" in answers[i]
        assert (answers[i]["entries"], answers[i]["deleted"]) == ([], [])


async def test_a_quiet_poll_answers_from_memory_and_comes_back_without_a_check(
    authority: Authority, autojump_clock: trio.testing.MockClock
) -> None:
    """A poll that times out unwoken made one check only (on arrival) and is told the
    revision committed when that check began (a change committed later may not have
    woken it yet).  Coming back with that answer, it parks without a check (feed rule
    4); a change for it while no poll is parked makes the next one check again."""
    fleet = Fleet(authority, 2)
    revision = authority.store.entries_revision()
    answers: list[dict[str, object]] = []

    async def poll(since: int) -> None:
        target = "/v1/entries?" + urlencode({"since": since, "wait": 5, "delta": 1})
        answers.append(await fleet.call(0, "GET", target))

    def entry_for(agent: int) -> dict[str, object]:
        return {
            "spiffe_id": "spiffe://example.org/web",
            "parent_id": str(fleet.peers[agent].spiffe_id),
            "selectors": [f"unix:uid:{1000 + len(answers)}"],
        }

    feed = fleet.entries
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll, revision)
        await trio.testing.wait_all_tasks_blocked()
        await fleet.admin_call("POST", "/v1/entries", entry_for(1))  # another agent's
    assert trio.current_time() == 5  # it waited its whole wait
    assert answers[-1]["revision"] == revision == authority.store.entries_revision() - 1
    assert (answers[-1]["full"], answers[-1]["entries"], answers[-1]["deleted"]) == (
        False,
        [],
        [],
    )
    assert feed.checks == 1

    await poll(revision)  # back with what it was told: no check, quiet again
    assert trio.current_time() == 10 and feed.checks == 1
    assert answers[-1]["revision"] == revision

    created = await fleet.admin_call("POST", "/v1/entries", entry_for(0))  # nobody parked
    await poll(revision)
    assert feed.checks == 2 and trio.current_time() == 10  # checked, and answered at once
    assert [e["id"] for e in answers[-1]["entries"]] == [created["id"]]  # type: ignore[attr-defined]
