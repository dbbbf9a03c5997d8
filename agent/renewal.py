"""What the agent should do next with the SVIDs it holds: pure decisions over its state.

`tally.spiffe.rotation` says when *one* certificate is due; this module applies
that to everything the agent holds, so the loops in `agent.keeper` only wait
and call the CA.

Rules:

1. **Pure.**  No trio, socket, os or time: every function takes ``now`` and
   the state it judges, and returns what to do.
2. **An entry needs a new SVID** when none is held for it, when the entry
   changed since its SVID was minted, or when the SVID's renewal time has
   come (`due`).
3. **Nothing is dropped early.**  An SVID leaves only at its ``not_after``
   (`expired`); one three quarters through its life with no successor is
   reported (`at_risk`), not removed.
4. **Retries are capped by what is at stake** (`retry_cap`): the sooner
   something expires, or while a workload goes without, the sooner the CA is
   asked again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from random import Random

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tally.spiffe.selectors import Selector, SelectorError

# The CA answers these when it will never serve this agent again without a new token.
FATAL_CODES = frozenset({"evicted", "banned", "unknown_agent", "stale_svid"})
# Of those, the one that is not eviction: the CA knows a newer SVID for this agent.
STALE = "stale_svid"
# At most this many CSRs per CA call.
BATCH = 200


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: str
    selectors: frozenset[Selector]
    revision: int
    hint: str

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Entry:
        raw = data.get("selectors")
        sels = (
            frozenset(Selector.parse(str(s)) for s in raw) if isinstance(raw, list) else frozenset()
        )
        return cls(
            id=str(data["id"]),
            spiffe_id=str(data["spiffe_id"]),
            selectors=sels,
            revision=int(str(data.get("revision", 0))),
            hint=str(data.get("hint") or ""),
        )


@dataclass(frozen=True)
class HeldSvid:
    entry: Entry
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]
    serial: str
    not_after: datetime
    renew_at: datetime


@dataclass(frozen=True)
class EntryChange:
    """A new entry list from the CA, compared with the one held."""

    entries: dict[str, Entry]
    removed: frozenset[str]
    changed: bool
    """Some entry is new or differs from the one held."""
    ignored: tuple[tuple[str, str], ...]
    """(entry id, why) for every item that does not parse; the rest still apply."""


def compare_entries(held: Mapping[str, Entry], raw: Iterable[dict[str, object]]) -> EntryChange:
    entries: dict[str, Entry] = {}
    ignored: list[tuple[str, str]] = []
    for item in raw:
        try:
            entry = Entry.from_json(item)
        except (KeyError, ValueError, SelectorError) as exc:
            ignored.append((str(item.get("id")), str(exc)))
            continue
        entries[entry.id] = entry
    removed = frozenset(held) - frozenset(entries)
    changed = any(eid not in held or held[eid] != e for eid, e in entries.items())
    return EntryChange(entries, removed, changed, tuple(ignored))


@dataclass(frozen=True)
class BundleNews:
    """A new bundle carried by an entries answer: its sequence, roots (PEM), JWT keys."""

    sequence: int
    roots_pem: bytes
    jwks: bytes
    """A JWK Set; an empty one from a CA that predates JWT-SVIDs."""

    @classmethod
    def from_json(cls, data: dict[str, object]) -> BundleNews | None:
        """The bundle in an answer that carries one (``bundle`` present), else None."""
        if "bundle" not in data:
            return None
        return cls(
            sequence=int(str(data["bundle_sequence"])),
            roots_pem=str(data["bundle"]).encode(),
            jwks=str(data.get("jwt_bundle") or '{"keys": []}').encode(),
        )


@dataclass(frozen=True)
class EntriesPage:
    """One answer of the CA's entry sync (``GET /v1/entries?delta=1``).

    ``full``: a page of the whole set (collect pages until ``more`` is false, asking
    for the next with ``after=cursor``).  Otherwise the changes since the revision
    asked about: ``entries`` now held (new or changed), ``deleted`` ids gone.
    """

    revision: int
    full: bool
    entries: tuple[dict[str, object], ...]
    deleted: tuple[str, ...] = ()
    more: bool = False
    cursor: str | None = None
    bundle: BundleNews | None = None
    """The bundle, when the poll asked with a sequence the CA has moved past."""

    @classmethod
    def from_json(cls, data: dict[str, object]) -> EntriesPage:
        entries = data.get("entries")
        deleted = data.get("deleted")
        cursor = data.get("cursor")
        return cls(
            revision=int(str(data["revision"])),
            full=bool(data.get("full", True)),
            entries=tuple(e for e in entries if isinstance(e, dict))
            if isinstance(entries, list)
            else (),
            deleted=tuple(str(d) for d in deleted) if isinstance(deleted, list) else (),
            more=bool(data.get("more", False)),
            cursor=None if cursor is None else str(cursor),
            bundle=BundleNews.from_json(data),
        )


def apply_delta(
    held: Mapping[str, Entry], upserts: Iterable[dict[str, object]], deleted: Iterable[str]
) -> EntryChange:
    """The entry set after a delta: ``upserts`` replace or join, ``deleted`` leave.

    An upsert that does not parse leaves too (and is reported in ``ignored``): the
    CA changed that entry, so what is held for it is no longer the CA's word.
    """
    entries = dict(held)
    ignored: list[tuple[str, str]] = []
    for eid in deleted:
        entries.pop(eid, None)
    for item in upserts:
        try:
            entry = Entry.from_json(item)
        except (KeyError, ValueError, SelectorError) as exc:
            ignored.append((str(item.get("id")), str(exc)))
            entries.pop(str(item.get("id")), None)
            continue
        entries[entry.id] = entry
    removed = frozenset(held) - frozenset(entries)
    changed = any(eid not in held or held[eid] != e for eid, e in entries.items())
    return EntryChange(entries, removed, changed, tuple(ignored))


@dataclass
class EntrySync:
    """Where the agent stands in the CA's entry sync: a sans-IO state machine.

    `request` says what to ask for next, `receive` takes the answer and returns the
    new entry set once there is one.  A full sync is collected page by page and
    stands, once complete, at its *first* page's revision: whatever changed while
    the pages were read comes again in the next delta, and applying a change twice
    gives the same set.
    """

    revision: int = -1
    synced: bool = False
    """A whole entry set has been received (and then kept up by deltas)."""
    _more: bool = False
    _pages: list[dict[str, object]] | None = None
    _pages_revision: int = -1
    _cursor: str = ""

    def request(self) -> tuple[int, str, bool]:
        """(since, after, may park): the query of the next call."""
        if self._pages is not None:
            return -1, self._cursor, False
        return self.revision, "", self.synced and not self._more

    def receive(self, held: Mapping[str, Entry], page: EntriesPage) -> EntryChange | None:
        """Apply one answer; the new entry set, or None while a full sync is unfinished."""
        if page.full:
            if self._pages is None:
                self._pages, self._pages_revision = [], page.revision
            self._pages.extend(page.entries)
            if page.more and page.cursor is not None:
                self._cursor = page.cursor
                return None
            raw, self._pages, self._cursor = self._pages, None, ""
            self.revision, self.synced, self._more = self._pages_revision, True, False
            return compare_entries(held, raw)
        self._pages = None
        self.revision = page.revision
        self._more = page.more  # more to come: ask again at once, without parking
        return apply_delta(held, page.entries, page.deleted)


def due(entries: Mapping[str, Entry], svids: Mapping[str, HeldSvid], now: datetime) -> list[Entry]:
    """The entries to mint an SVID for now (rule 2), in entry order."""
    out = []
    for eid, entry in entries.items():
        held = svids.get(eid)
        if held is None or held.entry != entry or held.renew_at <= now:
            out.append(entry)
    return out


def next_wake(svids: Mapping[str, HeldSvid], now: datetime) -> datetime:
    """When something held next needs renewing or letting go; an hour on with nothing held."""
    times = [h.renew_at for h in svids.values()]
    times += [h.not_after for h in svids.values()]
    return min(times, default=now + timedelta(hours=1))


def expired(svids: Mapping[str, HeldSvid], now: datetime) -> list[str]:
    """The entry ids whose SVID has reached its ``not_after``."""
    return [eid for eid, held in svids.items() if held.not_after <= now]


def soonest_expiry(svids: Mapping[str, HeldSvid], agent_leaf: x509.Certificate) -> datetime:
    """The first ``not_after`` among the workload SVIDs and the agent's own."""
    return min([*(h.not_after for h in svids.values()), agent_leaf.not_valid_after_utc])


def at_risk(svids: Mapping[str, HeldSvid], now: datetime) -> list[str]:
    """SVIDs three quarters through their life with no successor: renewal is failing."""
    risky = []
    for held in svids.values():
        life = held.not_after - held.chain[0].not_valid_before_utc
        if held.not_after - now < life / 4:
            risky.append(held.entry.spiffe_id)
    return risky


def retry_cap(now: datetime, soonest: datetime, someone_waits: bool) -> float:
    """The ceiling of the next retry delay, in seconds (rule 4): an eighth of the time
    left before ``soonest``, between 1 s and 30 s, and at most 5 s while an entry has
    no SVID yet (``someone_waits``), so a CA that comes back is noticed in time."""
    left = (soonest - now).total_seconds()
    if someone_waits:
        left = min(left, 40.0)  # a workload is going without: look again soon
    return max(1.0, min(30.0, left / 8))


def honor_retry_after(
    delay: float, retry_after: float | None, now: datetime, soonest: datetime, rng: Random
) -> float:
    """The retry delay once the CA's ``Retry-After`` (seconds, or None) is heeded.

    An overloaded CA is given at least what it asked, stretched by up to half again
    at random, so that agents it refused together do not return together.  The wait
    never runs past a quarter of the time before the soonest expiry (at least 1 s):
    being polite to the CA must not let a workload's SVID run out.
    """
    if retry_after is None:
        return delay
    asked = retry_after * (1 + rng.random() / 2)
    ceiling = max(1.0, (soonest - now).total_seconds() / 4)
    return max(delay, min(asked, ceiling))
