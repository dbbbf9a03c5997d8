"""What the console shows: the CA's records turned into one JSON-ready snapshot.

Rules:

1. Pure.  The shell (`ca.console`) reads the store and the key manager in the
   CA's worker thread and hands the rows here with ``now``; this module does no
   I/O and imports nothing that does, so the whole picture is tested on plain
   values.  Inputs are described by protocols, not by `ca.store`'s classes, so
   that this module stays importable without SQLite.
2. Public data only.  A snapshot carries SPIFFE IDs, serials, times, selectors,
   states, certificate fingerprints and reason words, never a key, a
   certificate body, a token or its secret.  Audit details are copied through
   an allow list (`SAFE_DETAIL`), not a deny list: a field someone adds to an
   audit record tomorrow stays out of the console until it is put on the list.
3. Bounded.  Every list is capped (`Limits`), and the counts before the cap are
   given too, so a fleet of ten thousand agents makes a snapshot of the same
   order of size as a fleet of ten, and the page says what it left out.
4. Judgements live here, not in the page: whether an agent is healthy, late
   or failed, whether an SVID expired without a successor, which audit events
   are rotations and which are failures.  The page only draws them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

RENEWAL_LATE = 0.55
"""Past this fraction of its life without a successor an SVID is *late*: agents renew at
38-48 % (`tally.spiffe.rotation`), so a healthy one never gets here."""

SAFE_DETAIL = ("kind", "reason", "state", "entry_id", "previous_status", "method")
"""Audit detail fields a snapshot may repeat (rule 2).  ``token_id`` is not secret (the
secret is the part after the dot), but nobody watching rotations needs it either."""

ROTATIONS = frozenset({"svid.issued", "svid.renewed", "jwt.issued"})
KEY_EVENTS = frozenset({"key.created", "key.activated", "key.retired", "key.removed"})
FAILURES = frozenset(
    {
        "attestation.failed",
        "attestation.throttled",
        "token.revoked",
        "agent.evicted",
        "agent.banned",
        "svid.expired",
        "audit.broken",
        "rotation.failed",
    }
)
"""Events drawn red.  ``svid.expired`` is derived here (rule 4); ``audit.broken`` and
``rotation.failed`` are counted when the CA records them."""


@dataclass(frozen=True)
class Limits:
    agents: int = 200
    entries: int = 200
    expiring: int = 12
    timeline: int = 400
    window_s: int = 300
    """How far back the timeline reaches."""


# -- inputs (satisfied by ca.store's records) -----------------------------------------


class AgentRow(Protocol):
    @property
    def spiffe_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def serial(self) -> str | None: ...
    @property
    def not_after(self) -> int | None: ...
    @property
    def attested_at(self) -> int: ...
    @property
    def updated_at(self) -> int: ...


class EntryRow(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def spiffe_id(self) -> str: ...
    @property
    def parent_id(self) -> str: ...
    @property
    def selectors(self) -> tuple[str, ...]: ...
    @property
    def ttl(self) -> int | None: ...
    @property
    def dns_names(self) -> tuple[str, ...]: ...
    @property
    def hint(self) -> str: ...


class SvidRow(Protocol):
    @property
    def serial(self) -> str: ...
    @property
    def spiffe_id(self) -> str: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def kind(self) -> str: ...
    @property
    def not_after(self) -> int: ...
    @property
    def issued_at(self) -> int: ...


class AuditRow(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def ts(self) -> str: ...
    @property
    def actor(self) -> str: ...
    @property
    def event(self) -> str: ...
    @property
    def spiffe_id(self) -> str | None: ...
    @property
    def serial(self) -> str | None: ...
    @property
    def detail(self) -> Mapping[str, object]: ...


@dataclass(frozen=True)
class KeyRow:
    """A CA key as the console sees it: the shell fills in the fingerprint, never the PEM."""

    id: str
    kind: str  # root, intermediate, or jwt
    state: str  # prepared, active, retired
    parent_id: str | None
    not_before: int
    not_after: int
    created_at: int
    activated_at: int | None
    fingerprint: str  # SHA-256 of the certificate (or public key), hex
    upstream: bool = False


class JwtKeyRow(Protocol):
    """A JWT signing key's record (``ca.jwt_keys.JwtKeyRecord``): states and times only."""

    @property
    def kid(self) -> str: ...
    @property
    def alg(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def created_at(self) -> int: ...
    @property
    def activate_at(self) -> int: ...
    @property
    def activated_at(self) -> int | None: ...
    @property
    def remove_at(self) -> int | None: ...


def jwt_key_rows(records: Iterable[JwtKeyRow], now: float) -> list[KeyRow]:
    """JWT keys on the key schedule.  They have no certificate and no fixed end: a key is
    drawn from its creation to its removal when that is set (retired keys), else to the
    later of now and its activation; the kid stands in for a fingerprint (it is public,
    published in the JWKS)."""
    rows = []
    for r in records:
        if r.state == "removed":
            continue
        end = r.remove_at if r.remove_at is not None else max(int(now), r.activate_at)
        rows.append(
            KeyRow(
                r.kid,
                "jwt",
                r.state,
                None,
                r.created_at,
                max(end, r.created_at + 1),
                r.created_at,
                r.activated_at,
                r.kid,
            )
        )
    return rows


@dataclass(frozen=True)
class AuditState:
    ok: bool
    records: int
    problem: str
    head_seq: int
    head_hash: str
    checked_at: int


# -- judgements (rule 4) --------------------------------------------------------------


def life_state(issued_at: int | None, not_after: int | None, now: float) -> str:
    """``ok``, ``late`` (past `RENEWAL_LATE` of its life) or ``expired``; ``unknown`` without
    times.  ``issued_at`` is when the CA signed it, which is when its life began."""
    if not_after is None:
        return "unknown"
    if now >= not_after:
        return "expired"
    if issued_at is None or not_after <= issued_at:
        return "ok"
    return "late" if (now - issued_at) / (not_after - issued_at) >= RENEWAL_LATE else "ok"


def agent_health(status: str, life: str) -> str:
    """One word per agent: its record's status wins; an active agent is judged by its SVID."""
    if status in ("evicted", "banned"):
        return status
    return life if life in ("late", "expired") else "ok"


SEVERITY = {"ok": "ok", "unknown": "ok", "late": "warn", "expired": "bad", "evicted": "bad"}
SEVERITY["banned"] = "bad"


def lane(event: str) -> str:
    if event in FAILURES:
        return "failure"
    if event in ROTATIONS:
        return "rotation"
    if event in KEY_EVENTS:
        return "key"
    return "change"


def parse_ts(ts: str) -> float | None:
    """An audit time (RFC 3339 in UTC, ``...Z``, as `ca.authority.iso` writes it) as Unix
    seconds; None for anything else, so a record whose time cannot be read is left off
    the timeline rather than drawn at a guessed place."""
    if not ts.endswith("Z") or len(ts) > 40:
        return None
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if when.utcoffset() != timedelta(0):
        return None
    return when.timestamp()


def safe_detail(detail: Mapping[str, object]) -> dict[str, str]:
    """The allowed detail fields (rule 2), as short strings."""
    out: dict[str, str] = {}
    for key in SAFE_DETAIL:
        value = detail.get(key)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            out[key] = str(value)[:120]
    return out


# -- the snapshot ---------------------------------------------------------------------


def agents_view(
    agents: Sequence[AgentRow], latest: Mapping[str, SvidRow], now: float
) -> list[dict[str, object]]:
    """Failed agents first, then late ones, then the rest by ID: what needs a look on top."""
    rows: list[dict[str, object]] = []
    for a in agents:
        svid = latest.get(a.spiffe_id)
        issued = svid.issued_at if svid is not None and svid.serial == a.serial else None
        if issued is None and a.status == "active":
            issued = a.updated_at  # set by attestation and by every renewal
        life = life_state(issued, a.not_after, now)
        health = agent_health(a.status, life)
        rows.append(
            {
                "id": a.spiffe_id,
                "status": a.status,
                "health": health,
                "severity": SEVERITY.get(health, "ok"),
                "serial": a.serial,
                "last_renewal": issued,
                "expires": a.not_after,
                "attested_at": a.attested_at,
            }
        )
    order = {"bad": 0, "warn": 1, "ok": 2}
    rows.sort(key=lambda r: (order[str(r["severity"])], str(r["id"])))
    return rows


def entries_view(
    entries: Sequence[EntryRow], latest: Mapping[tuple[str, str], SvidRow], now: float, limit: int
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for e in entries[:limit]:
        svid = latest.get((e.spiffe_id, e.parent_id))
        rows.append(
            {
                "id": e.id,
                "spiffe_id": e.spiffe_id,
                "parent_id": e.parent_id,
                "selectors": list(e.selectors),
                "ttl": e.ttl,
                "dns_names": list(e.dns_names),
                "hint": e.hint,
                "svid_expires": None if svid is None else svid.not_after,
                "svid_state": "none"
                if svid is None
                else life_state(svid.issued_at, svid.not_after, now),
            }
        )
    return rows


def expiring_view(svids: Sequence[SvidRow], now: float, limit: int) -> list[dict[str, object]]:
    """The newest SVID per identity, soonest expiry first (expired ones lead: they failed)."""
    rows: list[dict[str, object]] = []
    for s in sorted(svids, key=lambda s: (s.not_after, s.serial))[:limit]:
        state = life_state(s.issued_at, s.not_after, now)
        rows.append(
            {
                "spiffe_id": s.spiffe_id,
                "agent_id": s.agent_id,
                "kind": s.kind,
                "serial": s.serial,
                "issued_at": s.issued_at,
                "expires": s.not_after,
                "state": state,
                "severity": SEVERITY.get(state, "ok"),
            }
        )
    return rows


def timeline_view(
    records: Iterable[AuditRow], svids: Sequence[SvidRow], now: float, limits: Limits
) -> dict[str, object]:
    """Audit events of the last ``window_s`` seconds, each on its lane, plus the SVIDs that
    expired in that window without a successor (``svid.expired``, derived: the CA records
    no event when an agent simply stops renewing)."""
    start = now - limits.window_s
    events: list[dict[str, object]] = []
    for r in records:
        t = parse_ts(r.ts)
        if t is None or t < start or t > now + 60:
            continue
        events.append(
            {
                "t": t,
                "seq": r.seq,
                "event": r.event,
                "lane": lane(r.event),
                "spiffe_id": r.spiffe_id,
                "serial": r.serial,
                "detail": safe_detail(r.detail),
            }
        )
    for s in svids:
        if start <= s.not_after <= now:
            events.append(
                {
                    "t": float(s.not_after),
                    "seq": None,
                    "event": "svid.expired",
                    "lane": "failure",
                    "spiffe_id": s.spiffe_id,
                    "serial": s.serial,
                    "detail": {"kind": s.kind, "reason": "expired with no successor"},
                }
            )
    events.sort(key=lambda e: (float(str(e["t"])), str(e["event"])))
    counts = {name: 0 for name in ("rotation", "failure", "key", "change")}
    for e in events:
        counts[str(e["lane"])] += 1
    return {
        "start": start,
        "end": now,
        "counts": counts,
        "events": events[-limits.timeline :],
    }


def keys_view(keys: Sequence[KeyRow], now: float) -> dict[str, object]:
    """The key schedule, one group per kind, each with the moments that come next.

    For the active intermediate the next one is prepared at a third of its life and
    activated at two thirds (`ca.schedule`); an own root is replaced at two thirds.
    """
    groups: dict[str, list[dict[str, object]]] = {"root": [], "intermediate": [], "jwt": []}
    marks: list[dict[str, object]] = []
    for k in keys:
        if k.state == "removed":
            continue
        groups.setdefault(k.kind, []).append(
            {
                "id": k.id,
                "kind": k.kind,
                "state": k.state,
                "parent_id": k.parent_id,
                "not_before": k.not_before,
                "not_after": k.not_after,
                "created_at": k.created_at,
                "activated_at": k.activated_at,
                "fingerprint": k.fingerprint,
                "upstream": k.upstream,
            }
        )
        if k.state != "active":
            continue
        life = k.not_after - k.not_before
        if k.kind == "intermediate":
            marks.append({"key": k.id, "t": k.not_before + life / 3, "label": "next prepared"})
            marks.append({"key": k.id, "t": k.not_before + 2 * life / 3, "label": "next activated"})
        elif k.kind == "root" and not k.upstream:
            marks.append({"key": k.id, "t": k.not_before + 2 * life / 3, "label": "next root"})
    for k in keys:
        if k.kind == "jwt" and k.state == "prepared":
            marks.append({"key": k.id, "t": k.not_after, "label": "activates"})
    return {"now": now, "groups": groups, "marks": marks}


def audit_view(state: AuditState | None) -> dict[str, object]:
    if state is None:
        return {"ok": None, "records": 0, "problem": "not checked yet"}
    return {
        "ok": state.ok,
        "records": state.records,
        "problem": state.problem,
        "head_seq": state.head_seq,
        "head_hash": state.head_hash[:16],
        "checked_at": state.checked_at,
    }


def snapshot(
    *,
    trust_domain: str,
    now: float,
    agents: Sequence[AgentRow],
    entries: Sequence[EntryRow],
    svids: Sequence[SvidRow],
    records: Sequence[AuditRow],
    keys: Sequence[KeyRow],
    audit: AuditState | None,
    limits: Limits = Limits(),
) -> dict[str, object]:
    """The whole page's data at ``now`` (Unix seconds); ``svids`` is the newest SVID of each
    identity (`Store.latest_svids`), ``records`` the newest audit records."""
    by_agent = {s.spiffe_id: s for s in svids if s.kind == "agent"}
    by_entry = {(s.spiffe_id, s.agent_id or ""): s for s in svids if s.kind == "workload"}
    agent_rows = agents_view(agents, by_agent, now)
    health = {"ok": 0, "warn": 0, "bad": 0}
    for a in agent_rows:
        health[str(a["severity"])] += 1
    return {
        "trust_domain": trust_domain,
        "now": now,
        "head_seq": records[-1].seq if records else 0,
        "summary": {
            "agents": len(agents),
            "agents_ok": health["ok"],
            "agents_warn": health["warn"],
            "agents_bad": health["bad"],
            "entries": len(entries),
            "svids_live": sum(1 for s in svids if s.not_after > now),
        },
        "agents": agent_rows[: limits.agents],
        "entries": entries_view(entries, by_entry, now, limits.entries),
        "expiring": expiring_view(svids, now, limits.expiring),
        "timeline": timeline_view(records, svids, now, limits),
        "keys": keys_view(keys, now),
        "audit": audit_view(audit),
    }
