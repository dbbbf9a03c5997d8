"""The audit log's ends, tampered with behind a running CA's back, named by `tally ca audit verify`.

Theory: the chain links each record to the one before, so edits, swaps and
deletions in the middle break a link (tests/e2e/test_ca.py,
test_audit_verify_names_altered_removed_and_reordered_records).  The ends
are different: a record appended with a correct link, or the newest records
cut off, leave an intact chain.  Only the head the CA keeps beside the log
(written in the same transaction as each record) catches them, so these are
the shapes tested here, each undone afterwards to show the verdict was about
that shape alone.  An attacker who also rewrites the head holds the database
outright; the chain is not keyed, and that is out of its reach by design.
"""

from __future__ import annotations

import json
import sqlite3

from ca import audit
from tests.e2e.conftest import CA


def rows(db) -> list[tuple]:
    with sqlite3.connect(str(db)) as conn:
        return conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()


def execute(db, sql: str, *params) -> None:
    conn = sqlite3.connect(str(db))
    with conn:
        conn.execute(sql, params)
    conn.close()


def verdict(ca: CA) -> dict:
    result = ca.cli("audit", "verify", "--output", "json", check=False)
    return json.loads(result.stdout)


def test_records_appended_or_cut_off_out_of_band_are_named(ca: CA):
    for _ in range(3):
        ca.cli("token", "create")
    db = ca.data_dir / "ca.db"
    before = rows(db)
    last = before[-1]
    assert verdict(ca)["ok"]

    # Appended with a correct link: a forger who knows the format but not the head.
    forged = audit.seal(
        last[8], last[0] + 1, last[1], "admin:uid=0", "token.created", None, None, {}
    )
    execute(
        db,
        "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        forged.seq,
        forged.ts,
        forged.actor,
        forged.event,
        None,
        None,
        audit.canonical_detail(forged.detail),
        forged.prev_hash,
        forged.hash,
    )
    seen = verdict(ca)
    assert not seen["ok"] and seen["bad_seq"] == forged.seq
    assert "appended outside the CA" in seen["problem"]
    text = ca.cli("audit", "verify", check=False)
    assert text.returncode == 1 and "appended outside the CA" in text.stdout
    execute(db, "DELETE FROM audit WHERE seq = ?", forged.seq)
    assert verdict(ca)["ok"]

    # Appended with a made-up hash: its own hash gives it away.
    execute(
        db,
        "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        last[0] + 1,
        last[1],
        "admin:uid=0",
        "agent.banned",
        None,
        None,
        "{}",
        last[8],
        "f" * 64,
    )
    seen = verdict(ca)
    assert not seen["ok"] and f"record {last[0] + 1} was altered" in seen["problem"]
    execute(db, "DELETE FROM audit WHERE seq = ?", last[0] + 1)
    assert verdict(ca)["ok"]

    # Cut off: the newest two records deleted, which leaves a shorter intact chain.
    execute(db, "DELETE FROM audit WHERE seq >= ?", last[0] - 1)
    seen = verdict(ca)
    assert not seen["ok"] and seen["bad_seq"] == last[0] - 1
    assert f"records {last[0] - 1}-{last[0]} removed from the end" in seen["problem"]
