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
        forged.detail_json,
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


def rewrite_consistently(db, seq: int, actor: str) -> None:
    """What a holder of the whole database can do: edit record ``seq``, recompute every
    hash after it and the head, so that the chain is as consistent as the real one."""
    conn = sqlite3.connect(str(db))
    with conn:
        stored = conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        prev = audit.GENESIS
        for row in stored:
            row_actor = actor if row[0] == seq else row[2]
            digest = audit.record_hash(prev, row[1], row_actor, row[3], row[4], row[5], row[6])
            conn.execute(
                "UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (row_actor, prev, digest, row[0]),
            )
            prev = digest
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'audit_head'", (f"{stored[-1][0]}:{prev}",)
        )
    conn.close()


def test_a_consistent_rewrite_passes_verify_but_not_an_earlier_anchor(ca_factory, tmp_path):
    """The chain and its head live in one database: rewriting all of it passes plain
    ``verify``.  An anchor signed before the rewrite, from any of the places the CA
    publishes one (the CLI, the log, the anchor file), names the rewritten record."""
    anchor_file = tmp_path / "anchors.jsonl"
    ca = ca_factory("--audit-anchor-file", str(anchor_file))
    for _ in range(3):
        ca.cli("token", "create")
    kept = tmp_path / "kept.json"
    kept.write_text(ca.cli("audit", "anchor").stdout)
    anchored = json.loads(kept.read_text())
    logged = ca.daemon.wait_for("audit.anchor", count=2)  # at start, then the CLI's
    assert logged["seq"] == anchored["seq"] and logged["signature"] == anchored["signature"]
    log_excerpt = tmp_path / "log.jsonl"
    log_excerpt.write_text(json.dumps(logged) + "\n")
    assert json.loads(anchor_file.read_text().splitlines()[-1]) == anchored
    assert anchor_file.stat().st_mode & 0o777 == 0o600
    for path in (kept, log_excerpt, anchor_file):
        result = ca.cli("audit", "verify", "--anchor", str(path))
        assert "matches" in result.stdout, result.stdout

    ca.cli("token", "create")  # history goes on after the anchor
    rewrite_consistently(ca.data_dir / "ca.db", 2, "admin:uid=4242")
    assert verdict(ca)["ok"], "a consistent rewrite should pass the chain alone"
    first_in_file = json.loads(anchor_file.read_text().splitlines()[0])  # signed at start
    for path, named in ((kept, anchored), (log_excerpt, anchored), (anchor_file, first_in_file)):
        result = ca.cli("audit", "verify", "--anchor", str(path), check=False)
        assert result.returncode == 1, result.stdout
        assert (
            f"audit chain BROKEN at record {named['seq']}: history rewritten: "
            f"record {named['seq']} is not the one anchored at {named['at']}"
        ) in result.stdout

    # Cut back to before the anchor, consistently: the anchor saw more.
    execute(ca.data_dir / "ca.db", "DELETE FROM audit WHERE seq > 1")
    rewrite_consistently(ca.data_dir / "ca.db", 1, "ca")
    out = json.loads(
        ca.cli("audit", "verify", "--anchor", str(kept), "--output", "json", check=False).stdout
    )
    assert not out["ok"]
    assert out["problem"] == (
        f"history rewritten: the log ends at record 1, but the anchor of {anchored['at']} "
        f"saw record {anchored['seq']}"
    )


def test_forged_or_foreign_anchors_are_refused(ca_factory, tmp_path):
    ca = ca_factory()
    ca.cli("token", "create")
    good = json.loads(ca.cli("audit", "anchor").stdout)
    other = ca_factory(subdir="other")
    other.cli("token", "create")
    foreign = json.loads(other.cli("audit", "anchor").stdout)
    cases = {
        "bad signature": ({**good, "hash": "0" * 64}, "has a bad signature"),
        "another CA's key": (foreign, "not this CA's anchor key"),
    }
    for name, (anchor, words) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(anchor))
        result = ca.cli("audit", "verify", "--anchor", str(path), check=False)
        assert result.returncode == 1, (name, result.stdout)
        assert words in result.stdout, (name, result.stdout)
    for text, words in (
        ("not json\n", "line 1: not JSON"),
        ('{"event": "svid.issued"}\n', "not an audit.anchor one"),
        (json.dumps({**good, "seq": "3"}), "field 'seq' must be an integer"),
        ("", "no anchors in it"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(text)
        result = ca.cli("audit", "verify", "--anchor", str(path), check=False)
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
