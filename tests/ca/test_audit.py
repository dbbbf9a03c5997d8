"""The audit chain's verdicts, on rows altered, removed, reordered and appended."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from ca import audit


def chain(n: int) -> list[audit.StoredRow]:
    rows = []
    prev = audit.GENESIS
    for seq in range(1, n + 1):
        rec = audit.seal(
            prev,
            seq,
            f"2026-01-01T00:00:{seq:02d}Z",
            "ca",
            "svid.issued",
            f"spiffe://td/w{seq}",
            f"{seq:x}",
            {"n": seq},
        )
        rows.append(rec)
        prev = rec.hash
    return rows


def head(rows):
    return (rows[-1].seq, rows[-1].hash) if rows else None


@given(st.integers(0, 30))
def test_intact_chain_verifies(n):
    rows = chain(n)
    result = audit.verify(rows, head(rows))
    assert result.ok and result.records == n


@given(st.integers(1, 20), st.data())
def test_altered_record_is_named(n, data):
    rows = chain(n)
    i = data.draw(st.integers(0, n - 1))
    field = data.draw(
        st.sampled_from(["ts", "actor", "event", "spiffe_id", "serial", "detail_json"])
    )
    rows[i] = replace(rows[i], **{field: getattr(rows[i], field) + "x"})
    result = audit.verify(rows, head(chain(n)))
    assert not result.ok and result.bad_seq == i + 1 and "altered" in result.problem


@given(st.integers(2, 20), st.data())
def test_removed_record_is_named(n, data):
    rows = chain(n)
    i = data.draw(st.integers(0, n - 2))
    del rows[i]
    result = audit.verify(rows, head(chain(n)))
    assert not result.ok and result.bad_seq == i + 1 and "removed" in result.problem


def test_removed_from_the_end_is_caught_by_the_head():
    full = chain(5)
    result = audit.verify(full[:3], head(full))
    assert not result.ok and result.bad_seq == 4 and "removed from the end" in result.problem


@given(st.integers(2, 20), st.data())
def test_reordered_records_are_named(n, data):
    rows = chain(n)
    i = data.draw(st.integers(0, n - 2))
    # Swap two neighbours' positions (their seq values), as an UPDATE of seq would.
    a, b = rows[i], rows[i + 1]
    rows[i] = replace(b, seq=a.seq)
    rows[i + 1] = replace(a, seq=b.seq)
    result = audit.verify(rows, head(chain(n)))
    assert not result.ok and result.bad_seq == i + 1 and "out of order" in result.problem


def test_appended_outside_the_ca_is_caught():
    rows = chain(4)
    result = audit.verify(rows, (3, rows[2].hash))
    assert not result.ok and result.bad_seq == 4 and "appended outside" in result.problem


# -- anchors (rule 4): what a whole, consistent rewrite cannot match --------------------


def rewritten(rows: list[audit.StoredRow], seq: int) -> list[audit.StoredRow]:
    """Record ``seq`` edited and every hash after it recomputed: a consistent chain."""
    out, prev = [], audit.GENESIS
    for row in rows:
        actor = "forger" if row.seq == seq else row.actor
        digest = audit.record_hash(
            prev, row.ts, actor, row.event, row.spiffe_id, row.serial, row.detail_json
        )
        out.append(replace(row, actor=actor, prev_hash=prev, hash=digest))
        prev = digest
    return out


@given(st.integers(2, 30), st.data())
def test_a_consistent_rewrite_is_caught_by_any_anchor_at_or_after_it(n, data):
    rows = chain(n)
    edited = data.draw(st.integers(1, n))
    anchored = data.draw(st.integers(1, n))
    seen = audit.Seen(anchored, rows[anchored - 1].hash, "then")
    forged = rewritten(rows, edited)
    assert audit.verify(forged, head(forged)).ok  # the chain alone cannot tell
    result = audit.verify(forged, head(forged), [seen])
    if anchored >= edited:
        assert not result.ok
        assert result.bad_seq == anchored
        assert result.problem.startswith(f"history rewritten: record {anchored} ")
    else:
        assert result.ok  # history the anchor saw is intact
    assert audit.verify(rows, head(rows), [seen]).ok


@given(st.integers(1, 20), st.integers(1, 20))
def test_a_log_cut_below_an_anchor_is_named(n, extra):
    rows = chain(n + extra)
    seen = audit.Seen(n + extra, rows[-1].hash, "then")
    kept = rows[:n]
    result = audit.verify(kept, head(kept), [seen])
    assert not result.ok
    assert result.problem == (
        f"history rewritten: the log ends at record {n}, but the anchor of then "
        f"saw record {n + extra}"
    )
