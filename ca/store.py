"""The CA's datastore: SQLite in WAL mode behind a narrow, synchronous interface.

Rules:

1. Every change that the audit log must record is written in the *same*
   transaction as its audit record, so a crash (``kill -9`` at any moment)
   leaves either both or neither.  Nothing is returned to a caller before its
   transaction has committed, so nothing a peer holds is missing from the log.
2. The schema moves forward by numbered migrations kept in ``MIGRATIONS``;
   ``PRAGMA user_version`` records how far a file has come.  A file from a
   newer Tally is refused rather than guessed at.
3. One connection, used from one worker thread (the trio shell's
   `ca.store_thread`).  SQLite serialises writers anyway, and one
   connection keeps the WAL checkpointing simple.
4. WAL with ``synchronous=NORMAL``: a committed transaction survives the
   process dying at any point; only an OS crash or power loss can take back
   the last few commits.  That is the trade SPIRE's SQLite store makes too.

Times in tables are whole Unix seconds; audit times are RFC 3339 strings
because they are read by people.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ca import audit
from ca.datastore import Datastore
from ca.engines import ROTATION_LOCK, Db, PostgresDb, SqliteDb, StoreUnavailable, first_line
from tally.ops.errors import OperatorError

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE agents (
        spiffe_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('active', 'evicted', 'banned')),
        token_id TEXT,
        serial TEXT,
        prev_serial TEXT,
        not_after INTEGER,
        attested_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        ttl INTEGER,
        dns_names TEXT NOT NULL,
        hint TEXT NOT NULL,
        revision INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX entries_parent ON entries (parent_id);
    CREATE INDEX entries_spiffe_id ON entries (spiffe_id);
    CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        spiffe_id TEXT,
        expires_at INTEGER NOT NULL,
        used_at INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE svids (
        serial TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        agent_id TEXT,
        kind TEXT NOT NULL,
        not_after INTEGER NOT NULL,
        issued_at INTEGER NOT NULL
    );
    CREATE INDEX svids_not_after ON svids (not_after);
    CREATE TABLE ca_keys (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('root', 'intermediate')),
        state TEXT NOT NULL CHECK (state IN ('prepared', 'active', 'retired', 'removed')),
        cert_pem TEXT NOT NULL,
        parent_id TEXT,
        upstream INTEGER NOT NULL DEFAULT 0,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        activated_at INTEGER
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        actor TEXT NOT NULL,
        event TEXT NOT NULL,
        spiffe_id TEXT,
        serial TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_event ON audit (event);
    CREATE INDEX audit_spiffe_id ON audit (spiffe_id);
    """,
    # 2: wrong secrets counted per join token, and tokens revoked for them.
    """
    ALTER TABLE join_tokens ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE join_tokens ADD COLUMN revoked_at INTEGER
    """,
    # 3: the entry change log, for delta sync: one row per agent an entry change concerns.
    # The log is complete above ``entry_log_floor``; older history was never logged.
    """
    CREATE TABLE entry_log (
        revision INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        entry_id TEXT NOT NULL
    );
    CREATE INDEX entry_log_agent ON entry_log (agent_id, revision);
    CREATE INDEX entry_log_revision ON entry_log (revision);
    CREATE INDEX entries_parent_page ON entries (parent_id, id);
    INSERT INTO meta (key, value)
        SELECT 'entry_log_floor', value FROM meta WHERE key = 'entries_revision'
    """,
    # 4: several CA servers on one database (`ca.vault`): the servers, each with the
    # cluster key wrapped to its own identity, and the CA's private keys sealed under it.
    """
    CREATE TABLE ca_servers (
        id TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'approved')),
        wrapped_key BLOB,
        created_at INTEGER NOT NULL,
        approved_at INTEGER
    );
    CREATE TABLE ca_key_secrets (
        id TEXT PRIMARY KEY,
        sealed BLOB NOT NULL
    )
    """,
)

ENTRY_LOG_KEEP = 100_000
"""Entry revisions the change log keeps; an agent further behind resyncs in full."""


class StoreError(OperatorError):
    """The datastore cannot be used: a schema from a newer Tally, a file SQLite cannot
    read, a planted symlink.  An operator's fault to fix (`OperatorError`), so the CA
    stops with the one line that names the file, before it serves anything."""


class Conflict(Exception):
    """A change collides with what is stored (duplicate, missing row)."""


@dataclass(frozen=True)
class AuditEvent:
    """An audit record before the store gives it a place in the chain."""

    ts: str
    actor: str
    event: str
    spiffe_id: str | None = None
    serial: str | None = None
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentRecord:
    spiffe_id: str
    status: str
    token_id: str | None
    serial: str | None
    prev_serial: str | None
    not_after: int | None
    attested_at: int
    updated_at: int


@dataclass(frozen=True)
class EntryRecord:
    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]
    ttl: int | None
    dns_names: tuple[str, ...]
    hint: str
    revision: int
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class EntryDelta:
    """What changed for one agent since a revision: entries now held, ids now gone.

    ``revision`` is the revision the agent holds once it has applied this page;
    ``more`` says another page follows at once (ask again with ``since=revision``).
    """

    revision: int
    upserts: tuple[EntryRecord, ...]
    deleted: tuple[str, ...]
    more: bool


@dataclass(frozen=True)
class TokenRecord:
    id: str
    secret_hash: bytes
    spiffe_id: str | None
    expires_at: int
    used_at: int | None
    created_at: int
    failures: int = 0
    revoked_at: int | None = None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    kind: str
    state: str
    cert_pem: str
    parent_id: str | None
    upstream: bool
    not_before: int
    not_after: int
    created_at: int
    activated_at: int | None


@dataclass(frozen=True)
class ServerRecord:
    id: str
    public_key: str
    state: str
    wrapped_key: bytes | None
    created_at: int
    approved_at: int | None


@dataclass(frozen=True)
class IssuedSvid:
    serial: str
    spiffe_id: str
    agent_id: str | None
    kind: str
    not_after: int
    issued_at: int


class Store:
    def __init__(self, db: Db, path: Path | None = None) -> None:
        self._db = db
        self.path = path
        self.committed_entries_revision = 0
        """`entries_revision` as of the last commit, readable from any thread without a
        query (the trio shell answers a quiet long poll with it, off the worker thread)."""
        self.engine = db.engine
        self.shown = db.shown
        """The datastore as it may be logged (no password)."""

    @classmethod
    def open(cls, path: Path) -> Store:
        """The SQLite file at ``path`` (created 0600), migrated forward."""
        _refuse_symlinks(path)
        _private_files(path)
        try:
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=10
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(SqliteDb(conn, str(path)), path)
            store._migrate()
            store.committed_entries_revision = store.entries_revision()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"datastore {path}: {exc}") from exc
        return store

    @classmethod
    def connect(cls, where: Datastore) -> Store:
        """Open the datastore a URL names (`ca.datastore`), migrated forward."""
        if where.engine == "sqlite":
            assert where.path is not None
            return cls.open(where.path)
        try:
            store = cls(PostgresDb(where.url, where.shown))
        except StoreUnavailable as exc:
            raise StoreError(str(exc)) from None
        try:
            store._migrate()
        except StoreError:
            store.close()
            raise
        except Exception as exc:
            store.close()
            raise StoreError(f"datastore {where.shown}: {first_line(exc)}") from None
        return store

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Apply the migrations this datastore lacks, each in its own transaction.

        The version is read again inside each transaction, which holds the write
        lock: two CA servers starting at once on an empty PostgreSQL database apply
        each migration once between them.
        """
        while True:
            with self._tx() as db:
                version = db.schema_version()
                if version > len(MIGRATIONS):
                    raise StoreError(
                        f"datastore {self.shown} has schema version {version}, newer than "
                        f"this Tally understands ({len(MIGRATIONS)})"
                    )
                if version == len(MIGRATIONS):
                    return
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(db.ddl(statement))
                db.set_schema_version(version + 1)

    @property
    def schema_version(self) -> int:
        return self._db.schema_version()

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Db]:
        """One write transaction; writers are serialized in every engine (`ca.engines`).
        ``write=False``: a read-only snapshot, for reads that must agree (rule 1 there)."""
        db = self._db
        db.begin(write=write)
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        db.commit()

    def set_origin(self, server: str) -> None:
        """Name this server in the change notices it sends (PostgreSQL)."""
        if isinstance(self._db, PostgresDb):
            self._db.origin = server

    def hold_rotation(self, holder: str) -> bool:
        """Whether this server decides key rotations (`ca.keys.KeyManager.tick`).

        SQLite: always, one server per file.  PostgreSQL: the server whose
        connection holds a session advisory lock; it is released when that
        connection ends, so a server that dies (or loses the database) loses the
        lease, and the next server to ask takes it.  The holder's name is kept for
        the operator's messages.
        """
        db = self._db
        if not isinstance(db, PostgresDb):
            return True
        held = ROTATION_LOCK in db.locks
        if not db.try_lock(ROTATION_LOCK):
            return False
        if not held:
            with self._tx() as conn:
                self._set_meta(conn, "rotation_holder", holder)
        return True

    def rotation_holder(self) -> str | None:
        return self._get_meta("rotation_holder")

    def ping(self) -> None:
        """One round trip to the database (`StoreUnavailable` when it is not there)."""
        self._db.execute("SELECT 1").fetchone()

    # -- meta and revisions ------------------------------------------------------------

    def _get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, conn: Db, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _bump(self, conn: Db, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        value = (int(row[0]) if row else 0) + 1
        self._set_meta(conn, key, str(value))
        return value

    def entries_revision(self) -> int:
        return int(self._get_meta("entries_revision") or 0)

    def bundle_sequence(self) -> int:
        return int(self._get_meta("bundle_sequence") or 0)

    def jwt_keys(self) -> str | None:
        """The JWT signing keys' records, as `ca.jwt_keys` stored them (JSON)."""
        return self._get_meta("jwt_keys")

    def save_jwt_keys(self, records: str, events: Sequence[AuditEvent]) -> None:
        """Store JWT key changes with their audit records; the bundle's sequence goes up,
        because every JWT key change changes what the bundle publishes."""
        with self._tx() as conn:
            self._set_meta(conn, "jwt_keys", records)
            self._bump(conn, "bundle_sequence")
            self._append(conn, events)

    # -- audit -------------------------------------------------------------------------

    def _append(self, conn: Db, events: Sequence[AuditEvent]) -> None:
        head = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        if head is None:
            seq, prev = 0, audit.GENESIS
        else:
            seq_text, prev = str(head[0]).split(":", 1)
            seq = int(seq_text)
        rows = []
        for ev in events:
            seq += 1
            rec = audit.seal(
                prev, seq, ev.ts, ev.actor, ev.event, ev.spiffe_id, ev.serial, ev.detail
            )
            rows.append(
                (
                    rec.seq,
                    rec.ts,
                    rec.actor,
                    rec.event,
                    rec.spiffe_id,
                    rec.serial,
                    rec.detail_json,
                    rec.prev_hash,
                    rec.hash,
                )
            )
            prev = rec.hash
        conn.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._set_meta(conn, "audit_head", f"{seq}:{prev}")

    def record(self, *events: AuditEvent) -> None:
        """Append audit records that go with no other change."""
        with self._tx() as conn:
            self._append(conn, events)

    def audit_records(
        self,
        *,
        since_ts: str | None = None,
        spiffe_id: str | None = None,
        event: str | None = None,
        limit: int = 1000,
    ) -> list[audit.AuditRecord]:
        clauses, params = [], []
        if since_ts is not None:
            clauses.append("ts >= ?")
            params.append(since_ts)
        if spiffe_id is not None:
            clauses.append("spiffe_id = ?")
            params.append(spiffe_id)
        if event is not None:
            clauses.append("event = ?")
            params.append(event)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        recent = f"SELECT * FROM audit {where} ORDER BY seq DESC LIMIT ?"  # noqa: S608
        sql = f"SELECT * FROM ({recent}) AS recent ORDER BY seq"  # noqa: S608
        rows = self._db.execute(sql, (*params, limit)).fetchall()
        return [
            audit.AuditRecord(
                seq=r[0],
                ts=r[1],
                actor=r[2],
                event=r[3],
                spiffe_id=r[4],
                serial=r[5],
                detail=_load_detail(r[6]),
                prev_hash=r[7],
                hash=r[8],
            )
            for r in rows
        ]

    def audit_head(self) -> tuple[int, str] | None:
        """The chain's newest (seq, hash), as the store keeps it (`ca.audit` rule 3)."""
        head_text = self._get_meta("audit_head")
        if head_text is None:
            return None
        seq_text, digest = head_text.split(":", 1)
        return int(seq_text), digest

    def verify_audit(self, anchors: Sequence[audit.Seen] = ()) -> audit.VerifyResult:
        # One snapshot: another server's commit between reading the records and the
        # head would look like records removed from (or appended to) the chain.
        with self._tx(write=False) as db:
            head = self.audit_head()
            rows = (audit.StoredRow(*r) for r in db.execute("SELECT * FROM audit ORDER BY seq"))
            return audit.verify(rows, head, anchors)

    # -- join tokens -------------------------------------------------------------------

    def create_token(self, token: TokenRecord, ev: AuditEvent) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO join_tokens (id, secret_hash, spiffe_id, expires_at, used_at, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token.id,
                    token.secret_hash,
                    token.spiffe_id,
                    token.expires_at,
                    token.used_at,
                    token.created_at,
                ),
            )
            self._append(conn, [ev])

    def get_token(self, token_id: str) -> TokenRecord | None:
        row = self._db.execute("SELECT * FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
        return None if row is None else TokenRecord(*row)

    def count_wrong_secret(
        self, token_id: str, now: int, limit: int, ev: AuditEvent, revoked: AuditEvent
    ) -> bool:
        """Record a failed attestation that named ``token_id`` with a wrong secret.

        The audit record ``ev`` and the token's failure count move together; at
        ``limit`` failures the token is revoked and ``revoked`` is recorded too,
        all in one transaction.  A spent, revoked or unknown token only gets
        ``ev``.  True when this call revoked the token.
        """
        with self._tx() as conn:
            self._append(conn, [ev])
            row = conn.execute(
                "UPDATE join_tokens SET failures = failures + 1 "
                "WHERE id = ? AND used_at IS NULL AND revoked_at IS NULL RETURNING failures",
                (token_id,),
            ).fetchone()
            if row is None or int(row[0]) < limit:
                return False
            conn.execute("UPDATE join_tokens SET revoked_at = ? WHERE id = ?", (now, token_id))
            self._append(conn, [revoked])
            return True

    def prune_tokens(self, now: int) -> int:
        """Forget tokens that can never be used again (spent, revoked or expired a day ago)."""
        with self._tx() as conn:
            cur = conn.execute(
                "DELETE FROM join_tokens "
                "WHERE used_at IS NOT NULL OR revoked_at IS NOT NULL OR expires_at < ?",
                (now - 86400,),
            )
            return cur.rowcount

    # -- agents ------------------------------------------------------------------------

    def attest_agent(
        self,
        token_id: str,
        now: int,
        agent: AgentRecord,
        svid: IssuedSvid,
        events: Sequence[AuditEvent],
    ) -> None:
        """Spend the token and record the agent, in one transaction.

        The token is marked used with a conditional UPDATE, so two attestations
        racing on the same token cannot both succeed.
        """
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE join_tokens SET used_at = ? "
                "WHERE id = ? AND used_at IS NULL AND revoked_at IS NULL",
                (now, token_id),
            )
            if cur.rowcount != 1:
                raise Conflict("join token already used or revoked")
            conn.execute(
                "INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (spiffe_id) DO "
                "UPDATE SET status = excluded.status, token_id = excluded.token_id, "
                "serial = excluded.serial, prev_serial = NULL, not_after = excluded.not_after, "
                "attested_at = excluded.attested_at, updated_at = excluded.updated_at",
                (
                    agent.spiffe_id,
                    agent.status,
                    agent.token_id,
                    agent.serial,
                    None,
                    agent.not_after,
                    agent.attested_at,
                    agent.updated_at,
                ),
            )
            self._insert_svids(conn, [svid])
            self._append(conn, events)

    def renew_agent(
        self, spiffe_id: str, presented_serial: str, svid: IssuedSvid, ev: AuditEvent
    ) -> None:
        """Move the agent to a new SVID; refuse a serial that is not its current or last one."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE agents SET prev_serial = serial, serial = ?, not_after = ?, updated_at = ? "
                "WHERE spiffe_id = ? AND status = 'active' AND (serial = ? OR prev_serial = ?)",
                (
                    svid.serial,
                    svid.not_after,
                    svid.issued_at,
                    spiffe_id,
                    presented_serial,
                    presented_serial,
                ),
            )
            if cur.rowcount != 1:
                raise Conflict("agent SVID is not the one on record")
            self._insert_svids(conn, [svid])
            self._append(conn, [ev])
            conn.notify(f"agent {spiffe_id}")

    def get_agent(self, spiffe_id: str) -> AgentRecord | None:
        row = self._db.execute("SELECT * FROM agents WHERE spiffe_id = ?", (spiffe_id,)).fetchone()
        return None if row is None else AgentRecord(*row)

    def list_agents(self) -> list[AgentRecord]:
        rows = self._db.execute("SELECT * FROM agents ORDER BY spiffe_id").fetchall()
        return [AgentRecord(*r) for r in rows]

    def set_agent_status(self, spiffe_id: str, status: str, now: int, ev: AuditEvent) -> None:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE agents SET status = ?, updated_at = ? WHERE spiffe_id = ?",
                (status, now, spiffe_id),
            )
            if cur.rowcount != 1:
                raise Conflict(f"no agent {spiffe_id}")
            self._append(conn, [ev])
            conn.notify(f"agent {spiffe_id}")

    # -- entries -----------------------------------------------------------------------

    def create_entry(self, entry: EntryRecord, ev: AuditEvent) -> EntryRecord:
        [stored] = self.create_entries([entry], [ev])
        return stored

    def create_entries(
        self, entries: Sequence[EntryRecord], events: Sequence[AuditEvent]
    ) -> list[EntryRecord]:
        """Create entries in one transaction, each with a revision of its own: all or none
        (a duplicate, of a stored entry or within the batch, refuses the whole batch)."""
        stored: list[EntryRecord] = []
        with self._tx() as conn:
            for entry in entries:
                dup = conn.execute(
                    "SELECT id FROM entries "
                    "WHERE spiffe_id = ? AND parent_id = ? AND selectors = ?",
                    (entry.spiffe_id, entry.parent_id, json.dumps(list(entry.selectors))),
                ).fetchone()
                if dup is not None:
                    raise Conflict(f"an identical entry exists already: {dup[0]}")
                revision = self._bump(conn, "entries_revision")
                one = _replace_revision(entry, revision)
                conn.execute(
                    "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _entry_row(one)
                )
                self._log_entry(conn, revision, one.id, {one.parent_id})
                stored.append(one)
            self._append(conn, events)
        if stored:
            self.committed_entries_revision = stored[-1].revision
        return stored

    def update_entry(self, entry: EntryRecord, ev: AuditEvent) -> EntryRecord:
        with self._tx() as conn:
            old = conn.execute("SELECT parent_id FROM entries WHERE id = ?", (entry.id,)).fetchone()
            revision = self._bump(conn, "entries_revision")
            stored = _replace_revision(entry, revision)
            cur = conn.execute(
                "UPDATE entries SET spiffe_id = ?, parent_id = ?, selectors = ?, ttl = ?, "
                "dns_names = ?, hint = ?, revision = ?, updated_at = ? WHERE id = ?",
                (*_entry_row(stored)[1:8], stored.updated_at, stored.id),
            )
            if cur.rowcount != 1 or old is None:
                raise Conflict(f"no entry {entry.id}")
            self._log_entry(conn, revision, stored.id, {str(old[0]), stored.parent_id})
            self._append(conn, [ev])
        self.committed_entries_revision = revision
        return stored

    def delete_entry(self, entry_id: str, ev: AuditEvent) -> None:
        with self._tx() as conn:
            old = conn.execute(
                "DELETE FROM entries WHERE id = ? RETURNING parent_id", (entry_id,)
            ).fetchone()
            if old is None:
                raise Conflict(f"no entry {entry_id}")
            revision = self._bump(conn, "entries_revision")
            self._log_entry(conn, revision, entry_id, {str(old[0])})
            self._append(conn, [ev])
        self.committed_entries_revision = revision

    def get_entry(self, entry_id: str) -> EntryRecord | None:
        row = self._db.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else _entry_from_row(row)

    def list_entries(
        self, *, spiffe_id: str | None = None, parent_id: str | None = None
    ) -> list[EntryRecord]:
        clauses, params = [], []
        if spiffe_id is not None:
            clauses.append("spiffe_id = ?")
            params.append(spiffe_id)
        if parent_id is not None:
            clauses.append("parent_id = ?")
            params.append(parent_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT * FROM entries {where} ORDER BY spiffe_id, id"  # noqa: S608
        return [_entry_from_row(r) for r in self._db.execute(sql, params)]

    # -- the entry change log (delta sync) ---------------------------------------------

    def _log_entry(self, conn: Db, revision: int, entry_id: str, agents: set[str]) -> None:
        """One log row per agent the change concerns (`ca.feed.concerned_agents`)."""
        conn.executemany(
            "INSERT INTO entry_log (revision, agent_id, entry_id) VALUES (?, ?, ?)",
            [(revision, agent, entry_id) for agent in sorted(agents)],
        )
        for agent in sorted(agents):
            conn.notify(f"agent {agent}")

    def entry_log_floor(self) -> int:
        """The log holds every change above this revision, and nothing at or below it."""
        return int(self._get_meta("entry_log_floor") or 0)

    def needs_resync(self, since: int) -> bool:
        """Whether an agent holding revision ``since`` must fetch its entries in full:
        it holds nothing yet, or the log no longer reaches back to it, or it names a
        revision this datastore never had (a CA restored from an older backup)."""
        return since < 0 or since < self.entry_log_floor() or since > self.entries_revision()

    def entries_changed_for(self, agent_id: str, since: int) -> bool:
        """Whether a long poll holding ``since`` has something to hear (one indexed probe)."""
        if self.needs_resync(since):
            return True
        row = self._db.execute(
            "SELECT 1 FROM entry_log WHERE agent_id = ? AND revision > ? LIMIT 1",
            (agent_id, since),
        ).fetchone()
        return row is not None

    def entry_delta(self, agent_id: str, since: int, limit: int) -> EntryDelta:
        """Up to ``limit`` entries changed for ``agent_id`` after ``since``, oldest first.

        Each entry named in the log is reported as it is *now*: held (and still this
        agent's) or deleted.  Every revision changes one entry, so the last change of
        each entry has a revision of its own, and a page that stops at entry N's last
        change leaves nothing at or below it for the next page.  Callers check
        `needs_resync` first.
        """
        current = self.entries_revision()
        rows = self._db.execute(
            "SELECT entry_id, MAX(revision) AS last_rev FROM entry_log "
            "WHERE agent_id = ? AND revision > ? GROUP BY entry_id ORDER BY last_rev LIMIT ?",
            (agent_id, since, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        upserts: list[EntryRecord] = []
        deleted: list[str] = []
        for entry_id, _ in rows:
            entry = self.get_entry(str(entry_id))
            if entry is not None and entry.parent_id == agent_id:
                upserts.append(entry)
            else:
                deleted.append(str(entry_id))
        revision = int(rows[-1][1]) if more else current
        return EntryDelta(revision, tuple(upserts), tuple(deleted), more)

    def entries_page(
        self, parent_id: str, after: str, limit: int
    ) -> tuple[list[EntryRecord], bool]:
        """Up to ``limit`` of an agent's entries with ids above ``after``, by id; and
        whether more follow.  A full sync walks these pages."""
        rows = self._db.execute(
            "SELECT * FROM entries WHERE parent_id = ? AND id > ? ORDER BY id LIMIT ?",
            (parent_id, after, limit + 1),
        ).fetchall()
        return [_entry_from_row(r) for r in rows[:limit]], len(rows) > limit

    def prune_entry_log(self, keep: int = ENTRY_LOG_KEEP) -> int:
        """Forget changes more than ``keep`` revisions old; agents that far behind resync."""
        with self._tx() as conn:
            cutoff = self.entries_revision() - keep
            if cutoff <= self.entry_log_floor():
                return 0
            cur = conn.execute("DELETE FROM entry_log WHERE revision <= ?", (cutoff,))
            self._set_meta(conn, "entry_log_floor", str(cutoff))
            return cur.rowcount

    # -- issued SVIDs ------------------------------------------------------------------

    def _insert_svids(self, conn: Db, svids: Sequence[IssuedSvid]) -> None:
        conn.executemany(
            "INSERT INTO svids VALUES (?, ?, ?, ?, ?, ?)",
            [(s.serial, s.spiffe_id, s.agent_id, s.kind, s.not_after, s.issued_at) for s in svids],
        )

    def record_issued(self, svids: Sequence[IssuedSvid], events: Sequence[AuditEvent]) -> None:
        with self._tx() as conn:
            self._insert_svids(conn, svids)
            self._append(conn, events)

    def svid_count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM svids").fetchone()
        return int(n)

    def latest_svids(self, since: int, limit: int) -> list[IssuedSvid]:
        """The newest SVID of each (identity, agent) that expired after ``since``, soonest
        expiry first: what the console shows as about to expire (or expired unreplaced).
        Older SVIDs of the same identity were superseded and matter to nobody."""
        rows = self._db.execute(
            "SELECT serial, spiffe_id, agent_id, kind, not_after, issued_at FROM ("
            "SELECT *, ROW_NUMBER() OVER (PARTITION BY spiffe_id, agent_id "
            "ORDER BY issued_at DESC, not_after DESC) AS newest FROM svids "
            "WHERE not_after > ?) AS latest WHERE newest = 1 ORDER BY not_after, serial LIMIT ?",
            (since, limit),
        ).fetchall()
        return [IssuedSvid(*r) for r in rows]

    def prune_svids(self, before: int) -> int:
        """Drop expired SVID rows; the audit log keeps their history."""
        with self._tx() as conn:
            return conn.execute("DELETE FROM svids WHERE not_after < ?", (before,)).rowcount

    # -- CA keys -----------------------------------------------------------------------

    def list_keys(self) -> list[KeyRecord]:
        rows = self._db.execute("SELECT * FROM ca_keys ORDER BY not_before, id").fetchall()
        return [
            KeyRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9])
            for r in rows
        ]

    def save_keys(
        self, keys: Sequence[KeyRecord], events: Sequence[AuditEvent], *, bump_bundle: bool
    ) -> None:
        """Store key changes together: a rotation never half-happens."""
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO ca_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO "
                "UPDATE SET state = excluded.state, activated_at = excluded.activated_at",
                [
                    (
                        k.id,
                        k.kind,
                        k.state,
                        k.cert_pem,
                        k.parent_id,
                        int(k.upstream),
                        k.not_before,
                        k.not_after,
                        k.created_at,
                        k.activated_at,
                    )
                    for k in keys
                ],
            )
            if bump_bundle:
                self._bump(conn, "bundle_sequence")
            self._append(conn, events)
            conn.notify("keys")

    # -- CA servers and sealed keys (`ca.vault`) ----------------------------------------

    def get_sealed_key(self, key_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT sealed FROM ca_key_secrets WHERE id = ?", (key_id,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def put_sealed_key(self, key_id: str, sealed: bytes) -> None:
        """Written before the key's record (`ca.keys` rule 2): an orphan, never a gap."""
        with self._tx() as conn:
            conn.execute("INSERT INTO ca_key_secrets (id, sealed) VALUES (?, ?)", (key_id, sealed))

    def put_sealed_key_once(self, key_id: str, sealed: bytes) -> None:
        """Stored unless a key of that id already is (`ca.vault.SealedVault.put_once`)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO ca_key_secrets (id, sealed) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                (key_id, sealed),
            )

    def delete_sealed_key(self, key_id: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM ca_key_secrets WHERE id = ?", (key_id,))

    def list_servers(self) -> list[ServerRecord]:
        rows = self._db.execute("SELECT * FROM ca_servers ORDER BY created_at, id").fetchall()
        return [_server(r) for r in rows]

    def get_server(self, sid: str) -> ServerRecord | None:
        row = self._db.execute("SELECT * FROM ca_servers WHERE id = ?", (sid,)).fetchone()
        return None if row is None else _server(row)

    def first_server(self, server: ServerRecord, ev: AuditEvent) -> bool:
        """Record ``server`` as the cluster's first, approved, if no server and no key
        exist yet; False if the cluster is already founded (then ask to join)."""
        with self._tx() as conn:
            (servers,) = conn.execute("SELECT count(*) FROM ca_servers").fetchone()
            (keys,) = conn.execute("SELECT count(*) FROM ca_keys").fetchone()
            if servers or keys:
                return False
            self._insert_server(conn, server)
            self._append(conn, [ev])
        return True

    def request_join(self, server: ServerRecord, ev: AuditEvent) -> None:
        """A new server asks to join (pending); asking again changes nothing."""
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM ca_servers WHERE id = ?", (server.id,)).fetchone():
                return
            self._insert_server(conn, server)
            self._append(conn, [ev])

    def approve_server(self, sid: str, wrapped: bytes, now: int, ev: AuditEvent) -> None:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE ca_servers SET state = 'approved', wrapped_key = ?, approved_at = ? "
                "WHERE id = ? AND state = 'pending'",
                (wrapped, now, sid),
            )
            if cur.rowcount != 1:
                raise Conflict(f"no pending CA server {sid}")
            self._append(conn, [ev])
            conn.notify(f"server {sid}")

    def remove_server(self, sid: str, ev: AuditEvent) -> None:
        with self._tx() as conn:
            if conn.execute("DELETE FROM ca_servers WHERE id = ?", (sid,)).rowcount != 1:
                raise Conflict(f"no CA server {sid}")
            self._append(conn, [ev])

    def _insert_server(self, conn: Db, s: ServerRecord) -> None:
        conn.execute(
            "INSERT INTO ca_servers (id, public_key, state, wrapped_key, created_at, approved_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (s.id, s.public_key, s.state, s.wrapped_key, s.created_at, s.approved_at),
        )

    # -- moving a deployment to another datastore (`ca.migrate`) --------------------------

    def dump(self, table: str) -> list[tuple[object, ...]]:
        """Every row of one of `COPIED_TABLES`, in a stable order."""
        if table not in COPIED_TABLES:
            raise ValueError(f"not a table to copy: {table}")
        rows = self._db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
        return [tuple(r) for r in rows]

    def holds_anything(self) -> bool:
        for table in (*COPIED_TABLES, "ca_servers"):
            row = self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()  # noqa: S608
            if row is not None:
                return True
        return False

    def restore(
        self,
        tables: dict[str, list[tuple[object, ...]]],
        sealed: dict[str, bytes],
        founder: ServerRecord,
        ev: AuditEvent,
    ) -> None:
        """Load a copied deployment into this (empty) datastore, all in one transaction:
        its rows as they were (the audit chain unchanged), the private keys sealed, this
        server as the cluster's founder, and one audit record saying so."""
        with self._tx() as conn:
            for table in COPIED_TABLES:
                rows = tables.get(table, [])
                if rows:
                    marks = ", ".join("?" * len(rows[0]))
                    conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)  # noqa: S608
            conn.executemany(
                "INSERT INTO ca_key_secrets (id, sealed) VALUES (?, ?)", sorted(sealed.items())
            )
            self._insert_server(conn, founder)
            self._append(conn, [ev])


COPIED_TABLES = (
    "meta",
    "agents",
    "entries",
    "join_tokens",
    "svids",
    "ca_keys",
    "audit",
    "entry_log",
)
"""What `ca.migrate` copies: the whole state of a one-server deployment."""


def _server(r: Sequence[object]) -> ServerRecord:
    wrapped = r[3]
    return ServerRecord(
        str(r[0]),
        str(r[1]),
        str(r[2]),
        None if wrapped is None else bytes(wrapped),  # type: ignore[call-overload]
        int(str(r[4])),
        None if r[5] is None else int(str(r[5])),
    )


SIDE_FILES = ("", "-wal", "-shm")


def _private_files(path: Path) -> None:
    """The datastore holds every token hash and audit record: 0600, whatever the umask.

    A new datastore file is created 0600 before SQLite opens it; SQLite gives its
    ``-wal`` and ``-shm`` side files the mode of the database file.  A file that is
    already looser is refused, as a loose key file is.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"datastore {path}: {exc.strerror}") from exc
    else:
        os.fchmod(fd, 0o600)
        os.close(fd)
    for suffix in SIDE_FILES:
        side = Path(f"{path}{suffix}")
        try:
            mode = stat.S_IMODE(os.lstat(side).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            raise StoreError(
                f"datastore file {side} has mode {mode:04o}; it must not be readable by "
                f"group or others (chmod 600 {path}*)"
            )


def _refuse_symlinks(path: Path) -> None:
    """A planted link must not make the CA keep its records where someone else chose.

    The data dir and the datastore are checked; SQLite's side files (``-wal``,
    ``-shm``) sit in the same directory, which the CA creates with mode 0700.
    """
    for candidate, what in ((path.parent, "data dir"), (path, "datastore")):
        if candidate.is_symlink():
            raise StoreError(f"{what} {candidate} is a symlink; refusing to follow it")


def _load_detail(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"unreadable": text}
    return value if isinstance(value, dict) else {"value": value}


def _entry_row(e: EntryRecord) -> tuple[object, ...]:
    return (
        e.id,
        e.spiffe_id,
        e.parent_id,
        json.dumps(list(e.selectors)),
        e.ttl,
        json.dumps(list(e.dns_names)),
        e.hint,
        e.revision,
        e.created_at,
        e.updated_at,
    )


def _entry_from_row(r: Sequence[object]) -> EntryRecord:
    return EntryRecord(
        id=str(r[0]),
        spiffe_id=str(r[1]),
        parent_id=str(r[2]),
        selectors=tuple(json.loads(str(r[3]))),
        ttl=None if r[4] is None else int(str(r[4])),
        dns_names=tuple(json.loads(str(r[5]))),
        hint=str(r[6]),
        revision=int(str(r[7])),
        created_at=int(str(r[8])),
        updated_at=int(str(r[9])),
    )


def _replace_revision(entry: EntryRecord, revision: int) -> EntryRecord:
    return replace(entry, revision=revision)
