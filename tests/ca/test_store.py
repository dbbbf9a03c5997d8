"""The datastore on a temporary SQLite file: migrations, refusals, and each change with
its audit record in one transaction."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from ca.store import (
    MIGRATIONS,
    AgentRecord,
    AuditEvent,
    Conflict,
    EntryRecord,
    IssuedSvid,
    Store,
    StoreError,
    TokenRecord,
)
from tally.ops.errors import OperatorError

TS = "2026-11-29T00:00:00.000Z"
NOW = 1_795_910_400
AGENT = "spiffe://example.org/agent/node-1"


def ev(event: str = "test.event", spiffe_id: str | None = None) -> AuditEvent:
    return AuditEvent(TS, "test", event, spiffe_id)


def token(token_id: str = "0123456789abcdef", expires_at: int = NOW + 600) -> TokenRecord:
    return TokenRecord(token_id, b"h" * 32, AGENT, expires_at, None, NOW)


def agent_record(serial: str = "a1") -> AgentRecord:
    return AgentRecord(AGENT, "active", "0123456789abcdef", serial, None, NOW + 3600, NOW, NOW)


def svid(serial: str = "a1", not_after: int = NOW + 3600) -> IssuedSvid:
    return IssuedSvid(serial, AGENT, AGENT, "agent", not_after, NOW)


def entry_record(entry_id: str = "e1", selectors: tuple[str, ...] = ("unix:uid:1",)) -> EntryRecord:
    return EntryRecord(
        entry_id, "spiffe://example.org/web", AGENT, selectors, None, (), "", 0, NOW, NOW
    )


def audited(store: Store) -> list[str]:
    return [r.event for r in store.audit_records()]


# -- opening and migrations ------------------------------------------------------------------


def test_a_new_file_gets_every_migration_and_reopens_unchanged(tmp_path: Path):
    store = Store.open(tmp_path / "ca.db")
    assert store.schema_version == len(MIGRATIONS)
    store.create_token(token(), ev("token.created"))
    store.close()
    again = Store.open(tmp_path / "ca.db")
    assert again.schema_version == len(MIGRATIONS) and again.get_token("0123456789abcdef")
    again.close()


def test_an_older_file_is_migrated_forward_keeping_its_rows(tmp_path: Path):
    path = tmp_path / "ca.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute(
        "INSERT INTO join_tokens VALUES (?, ?, ?, ?, ?, ?)",
        ("0123456789abcdef", b"h" * 32, AGENT, NOW + 600, None, NOW),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    path.chmod(0o600)  # the CA refuses a looser datastore
    store = Store.open(path)
    assert store.schema_version == len(MIGRATIONS)
    assert store.get_token("0123456789abcdef") == token()  # no failures, not revoked
    store.close()


def test_a_file_from_a_newer_tally_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "ca.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    path.chmod(0o600)
    with pytest.raises(StoreError) as info:
        Store.open(path)
    assert str(info.value) == (
        f"datastore {path} has schema version {len(MIGRATIONS) + 1}, newer than this "
        f"Tally understands ({len(MIGRATIONS)})"
    )
    assert isinstance(info.value, OperatorError)


def test_a_file_that_is_not_sqlite_is_refused_naming_it(tmp_path: Path):
    path = tmp_path / "ca.db"
    path.write_bytes(b"not a database at all, not even close" * 100)
    path.chmod(0o600)
    with pytest.raises(StoreError, match=f"^datastore {path}: "):
        Store.open(path)


def test_symlinks_are_refused_for_the_datastore_and_its_dir(tmp_path: Path):
    (tmp_path / "real.db").touch()
    (tmp_path / "ca.db").symlink_to(tmp_path / "real.db")
    with pytest.raises(StoreError, match=r"datastore .* is a symlink"):
        Store.open(tmp_path / "ca.db")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StoreError, match=r"data dir .* is a symlink"):
        Store.open(tmp_path / "link" / "ca.db")


# -- join tokens and agents ------------------------------------------------------------------


def test_a_token_is_spent_once_with_its_agent_and_records(store: Store):
    store.create_token(token(), ev("token.created"))
    store.attest_agent("0123456789abcdef", NOW, agent_record(), svid(), [ev("agent.attested")])
    assert store.get_token("0123456789abcdef").used_at == NOW
    assert store.get_agent(AGENT) == agent_record()
    assert store.svid_count() == 1
    with pytest.raises(Conflict):
        store.attest_agent("0123456789abcdef", NOW, agent_record("a2"), svid("a2"), [ev("x")])
    assert store.get_agent(AGENT).serial == "a1" and store.svid_count() == 1
    assert audited(store) == ["token.created", "agent.attested"]


def test_wrong_secrets_revoke_a_token_at_the_limit(store: Store):
    store.create_token(token(), ev("token.created"))
    revoked = ev("token.revoked")
    assert not store.count_wrong_secret("0123456789abcdef", NOW, 2, ev("failed"), revoked)
    assert store.count_wrong_secret("0123456789abcdef", NOW, 2, ev("failed"), revoked)
    record = store.get_token("0123456789abcdef")
    assert record.failures == 2 and record.revoked_at == NOW
    assert not store.count_wrong_secret("0123456789abcdef", NOW, 2, ev("failed"), revoked)
    assert not store.count_wrong_secret("ffffffffffffffff", NOW, 2, ev("failed"), revoked)
    assert audited(store) == ["token.created", "failed", "failed", "token.revoked"] + ["failed"] * 2
    with pytest.raises(Conflict):
        store.attest_agent("0123456789abcdef", NOW, agent_record(), svid(), [ev()])


def test_renewal_moves_the_serial_and_refuses_one_that_is_not_on_record(store: Store):
    store.create_token(token(), ev())
    store.attest_agent("0123456789abcdef", NOW, agent_record(), svid(), [ev()])
    store.renew_agent(AGENT, "a1", svid("a2"), ev("svid.renewed"))
    store.renew_agent(AGENT, "a1", svid("a3"), ev("svid.renewed"))  # the replaced one counts
    agent = store.get_agent(AGENT)
    assert (agent.serial, agent.prev_serial) == ("a3", "a2")
    with pytest.raises(Conflict):
        store.renew_agent(AGENT, "a1", svid("a4"), ev("svid.renewed"))
    store.set_agent_status(AGENT, "evicted", NOW + 1, ev("agent.evicted"))
    with pytest.raises(Conflict):
        store.renew_agent(AGENT, "a3", svid("a5"), ev("svid.renewed"))
    with pytest.raises(Conflict):
        store.set_agent_status("spiffe://example.org/agent/none", "banned", NOW, ev())
    assert store.list_agents()[0].status == "evicted"
    assert audited(store).count("svid.renewed") == 2


def test_spent_expired_and_revoked_tokens_and_old_svids_are_pruned(store: Store):
    store.create_token(token("1111111111111111"), ev())
    store.create_token(token("2222222222222222", expires_at=NOW - 86401), ev())
    store.create_token(token("3333333333333333"), ev())
    store.attest_agent("3333333333333333", NOW, agent_record(), svid("a1", NOW - 10), [ev()])
    store.record_issued([svid("b1", NOW + 10)], [ev()])
    assert store.prune_tokens(NOW) == 2
    assert store.get_token("1111111111111111") is not None
    assert store.prune_svids(NOW) == 1 and store.svid_count() == 1


# -- entries ---------------------------------------------------------------------------------


def test_entries_create_update_delete_with_revisions(store: Store):
    created = store.create_entry(entry_record(), ev("entry.created"))
    assert created.revision == store.entries_revision() == 1
    assert store.get_entry("e1") == created
    updated = store.update_entry(replace(created, ttl=60, hint="h"), ev("entry.updated"))
    assert updated.revision == 2 and store.get_entry("e1") == updated
    store.delete_entry("e1", ev("entry.deleted"))
    assert store.get_entry("e1") is None and store.entries_revision() == 3
    assert audited(store) == ["entry.created", "entry.updated", "entry.deleted"]


def test_entry_conflicts_change_nothing_and_record_nothing(store: Store):
    store.create_entry(entry_record(), ev("entry.created"))
    with pytest.raises(Conflict, match="an identical entry exists already: e1"):
        store.create_entry(entry_record("e2"), ev("entry.created"))
    with pytest.raises(Conflict, match="no entry e9"):
        store.update_entry(entry_record("e9"), ev("entry.updated"))
    with pytest.raises(Conflict, match="no entry e9"):
        store.delete_entry("e9", ev("entry.deleted"))
    assert store.entries_revision() == 1 and audited(store) == ["entry.created"]
    assert store.audit_records()[-1].seq == 1 and store.verify_audit().ok


def test_entries_are_listed_by_spiffe_id_and_parent(store: Store):
    web = store.create_entry(entry_record("e1"), ev())
    other_parent = replace(entry_record("e2"), parent_id="spiffe://example.org/agent/o")
    other = store.create_entry(other_parent, ev())
    db = store.create_entry(
        replace(entry_record("e3"), spiffe_id="spiffe://example.org/db"),
        ev(),
    )
    assert store.list_entries() == [db, web, other]
    assert store.list_entries(parent_id=AGENT) == [db, web]
    assert store.list_entries(spiffe_id="spiffe://example.org/web") == [web, other]
    assert store.list_entries(spiffe_id="spiffe://example.org/web", parent_id=AGENT) == [web]


# -- audit -----------------------------------------------------------------------------------


def test_audit_records_filter_and_keep_the_newest_within_the_limit(store: Store):
    store.record(ev("a", AGENT), ev("b"), ev("a"))
    store.record(AuditEvent("2026-11-30T00:00:00.000Z", "test", "c"))
    assert [r.seq for r in store.audit_records(event="a")] == [1, 3]
    assert [r.event for r in store.audit_records(spiffe_id=AGENT)] == ["a"]
    assert [r.event for r in store.audit_records(since_ts="2026-11-30")] == ["c"]
    assert [r.seq for r in store.audit_records(limit=2)] == [3, 4]
    result = store.verify_audit()
    assert result.ok and result.records == 4
