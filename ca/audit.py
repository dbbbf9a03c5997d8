"""The audit chain: what makes a record tamper-evident, and how to prove it.

Rules:

1. Each record's ``hash`` is SHA-256 over the previous record's hash and the
   record's own content (time, actor, event, SPIFFE ID, serial, detail), in a
   canonical JSON form.  The sequence number is *not* hashed: it is the row's
   position, and leaving it out is what lets `verify` tell a record that was
   moved (its own hash still holds, its link does not) from one that was
   edited (its own hash fails).
2. The first record links to ``GENESIS``.
3. The store keeps the newest (seq, hash) as the chain's *head*, written in the
   same transaction as the record, so removing records from the end is caught
   too: the chain alone cannot tell a truncated log from a short one.
4. Head and chain live in one datastore, so whoever rewrites all of it can
   make them agree.  *Anchors* (`ca.anchor`: a head signed outside the
   datastore) are what such a rewrite cannot match: given some, `verify`
   names the first anchored record whose hash is no longer the one signed.

This module does no I/O; the store appends and reads rows, this decides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    ts: str
    actor: str
    event: str
    spiffe_id: str | None = None
    serial: str | None = None
    detail: Mapping[str, object] = field(default_factory=dict)
    prev_hash: str = GENESIS
    hash: str = ""


# Built once: `json.dumps` with options builds an encoder per call, and the CA hashes
# every record it appends (one per SVID of a batch) with both of these.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def canonical_detail(detail: Mapping[str, object]) -> str:
    return _canonical(detail)


def record_hash(
    prev_hash: str,
    ts: str,
    actor: str,
    event: str,
    spiffe_id: str | None,
    serial: str | None,
    detail_json: str,
) -> str:
    body = _compact([prev_hash, ts, actor, event, spiffe_id, serial, detail_json])
    return hashlib.sha256(body.encode()).hexdigest()


def seal(
    prev_hash: str,
    seq: int,
    ts: str,
    actor: str,
    event: str,
    spiffe_id: str | None,
    serial: str | None,
    detail: Mapping[str, object],
) -> StoredRow:
    """The next record of a chain whose newest hash is ``prev_hash``, as it is stored
    (its detail in the canonical text that was hashed)."""
    detail_json = canonical_detail(detail)
    digest = record_hash(prev_hash, ts, actor, event, spiffe_id, serial, detail_json)
    return StoredRow(seq, ts, actor, event, spiffe_id, serial, detail_json, prev_hash, digest)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    bad_seq: int | None = None
    problem: str = ""


@dataclass(frozen=True)
class StoredRow:
    """A record exactly as read back, with the detail still in its stored text."""

    seq: int
    ts: str
    actor: str
    event: str
    spiffe_id: str | None
    serial: str | None
    detail_json: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Seen:
    """What an anchor (rule 4) says the chain held: record ``seq`` hashed to ``hash``
    at time ``at``.  Its signature is checked before it gets here."""

    seq: int
    hash: str
    at: str


def verify(
    rows: Iterable[StoredRow], head: tuple[int, str] | None, anchors: Sequence[Seen] = ()
) -> VerifyResult:
    """Walk rows in ``seq`` order and name the first one that breaks the chain, or
    that differs from what an anchor saw."""
    expected_seq = 1
    prev = GENESIS
    count = 0
    anchored: dict[int, list[Seen]] = {}
    for seen in anchors:
        anchored.setdefault(seen.seq, []).append(seen)
    for row in rows:
        count += 1
        for seen in anchored.get(row.seq, ()):
            if seen.hash != row.hash:
                return VerifyResult(
                    False,
                    count,
                    row.seq,
                    f"history rewritten: record {row.seq} is not the one anchored at {seen.at}"
                    " (its hash differs from the signed one)",
                )
        own = record_hash(
            row.prev_hash, row.ts, row.actor, row.event, row.spiffe_id, row.serial, row.detail_json
        )
        if own != row.hash:
            return VerifyResult(
                False, count, row.seq, f"record {row.seq} was altered (its hash does not match)"
            )
        if row.prev_hash != prev:
            if row.seq > expected_seq:
                missing = (
                    f"record {expected_seq}"
                    if row.seq == expected_seq + 1
                    else f"records {expected_seq}-{row.seq - 1}"
                )
                return VerifyResult(
                    False, count, expected_seq, f"{missing} removed before record {row.seq}"
                )
            return VerifyResult(
                False,
                count,
                row.seq,
                f"record {row.seq} is out of order (it does not follow record {expected_seq - 1})",
            )
        if row.seq != expected_seq:
            return VerifyResult(
                False, count, row.seq, f"record {row.seq} was renumbered (expected {expected_seq})"
            )
        prev = row.hash
        expected_seq += 1
    last_seq = expected_seq - 1
    beyond = [seen for seen in anchors if seen.seq > last_seq]
    if beyond:
        seen = min(beyond, key=lambda s: s.seq)
        return VerifyResult(
            False,
            count,
            last_seq + 1,
            f"history rewritten: the log ends at record {last_seq}, but the anchor of "
            f"{seen.at} saw record {seen.seq}",
        )
    if head is not None and head != (last_seq, prev):
        head_seq = head[0]
        if head_seq > last_seq:
            return VerifyResult(
                False,
                count,
                last_seq + 1,
                f"records {last_seq + 1}-{head_seq} removed from the end of the log",
            )
        if head_seq < last_seq:
            return VerifyResult(
                False,
                count,
                head_seq + 1,
                f"records {head_seq + 1}-{last_seq} were appended outside the CA",
            )
        return VerifyResult(
            False, count, head_seq, f"record {head_seq} does not match the chain head"
        )
    return VerifyResult(True, count)
