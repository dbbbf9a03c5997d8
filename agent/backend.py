"""What a Workload API caller may see: attestation plus the agent's current state.

Rules:

1. A caller is attested once per connection, from the kernel's record of who
   connected (`agent.attestor`), for the selector kinds the agent's entries
   name (`AgentBackend.kinds`, `agent.attestor` rule 7); its selectors are
   then matched against every entry the agent serves, afresh on each change,
   so a new entry reaches a caller that is already streaming (attested again
   first when the new entry names a kind not gathered yet).
2. Each message is the complete current state (the Workload API streams full
   snapshots, never diffs), and a stream only sends when what this caller may
   see actually changed.
3. A caller with no matching identity gets PERMISSION_DENIED, and the agent
   logs its pid and full selector set: the entry an operator forgot is then
   one log line away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

import trio
from cryptography.hazmat.primitives import serialization

from agent.attestor import (
    AttestationError,
    ExeHashCache,
    NeedsThread,
    attest_socket,
    describe,
    kinds_of,
)
from agent.ca_client import CAError
from agent.jwt_cache import JwtCache
from agent.keeper import SvidKeeper
from agent.renewal import Entry, HeldSvid
from agent.workload_messages import (
    InvalidJwt,
    JwtSvidItem,
    NoIdentity,
    SvidItem,
    ValidatedJwt,
    X509Snapshot,
)
from tally.ops.logs import get_logger
from tally.ops.net import PeerCred
from tally.spiffe import jwt
from tally.spiffe.selectors import Selector, matches
from tally.wire.grpc import GrpcError, Status

log = get_logger("tally.agent")
NO_ENTRY = "no registration entry matches this caller"
_SNAPSHOTS_KEPT = 1024
"""Snapshots remembered, one per set of caller selectors (kinds of caller, not callers)."""
_SNAPSHOT_MAX_AGE = timedelta(seconds=60)


@dataclass
class Stats:
    denied: int = 0
    attested: int = 0
    attestation_failures: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    jwt_invalid: dict[str, int] = field(default_factory=dict)


def _item(held: HeldSvid, bundle_der: bytes) -> SvidItem:
    return SvidItem(
        spiffe_id=held.entry.spiffe_id,
        cert_chain_der=b"".join(c.public_bytes(serialization.Encoding.DER) for c in held.chain),
        private_key_pkcs8=held.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        bundle_der=bundle_der,
        hint=held.entry.hint,
    )


# CA refusals that mean "no identity for this caller", not "try again soon".
_NO_IDENTITY_CODES = frozenset(
    {"not_authorized", "evicted", "banned", "unknown_agent", "stale_svid"}
)


class AgentBackend:
    def __init__(self, keeper: SvidKeeper, trust_domain_id: str) -> None:
        self.keeper = keeper
        self.td_id = trust_domain_id
        self.hashes = ExeHashCache()
        self.stats = Stats()
        self.jwt_cache = JwtCache(keeper.client.jwt, keeper.clock)
        self._bundle: tuple[object, bytes] | None = None
        self._snapshots: dict[frozenset[Selector], tuple[int, object, datetime, X509Snapshot]] = {}
        self._items: dict[int, tuple[HeldSvid, bytes, SvidItem]] = {}
        """`_item_for`'s encodings by the identity of the held SVID they encode."""
        self._kinds: tuple[int, frozenset[str]] = (-1, frozenset())

    def kinds(self) -> frozenset[str]:
        """The selector kinds the agent's entries name: all an X.509 caller is attested
        for (`agent.attestor` rule 7), worked out once per change of the keeper."""
        keeper = self.keeper
        if self._kinds[0] != keeper.version:
            entries = [*keeper.entries.values(), *(h.entry for h in keeper.svids.values())]
            self._kinds = (keeper.version, kinds_of(s for e in entries for s in e.selectors))
        return self._kinds[1]

    def snapshot_for(self, selectors: frozenset[Selector]) -> X509Snapshot:
        return self._snapshot(selectors)[0]

    def _snapshot(self, selectors: frozenset[Selector]) -> tuple[X509Snapshot, datetime]:
        """`snapshot_for`, and when the first SVID in it expires.

        What callers with ``selectors`` see now: one object shared by all of them until
        the keeper changes or one of its SVIDs expires, so that a rotation pushed to many
        streams matches the node's entries once per kind of caller, not once per stream
        (streams x SVIDs selector matches: 800 ms for 1,000 of each).
        """
        keeper = self.keeper
        now = keeper.clock()
        got = self._snapshots.get(selectors)
        if got is not None and got[0] == keeper.version and got[1] is keeper.roots and now < got[2]:
            return got[3], got[2]
        bundle_der = self._bundle_der()
        held = [
            h
            for h in keeper.svids.values()
            if h.not_after > now and matches(h.entry.selectors, selectors)
        ]
        held.sort(key=lambda h: (h.entry.spiffe_id, h.entry.id))
        items = tuple(self._item_for(h, bundle_der) for h in held)
        snap = X509Snapshot(svids=items, bundles={self.td_id: bundle_der})
        until = min((h.not_after for h in held), default=now + _SNAPSHOT_MAX_AGE)
        if len(self._snapshots) >= _SNAPSHOTS_KEPT:
            self._snapshots.clear()
        self._snapshots[selectors] = (keeper.version, keeper.roots, until, snap)
        return snap, until

    def _bundle_der(self) -> bytes:
        """The roots as DER, encoded once per bundle (the keeper replaces ``roots`` whole)."""
        roots = self.keeper.roots
        if self._bundle is None or self._bundle[0] is not roots:
            self._bundle = (
                roots,
                b"".join(c.public_bytes(serialization.Encoding.DER) for c in roots),
            )
        return self._bundle[1]

    def _item_for(self, held: HeldSvid, bundle_der: bytes) -> SvidItem:
        """One SVID as served, encoded once (chain DER, key PKCS#8), not once per fetch."""
        got = self._items.get(id(held))
        if got is not None and got[0] is held and got[1] is bundle_der:
            return got[2]
        item = _item(held, bundle_der)
        live = self.keeper.svids.values()
        if len(self._items) >= 2 * len(live) + 16:  # forget SVIDs the keeper dropped
            kept = {id(h) for h in live}
            self._items = {k: v for k, v in self._items.items() if k in kept}
        self._items[id(held)] = (held, bundle_der, item)
        return item

    async def _attest(
        self, peer: PeerCred, kinds: frozenset[str] | None = None
    ) -> frozenset[Selector]:
        """The caller's selectors, of ``kinds`` only when given (`agent.attestor` rule 7)."""
        sock = peer.sock
        if sock is None:
            raise NoIdentity("caller cannot be attested")
        try:
            # A caller seen before: no thread (`agent.attestor` rule 6), and no checkpoint
            # either (the call's task waits for the agent's next change right after).
            try:
                _facts, selectors = attest_socket(sock, self.hashes, cached_only=True, kinds=kinds)
            except NeedsThread:
                _facts, selectors = await trio.to_thread.run_sync(
                    partial(attest_socket, sock, self.hashes, kinds=kinds)
                )
        except (AttestationError, OSError) as exc:
            self.stats.attestation_failures += 1
            log.warning("workload.attestation_failed", pid=peer.pid, uid=peer.uid, error=str(exc))
            raise NoIdentity("caller could not be attested") from exc
        self.stats.attested += 1
        return selectors

    def _denied(self, peer: PeerCred, selectors: frozenset[Selector], reason: str) -> NoIdentity:
        """Count and log a caller that gets no identity; the error to raise for it."""
        self.stats.denied += 1
        log.warning(
            "workload.denied",
            pid=peer.pid,
            uid=peer.uid,
            selectors=describe(selectors),
            reason=reason,
        )
        return NoIdentity("no identity issued")

    def x509_now(self, peer: PeerCred) -> X509Snapshot | None:
        """`watch_x509`'s first snapshot without a task or a wait (`WorkloadBackend`): a
        caller seen before is attested from the cache.  Anything else (a thread needed,
        a failure, no SVID) is None, for `watch_x509` to handle and log as it does."""
        sock = peer.sock
        if sock is None:
            return None
        try:
            _facts, selectors = attest_socket(
                sock, self.hashes, cached_only=True, kinds=self.kinds()
            )
        except (NeedsThread, AttestationError, OSError):
            return None
        snap = self._snapshot(selectors)[0]
        if not snap.svids:
            return None
        self.stats.attested += 1
        return snap

    @asynccontextmanager
    async def watch_x509(self, peer: PeerCred) -> AsyncIterator[AsyncIterator[X509Snapshot]]:
        kinds = self.kinds()
        selectors = await self._attest(peer, kinds)
        yield self._stream(peer, selectors, kinds)

    async def _stream(
        self, peer: PeerCred, selectors: frozenset[Selector], kinds: frozenset[str]
    ) -> AsyncIterator[X509Snapshot]:
        keeper = self.keeper
        last: tuple[object, ...] | None = None
        last_snap: X509Snapshot | None = None
        while True:
            changed = keeper.changed
            if not self.kinds() <= kinds:  # an entry names a kind not attested yet
                kinds |= self.kinds()
                selectors = await self._attest(peer, kinds)
                continue  # the keeper may have changed meanwhile
            snap, soonest = self._snapshot(selectors)
            if not snap.svids:
                raise self._denied(
                    peer,
                    await self._attest(peer),  # the full set, for the operator's log line
                    NO_ENTRY
                    if not keeper.halted
                    else f"the CA refused this agent ({keeper.halted}) "
                    "and no unexpired SVID matches",
                )
            if snap is not last_snap:  # snapshots are shared until something changes
                last_snap = snap
                key = (
                    tuple((s.spiffe_id, s.cert_chain_der) for s in snap.svids),
                    tuple(snap.bundles.items()),
                )
                if key != last:
                    last = key
                    yield snap
            # Wake for agent changes, and at the next expiry of what this caller holds.
            with trio.move_on_after(max(0.0, (soonest - keeper.clock()).total_seconds()) + 0.01):
                await changed.wait()

    # -- the JWT profile -------------------------------------------------------------

    def _entries_for(self, peer: PeerCred, selectors: frozenset[Selector]) -> list[Entry]:
        """The entries whose SVIDs this caller may have, as for X.509 (rule 3)."""
        entries = [e for e in self.keeper.entries.values() if matches(e.selectors, selectors)]
        if not entries:
            raise self._denied(peer, selectors, NO_ENTRY)
        return sorted(entries, key=lambda e: (e.spiffe_id, e.id))

    async def fetch_jwt(
        self, peer: PeerCred, audience: Sequence[str], spiffe_id: str
    ) -> list[JwtSvidItem]:
        entries = self._entries_for(peer, await self._attest(peer))
        if spiffe_id:
            entries = [e for e in entries if e.spiffe_id == spiffe_id]
            if not entries:
                raise NoIdentity(f"no identity {spiffe_id} for this caller")
        # One identity per SPIFFE ID (two entries may name the same one).
        seen: dict[str, Entry] = {}
        for entry in entries:
            seen.setdefault(entry.spiffe_id, entry)
        items = []
        for entry in seen.values():
            try:
                token = await self.jwt_cache.get(entry.id, audience)
            except CAError as exc:
                log.warning("jwt.fetch_failed", spiffe_id=entry.spiffe_id, error=exc.code)
                if exc.code in ("bad_audience", "ttl_too_long"):
                    raise GrpcError(Status.INVALID_ARGUMENT, exc.message) from exc
                if exc.code in _NO_IDENTITY_CODES:
                    # As for X.509: the CA will not give this caller an identity (the
                    # entry went, the agent was evicted): PERMISSION_DENIED.
                    raise NoIdentity(f"the CA refused a JWT-SVID ({exc.code})") from exc
                raise GrpcError(Status.UNAVAILABLE, "the CA could not sign a JWT-SVID") from exc
            items.append(JwtSvidItem(entry.spiffe_id, token, entry.hint))
        return items

    def _jwt_bundles(self) -> dict[str, bytes]:
        bundle = self.keeper.jwt_bundle
        if bundle is None:
            return {}
        return {self.td_id: bundle.to_jwks()}

    @asynccontextmanager
    async def watch_jwt_bundles(
        self, peer: PeerCred
    ) -> AsyncIterator[AsyncIterator[Mapping[str, bytes]]]:
        selectors = await self._attest(peer)
        self._entries_for(peer, selectors)
        yield self._jwt_bundle_stream(peer, selectors)

    async def _jwt_bundle_stream(
        self, peer: PeerCred, selectors: frozenset[Selector]
    ) -> AsyncIterator[Mapping[str, bytes]]:
        last: dict[str, bytes] | None = None
        while True:
            changed = self.keeper.changed
            self._entries_for(peer, selectors)
            bundles = self._jwt_bundles()
            if bundles and bundles != last:
                last = bundles
                yield bundles
            await changed.wait()

    async def validate_jwt(self, peer: PeerCred, audience: str, token: str) -> ValidatedJwt:
        self._entries_for(peer, await self._attest(peer))
        bundle = self.keeper.jwt_bundle
        bundles = [] if bundle is None else [bundle]
        try:
            svid = jwt.validate(token, audience, bundles, self.keeper.clock().timestamp())
        except jwt.JwtError as exc:
            self.stats.jwt_invalid[exc.reason] = self.stats.jwt_invalid.get(exc.reason, 0) + 1
            log.info("jwt.invalid", pid=peer.pid, reason=exc.reason)
            raise InvalidJwt(exc.reason) from exc
        return ValidatedJwt(str(svid.spiffe_id), svid.claims)
