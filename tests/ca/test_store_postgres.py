"""The datastore on PostgreSQL where it differs from one SQLite file: the schema version
kept in the database, one-line refusals, and several writers at once (two connections,
as two CA servers have), racing for real in threads."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from ca.datastore import parse
from ca.engines import ROTATION_LOCK
from ca.store import MIGRATIONS, AuditEvent, Conflict, Store, StoreError
from tests.ca.test_store import AGENT, NOW, agent_record, ev, svid, token
from tests.pg import Cluster


def open_pg(url: str) -> Store:
    return Store.connect(parse(url))


def test_an_empty_database_gets_every_migration_once_even_opened_twice_at_once(fresh_pg):
    stores: list[Store] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            stores.append(open_pg(fresh_pg))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 3
    assert {s.schema_version for s in stores} == {len(MIGRATIONS)}
    for s in stores:
        s.close()


def test_an_older_schema_is_migrated_forward_keeping_its_rows(fresh_pg):
    with psycopg.connect(fresh_pg, autocommit=True) as conn:
        from ca.engines import PostgresDb

        db = PostgresDb(fresh_pg, "test")
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                db.execute(db.ddl(statement))
        db.set_schema_version(1)
        db.close()
        conn.execute(
            "INSERT INTO join_tokens VALUES (%s, %s, %s, %s, %s, %s)",
            ("0123456789abcdef", b"h" * 32, AGENT, NOW + 600, None, NOW),
        )
    store = open_pg(fresh_pg)
    assert store.schema_version == len(MIGRATIONS)
    assert store.get_token("0123456789abcdef") == token()
    store.close()


def test_a_database_from_a_newer_tally_is_refused_in_one_line(fresh_pg):
    open_pg(fresh_pg).close()
    with psycopg.connect(fresh_pg, autocommit=True) as conn:
        conn.execute("UPDATE tally_schema SET version = %s", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError) as info:
        open_pg(fresh_pg)
    assert str(info.value) == (
        f"datastore {parse(fresh_pg).shown} has schema version {len(MIGRATIONS) + 1}, newer "
        f"than this Tally understands ({len(MIGRATIONS)})"
    )


def test_an_unreachable_database_is_one_line_without_the_password(pg_cluster: Cluster, tmp_path):
    url = f"postgresql://postgres:hunter2@/nowhere?host={tmp_path}&connect_timeout=1"
    with pytest.raises(StoreError) as info:
        open_pg(url)
    message = str(info.value)
    assert "hunter2" not in message and "\n" not in message
    assert message.startswith("datastore postgresql://postgres:***@/nowhere")
    missing = pg_cluster.url("no_such_database")
    with pytest.raises(StoreError, match="no_such_database"):
        open_pg(missing)


def race(n: int, fn) -> list[object]:
    """Run ``fn(i)`` in ``n`` threads released at the same instant; results or exceptions."""
    barrier = threading.Barrier(n)
    out: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_a_token_raced_by_two_servers_is_spent_once(fresh_pg):
    servers = [open_pg(fresh_pg), open_pg(fresh_pg)]
    try:
        for round_ in range(20):
            tid = f"{round_:016x}"
            servers[0].create_token(token(tid), ev("token.created"))
            results = race(
                2,
                lambda i, tid=tid, round_=round_: servers[i].attest_agent(
                    tid,
                    NOW,
                    agent_record(f"s{round_}-{i}"),
                    svid(f"s{round_}-{i}"),
                    [ev("agent.attested")],
                ),
            )
            assert sorted(type(r).__name__ for r in results) == ["Conflict", "NoneType"]
            assert any(isinstance(r, Conflict) for r in results)
        assert servers[1].verify_audit().ok
        assert [r.event for r in servers[0].audit_records()].count("agent.attested") == 20
    finally:
        for s in servers:
            s.close()


def test_the_audit_chain_stays_one_chain_with_every_server_writing_and_tampering_shows(
    fresh_pg,
):
    servers = [open_pg(fresh_pg) for _ in range(3)]
    try:

        def write(i: int) -> None:
            for k in range(30):
                servers[i].record(AuditEvent("2026-11-29T00:00:00.000Z", f"server-{i}", f"e{k}"))

        assert race(3, write) == [None, None, None]
        result = servers[0].verify_audit()
        assert result.ok and result.records == 90
        with psycopg.connect(fresh_pg, autocommit=True) as conn:
            conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 45")
        assert not servers[2].verify_audit().ok
    finally:
        for s in servers:
            s.close()


def test_verify_while_another_server_writes_never_cries_tampering(fresh_pg):
    """Verify reads the records and the chain's head in one snapshot: a record another
    server commits between those two reads is neither "removed" nor "appended outside
    the CA".  (Read apart, about one verify in five met a commit in between here.)"""
    writer, reader = open_pg(fresh_pg), open_pg(fresh_pg)
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            writer.record(AuditEvent("2026-12-07T00:00:00.000Z", "server-b", "busy"))

    thread = threading.Thread(target=write)
    thread.start()
    try:
        results = [reader.verify_audit() for _ in range(60)]
    finally:
        stop.set()
        thread.join()
        writer.close()
        reader.close()
    assert all(r.ok for r in results), [r.problem for r in results if not r.ok][:3]
    assert results[-1].records > results[0].records  # the writer really was writing


def test_the_rotation_lease_has_one_holder_and_a_dead_holder_loses_it(fresh_pg):
    a, b = open_pg(fresh_pg), open_pg(fresh_pg)
    try:
        assert a.hold_rotation("srv-a") and a.hold_rotation("srv-a")
        assert not b.hold_rotation("srv-b")
        assert b.rotation_holder() == "srv-a"
        with psycopg.connect(fresh_pg, autocommit=True) as admin:  # srv-a's backend dies
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND objid = %s",
                (ROTATION_LOCK & 0xFFFFFFFF,),
            )
        # The backend ends a moment after it is told to; the lease goes with it.
        deadline = time.monotonic() + 5
        while not b.hold_rotation("srv-b"):
            assert time.monotonic() < deadline, "the dead holder's lease was never released"
            time.sleep(0.02)
        assert b.rotation_holder() == "srv-b"
        assert not a.hold_rotation("srv-a")  # reconnected, but the lease has moved on
    finally:
        a.close()
        b.close()
