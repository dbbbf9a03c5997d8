"""`tally ca datastore migrate`: move a one-server deployment onto PostgreSQL, keeping it whole.

Rules:

1. **Everything moves, as it is.**  Agents, entries, join tokens, issued
   SVIDs, CA key records, the entry change log, the counters in ``meta`` and
   the audit chain are copied row for row, so the chain verifies unchanged,
   agents keep their SPIFFE IDs and serials (they renew and poll as before,
   with no new join token), and delta sync goes on from the same revision.
2. **The private keys move sealed.**  The key files of keys still in use are
   read from the CA's ``keys/`` directory (in ``--data-dir``, by default the
   SQLite file's directory) and sealed under a new cluster key; the server that
   will run on the new datastore from that data dir (where its ``server.key``
   is made) becomes the cluster's founder, holding the cluster key wrapped to
   it (`ca.vault`).  Other servers join by approval.
3. **One transaction, into an empty database.**  A target that holds anything
   is refused; a copy that fails leaves the target as it was.  One audit
   record, ``datastore.migrated``, continues the chain on the new side.
4. **Stop the CA first.**  Rows the old CA writes after the copy began would
   be left behind; the command reads a consistent snapshot (one SQLite read
   transaction) but cannot know what comes later.  Agents ride out the few
   seconds on their cached SVIDs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from ca.datastore import Datastore
from ca.jwt_keys import sealed_id
from ca.keys import load_private_key
from ca.store import COPIED_TABLES, AuditEvent, ServerRecord, Store
from ca.vault import (
    load_or_create_identity,
    new_cluster_key,
    public_pem,
    seal,
    server_id,
    wrap,
)
from tally.ops.errors import OperatorError
from tally.spiffe import pem


class MigrateError(OperatorError):
    """A migration that cannot start: a wrong source or target, a missing key file."""


def migrate(source: Datastore, target: Datastore, data_dir: Path | None) -> dict[str, object]:
    """Copy ``source`` (SQLite) into ``target`` (PostgreSQL); what was copied."""
    if source.engine != "sqlite" or source.path is None:
        raise MigrateError("--from must be the SQLite datastore, sqlite:///PATH")
    if target.engine != "postgresql":
        raise MigrateError("--to must be a PostgreSQL datastore, postgresql://USER@HOST/DB")
    if not source.path.exists():
        raise MigrateError(f"--from {source.path}: no such datastore")
    server_dir = data_dir or source.path.parent
    keys_dir = server_dir / "keys"  # the CA's data dir holds keys/ (and server.key)
    src = Store.connect(source)
    try:
        tables = {table: src.dump(table) for table in COPIED_TABLES}
        records = src.list_keys()
        jwt_records = json.loads(src.jwt_keys() or "[]")
        verified = src.verify_audit()
    finally:
        src.close()
    if not verified.ok:
        raise MigrateError(
            f"the audit chain of {source.path} does not verify ({verified.problem});"
            " refusing to carry a broken chain over"
        )
    cluster_key = new_cluster_key()
    sealed: dict[str, bytes] = {}
    for rec in records:
        if rec.state in ("prepared", "active") and not rec.upstream:
            key = load_private_key(keys_dir / f"{rec.id}.pem")
            sealed[rec.id] = seal(cluster_key, rec.id, pem.key_to_pem(key))
    for item in jwt_records:  # the JWT signing keys move sealed too (`ca.jwt_keys`)
        if item.get("state") in ("prepared", "active"):
            name = sealed_id(str(item["kid"]))
            key = load_private_key(keys_dir / f"{name}.pem")
            sealed[name] = seal(cluster_key, name, pem.key_to_pem(key))
    identity = load_or_create_identity(server_dir)
    public = public_pem(identity)
    sid = server_id(public)
    now = datetime.now(UTC).replace(microsecond=0)
    stamp = int(now.timestamp())
    founder = ServerRecord(sid, public, "approved", wrap(cluster_key, public), stamp, stamp)
    detail: dict[str, object] = {
        "from": source.shown,
        "founder": sid,
        "keys_sealed": len(sealed),
        "audit_records": len(tables["audit"]),
    }
    ev = AuditEvent(
        now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "cli",
        "datastore.migrated",
        None,
        None,
        detail,
    )
    dst = Store.connect(target)
    try:
        if dst.holds_anything():
            raise MigrateError(f"--to {target.shown} is not empty; migrate into a new database")
        dst.restore(tables, sealed, founder, ev)
        after = dst.verify_audit()
    finally:
        dst.close()
    if not after.ok:
        raise MigrateError(f"the copied audit chain does not verify: {after.problem}")
    return {
        "to": target.shown,
        "server": sid,
        "server_key": str(server_dir / "server.key"),
        "rows": {table: len(rows) for table, rows in tables.items()},
        "keys_sealed": len(sealed),
        "audit_records": after.records,
    }
