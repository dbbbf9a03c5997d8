"""What the CA decides: tokens, attestation, entries, issuance, eviction.

Rules:

1. Every method here is synchronous and runs in the store's worker thread;
   the trio shell (`ca.api`) only moves requests in and answers out, and
   `ca.messages` turns JSON into the typed values taken here and the
   dataclasses given back into JSON.  A method either completes with its
   audit record committed or raises `Denied` having changed nothing.
2. Identity comes from the registration entry, never from the requester: a
   CSR contributes its public key and nothing else.
3. Every certificate the CA signs passes the SPIFFE profile validator before
   it is stored, audited or returned (SPIRE does the same on every SVID).
4. Join tokens are ``<id>.<secret>``.  Only SHA-256 of the secret is stored,
   the comparison is constant-time, and a token is spent in the same
   transaction that records the agent, so it cannot be used twice.
5. `Denied` carries a status, a stable machine code and a message safe to
   show the peer; detail for the operator goes to the audit log and logs.
6. Guessing is bounded twice.  Every failed attestation is an audit record
   (the token id, never the secret) and takes one from the peer's bucket
   (`ca.throttle`); an empty bucket gets 429 before the token is looked at.
   A token id tried with a wrong secret `token_max_failures` times is
   revoked: its id is evidently known to someone who does not hold it.
7. Every agent call (renewal, entries, signing) is judged on the serial of
   the certificate it came with as well as the agent's status: only the
   agent's current SVID or the one it replaced is accepted
   (`presents_live_svid`), so a copy of an older, still unexpired one is
   worthless once the agent has renewed twice.
8. What is checked here is policy: the trust domain, TTL limits, token and
   agent state.  The shape of a request (types, SPIFFE ID and selector
   syntax, DNS names, hints) is `ca.messages`' to check.  A CSR and a join
   token are read here, after the checks that come before them (a throttled
   peer gets 429 whatever it sent, a live token is not spent on a bad CSR);
   ``None`` for either means the request carried no string for it.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca.audit import VerifyResult
from ca.jwt_keys import MAX_AUDIENCE_CHARS, MAX_AUDIENCES, AuditSampler, JwtKeyManager, JwtLimits
from ca.keys import KeyManager, PrivateKey, Signer
from ca.leaves import LeafJob, NotSigned, SignedLeaf, sign_jobs, sign_leaf
from ca.schedule import not_before_cushion
from ca.store import (
    AgentRecord,
    AuditEvent,
    Conflict,
    EntryRecord,
    IssuedSvid,
    Store,
    TokenRecord,
)
from ca.throttle import AttestThrottle, peer_key
from tally.ops.logs import get_logger
from tally.spiffe import jwt, pem, x509profile
from tally.spiffe.bundle import Bundle
from tally.spiffe.selectors import Selector
from tally.spiffe.spiffeid import SpiffeId, TrustDomain

log = get_logger("tally.ca")

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
AgentStatus = Literal["evicted", "banned"]

TOKEN_MAX_TTL = 30 * 86400
_TOKEN_RE = re.compile(r"([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})")


class Denied(Exception):
    """A request refused; ``message`` is safe to send to the caller."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def bad_ttl() -> Denied:
    """An SVID TTL that is not a positive whole number of seconds."""
    return Denied(400, "bad_ttl", "ttl must be a positive number of seconds")


def bad_token_ttl() -> Denied:
    """A join token TTL outside 1 s to 30 d (or not a whole number of seconds)."""
    return Denied(400, "bad_ttl", "token ttl must be between 1s and 30d")


@dataclass(frozen=True)
class Limits:
    default_ttl: int
    max_ttl: int
    agent_ttl: int
    token_ttl: int


class Keep(enum.Enum):
    """An `EntryPatch` field left as it is."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class EntrySpec:
    """A new registration entry; ``selectors`` holds at least one."""

    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    ttl: int | None = None  # None: the CA's default SVID TTL
    dns_names: tuple[str, ...] = ()
    hint: str = ""


@dataclass(frozen=True)
class EntryPatch:
    """The fields of an entry to change; the others `KEEP` their value."""

    spiffe_id: SpiffeId | Keep = KEEP
    parent_id: SpiffeId | Keep = KEEP
    selectors: tuple[Selector, ...] | Keep = KEEP
    ttl: int | Keep | None = KEEP
    dns_names: tuple[str, ...] | Keep = KEEP
    hint: str | Keep = KEEP


@dataclass(frozen=True)
class NewToken:
    """A join token as created: ``token`` holds the secret and is shown once."""

    token: str
    token_id: str
    spiffe_id: SpiffeId  # the agent ID it attests to
    expires_at: datetime


@dataclass(frozen=True)
class Issued:
    spiffe_id: SpiffeId
    serial: str
    not_after: datetime
    chain: tuple[x509.Certificate, ...]
    chain_pem: bytes


@dataclass(frozen=True)
class Attested:
    """An agent's first SVID and the bundle to trust the CA by."""

    svid: Issued
    bundle: Bundle


@dataclass(frozen=True)
class Minted:
    """An SVID with the key made for it, and the bundle it chains to."""

    svid: Issued
    private_key: PrivateKey
    bundle: Bundle


@dataclass(frozen=True)
class IssuedJwt:
    """A JWT-SVID as signed; ``token`` is a bearer credential, never logged."""

    spiffe_id: SpiffeId
    token: str
    audience: tuple[str, ...]
    expires_at: int
    kid: str


@dataclass(frozen=True)
class AgentEntries:
    """The entries an agent serves, at one revision of the entry set."""

    revision: int
    entries: tuple[EntryRecord, ...]


@dataclass(frozen=True)
class EntrySync:
    """One page of an agent's entry sync (`Authority.entries_since`).

    ``full``: ``entries`` is a page of the whole set, by id, to be collected until
    ``more`` is false (ask for the next one with ``after=cursor``); the set then
    stands at the first page's ``revision``.  Otherwise ``entries`` and ``deleted``
    are the changes since the revision the agent holds, and ``revision`` is where
    the agent stands once it has applied them.
    """

    revision: int
    full: bool
    entries: tuple[EntryRecord, ...]
    deleted: tuple[str, ...]
    more: bool
    cursor: str | None = None


ENTRY_PAGE = 500
"""Most entries in one answer of the entries sync (about 200 KiB of JSON)."""


@dataclass(frozen=True)
class SignRequest:
    """One CSR of a batch; ``None`` for a field the request had no string for."""

    entry_id: str | None
    csr: str | None


@dataclass(frozen=True)
class SignPlan:
    """A batch of CSRs as the CA decided it before any signing (`Authority.plan_batch`).

    ``items`` has one item per request, in order: the entry and the job to sign
    for it, or why it gets nothing.  ``signer`` is the key the main process chose
    (the active one of the published bundle); the jobs may be signed anywhere.
    """

    agent_id: str
    signer: Signer
    now: datetime
    items: tuple[tuple[EntryRecord, LeafJob] | NotSigned, ...]

    @property
    def jobs(self) -> list[LeafJob]:
        return [item[1] for item in self.items if not isinstance(item, NotSigned)]


@functools.lru_cache(maxsize=64)
def iso(dt: datetime) -> str:
    """Milliseconds, UTC, ``Z``.  Cached: the SVIDs of a batch share their ``not_after``,
    which each one's audit record and answer spell out."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Authority:
    def __init__(
        self,
        store: Store,
        keys: KeyManager,
        td: TrustDomain,
        limits: Limits,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.keys = keys
        self.td = td
        self.limits = limits
        self.clock = clock
        self.issued_total = 0
        self.attestation_failures = 0
        self.throttle = AttestThrottle()
        self.token_max_failures = 5
        # JWT-SVIDs (issue 15); the server sets these, tests may leave them unset.
        self.jwt_keys: JwtKeyManager | None = None
        self.jwt_limits = JwtLimits()
        self.jwt_sampler = AuditSampler(self.jwt_limits.audit_window)
        self.jwt_issued_total = 0

    def limit_attestation(self, burst: int, refill: float, token_max_failures: int) -> None:
        """Apply the `attest_burst`, `attest_refill` and `token_max_failures` settings."""
        self.throttle = AttestThrottle(burst, refill)
        self.token_max_failures = token_max_failures

    # -- helpers -----------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.clock().astimezone(UTC).replace(microsecond=0)

    def _signer(self) -> Signer:
        signer = self.keys.signer
        if signer is None:
            raise Denied(503, "unavailable", "the CA has no active signing key")
        return signer

    def _own_id(self, sid: SpiffeId, what: str = "spiffe_id") -> SpiffeId:
        if sid.trust_domain != self.td:
            raise Denied(
                400, "wrong_trust_domain", f"{what} {sid} is not in trust domain {self.td}"
            )
        if sid.is_root:
            raise Denied(400, "bad_spiffe_id", f"{what} {sid} must have a path")
        return sid

    def _ttl(self, ttl: int | None, default: int) -> int:
        if ttl is None:
            return default
        if ttl <= 0:
            raise bad_ttl()
        if ttl > self.limits.max_ttl:
            raise Denied(
                400,
                "ttl_too_long",
                f"ttl {ttl}s is above the CA's maximum SVID TTL of {self.limits.max_ttl}s",
            )
        return ttl

    def _sign(
        self,
        signer: Signer,
        public_key: PublicKey,
        sid: SpiffeId,
        ttl: int,
        now: datetime,
        dns_names: Sequence[str] = (),
    ) -> Issued:
        start, end = _lifetime(now, ttl)
        cert = sign_leaf(signer.leaf_signer, public_key, sid, start, end, dns_names)
        return _issued(signer, sid, cert, pem.chain_to_pem([cert]))

    def _csr_key(self, csr: str | None) -> PublicKey:
        if csr is None:
            raise Denied(400, "bad_csr", "csr must be a PEM string")
        try:
            return x509profile.csr_public_key(csr.encode())  # type: ignore[return-value]
        except ValueError as exc:
            raise Denied(400, "bad_csr", str(exc)) from exc

    def bundle(self) -> Bundle:
        """The trust bundle now (the key manager has one once it has loaded)."""
        bundle = self.keys.bundle
        assert bundle is not None
        return bundle

    # -- join tokens and attestation ---------------------------------------------------

    def create_token(self, spiffe_id: SpiffeId | None, ttl: int | None, actor: str) -> NewToken:
        """A join token for ``spiffe_id``, or for an agent ID derived from the token's id."""
        now = self._now()
        sid = None if spiffe_id is None else self._own_id(spiffe_id)
        if ttl is None:
            lifetime = self.limits.token_ttl
        elif 0 < ttl <= TOKEN_MAX_TTL:
            lifetime = ttl
        else:
            raise bad_token_ttl()
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires = now + timedelta(seconds=lifetime)
        agent_id = sid if sid is not None else self.agent_id_for(token_id, None)
        self.store.create_token(
            TokenRecord(
                token_id,
                hash_secret(secret),
                None if sid is None else str(sid),
                int(expires.timestamp()),
                None,
                int(now.timestamp()),
            ),
            AuditEvent(
                iso(now),
                actor,
                "token.created",
                str(agent_id),
                None,
                {"token_id": token_id, "expires_at": iso(expires)},
            ),
        )
        return NewToken(f"{token_id}.{secret}", token_id, agent_id, expires)

    def agent_id_for(self, token_id: str, fixed: str | None) -> SpiffeId:
        if fixed is not None:
            return SpiffeId.parse(fixed)
        return SpiffeId.from_parts(self.td, "agent", "join_token", token_id)

    def _fail_attest(
        self,
        now: datetime,
        reason: str,
        token_id: str | None,
        peer: str,
        *,
        wrong_secret: bool = False,
    ) -> Denied:
        self.attestation_failures += 1
        self.throttle.failed(peer_key(peer))
        failed = AuditEvent(
            iso(now),
            f"peer:{peer}",
            "attestation.failed",
            None,
            None,
            {"reason": reason, "token_id": token_id},
        )
        if wrong_secret and token_id is not None:
            # Counted even for ids we do not know (a no-op there), so that the
            # work done does not tell a known id from an unknown one.
            limit = self.token_max_failures
            revoked = AuditEvent(
                iso(now),
                "ca",
                "token.revoked",
                None,
                None,
                {"token_id": token_id, "reason": f"{limit} attestations with a wrong secret"},
            )
            if self.store.count_wrong_secret(
                token_id, int(now.timestamp()), limit, failed, revoked
            ):
                log.warning("token.revoked", token_id=token_id, failures=limit, peer=peer)
        else:
            self.store.record(failed)
        return Denied(403, "attestation_failed", f"attestation failed: {reason}")

    def _throttled(self, now: datetime, peer: str) -> Denied | None:
        """429 for a peer past its failed attempts, decided before the token is read."""
        key = peer_key(peer)
        wait = self.throttle.retry_after(key)
        if not wait:
            return None
        self.attestation_failures += 1
        if self.throttle.refuse(key):
            # Once per throttled spell: the audit log grows with failures, not with 429s.
            self.store.record(
                AuditEvent(
                    iso(now),
                    f"peer:{peer}",
                    "attestation.throttled",
                    None,
                    None,
                    {"peer": key, "retry_after": wait},
                )
            )
            log.warning("attestation.throttled", peer=key, retry_after=wait)
        return Denied(
            429,
            "rate_limited",
            f"too many failed attestations from {key}; retry in {wait}s",
            retry_after=wait,
        )

    def attest(self, token: str | None, csr: str | None, peer: str) -> Attested:
        """Spend a join token on the agent SVID for the CSR's key; ``peer`` is host:port."""
        now = self._now()
        if (throttled := self._throttled(now, peer)) is not None:
            raise throttled
        if token is None or (m := _TOKEN_RE.fullmatch(token)) is None:
            raise self._fail_attest(now, "malformed join token", None, peer)
        token_id, secret = m.group(1), m.group(2)
        record = self.store.get_token(token_id)
        # Hash and compare even when the id is unknown, so timing does not tell.
        expected = record.secret_hash if record else hashlib.sha256(b"").digest()
        if not hmac.compare_digest(hash_secret(secret), expected) or record is None:
            raise self._fail_attest(now, "unknown join token", token_id, peer, wrong_secret=True)
        if record.revoked_at is not None:
            raise self._fail_attest(now, "join token revoked", token_id, peer)
        if record.used_at is not None:
            raise self._fail_attest(now, "join token already used", token_id, peer)
        if record.expires_at <= now.timestamp():
            raise self._fail_attest(now, "join token expired", token_id, peer)
        agent_id = self.agent_id_for(token_id, record.spiffe_id)
        existing = self.store.get_agent(str(agent_id))
        if existing is not None and existing.status == "banned":
            raise self._fail_attest(now, f"agent {agent_id} is banned", token_id, peer)
        # An agent ID already on record comes back (stale state, eviction, lost data
        # dir) only with a token the operator made for that very ID, so no agent can
        # be taken over without an operator saying so; the audit log names it.
        attested = _attest_event(existing, token_id)
        public_key = self._csr_key(csr)
        issued = self._sign(self._signer(), public_key, agent_id, self.limits.agent_ttl, now)
        ts = int(now.timestamp())
        try:
            self.store.attest_agent(
                token_id,
                ts,
                AgentRecord(
                    str(agent_id),
                    "active",
                    token_id,
                    issued.serial,
                    None,
                    int(issued.not_after.timestamp()),
                    ts,
                    ts,
                ),
                IssuedSvid(
                    issued.serial,
                    str(agent_id),
                    str(agent_id),
                    "agent",
                    int(issued.not_after.timestamp()),
                    ts,
                ),
                [
                    AuditEvent(
                        iso(now),
                        str(agent_id),
                        attested[0],
                        str(agent_id),
                        issued.serial,
                        attested[1],
                    ),
                    AuditEvent(
                        iso(now),
                        str(agent_id),
                        "svid.issued",
                        str(agent_id),
                        issued.serial,
                        {"kind": "agent", "not_after": iso(issued.not_after)},
                    ),
                ],
            )
        except Conflict as exc:
            raise self._fail_attest(now, "join token already used", token_id, peer) from exc
        if existing is not None:
            log.warning(
                "agent.reattested",
                agent_id=str(agent_id),
                token_id=token_id,
                previous_status=existing.status,
                previous_serial=existing.serial,
                serial=issued.serial,
            )
        self.issued_total += 1
        return Attested(issued, self.bundle())

    def check_agent(self, agent_id: SpiffeId, serial: str) -> AgentRecord:
        """The agent behind an mTLS call, if it may still talk to us with this certificate."""
        agent = self.store.get_agent(str(agent_id))
        if agent is None:
            raise Denied(403, "unknown_agent", "unknown agent; attest with a join token")
        if agent.status == "evicted":
            raise Denied(403, "evicted", "agent was evicted; attest again with a new join token")
        if agent.status == "banned":
            raise Denied(403, "banned", "agent is banned")
        if not presents_live_svid(agent, serial):
            raise stale_svid(agent)
        return agent

    def renew_agent(self, agent_id: SpiffeId, presented_serial: str, csr: str | None) -> Issued:
        self.check_agent(agent_id, presented_serial)
        now = self._now()
        public_key = self._csr_key(csr)
        issued = self._sign(self._signer(), public_key, agent_id, self.limits.agent_ttl, now)
        ts = int(now.timestamp())
        aid = str(agent_id)
        try:
            self.store.renew_agent(
                aid,
                presented_serial,
                IssuedSvid(
                    issued.serial,
                    aid,
                    aid,
                    "agent",
                    int(issued.not_after.timestamp()),
                    ts,
                ),
                AuditEvent(
                    iso(now),
                    aid,
                    "svid.renewed",
                    aid,
                    issued.serial,
                    {
                        "kind": "agent",
                        "previous_serial": presented_serial,
                        "not_after": iso(issued.not_after),
                    },
                ),
            )
        except Conflict as exc:
            # A renewal with the same certificate got in first (the store applies the
            # rule of `presents_live_svid` again, atomically).
            raise stale_svid(self.store.get_agent(aid)) from exc
        self.issued_total += 1
        return issued

    # -- entries -----------------------------------------------------------------------

    def entries_for(self, agent_id: SpiffeId, serial: str) -> AgentEntries:
        self.check_agent(agent_id, serial)
        revision = self.store.entries_revision()
        entries = self.store.list_entries(parent_id=str(agent_id))
        return AgentEntries(revision, tuple(entries))

    def entries_since(
        self, agent_id: SpiffeId, serial: str, since: int, after: str, limit: int = ENTRY_PAGE
    ) -> EntrySync:
        """A page of the delta sync: changes since ``since``, or a page of the full set
        from ``after`` when the change log does not reach back to ``since``."""
        self.check_agent(agent_id, serial)
        aid = str(agent_id)
        limit = max(1, min(limit, ENTRY_PAGE))
        store = self.store
        if store.needs_resync(since):
            revision = store.entries_revision()
            page, more = store.entries_page(aid, after, limit)
            cursor = page[-1].id if more else None
            return EntrySync(revision, True, tuple(page), (), more, cursor)
        delta = store.entry_delta(aid, since, limit)
        return EntrySync(delta.revision, False, delta.upserts, delta.deleted, delta.more)

    def create_entry(self, spec: EntrySpec, actor: str) -> EntryRecord:
        [created] = self.create_entries([spec], actor)
        return created

    def create_entries(self, specs: Sequence[EntrySpec], actor: str) -> list[EntryRecord]:
        """Create entries together (one transaction, one audit record each): a fleet's
        registrations in one call rather than one round trip per entry."""
        now = self._now()
        ts = int(now.timestamp())
        entries: list[EntryRecord] = []
        for spec in specs:
            sid = self._own_id(spec.spiffe_id)
            parent = self._own_id(spec.parent_id, "parent_id")
            ttl = None if spec.ttl is None else self._ttl(spec.ttl, self.limits.default_ttl)
            entries.append(
                EntryRecord(
                    id=str(uuid.uuid4()),
                    spiffe_id=str(sid),
                    parent_id=str(parent),
                    selectors=_selector_texts(spec.selectors),
                    ttl=ttl,
                    dns_names=spec.dns_names,
                    hint=spec.hint,
                    revision=0,
                    created_at=ts,
                    updated_at=ts,
                )
            )
        events = [
            AuditEvent(iso(now), actor, "entry.created", e.spiffe_id, None, _entry_detail(e))
            for e in entries
        ]
        try:
            return self.store.create_entries(entries, events)
        except Conflict as exc:
            raise Denied(409, "exists", str(exc)) from exc

    def get_entry(self, entry_id: str) -> EntryRecord:
        entry = self.store.get_entry(entry_id)
        if entry is None:
            raise Denied(404, "not_found", f"no entry {entry_id}")
        return entry

    def update_entry(self, entry_id: str, patch: EntryPatch, actor: str) -> EntryRecord:
        now = self._now()
        entry = self.get_entry(entry_id)
        if not isinstance(patch.spiffe_id, Keep):
            entry = replace(entry, spiffe_id=str(self._own_id(patch.spiffe_id)))
        if not isinstance(patch.parent_id, Keep):
            entry = replace(entry, parent_id=str(self._own_id(patch.parent_id, "parent_id")))
        if not isinstance(patch.selectors, Keep):
            entry = replace(entry, selectors=_selector_texts(patch.selectors))
        if not isinstance(patch.ttl, Keep):
            ttl = None if patch.ttl is None else self._ttl(patch.ttl, self.limits.default_ttl)
            entry = replace(entry, ttl=ttl)
        if not isinstance(patch.dns_names, Keep):
            entry = replace(entry, dns_names=patch.dns_names)
        if not isinstance(patch.hint, Keep):
            entry = replace(entry, hint=patch.hint)
        entry = replace(entry, updated_at=int(now.timestamp()))
        try:
            return self.store.update_entry(
                entry,
                AuditEvent(
                    iso(now), actor, "entry.updated", entry.spiffe_id, None, _entry_detail(entry)
                ),
            )
        except Conflict as exc:
            raise Denied(404, "not_found", str(exc)) from exc

    def delete_entry(self, entry_id: str, actor: str) -> None:
        now = self._now()
        entry = self.get_entry(entry_id)
        try:
            self.store.delete_entry(
                entry_id,
                AuditEvent(
                    iso(now), actor, "entry.deleted", entry.spiffe_id, None, {"id": entry_id}
                ),
            )
        except Conflict as exc:
            raise Denied(404, "not_found", str(exc)) from exc

    # -- issuance ----------------------------------------------------------------------

    def sign_batch(
        self, agent_id: SpiffeId, serial: str, requests: Sequence[SignRequest]
    ) -> list[Issued | NotSigned]:
        """Sign CSRs for entries this agent serves, here and now; one transaction.

        The agent API does the same in three steps so that the signing runs in
        the signing workers (`ca.signing_pool`): `plan_batch`, the jobs signed,
        `record_batch`.  The answer has one item per request, in order.
        """
        plan = self.plan_batch(agent_id, serial, requests)
        return self.record_batch(plan, sign_jobs(plan.signer.leaf_signer, plan.jobs))

    def plan_batch(
        self, agent_id: SpiffeId, serial: str, requests: Sequence[SignRequest]
    ) -> SignPlan:
        """What a batch will be: the agent judged, each request's entry found, and for
        each the SPIFFE ID, serial and lifetime decided, under the active key."""
        self.check_agent(agent_id, serial)
        aid = str(agent_id)
        entries = {e.id: e for e in self.store.list_entries(parent_id=aid)}
        signer = self._signer()
        now = self._now()
        items: list[tuple[EntryRecord, LeafJob] | NotSigned] = []
        lifetimes: dict[int, tuple[datetime, datetime]] = {}  # by TTL
        for request in requests:
            entry = None if request.entry_id is None else entries.get(request.entry_id)
            if entry is None:
                items.append(NotSigned("not_authorized", "no such entry for this agent"))
            elif request.csr is None:
                items.append(NotSigned("bad_csr", "csr must be a PEM string"))
            else:
                ttl = entry.ttl or self.limits.default_ttl
                if ttl not in lifetimes:
                    lifetimes[ttl] = _lifetime(now, ttl)
                start, end = lifetimes[ttl]
                serial_number = x509profile.new_serial()
                job = LeafJob(
                    request.csr, entry.spiffe_id, serial_number, start, end, entry.dns_names
                )
                items.append((entry, job))
        return SignPlan(aid, signer, now, tuple(items))

    def record_batch(
        self, plan: SignPlan, signed: Sequence[SignedLeaf | NotSigned]
    ) -> list[Issued | NotSigned]:
        """Store and audit what was signed for ``plan`` (one answer per job in
        ``signed``, in order), in one transaction; the answer for every request."""
        ts = int(plan.now.timestamp())
        at = iso(plan.now)
        aid = plan.agent_id
        leaves = iter(signed)
        ids: dict[str, SpiffeId] = {}
        results: list[Issued | NotSigned] = []
        svids: list[IssuedSvid] = []
        events: list[AuditEvent] = []
        for item in plan.items:
            leaf = item if isinstance(item, NotSigned) else next(leaves)
            if isinstance(leaf, NotSigned):
                results.append(leaf)
                continue
            assert not isinstance(item, NotSigned)
            entry, job = item
            cert = x509.load_der_x509_certificate(leaf.der)
            if cert.serial_number != job.serial:  # answers out of step with the plan
                raise RuntimeError(f"signed leaf {cert.serial_number:x} is not job {job.serial:x}")
            sid = ids.get(entry.spiffe_id)
            if sid is None:
                sid = ids[entry.spiffe_id] = SpiffeId.parse(entry.spiffe_id)
            issued = _issued(plan.signer, sid, cert, leaf.pem)
            na = int(issued.not_after.timestamp())
            svids.append(IssuedSvid(issued.serial, entry.spiffe_id, aid, "workload", na, ts))
            events.append(
                AuditEvent(
                    at,
                    aid,
                    "svid.issued",
                    entry.spiffe_id,
                    issued.serial,
                    {"kind": "workload", "entry_id": entry.id, "not_after": iso(issued.not_after)},
                )
            )
            results.append(issued)
        if svids:
            self.store.record_issued(svids, events)
            self.issued_total += len(svids)
        return results

    def mint(
        self, spiffe_id: SpiffeId, ttl: int | None, dns_names: tuple[str, ...], actor: str
    ) -> Minted:
        """An SVID for bootstrap and tests; the key is made here and returned once."""
        now = self._now()
        sid = self._own_id(spiffe_id)
        lifetime = self._ttl(ttl, self.limits.default_ttl)
        key = x509profile.generate_key()
        issued = self._sign(self._signer(), key.public_key(), sid, lifetime, now, dns_names)
        ts = int(now.timestamp())
        self.store.record_issued(
            [
                IssuedSvid(
                    issued.serial, str(sid), None, "mint", int(issued.not_after.timestamp()), ts
                )
            ],
            [
                AuditEvent(
                    iso(now),
                    actor,
                    "svid.issued",
                    str(sid),
                    issued.serial,
                    {"kind": "mint", "not_after": iso(issued.not_after)},
                )
            ],
        )
        self.issued_total += 1
        return Minted(issued, key, self.bundle())

    # -- JWT-SVIDs ----------------------------------------------------------------------

    def jwt_bundle(self) -> jwt.JwtBundle:
        """The JWT keys peers must trust now: prepared, active and retired ones."""
        if self.jwt_keys is None:
            return jwt.JwtBundle(self.td, {})
        return self.jwt_keys.bundle

    def _jwt_ttl(self, ttl: int | None) -> int:
        limits = self.jwt_limits
        if ttl is None:
            return min(limits.default_ttl, limits.max_ttl)
        if ttl <= 0:
            raise bad_ttl()
        if ttl > limits.max_ttl:
            raise Denied(
                400,
                "ttl_too_long",
                f"ttl {ttl}s is above the CA's maximum JWT-SVID TTL of {limits.max_ttl}s",
            )
        return ttl

    def _sign_jwt(self, sid: SpiffeId, audience: Sequence[str], ttl: int) -> IssuedJwt:
        if not audience or len(audience) > MAX_AUDIENCES:
            raise Denied(400, "bad_audience", f"audience must hold 1 to {MAX_AUDIENCES} values")
        for aud in audience:
            if not aud or len(aud) > MAX_AUDIENCE_CHARS or not aud.isprintable():
                raise Denied(
                    400,
                    "bad_audience",
                    f"each audience must be 1 to {MAX_AUDIENCE_CHARS} printable characters",
                )
        signer = None if self.jwt_keys is None else self.jwt_keys.signer
        if signer is None or self.jwt_keys is None:
            raise Denied(503, "unavailable", "the CA has no active JWT signing key")
        now = int(self._now().timestamp())
        claims = jwt.svid_claims(sid, audience, now, now + ttl, self.jwt_limits.issuer)
        token = jwt.encode(claims, signer.key, signer.kid, signer.alg)
        self.jwt_keys.signed(signer.kid, now + ttl)
        self.jwt_issued_total += 1
        return IssuedJwt(sid, token, tuple(audience), now + ttl, signer.kid)

    def _jwt_event(
        self, issued: IssuedJwt, actor: str, kind: str, unrecorded: int | None
    ) -> AuditEvent:
        claims = jwt.parse_insecure(issued.token).claims
        detail: dict[str, object] = {
            "kind": kind,
            "audience": list(issued.audience),
            "kid": issued.kid,
            "jti": claims.get("jti"),
            "expires_at": iso(datetime.fromtimestamp(issued.expires_at, UTC)),
        }
        if unrecorded is not None:
            detail["unrecorded"] = unrecorded
        return AuditEvent(
            iso(self._now()), actor, "jwt.issued", str(issued.spiffe_id), None, detail
        )

    def sign_jwt(
        self, agent_id: SpiffeId, serial: str, entry_id: str | None, audience: Sequence[str]
    ) -> IssuedJwt:
        """A JWT-SVID for an entry this agent serves, and only for one (sampled audit)."""
        self.check_agent(agent_id, serial)
        entry = None if entry_id is None else self.store.get_entry(entry_id)
        if entry is None or entry.parent_id != str(agent_id):
            raise Denied(403, "not_authorized", "no such entry for this agent")
        issued = self._sign_jwt(SpiffeId.parse(entry.spiffe_id), audience, self._jwt_ttl(None))
        key = (str(agent_id), entry.spiffe_id, tuple(sorted(audience)))
        unrecorded = self.jwt_sampler.observe(key, int(self._now().timestamp()))
        if unrecorded is not None:
            self.store.record(self._jwt_event(issued, str(agent_id), "workload", unrecorded))
        return issued

    def mint_jwt(
        self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: int | None, actor: str
    ) -> IssuedJwt:
        """A JWT-SVID for an operator (``tally ca jwt mint``); always audited."""
        sid = self._own_id(spiffe_id)
        issued = self._sign_jwt(sid, audience, self._jwt_ttl(ttl))
        self.store.record(self._jwt_event(issued, actor, "mint", None))
        return issued

    # -- agents ------------------------------------------------------------------------

    def check_audit(self) -> VerifyResult:
        """Prove the audit chain, as the CA's own schedule and its console do; a break is
        logged as ``audit.broken`` (a hook event) each time it is found, until repaired."""
        result = self.store.verify_audit()
        if not result.ok:
            log.error(
                "audit.broken",
                reason="chain_broken",
                records=result.records,
                bad_seq=result.bad_seq,
                problem=result.problem,
            )
        return result

    def list_agents(self) -> list[AgentRecord]:
        return self.store.list_agents()

    def get_agent(self, agent_id: SpiffeId) -> AgentRecord:
        agent = self.store.get_agent(str(agent_id))
        if agent is None:
            raise Denied(404, "not_found", f"no agent {agent_id}")
        return agent

    def set_agent_status(self, agent_id: SpiffeId, status: AgentStatus, actor: str) -> AgentRecord:
        now = self._now()
        event = {"evicted": "agent.evicted", "banned": "agent.banned"}[status]
        agent = self.get_agent(agent_id)
        self.store.set_agent_status(
            str(agent_id),
            status,
            int(now.timestamp()),
            AuditEvent(iso(now), actor, event, str(agent_id), agent.serial, {}),
        )
        return self.get_agent(agent_id)


def _lifetime(now: datetime, ttl: int) -> tuple[datetime, datetime]:
    """When an SVID of ``ttl`` seconds issued ``now`` is valid: backdated a little."""
    return now - not_before_cushion(ttl), now + timedelta(seconds=ttl)


def _issued(signer: Signer, sid: SpiffeId, cert: x509.Certificate, leaf_pem: bytes) -> Issued:
    return Issued(
        sid,
        serial_hex(cert.serial_number),
        cert.not_valid_after_utc,
        (cert, *signer.chain),
        leaf_pem + signer.chain_pem,
    )


def presents_live_svid(agent: AgentRecord, serial: str) -> bool:
    """Whether an agent call may come with the agent SVID of this serial.

    The one it replaced counts too: connections opened before a renewal still carry
    it, and an agent that crashed before saving a renewal's answer holds only that
    one.  Anything older has been replaced twice and is in no live agent's hands,
    so whoever shows it holds a copy: a leaked backup, a theft.
    """
    return serial in (agent.serial, agent.prev_serial)


def stale_svid(agent: AgentRecord | None) -> Denied:
    """The refusal of a superseded agent SVID, naming the serial the CA holds as current,
    so that the agent (restored from a backup, or sharing a data dir) can say so."""
    current = f" (serial {agent.serial})" if agent is not None else ""
    return Denied(403, "stale_svid", f"the CA knows a newer SVID for this agent{current}")


def _attest_event(existing: AgentRecord | None, token_id: str) -> tuple[str, dict[str, object]]:
    """The audit event of an attestation: ``agent.reattested`` when the ID was on record,
    with what it replaced, so an operator can see which token took over which SVID."""
    detail: dict[str, object] = {"token_id": token_id, "method": "join_token"}
    if existing is None:
        return "agent.attested", detail
    detail |= {"previous_status": existing.status, "previous_serial": existing.serial}
    return "agent.reattested", detail


def _selector_texts(selectors: Sequence[Selector]) -> tuple[str, ...]:
    """Selectors as stored: sorted, duplicates dropped."""
    return tuple(str(s) for s in sorted(set(selectors)))


def _entry_detail(entry: EntryRecord) -> dict[str, object]:
    return {
        "id": entry.id,
        "parent_id": entry.parent_id,
        "selectors": list(entry.selectors),
        "ttl": entry.ttl,
        "dns_names": list(entry.dns_names),
    }
