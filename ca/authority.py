"""What the CA decides: tokens, attestation, entries, issuance, eviction.

Rules:

1. Every method here is synchronous and runs in the store's worker thread;
   the trio shells (`ca.api`, `ca.admin`) only move requests in and answers
   out.  A method either completes with its audit record committed or raises
   `Denied` having changed nothing.
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
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca.keys import KeyManager, Signer
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
from tally.spiffe import pem, x509profile
from tally.spiffe.selectors import Selector, SelectorError
from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

log = get_logger("tally.ca")

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_TOKEN_RE = re.compile(r"([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})")
_HINT_MAX = 1024
_DNS_RE = re.compile(
    r"(?=.{1,253}$)(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)


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


@dataclass(frozen=True)
class Limits:
    default_ttl: int
    max_ttl: int
    agent_ttl: int
    token_ttl: int


@dataclass(frozen=True)
class Issued:
    spiffe_id: str
    serial: str
    not_after: datetime
    chain: tuple[x509.Certificate, ...]
    chain_pem: bytes

    def to_json(self) -> dict[str, object]:
        return {
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "not_after": iso(self.not_after),
            "cert_chain": self.chain_pem.decode(),
        }


def iso(dt: datetime) -> str:
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

    def parse_id(self, text: object, what: str = "spiffe_id") -> SpiffeId:
        if not isinstance(text, str):
            raise Denied(400, "bad_request", f"{what} must be a string")
        try:
            sid = SpiffeId.parse(text)
        except SpiffeIdError as exc:
            raise Denied(400, "bad_spiffe_id", str(exc)) from exc
        return sid

    def _own_id(self, text: object, what: str = "spiffe_id") -> SpiffeId:
        sid = self.parse_id(text, what)
        if sid.trust_domain != self.td:
            raise Denied(
                400, "wrong_trust_domain", f"{what} {sid} is not in trust domain {self.td}"
            )
        if sid.is_root:
            raise Denied(400, "bad_spiffe_id", f"{what} {sid} must have a path")
        return sid

    def _ttl(self, ttl: object, default: int) -> int:
        if ttl is None:
            return default
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            raise Denied(400, "bad_ttl", "ttl must be a positive number of seconds")
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
        cert = signer.leaf_signer.sign(
            public_key,
            sid,
            now - not_before_cushion(ttl),
            now + timedelta(seconds=ttl),
            dns_names=dns_names,
        )
        x509profile.validate_leaf(cert)
        return Issued(
            str(sid),
            serial_hex(cert.serial_number),
            cert.not_valid_after_utc,
            (cert, *signer.chain),
            pem.chain_to_pem([cert]) + signer.chain_pem,
        )

    def _csr_key(self, csr: object) -> PublicKey:
        if not isinstance(csr, str):
            raise Denied(400, "bad_csr", "csr must be a PEM string")
        try:
            return x509profile.csr_public_key(csr.encode())  # type: ignore[return-value]
        except ValueError as exc:
            raise Denied(400, "bad_csr", str(exc)) from exc

    # -- join tokens and attestation ---------------------------------------------------

    def create_token(self, spiffe_id: object, ttl: object, actor: str) -> dict[str, object]:
        now = self._now()
        sid = None if spiffe_id is None else self._own_id(spiffe_id)
        if ttl is None:
            lifetime = self.limits.token_ttl
        elif isinstance(ttl, int) and not isinstance(ttl, bool) and 0 < ttl <= 30 * 86400:
            lifetime = ttl
        else:
            raise Denied(400, "bad_ttl", "token ttl must be between 1s and 30d")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires = now + timedelta(seconds=lifetime)
        agent_id = str(sid) if sid else str(self.agent_id_for(token_id, None))
        self.store.create_token(
            TokenRecord(
                token_id,
                hash_secret(secret),
                str(sid) if sid else None,
                int(expires.timestamp()),
                None,
                int(now.timestamp()),
            ),
            AuditEvent(
                iso(now),
                actor,
                "token.created",
                agent_id,
                None,
                {"token_id": token_id, "expires_at": iso(expires)},
            ),
        )
        return {
            "token": f"{token_id}.{secret}",
            "token_id": token_id,
            "spiffe_id": agent_id,
            "expires_at": iso(expires),
        }

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

    def attest(self, token: object, csr: object, peer: str) -> dict[str, object]:
        now = self._now()
        if (throttled := self._throttled(now, peer)) is not None:
            raise throttled
        if not isinstance(token, str) or (m := _TOKEN_RE.fullmatch(token)) is None:
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
                        "agent.attested",
                        str(agent_id),
                        issued.serial,
                        {"token_id": token_id, "method": "join_token"},
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
        self.issued_total += 1
        return {**issued.to_json(), **self.bundle_json()}

    def check_agent(self, agent_id: str, serial: str) -> AgentRecord:
        """The agent behind an mTLS call, if it may still talk to us with this certificate."""
        agent = self.store.get_agent(agent_id)
        if agent is None:
            raise Denied(403, "unknown_agent", "unknown agent; attest with a join token")
        if agent.status == "evicted":
            raise Denied(403, "evicted", "agent was evicted; attest again with a new join token")
        if agent.status == "banned":
            raise Denied(403, "banned", "agent is banned")
        if not presents_live_svid(agent, serial):
            raise Denied(403, "stale_svid", "this agent SVID is no longer the agent's current one")
        return agent

    def renew_agent(self, agent_id: str, presented_serial: str, csr: object) -> dict[str, object]:
        self.check_agent(agent_id, presented_serial)
        now = self._now()
        public_key = self._csr_key(csr)
        sid = SpiffeId.parse(agent_id)
        issued = self._sign(self._signer(), public_key, sid, self.limits.agent_ttl, now)
        ts = int(now.timestamp())
        try:
            self.store.renew_agent(
                agent_id,
                presented_serial,
                IssuedSvid(
                    issued.serial,
                    agent_id,
                    agent_id,
                    "agent",
                    int(issued.not_after.timestamp()),
                    ts,
                ),
                AuditEvent(
                    iso(now),
                    agent_id,
                    "svid.renewed",
                    agent_id,
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
            raise Denied(
                403, "stale_svid", "this agent SVID is no longer the agent's current one"
            ) from exc
        self.issued_total += 1
        return issued.to_json()

    # -- entries -----------------------------------------------------------------------

    def entries_for(self, agent_id: str, serial: str) -> dict[str, object]:
        self.check_agent(agent_id, serial)
        revision = self.store.entries_revision()
        entries = self.store.list_entries(parent_id=agent_id)
        return {"revision": revision, "entries": [e.to_json() for e in entries]}

    def _entry_fields(self, body: dict[str, object], base: EntryRecord | None) -> dict[str, object]:
        fields: dict[str, object] = {}
        if "spiffe_id" in body or base is None:
            fields["spiffe_id"] = str(self._own_id(body.get("spiffe_id")))
        if "parent_id" in body or base is None:
            fields["parent_id"] = str(self._own_id(body.get("parent_id"), "parent_id"))
        if "selectors" in body or base is None:
            raw = body.get("selectors")
            if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
                raise Denied(
                    400,
                    "bad_selectors",
                    "selectors must be a non-empty list of 'type:value' strings",
                )
            try:
                sels = sorted({Selector.parse(s) for s in raw})
            except SelectorError as exc:
                raise Denied(400, "bad_selectors", str(exc)) from exc
            fields["selectors"] = tuple(str(s) for s in sels)
        if "ttl" in body:
            fields["ttl"] = (
                None if body["ttl"] is None else self._ttl(body["ttl"], self.limits.default_ttl)
            )
        if "dns_names" in body:
            fields["dns_names"] = _dns_names(body["dns_names"])
        if "hint" in body:
            hint = body["hint"] or ""
            if (
                not isinstance(hint, str)
                or len(hint.encode()) > _HINT_MAX
                or not hint.isprintable()
            ):
                raise Denied(400, "bad_hint", "hint must be printable text of at most 1024 bytes")
            fields["hint"] = hint
        return fields

    def create_entry(self, body: dict[str, object], actor: str) -> dict[str, object]:
        now = self._now()
        f = self._entry_fields(body, None)
        ts = int(now.timestamp())
        entry = EntryRecord(
            id=str(uuid.uuid4()),
            spiffe_id=str(f["spiffe_id"]),
            parent_id=str(f["parent_id"]),
            selectors=f["selectors"],  # type: ignore[arg-type]
            ttl=f.get("ttl"),  # type: ignore[arg-type]
            dns_names=f.get("dns_names", ()),  # type: ignore[arg-type]
            hint=str(f.get("hint", "")),
            revision=0,
            created_at=ts,
            updated_at=ts,
        )
        try:
            stored = self.store.create_entry(
                entry,
                AuditEvent(
                    iso(now), actor, "entry.created", entry.spiffe_id, None, _entry_detail(entry)
                ),
            )
        except Conflict as exc:
            raise Denied(409, "exists", str(exc)) from exc
        return stored.to_json()

    def get_entry(self, entry_id: str) -> EntryRecord:
        entry = self.store.get_entry(entry_id)
        if entry is None:
            raise Denied(404, "not_found", f"no entry {entry_id}")
        return entry

    def update_entry(self, entry_id: str, body: dict[str, object], actor: str) -> dict[str, object]:
        now = self._now()
        base = self.get_entry(entry_id)
        f = self._entry_fields(body, base)
        entry = replace(base, **f, updated_at=int(now.timestamp()))  # type: ignore[arg-type]
        try:
            stored = self.store.update_entry(
                entry,
                AuditEvent(
                    iso(now), actor, "entry.updated", entry.spiffe_id, None, _entry_detail(entry)
                ),
            )
        except Conflict as exc:
            raise Denied(404, "not_found", str(exc)) from exc
        return stored.to_json()

    def delete_entry(self, entry_id: str, actor: str) -> dict[str, object]:
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
        return {"deleted": entry_id}

    # -- issuance ----------------------------------------------------------------------

    def sign_batch(self, agent_id: str, serial: str, requests: object) -> dict[str, object]:
        """Sign CSRs for entries this agent serves; one transaction for the batch."""
        self.check_agent(agent_id, serial)
        if not isinstance(requests, list) or not requests or len(requests) > 1000:
            raise Denied(400, "bad_request", "csrs must be a list of 1 to 1000 requests")
        entries = {e.id: e for e in self.store.list_entries(parent_id=agent_id)}
        ids = {e.id: SpiffeId.parse(e.spiffe_id) for e in entries.values()}
        signer = self._signer()
        now = self._now()
        ts = int(now.timestamp())
        results: list[dict[str, object]] = []
        svids: list[IssuedSvid] = []
        events: list[AuditEvent] = []
        for item in requests:
            if not isinstance(item, dict):
                raise Denied(
                    400, "bad_request", "each request must be an object with entry_id and csr"
                )
            entry_id = item.get("entry_id")
            entry = entries.get(entry_id) if isinstance(entry_id, str) else None
            if entry is None:
                results.append(
                    {
                        "entry_id": entry_id,
                        "error": "not_authorized",
                        "message": "no such entry for this agent",
                    }
                )
                continue
            try:
                public_key = self._csr_key(item.get("csr"))
            except Denied as exc:
                results.append({"entry_id": entry_id, "error": exc.code, "message": exc.message})
                continue
            ttl = entry.ttl or self.limits.default_ttl
            issued = self._sign(signer, public_key, ids[entry.id], ttl, now, entry.dns_names)
            na = int(issued.not_after.timestamp())
            svids.append(IssuedSvid(issued.serial, entry.spiffe_id, agent_id, "workload", na, ts))
            events.append(
                AuditEvent(
                    iso(now),
                    agent_id,
                    "svid.issued",
                    entry.spiffe_id,
                    issued.serial,
                    {"kind": "workload", "entry_id": entry.id, "not_after": iso(issued.not_after)},
                )
            )
            results.append({"entry_id": entry.id, **issued.to_json()})
        if svids:
            self.store.record_issued(svids, events)
            self.issued_total += len(svids)
        return {"svids": results}

    def mint(self, body: dict[str, object], actor: str) -> dict[str, object]:
        """An SVID for bootstrap and tests; the key is made here and returned once."""
        now = self._now()
        sid = self._own_id(body.get("spiffe_id"))
        ttl = self._ttl(body.get("ttl"), self.limits.default_ttl)
        raw_dns = _dns_names(body.get("dns_names"))
        key = x509profile.generate_key()
        issued = self._sign(self._signer(), key.public_key(), sid, ttl, now, raw_dns)
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
        return {
            **issued.to_json(),
            "private_key": pem.key_to_pem(key).decode(),
            **self.bundle_json(),
        }

    # -- agents ------------------------------------------------------------------------

    def list_agents(self) -> list[dict[str, object]]:
        return [a.to_json() for a in self.store.list_agents()]

    def get_agent(self, agent_id: str) -> dict[str, object]:
        agent = self.store.get_agent(agent_id)
        if agent is None:
            raise Denied(404, "not_found", f"no agent {agent_id}")
        return agent.to_json()

    def set_agent_status(self, agent_id: str, status: str, actor: str) -> dict[str, object]:
        now = self._now()
        event = {"evicted": "agent.evicted", "banned": "agent.banned"}[status]
        agent = self.store.get_agent(agent_id)
        if agent is None:
            raise Denied(404, "not_found", f"no agent {agent_id}")
        self.store.set_agent_status(
            agent_id,
            status,
            int(now.timestamp()),
            AuditEvent(iso(now), actor, event, agent_id, agent.serial, {}),
        )
        return self.get_agent(agent_id)

    # -- bundle ------------------------------------------------------------------------

    def bundle_json(self) -> dict[str, object]:
        bundle = self.keys.bundle
        assert bundle is not None
        return {
            "bundle": bundle.to_pem().decode(),
            "bundle_sequence": bundle.sequence,
        }


def presents_live_svid(agent: AgentRecord, serial: str) -> bool:
    """Whether an agent call may come with the agent SVID of this serial.

    The one it replaced counts too: connections opened before a renewal still carry
    it, and an agent that crashed before saving a renewal's answer holds only that
    one.  Anything older has been replaced twice and is in no live agent's hands,
    so whoever shows it holds a copy: a leaked backup, a theft.
    """
    return serial in (agent.serial, agent.prev_serial)


def _dns_names(raw: object) -> tuple[str, ...]:
    """DNS SANs from a request body: a list of lowercase names, duplicates dropped."""
    raw = raw or []
    if not isinstance(raw, list) or not all(
        isinstance(d, str) and _DNS_RE.fullmatch(d) for d in raw
    ):
        raise Denied(400, "bad_dns_name", "dns_names must be a list of lowercase DNS names")
    return tuple(dict.fromkeys(raw))


def _entry_detail(entry: EntryRecord) -> dict[str, object]:
    return {
        "id": entry.id,
        "parent_id": entry.parent_id,
        "selectors": list(entry.selectors),
        "ttl": entry.ttl,
        "dns_names": list(entry.dns_names),
    }
