"""The two SQL engines under `ca.store.Store`: what differs between SQLite and PostgreSQL.

`ca.store` writes its SQL once, in the common subset with ``?`` placeholders;
an engine runs it.  What an engine owns:

1. **Transactions that serialize every writer.**  SQLite's ``BEGIN IMMEDIATE``
   takes the database's one write lock.  On PostgreSQL, where several CA
   servers write at once, every write transaction first takes one
   transaction-scoped advisory lock (`WRITE_LOCK`), released by its commit or
   rollback.  So writers run one at a time in every engine: the audit chain's
   head is read and moved by one transaction at a time (one chain, whatever
   the number of servers), counters read-then-written in a transaction cannot
   interleave, and a join token's conditional UPDATE sees the other server's
   spend.  A write is a few short statements; PostgreSQL serializes thousands
   of them a second, far more than a fleet's renewals.  A reader that needs several
   statements to agree (the audit chain's records and its head, `Store.verify_audit`)
   takes a read-only snapshot instead (``begin(write=False)``): it waits on no writer,
   and no writer's commit lands between its statements.
2. **The schema version**: ``PRAGMA user_version`` in SQLite, the one-row
   table ``tally_schema`` in PostgreSQL.
3. **Types**: the migrations say INTEGER, BLOB and TEXT; PostgreSQL is given
   BIGINT (times and sequence numbers outgrow 32 bits), BYTEA, and TEXT with
   the "C" collation, so both engines sort ids byte by byte and a page of
   entries ends at the same place in both.
4. **A lost connection** (PostgreSQL stopped, the network cut) is a
   `StoreUnavailable`, never a half-done change: the transaction is gone with
   the connection, and the next call connects again.  The CA answers 503 and
   signs nothing meanwhile (`ca.server` rule 7).
5. **Change notices** (PostgreSQL only): `notify` queues a ``NOTIFY`` inside
   the transaction, delivered to every other CA server when, and only if, the
   transaction commits (`ca.cluster`).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from tally.ops.errors import OperatorError

WRITE_LOCK = 0x7A11_0001
"""The advisory lock every PostgreSQL write transaction holds (rule 1)."""
ROTATION_LOCK = 0x7A11_0002
"""The session advisory lock of the server that decides key rotations (`ca.cluster`)."""
RECONNECT_QUIET = 0.5
"""Seconds after a failed connect during which calls fail without trying again."""
CHANNEL = "tally_changes"
"""The NOTIFY channel CA servers listen on."""


class StoreUnavailable(OperatorError):
    """The database cannot be reached now; nothing was changed (rule 4)."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """What `ca.store.Store` needs of an engine."""

    engine: str
    shown: str

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    def begin(self, *, write: bool = True) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def schema_version(self) -> int: ...

    def set_schema_version(self, version: int) -> None: ...

    def ddl(self, statement: str) -> str: ...

    def notify(self, payload: str) -> None: ...

    def close(self) -> None: ...


class SqliteDb:
    engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection, shown: str) -> None:
        self.conn = conn
        self.shown = shown

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        return self.conn.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.conn.executemany(sql, [tuple(r) for r in rows])

    def begin(self, *, write: bool = True) -> None:
        # A deferred BEGIN reads one snapshot from its first SELECT on (WAL mode).
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    def schema_version(self) -> int:
        (version,) = self.conn.execute("PRAGMA user_version").fetchone()
        return int(version)

    def set_schema_version(self, version: int) -> None:
        self.conn.execute(f"PRAGMA user_version = {int(version)}")

    def ddl(self, statement: str) -> str:
        return statement

    def notify(self, payload: str) -> None:
        """One process per SQLite file: its own feed already heard the change."""

    def close(self) -> None:
        self.conn.close()


_TYPES = (
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bTEXT\b"), 'TEXT COLLATE "C"'),
)


def pg_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled first)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresDb:
    """One psycopg connection in autocommit mode; transactions are explicit (rule 1).

    Used from one worker thread at a time, like the SQLite connection.  After the
    connection is lost, the next call opens a new one (rule 4).
    """

    engine = "postgresql"

    def __init__(self, url: str, shown: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.shown = shown
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._in_tx = False
        self._quiet_until = 0.0
        """After a failed connect, calls fail at once until then: a blackholed database
        must not hold the one worker thread for a connect timeout per request."""
        self.origin = "-"
        """This server's name in the notices it sends (`ca.cluster`)."""
        self.locks: set[int] = set()
        """Session advisory locks this connection holds (gone with the connection)."""
        self._connect()

    def _connect(self) -> Any:
        import psycopg

        self.locks = set()
        now = time.monotonic()
        if now < self._quiet_until:
            raise StoreUnavailable(f"datastore {self.shown}: unreachable (retrying)")
        try:
            self._conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, int(self.connect_timeout)),
                application_name="tally-ca",
                # A database cut off without a reset is noticed in seconds, not hours.
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
            )
        except psycopg.OperationalError as exc:
            self._conn = None
            self._quiet_until = time.monotonic() + RECONNECT_QUIET
            raise StoreUnavailable(f"datastore {self.shown}: {first_line(exc)}") from None
        return self._conn

    def _live(self) -> Any:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if self._in_tx:
                raise StoreUnavailable(f"datastore {self.shown}: connection lost")
            conn = self._connect()
        return conn

    def _lost(self, exc: Exception) -> StoreUnavailable:
        self._in_tx = False
        try:
            if self._conn is not None:
                self._conn.close()
        finally:
            self._conn = None
        return StoreUnavailable(f"datastore {self.shown}: {first_line(exc)}")

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        import psycopg

        conn = self._live()
        try:
            cur: Cursor = conn.execute(pg_sql(sql), tuple(params) if params else None)
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from None
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        import psycopg

        if not rows:
            return
        conn = self._live()
        try:
            with conn.cursor() as cur:
                cur.executemany(pg_sql(sql), [tuple(r) for r in rows])
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from None

    def begin(self, *, write: bool = True) -> None:
        self._in_tx = False
        self.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._in_tx = True
        if write:
            self.execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    def commit(self) -> None:
        self.execute("COMMIT")
        self._in_tx = False

    def rollback(self) -> None:
        if self._conn is None or self._conn.closed:
            self._in_tx = False
            return
        try:
            self.execute("ROLLBACK")
        except StoreUnavailable:
            pass
        self._in_tx = False

    def schema_version(self) -> int:
        self.execute("CREATE TABLE IF NOT EXISTS tally_schema (version INTEGER NOT NULL)")
        row = self.execute("SELECT max(version) FROM tally_schema").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def set_schema_version(self, version: int) -> None:
        self.execute("CREATE TABLE IF NOT EXISTS tally_schema (version INTEGER NOT NULL)")
        self.execute("DELETE FROM tally_schema")
        self.execute("INSERT INTO tally_schema (version) VALUES (?)", (version,))

    def ddl(self, statement: str) -> str:
        for pattern, replacement in _TYPES:
            statement = pattern.sub(replacement, statement)
        return statement

    def notify(self, payload: str) -> None:
        """Sent as ``<origin> <payload>``, so a server knows its own notices and skips
        them: its own change feed was woken already, once."""
        self.execute("SELECT pg_notify(?, ?)", (CHANNEL, f"{self.origin} {payload}"))

    def ping(self) -> None:
        """A round trip, so a lost database is noticed (and a back one reconnected)."""
        self.execute("SELECT 1").fetchone()

    def try_lock(self, key: int) -> bool:
        """A session advisory lock: held until released or until this connection dies."""
        if key in self.locks:
            try:
                self.ping()  # held as long as this very connection lives
                return True
            except StoreUnavailable:
                pass  # gone with the connection; ask again on a new one
        row = self.execute("SELECT pg_try_advisory_lock(?)", (key,)).fetchone()
        if row[0]:
            self.locks.add(key)
        return bool(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
