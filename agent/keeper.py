"""The agent's working memory and the trio loops that keep it fresh (`SvidKeeper`).

Rules:

1. Three loops, one nursery: the agent's own SVID, the entry feed and the
   workload SVIDs.  The entry feed is one long poll on the CA that also brings
   a new bundle (``ca.api`` rule 7), so an entry created at the CA is minted
   here, and a new root trusted, within a round trip, not a poll period, while
   the agent parks a single request at the CA.
2. Workload keys are generated here and live only in memory; the CA sees
   CSRs.  Each SVID is renewed at a random point just before its half-life
   (`tally.spiffe.rotation`), in batches, so one CA call serves many renewals.
   What is due when is decided in `agent.renewal`; this shell waits and calls.
3. The CA being away is normal: every loop retries with capped, jittered
   backoff and logs ``rotation.failed`` with the reason, while workloads keep
   being served what is held until it expires.  Nothing is dropped early.
4. Eviction is not an outage: when the CA says ``evicted`` (or no longer knows
   the agent), the agent stops asking for new identities, says so once, and
   waits for an operator; it never loops hot.  ``stale_svid`` halts the same
   way but is not eviction: the CA knows a newer SVID for this agent, so this
   state is older (a restored backup, or a second agent on the same data dir),
   and the agent says that (``agent.stale``) and how to recover.
5. Every change bumps `version` and wakes `changed`, and Workload API streams
   recompute what their caller may see from this state.
6. Sign, then park.  When the entry feed brings entries to mint (at start,
   above all after a restart, when every workload SVID is due at once), the
   poll waits until the minter has signed them or is backing off, at most
   `SIGN_BEFORE_PARK_S`, before it parks again: the signing calls then take
   the connection the poll just left idle, and the CA makes one TLS handshake
   for this agent instead of two (the handshakes are the largest share of the
   CA's work when a fleet restarts, which is also when signing is slowest).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent import renewal, state
from agent.ca_client import CAError, Issued, make_csr
from agent.renewal import (
    BATCH,
    BundleNews,
    EntriesPage,
    Entry,
    EntryChange,
    EntrySync,
    HeldSvid,
)
from tally.ops.logs import get_logger
from tally.spiffe import rotation, x509profile
from tally.spiffe.jwt import JwtBundle
from tally.spiffe.pem import chain_from_pem
from tally.spiffe.spiffeid import SpiffeId

log = get_logger("tally.agent")

_T = TypeVar("_T")

SIGN_BEFORE_PARK_S = 30.0
"""How long the entry poll waits for the minter before it parks (rule 6): a CA too busy
to sign within it must not keep the poll, and with it news of changes, away longer."""


class CAApi(Protocol):
    """What the keeper needs of the CA (`agent.ca_client.CAClient` in the daemon)."""

    async def renew(self, key: ec.EllipticCurvePrivateKey) -> Issued: ...

    async def entries(
        self, since: int = -1, wait: float = 0
    ) -> tuple[int, list[dict[str, Any]]]: ...

    async def entries_sync(
        self,
        since: int = -1,
        wait: float = 0,
        after: str = "",
        limit: int | None = None,
        bundle: int | None = None,
    ) -> EntriesPage: ...

    async def sign(self, requests: Sequence[tuple[str, str]]) -> list[dict[str, Any]]: ...

    async def jwt(self, entry_id: str, audience: Sequence[str]) -> str: ...

    def set_identity(
        self, chain: Sequence[x509.Certificate], key: ec.EllipticCurvePrivateKey
    ) -> None: ...

    def set_roots(self, roots: Sequence[x509.Certificate]) -> None: ...


class Offload(Protocol):
    """Runs CPU or disk work (key generation, state files) away from the event loop."""

    def __call__(self, work: Callable[[], _T], /) -> Awaitable[_T]: ...


async def in_thread(work: Callable[[], _T]) -> _T:
    """The daemon's `Offload`: a trio worker thread."""
    return await trio.to_thread.run_sync(work)


@dataclass
class Counters:
    rotations: int = 0
    rotation_failures: int = 0
    issued: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class SvidKeeper:
    """Holds the agent's identity, entries, bundle and workload SVIDs, and runs the
    loops that keep them fresh against the CA (`run`)."""

    def __init__(
        self,
        client: CAApi,
        identity: state.AgentIdentity,
        roots: list[x509.Certificate],
        bundle_sequence: int,
        data_dir: Path,
        *,
        clock: Callable[[], datetime],
        rng: random.Random | None = None,
        poll_wait: float = 50,
        offload: Offload = in_thread,
    ) -> None:
        self.client = client
        self.identity = identity
        self.roots = roots
        self.bundle_sequence = bundle_sequence
        self.data_dir = data_dir
        self.clock = clock
        self.rng = rng or random.Random()
        self.poll_wait = poll_wait
        self._offload = offload
        self.entries: dict[str, Entry] = {}
        self.sync = EntrySync()
        self.svids: dict[str, HeldSvid] = {}
        self.version = 0
        self.changed = trio.Event()
        # The CA's code once it refused this agent for good; the loops stop on it.
        self.halted: str | None = None
        # The CA's JWT keys; None until the first entries answer brings the bundle.
        self.jwt_bundle: JwtBundle | None = None
        self.counters = Counters()
        self._wake_minter = trio.Event()
        self._minter_idle = trio.Event()
        """Set while the minter holds no connection: nothing due, or backing off (rule 6)."""
        self.agent_renew_at = self._renewal(identity.chain[0])

    @property
    def entries_revision(self) -> int:
        return self.sync.revision

    @property
    def entries_synced(self) -> bool:
        return self.sync.synced

    # -- shared state ------------------------------------------------------------------

    @property
    def agent_id(self) -> str:
        return str(x509profile.validate_leaf(self.identity.chain[0]))

    def _renewal(self, cert: x509.Certificate) -> datetime:
        return rotation.renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc, self.rng)

    def notify(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = trio.Event()

    def _fail(self, what: str, exc: Exception) -> None:
        self.counters.rotation_failures += 1
        reason = exc.code if isinstance(exc, CAError) else type(exc).__name__
        self.counters.by_reason[reason] = self.counters.by_reason.get(reason, 0) + 1
        log.warning("rotation.failed", what=what, reason=reason, error=str(exc))

    @property
    def evicted(self) -> str | None:
        """Why the CA evicted (or forgot, or banned) this agent; None while it has not."""
        return None if self.halted == renewal.STALE else self.halted

    @property
    def stale(self) -> bool:
        """Whether the CA knows a newer SVID for this agent than the one it holds."""
        return self.halted == renewal.STALE

    def _check_fatal(self, exc: Exception) -> bool:
        if isinstance(exc, CAError) and exc.code in renewal.FATAL_CODES:
            if self.halted is None:
                self.halted = exc.code
                if exc.code == renewal.STALE:
                    self._say_stale(exc)
                else:
                    log.error(
                        "agent.evicted",
                        agent_id=self.agent_id,
                        code=exc.code,
                        detail=exc.message,
                        action="this agent gets no new identities; "
                        "restart it with a new --join-token",
                    )
                self.notify()
            return True
        return False

    def _say_stale(self, exc: CAError) -> None:
        """One line that tells the operator what happened and the safe way back."""
        agent_id = self.agent_id
        log.error(
            "agent.stale",
            agent_id=agent_id,
            serial=format(self.identity.chain[0].serial_number, "x"),
            detail=f"{exc.message}; this agent's state is older — restored from a backup, "
            "or a second agent with the same data dir?",
            action="make sure no other agent runs on this data dir; then "
            f"`tally ca token create --spiffe-id {agent_id}` and restart this agent with "
            "--join-token: it keeps its SPIFFE ID and its entries",
        )

    def drop_expired(self) -> None:
        gone = renewal.expired(self.svids, self.clock())
        for eid in gone:
            held = self.svids.pop(eid)
            log.warning("svid.expired", spiffe_id=held.entry.spiffe_id, serial=held.serial)
        if gone:
            self.notify()

    def soonest_expiry(self) -> datetime:
        return renewal.soonest_expiry(self.svids, self.identity.chain[0])

    def at_risk(self) -> list[str]:
        """SVIDs three quarters through their life with no successor: renewal is failing."""
        return renewal.at_risk(self.svids, self.clock())

    def _backoff(self, attempt: int, exc: Exception | None = None) -> float:
        """Retry delay: exponential, jittered, and capped by how soon something expires,
        so a CA that comes back is noticed before the SVIDs it must renew run out.  A CA
        that said how long to stay away (429 with ``Retry-After``) is given that long,
        spread by jitter so that a refused herd does not come back as one."""
        waiting = any(eid not in self.svids for eid in self.entries)
        cap = renewal.retry_cap(self.clock(), self.soonest_expiry(), waiting)
        delay = rotation.backoff(attempt, self.rng, cap=cap)
        told = exc.retry_after if isinstance(exc, CAError) else None
        return renewal.honor_retry_after(delay, told, self.clock(), self.soonest_expiry(), self.rng)

    async def _sleep_until(self, when: datetime, *, cap: float = 3600) -> None:
        delay = (when - self.clock()).total_seconds()
        await trio.sleep(max(0.0, min(cap, delay)))

    async def _wait_for_operator(self) -> None:
        """After eviction: nothing to do until someone restarts us with a token."""
        await trio.sleep_forever()

    # -- the agent's own SVID ----------------------------------------------------------

    async def agent_svid_loop(self) -> None:
        attempt = 0
        failure: Exception | None = None
        while self.halted is None:
            await self._sleep_until(self.agent_renew_at if attempt == 0 else self.clock())
            if attempt:
                await trio.sleep(self._backoff(attempt, failure))
            key = x509profile.generate_key()
            old = self.identity.chain[0]
            try:
                issued = await self.client.renew(key)
            except (CAError, trio.TooSlowError) as exc:
                if self._check_fatal(exc):
                    break
                self._fail("agent_svid", exc)
                attempt += 1
                failure = exc
                continue
            attempt = 0
            self.identity = state.AgentIdentity(key, issued.chain)
            # Before any checkpoint: a call made from here on must carry the new SVID, as
            # the CA accepts the old one only until the next renewal.
            self.client.set_identity(issued.chain, key)
            await self._offload(partial(state.save_identity, self.data_dir, self.identity))
            self.agent_renew_at = self._renewal(issued.chain[0])
            self.counters.rotations += 1
            log.info(
                "svid.rotated",
                kind="agent",
                spiffe_id=issued.spiffe_id,
                old_serial=format(old.serial_number, "x"),
                new_serial=issued.serial,
                not_after=issued.chain[0].not_valid_after_utc.isoformat(),
            )
        await self._wait_for_operator()

    # -- feeds -------------------------------------------------------------------------

    async def entries_loop(self) -> None:
        """Keep the entry set in step by delta sync (`agent.renewal.EntrySync`): park a
        long poll while in step, page through a full set when the CA asks for one.
        The same poll brings a new bundle (rule 1)."""
        attempt = 0
        while self.halted is None:
            since, after, park = self.sync.request()
            # Without JWT keys yet, ask for the bundle whatever its sequence: the
            # attestation answer carried the roots, not the JWT keys.
            held = self.bundle_sequence if self.jwt_bundle is not None else -1
            try:
                page = await self.client.entries_sync(
                    since=since, wait=self.poll_wait if park else 0, after=after, bundle=held
                )
                news = None if page.bundle is None else self._read_bundle(page.bundle)
            except (CAError, trio.TooSlowError, ValueError) as exc:
                if self._check_fatal(exc):
                    break
                self._fail("bundle" if isinstance(exc, ValueError) else "entries", exc)
                attempt += 1
                await trio.sleep(self._backoff(attempt, exc))
                continue
            attempt = 0
            if news is not None:
                await self._apply_bundle(*news)
            change = self.sync.receive(self.entries, page)
            if change is not None:
                self._apply_entries(page.revision, change)
                if change.changed and self.sync.request()[2]:
                    with trio.move_on_after(SIGN_BEFORE_PARK_S):  # rule 6
                        await self._minter_idle.wait()
        await self._wait_for_operator()

    def _apply_entries(self, revision: int, change: EntryChange) -> None:
        for eid, error in change.ignored:
            log.warning("entry.ignored", entry=eid, error=error)
        for eid in change.removed:
            held = self.svids.pop(eid, None)
            log.info(
                "entry.removed", entry_id=eid, spiffe_id=held.entry.spiffe_id if held else None
            )
        self.entries = change.entries
        if change.removed or change.changed:
            log.info("entries.synced", revision=self.sync.revision, entries=len(change.entries))
            self._wake_minter.set()
            self._minter_idle = trio.Event()  # until the minter has looked (rule 6)
            self.notify()

    def _read_bundle(self, news: BundleNews) -> tuple[int, list[x509.Certificate], JwtBundle]:
        """The bundle an entries answer carried, parsed (ValueError when it does not)."""
        roots = chain_from_pem(news.roots_pem)
        if not roots:
            raise ValueError("the CA sent a bundle with no root")
        td = SpiffeId.parse(self.agent_id).trust_domain
        return news.sequence, roots, JwtBundle.from_jwks(td, news.jwks)

    async def _apply_bundle(
        self, sequence: int, roots: list[x509.Certificate], jwt_bundle: JwtBundle
    ) -> None:
        if sequence != self.bundle_sequence or roots != self.roots:
            self.roots = roots
            self.bundle_sequence = sequence
            self.client.set_roots(roots)
            await self._offload(partial(state.save_bundle, self.data_dir, roots, sequence))
            log.info("bundle.updated", sequence=sequence, roots=len(roots))
            self.notify()
        if self.jwt_bundle is None or jwt_bundle.keys.keys() != self.jwt_bundle.keys.keys():
            self.jwt_bundle = jwt_bundle
            log.info("jwt_bundle.updated", sequence=sequence, keys=len(jwt_bundle.keys))
            self.notify()

    # -- workload SVIDs ----------------------------------------------------------------

    async def minter_loop(self) -> None:
        attempt = 0
        while self.halted is None:
            self.drop_expired()
            due = renewal.due(self.entries, self.svids, self.clock()) if self.entries_synced else []
            if not due:
                self._wake_minter = trio.Event()
                self._minter_idle.set()
                wake = renewal.next_wake(self.svids, self.clock())
                with trio.move_on_after(max(0.0, (wake - self.clock()).total_seconds())):
                    await self._wake_minter.wait()
                continue
            try:
                await self._mint(due[:BATCH])
            except (CAError, trio.TooSlowError) as exc:
                if self._check_fatal(exc):
                    break
                self._fail("workload_svids", exc)
                self._minter_idle.set()  # backing off: the poll need not wait (rule 6)
                attempt += 1
                delay = self._backoff(attempt, exc)
                with trio.move_on_after(delay):
                    # New entries still wait their turn: the CA is what is failing.
                    await trio.sleep_forever()
                continue
            attempt = 0
        # Evicted: keep what is held until it expires, then let it go.
        while True:
            self.drop_expired()
            if not self.svids:
                await trio.sleep_forever()
            await self._sleep_until(min(h.not_after for h in self.svids.values()))

    async def _mint(self, due: list[Entry]) -> None:
        keys = await self._offload(lambda: [x509profile.generate_key() for _ in due])
        csrs = await self._offload(lambda: [make_csr(k) for k in keys])
        results = await self.client.sign([(e.id, csr) for e, csr in zip(due, csrs, strict=True)])
        for entry, key, result in zip(due, keys, results, strict=True):
            if "chain" not in result:
                log.warning(
                    "rotation.failed",
                    what="workload_svid",
                    entry_id=entry.id,
                    spiffe_id=entry.spiffe_id,
                    reason=str(result.get("error")),
                    error=str(result.get("message")),
                )
                self.counters.rotation_failures += 1
                continue
            chain: tuple[x509.Certificate, ...] = tuple(result["chain"])
            leaf = chain[0]
            old = self.svids.get(entry.id)
            self.svids[entry.id] = HeldSvid(
                entry=entry,
                key=key,
                chain=chain,
                serial=str(result["serial"]),
                not_after=leaf.not_valid_after_utc,
                renew_at=self._renewal(leaf),
            )
            self.counters.issued += 1
            if old is None:
                log.info(
                    "svid.issued",
                    spiffe_id=entry.spiffe_id,
                    serial=result["serial"],
                    not_after=leaf.not_valid_after_utc.isoformat(),
                )
            else:
                self.counters.rotations += 1
                log.info(
                    "svid.rotated",
                    kind="workload",
                    spiffe_id=entry.spiffe_id,
                    old_serial=old.serial,
                    new_serial=result["serial"],
                    not_after=leaf.not_valid_after_utc.isoformat(),
                )
        self.notify()

    # -- running -----------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.agent_svid_loop)
            nursery.start_soon(self.entries_loop)
            nursery.start_soon(self.minter_loop)
