"""Delta sync of entries: the CA's change log and pages, the agent's `EntrySync`.

Both halves are real: `Authority.entries_since` over a SQLite store on one side,
`agent.renewal.EntrySync` (what the agent's entries loop runs) on the other,
joined by the wire JSON (`ca.api.entry_sync_json` → `EntriesPage.from_json`).
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ca_client import make_csr
from agent.renewal import EntriesPage, Entry, EntrySync, compare_entries
from ca import messages
from ca.api import entry_sync_json
from ca.authority import ENTRY_PAGE, Authority, EntryPatch, EntrySpec, Limits
from ca.keys import KeyManager
from ca.schedule import Policy
from ca.store import Store
from tally.spiffe.selectors import Selector
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tally.spiffe.x509profile import generate_key

TD = TrustDomain.parse("example.org")
AGENTS = [SpiffeId.parse(f"spiffe://example.org/agent/n{i}") for i in range(3)]
ME = AGENTS[0]


class Agent:
    """One agent's side of the sync, driven by hand as `SvidKeeper.entries_loop` drives it."""

    def __init__(self, authority: Authority, serial: str) -> None:
        self.authority = authority
        self.serial = serial
        self.sync = EntrySync()
        self.entries: dict[str, Entry] = {}
        self.answers: list[EntriesPage] = []

    def step(self, limit: int) -> bool:
        """One call; False once the agent is in step and would park."""
        since, after, park = self.sync.request()
        if park and self.answers:
            return False
        page = self.authority.entries_since(ME, self.serial, since, after, limit)
        answer = EntriesPage.from_json(entry_sync_json(page))
        self.answers.append(answer)
        change = self.sync.receive(self.entries, answer)
        if change is not None:
            self.entries = change.entries
        return True

    def catch_up(self, limit: int) -> list[EntriesPage]:
        self.answers = []
        for _ in range(10_000):
            if not self.step(limit):
                return self.answers
        raise AssertionError("the sync never settled")

    def full_fetch(self) -> dict[str, Entry]:
        view = self.authority.entries_for(ME, self.serial)
        return compare_entries({}, [messages.entry_json(e) for e in view.entries]).entries


def _authority(data_dir: Path) -> tuple[Authority, str]:
    store = Store.open(data_dir / "ca.db")

    def clock() -> datetime:
        return datetime(2026, 11, 29, tzinfo=UTC)

    keys = KeyManager(store, data_dir, TD, Policy(86400, 10 * 365 * 86400, 3600), clock)
    keys.load()
    keys.tick()
    authority = Authority(store, keys, TD, Limits(3600, 86400, 3600, 600), clock)
    token = authority.create_token(ME, None, "admin:uid=0").token
    serial = authority.attest(token, make_csr(generate_key()), "10.0.0.1:1").svid.serial
    return authority, serial


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.integers(0, 2)),
        st.tuples(st.just("update"), st.integers(0, 30), st.integers(-1, 2)),
        st.tuples(st.just("delete"), st.integers(0, 30)),
        st.tuples(st.just("sync"), st.integers(1, 4)),
        st.tuples(st.just("prune"), st.integers(0, 3)),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.integers(1, 4))
def test_applying_deltas_ends_with_what_a_full_fetch_returns(
    ops: list[tuple[object, ...]], limit: int
) -> None:
    """Any creations, updates (moves between agents included), deletions, syncs part
    way and log pruning: an agent that catches up holds exactly the full-fetch set."""
    with tempfile.TemporaryDirectory() as tmp:
        authority, serial = _authority(Path(tmp))
        agent = Agent(authority, serial)
        ids: list[str] = []
        for n, op in enumerate(ops):
            kind = op[0]
            if kind == "create":
                spec = EntrySpec(
                    SpiffeId.parse(f"spiffe://example.org/w{n}"),
                    AGENTS[int(str(op[1]))],
                    (Selector.parse(f"unix:uid:{n}"),),
                )
                ids.append(authority.create_entry(spec, "t").id)
            elif kind == "update" and ids:
                eid = ids[int(str(op[1])) % len(ids)]
                if authority.store.get_entry(eid) is None:
                    continue
                target = int(str(op[2]))
                patch = (
                    EntryPatch(hint=f"h{n}") if target < 0 else EntryPatch(parent_id=AGENTS[target])
                )
                authority.update_entry(eid, patch, "t")
            elif kind == "delete" and ids:
                eid = ids[int(str(op[1])) % len(ids)]
                if authority.store.get_entry(eid) is not None:
                    authority.delete_entry(eid, "t")
            elif kind == "sync":
                for _ in range(int(str(op[1]))):  # part way: a few calls, maybe mid-pages
                    if not agent.step(limit):
                        break
            elif kind == "prune":
                authority.store.prune_entry_log(int(str(op[1])))
        agent.catch_up(limit)
        assert agent.entries == agent.full_fetch()
        assert agent.sync.revision == authority.store.entries_revision()
        authority.store.close()


def test_20000_entries_sync_in_pages_and_one_change_sends_one_entry(tmp_path: Path) -> None:
    authority, serial = _authority(tmp_path)
    for start in range(0, 20_000, 1000):  # the admin API's batch: 1,000 a transaction
        authority.create_entries(
            [
                EntrySpec(
                    SpiffeId.parse(f"spiffe://example.org/w{i}"),
                    ME,
                    (Selector.parse(f"unix:uid:{i}"),),
                )
                for i in range(start, start + 1000)
            ],
            "t",
        )
    agent = Agent(authority, serial)
    pages = agent.catch_up(ENTRY_PAGE)
    assert len(agent.entries) == 20_000
    assert len(pages) == 20_000 // ENTRY_PAGE and all(p.full for p in pages)
    sizes = [
        len(entry_sync_json(authority.entries_since(ME, serial, -1, "", ENTRY_PAGE)).__repr__())
    ]
    assert max(sizes) < 512 * 1024  # bounded: a page is a few hundred KiB at most

    # Asking again when nothing changed: nothing is sent.
    revision = agent.sync.revision
    quiet = authority.entries_since(ME, serial, revision, "", ENTRY_PAGE)
    assert (quiet.full, quiet.entries, quiet.deleted, quiet.more) == (False, (), (), False)

    # One later change sends one entry, and the agent's set is the full fetch.
    first = sorted(agent.entries)[0]
    authority.update_entry(first, EntryPatch(hint="moved"), "t")
    [delta] = agent.catch_up(ENTRY_PAGE)
    assert not delta.full and [e["id"] for e in delta.entries] == [first] and not delta.deleted
    assert agent.entries[first].hint == "moved"
    assert agent.entries == agent.full_fetch()


def test_an_agent_behind_the_log_resyncs_in_full(tmp_path: Path) -> None:
    authority, serial = _authority(tmp_path)
    for i in range(5):
        authority.create_entry(
            EntrySpec(
                SpiffeId.parse(f"spiffe://example.org/w{i}"), ME, (Selector.parse(f"unix:uid:{i}"),)
            ),
            "t",
        )
    agent = Agent(authority, serial)
    agent.catch_up(2)
    behind = agent.sync.revision
    gone = sorted(agent.entries)[0]
    authority.delete_entry(gone, "t")
    authority.store.prune_entry_log(0)
    assert authority.store.needs_resync(behind)
    pages = agent.catch_up(2)
    assert [p.full for p in pages] == [True, True]  # 4 entries in pages of 2
    assert gone not in agent.entries and agent.entries == agent.full_fetch()
    # A revision from the future (a CA restored from an older backup) resyncs too.
    assert authority.store.needs_resync(authority.store.entries_revision() + 1)
