"""`tally ca run`: the trio shell that puts the authority on its sockets.

Rules:

1. Startup is synchronous and fails fast with one line naming the problem
   (a loose key file, a datastore from the future, an address in use).  Only
   once everything is open does the CA start serving.  The paths it will
   create things at (the data dir, the admin socket) are checked before it
   creates anything, so a refused start leaves no keys or log of keys behind.
2. One nursery for listeners, one for connection handlers.  SIGTERM closes
   the listeners at once, closes idle connections, answers parked long polls
   and gives requests in flight `DRAIN_SECONDS` to end.
3. The agent API's TLS context is an immutable object swapped in one
   assignment whenever the signing key, the bundle or the CA's own serving
   certificate changes; each handshake takes the one current at its start.
   A client may come without a certificate (it attests with a join token);
   one that shows a certificate must show an agent's: the chain is judged in
   the handshake by the same checks as the proxy's (`tally.spiffe.authz`), then the
   ID must be an agent on record, else the connection closes before any
   request.  Every refusal is one ``peer.denied`` line and one count by
   reason, with the same reason words as the proxy; the API's own refusals of
   a peer (no certificate, a replaced agent SVID) go through the same door.
4. Every store call goes through one worker thread (`run_sync`,
   `ca.store_thread`), so SQLite sees one writer and the event loop never
   blocks on disk or on signing; the thread takes its next call the moment
   one ends, however busy the event loop is.
5. The audit chain's head is signed (`ca.anchor`) at start, every
   ``audit_anchor_every`` and after every key event, and published outside
   the datastore: an ``audit.anchor`` line, the metrics, ``audit_anchor_file``.
6. SIGHUP re-reads the ``--config`` file (`tally.ops.reload`): TTLs, the
   key schedule, the attestation throttle, timeouts, ``max_connections`` and
   the log level change at once, for the next request or connection, with no
   connection dropped; `RESTART_ONLY` keep their old value.  The signal
   receiver lives until the end, so a SIGHUP during the drain does not kill
   the process.
7. A CA cut off from its database signs nothing: every call that would change
   state fails before its answer leaves (the change and its audit record are
   one transaction that did not commit), the API answers 503
   ``datastore_unavailable``, ``/readyz`` says why, and a ping every second
   notices the database's return; then every parked poll re-checks once.
8. On PostgreSQL, several servers share the database (`ca.cluster`): each
   listens for the others' changes and takes up their key changes at once.
9. Sized for a fleet: at start the CA raises its open-file limit toward what
   ``max_connections`` needs (`raise_open_files`) and says in one line when the
   hard limit stops it short.  Past ``overload_queue`` calls waiting for the
   datastore, agent calls are answered 429 with ``Retry-After`` at once
   (`ca.throttle.overload_retry_after`), so a herd queues outside the CA.  While
   that lasts, and while the event loop runs more than `LAG_SHED_S` behind (a
   probe asks to be woken every `LAG_PROBE_S`; two wake-ups in a row must be
   that late, so one stall sheds nothing), a new agent connection is closed
   before its handshake (counted in ``tally_ca_connections_shed``): a handshake
   costs far more CPU than the close, and a CA taking on every connection of a
   herd answered so late that agents gave up (60 s) on calls it then did anyway
   (bench.fleet, 10,000 agents).  The agent backs off with jitter, or tries its
   other server.  Connections already open carry on.  An agent's first contact
   (its handshake, up to its first parked poll) takes its turn among
   `FIRST_CONTACTS` once its whole ClientHello is in (`ca.first_contact`), so a
   herd is served in arrival order rather than all at once and all late; a slow
   peer costs no CPU, adds no lag and takes no turn before its ClientHello is
   whole, so a few hundred half-open connections cannot lock agents out
   (``tests/security/test_slow_clients.py``).  Agents on record are remembered
   (none is ever deleted), so a known agent's connection costs no store call
   before its first request.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio
from cryptography import x509
from prometheus_client.core import Metric

from ca import cluster, console, schedule
from ca.anchor import Anchor, AnchorKey
from ca.api import AdminApi, AgentApi, AgentPeer
from ca.authority import Authority, Limits, iso, serial_hex
from ca.engines import StoreUnavailable
from ca.feed import ChangeFeed
from ca.first_contact import FirstContacts, first_record, peer_gone
from ca.jwt_keys import AuditSampler, JwtKeyManager, JwtStep, jwt_limits, jwt_policy
from ca.keys import KeyManager, Signer, load_upstream
from ca.oidc import serve_oidc
from ca.oidc import tls_context as oidc_tls_context
from ca.settings import CASettings, workers_for
from ca.signing_pool import SigningPool
from ca.store import AuditEvent, IssuedSvid, Store
from ca.store_thread import StoreThread
from ca.throttle import overload_retry_after
from ca.vault import SealedVault
from tally.ops import metrics
from tally.ops.admission import Admission
from tally.ops.clock import Clock, wall_clock
from tally.ops.errors import OperatorError
from tally.ops.health import serve_health, watch_ready
from tally.ops.hook_rules import check_hooks
from tally.ops.hooks import Hooks
from tally.ops.logs import get_logger, setup_logging
from tally.ops.net import (
    accept_loop,
    bound_address,
    clear_stale_unix,
    open_listener,
    open_unix_listener,
    stream_peer_credentials,
)
from tally.ops.reload import reread
from tally.spiffe import authz, x509profile
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tally.tls.contexts import TLSContext, server_context
from tally.tls.stream import TLSStream
from tally.tls.verify import PeerRejected, PeerVerifier, TLSError, authz_verifier
from tally.wire import http

T = TypeVar("T")
log = get_logger("tally.ca")
DRAIN_SECONDS = 5.0
DB_PING_SECONDS = 1.0
SERVER_PATH = ("tally", "ca")
SERVING_TTL = 3600
# Changing these needs a restart; a reload that changes them says so and keeps the old value.
RESTART_ONLY = (
    "trust_domain",
    "data_dir",
    "datastore",
    "listen",
    "admin_socket",
    "metrics",
    "console",
    "console_cert",
    "console_key",
    "console_admin_id",
    "upstream_cert",
    "upstream_key",
    "upstream_bundle",
    "oidc_listen",
    "oidc_issuer",
    "oidc_cert",
    "oidc_key",
    "signing_workers",
)


class StartupPathError(OperatorError):
    """A path the CA would create something at is refused before anything is created."""


def check_paths(cfg: CASettings) -> None:
    """Refuse a planted symlink (dangling or not) or a stray file at the data dir, and
    whatever `tally.ops.net` would refuse at the admin socket, before anything is created."""
    try:
        mode = os.lstat(cfg.data_dir).st_mode
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupPathError(f"cannot use data dir {cfg.data_dir}: {exc.strerror}") from exc
    else:
        if stat.S_ISLNK(mode):
            raise StartupPathError(f"data dir {cfg.data_dir} is a symlink; refusing to follow it")
        if not stat.S_ISDIR(mode):
            raise StartupPathError(f"data dir {cfg.data_dir} is in the way: not a directory")
    if cfg.admin_socket.parent.is_dir():  # else `run` creates it, and nothing can be there
        clear_stale_unix(cfg.admin_socket)


def _metrics(server: CAServer) -> Iterator[Metric]:
    """What ``/metrics`` shows, read from the daemon's counters at scrape time."""
    s = server
    a = s.authority
    yield metrics.counter(
        "tally_ca_svids_issued", "SVIDs signed (workload, agent and minted)", a.issued_total
    )
    yield metrics.counter(
        "tally_ca_jwt_svids_issued", "JWT-SVIDs signed (for agents and minted)", a.jwt_issued_total
    )
    yield metrics.counter(
        "tally_ca_attestation_failures", "node attestations refused", a.attestation_failures
    )
    yield metrics.counter_by(
        "tally_ca_admin_refused",
        "admin socket connections refused over admin_max_connections",
        ["reason"],
        s.admin_admission.refused,
    )
    yield metrics.counter_by(
        "tally_ca_peer_denied", "agent API peers refused, by reason", ["reason"], s.peers_denied
    )
    yield metrics.counter(
        "tally_ca_signing_workers_replaced",
        "times the signing workers were restarted because one died",
        s.signing.replaced,
    )
    yield metrics.counter(
        "tally_ca_connections_accepted",
        "agent API connections accepted (each costs a TLS handshake unless shed or refused)",
        s.accepted,
    )
    yield metrics.counter(
        "tally_ca_connections_shed",
        "agent connections closed before their handshake while overloaded (datastore queue"
        " or event-loop lag)",
        s.shed,
    )
    yield metrics.gauge(
        "tally_ca_first_contacts_waiting",
        "agent connections whose ClientHello is in, waiting their turn to shake hands",
        s.first_contacts.waiting,
    )
    yield metrics.counter(
        "tally_ca_first_contact_turns_lapsed",
        "first contacts still unfinished when their turn lapsed (a peer slow to answer)",
        s.first_contacts.lapsed,
    )
    yield metrics.counter(
        "tally_ca_overloaded",
        "agent calls answered 429 overloaded (more than overload_queue waiting for the store)",
        0 if s.agent_api is None else s.agent_api.refused_overloaded,
    )
    polls = (s.entries_changed, s.bundle_changed)
    woken: Counter[str] = Counter()
    for feed in polls:
        woken.update(feed.wakeups_by)
    yield metrics.counter_by(
        "tally_ca_poll_wakeups",
        "parked long polls woken by a change that concerns them, by cause",
        ["cause"],
        woken,
    )
    yield metrics.counter(
        "tally_ca_poll_checks",
        "checks long polls made of whether their agent has news (on arrival and on each wake-up)",
        sum(feed.checks for feed in polls),
    )
    yield metrics.gauge(
        "tally_ca_polls_parked", "long polls parked now", sum(feed.parked for feed in polls)
    )
    yield metrics.gauge(
        "tally_ca_event_loop_lag_seconds",
        "how late the event loop last woke a task that asked to be woken; past 1 s new"
        " agent connections are shed",
        s.loop_lag,
    )
    signer = s.keys.signer
    now = s.clock()
    if signer is not None:
        age = (now - signer.cert.not_valid_before_utc).total_seconds()
        left = (signer.not_after - now).total_seconds()
        yield metrics.gauge(
            "tally_ca_signing_key_age_seconds", "age of the active signing key", age
        )
        yield metrics.gauge(
            "tally_ca_signing_key_expiry_seconds",
            "seconds until the active signing key expires",
            left,
        )
    if s.last_anchor is not None:
        yield metrics.gauge(
            "tally_ca_audit_anchor_sequence",
            "audit record whose hash the newest anchor signed",
            s.last_anchor.seq,
        )
        yield metrics.info(
            "tally_ca_audit_anchor",
            "the newest signed audit anchor (public; keep a copy outside the datastore)",
            {
                "seq": str(s.last_anchor.seq),
                "hash": s.last_anchor.hash,
                "at": s.last_anchor.at,
                "key_id": s.last_anchor.key_id,
                "signature": s.last_anchor.signature,
            },
        )
    if s.keys.bundle is not None:
        yield metrics.gauge(
            "tally_ca_bundle_sequence",
            "sequence number of the trust bundle",
            s.keys.bundle.sequence,
        )
        yield metrics.gauge(
            "tally_ca_bundle_roots",
            "root certificates in the bundle",
            len(s.keys.bundle.x509_authorities),
        )


def _limits(cfg: CASettings) -> Limits:
    return Limits(
        default_ttl=int(cfg.default_svid_ttl),
        max_ttl=int(cfg.max_svid_ttl),
        agent_ttl=int(cfg.agent_svid_ttl),
        token_ttl=int(cfg.join_token_ttl),
    )


class CAServer:
    def __init__(
        self,
        cfg: CASettings,
        clock: Clock = wall_clock,
        *,
        reload: Callable[[], CASettings] | None = None,
    ) -> None:
        self.cfg = cfg
        self._reload_config = reload
        self.clock = clock
        self.td = TrustDomain.parse(cfg.trust_domain)
        check_paths(cfg)
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        upstream = None
        if cfg.upstream_cert is not None and cfg.upstream_key is not None:
            upstream = load_upstream(cfg.upstream_cert, cfg.upstream_key, cfg.upstream_bundle)
        self.where = cfg.where()
        self.store = Store.connect(self.where)
        vault: SealedVault | None = None
        self.server_name = "ca"
        self.membership: cluster.Membership | None = None
        if self.store.engine == "postgresql":
            # Several servers share this database (`ca.cluster`): keys are sealed in it.
            self.server_name, cluster_key = cluster.join(self.store, cfg.data_dir, clock)
            self.store.set_origin(self.server_name)
            vault = SealedVault(self.store, cluster_key)
            self.membership = cluster.Membership(self.store, cluster_key, self.server_name, clock)
        self.db_error: str | None = None
        """Why the datastore cannot be used now (`/readyz`), or None."""
        policy = schedule.Policy(
            intermediate_ttl=int(cfg.intermediate_ttl),
            root_ttl=int(cfg.root_ttl),
            root_propagation=int(cfg.root_propagation),
            own_root=upstream is None,
        )
        self.anchor_key = (
            AnchorKey.load_or_create(cfg.data_dir) if vault is None else AnchorKey.shared(vault)
        )
        self.last_anchor: Anchor | None = None
        self.keys = KeyManager(self.store, cfg.data_dir, self.td, policy, clock, upstream, vault)
        self.keys.server_name = self.server_name
        self.keys.load()
        self.jwt_keys = JwtKeyManager(
            self.store,
            cfg.data_dir,
            self.td,
            jwt_policy(cfg),
            clock,
            vault,
            None if vault is None else self.keys.holds_lease,
        )
        self.jwt_keys.load()
        for jwt_step in self.jwt_keys.tick():
            log.info("key.rotated", step=f"jwt_{jwt_step.kind}", reason=jwt_step.reason)
        for step in self.keys.tick():
            log.info("key.rotated", step=step.kind, reason=step.reason)
        self.authority = Authority(
            self.store,
            self.keys,
            self.td,
            _limits(cfg),
            clock,
        )
        self.authority.limit_attestation(
            cfg.attest_burst, float(cfg.attest_refill), cfg.token_max_failures
        )
        self.authority.jwt_keys = self.jwt_keys
        self.oidc_tls = None
        if cfg.oidc_cert is not None and cfg.oidc_key is not None:
            self.oidc_tls = oidc_tls_context(cfg.oidc_cert, cfg.oidc_key)
        self.authority.jwt_limits = jwt_limits(cfg)
        self.authority.jwt_sampler = AuditSampler(int(cfg.jwt_audit_window))
        self.store_thread = StoreThread()
        self.signing = SigningPool(workers_for(cfg.signing_workers))
        self._conn_limiter = trio.CapacityLimiter(cfg.max_connections)
        self.first_contacts = FirstContacts(FIRST_CONTACTS, FIRST_CONTACT_LEASE_S)
        self.admin_admission = Admission(cfg.admin_max_connections)
        self.drain = http.Drain()
        self.entries_changed = ChangeFeed()
        self.bundle_changed = ChangeFeed()
        self._bundle_woken = self.keys.bundle.sequence if self.keys.bundle else None
        """The bundle sequence parked polls were last woken for (`refresh_keys`)."""
        self.peers_denied: Counter[str] = Counter()
        self._on_record: set[str] = set()
        """Agent IDs found on record (rule 9); none is ever deleted, so none goes stale."""
        self.accepted = 0
        self.shed = 0
        self.loop_lag = 0.0
        """How late the lag probe last woke, in seconds (`_watch_lag`)."""
        self._lag_before = 0.0
        self._lag_probe_due = math.inf
        self._shed_reported = -math.inf
        self._shed_at_report = 0
        self.console: console.Console | None = None
        if cfg.console is not None:
            tls = console.load_tls(cfg.console_cert, cfg.console_key, cfg.console_admin_id)
            self.console = console.Console(
                self.authority,
                self.run_sync,
                cfg.console,
                tls,
                clock=lambda: self.clock().timestamp(),
                drain=self.drain,
            )
        self.started = time.monotonic()
        self.server_id = SpiffeId.from_parts(self.td, *SERVER_PATH)
        self.tls_context: TLSContext | None = None
        self.agent_api: AgentApi | None = None
        self._serving_refresh_at = 0.0
        self._serving_for: tuple[str, int] | None = None
        self.hooks = Hooks("ca", check_hooks(cfg.hooks), identity=lambda: str(self.server_id))
        self.registry = metrics.registry_of(
            lambda: [*_metrics(self), *self.hooks.metrics("tally_ca")]
        )
        self._keys_notice = trio.Event()

    async def run_sync(self, fn: Callable[[], T]) -> T:
        return await self.store_thread.run(fn)

    # -- the CA's own serving certificate ---------------------------------------------

    def _build_tls_context(self) -> None:
        """Issue the CA's serving SVID from the active key and publish a new context."""
        signer = self.keys.signer
        bundle = self.keys.bundle
        assert signer is not None and bundle is not None
        now = self.clock().replace(microsecond=0)
        key = x509profile.generate_key()
        # An hour, capped at the signing key's expiry; renewed at half-life by the key
        # loop, which ticks far more often than that.
        lifetime = SERVING_TTL
        cert = x509profile.build_leaf(
            key.public_key(),
            self.server_id,
            signer.cert,
            signer.key,
            now - schedule.not_before_cushion(int(lifetime)),
            now + timedelta(seconds=lifetime),
        )
        serial = serial_hex(cert.serial_number)
        self.store.record_issued(
            [
                IssuedSvid(
                    serial,
                    str(self.server_id),
                    None,
                    "server",
                    int(cert.not_valid_after_utc.timestamp()),
                    int(now.timestamp()),
                )
            ],
            [
                AuditEvent(
                    iso(now),
                    "ca",
                    "svid.issued",
                    str(self.server_id),
                    serial,
                    {"kind": "server", "not_after": iso(cert.not_valid_after_utc)},
                )
            ],
        )
        self.authority.issued_total += 1
        self.tls_context = server_context(
            [cert, *signer.chain],
            key,
            roots=list(bundle.x509_authorities),
            client_auth="optional",
            verifier=self._agent_verifier(bundle.x509_authorities),
        )
        remaining = (cert.not_valid_after_utc - now).total_seconds()
        self._serving_refresh_at = time.monotonic() + remaining / 2
        self._serving_for = (signer.key_id, bundle.sequence)

    def _agent_verifier(self, roots: Iterable[x509.Certificate]) -> PeerVerifier:
        """Any SVID of our trust domain passes the handshake; `_is_agent` then narrows it."""
        trusted = {self.td: frozenset(authz.fingerprint(root) for root in roots)}
        return authz_verifier(trusted, authz.Policy(trust_domains=frozenset({self.td})))

    def _needs_new_context(self) -> bool:
        signer: Signer | None = self.keys.signer
        bundle = self.keys.bundle
        if signer is None or bundle is None:
            return False
        return (
            self.tls_context is None
            or self._serving_for != (signer.key_id, bundle.sequence)
            or time.monotonic() >= self._serving_refresh_at
        )

    async def refresh_keys(self, *, key_event: bool = False, take_up: bool = False) -> None:
        """Apply due key steps (or, with ``take_up``, only what another server changed);
        republish the bundle and TLS context when they changed.  ``key_event``: a key
        changed already (an operator's rotation): anchor anyway."""
        jwt_steps: list[JwtStep] = []

        def tick() -> list[schedule.Step]:
            # JWT keys first: the X.509 tick then republishes the bundle's sequence.
            jwt_steps.extend(self.jwt_keys.tick())
            return self.keys.tick()

        if take_up:

            def take_up_all() -> None:
                self.keys.refresh()
                self.jwt_keys.refresh()

            await self.run_sync(take_up_all)
            steps: list[schedule.Step] = []
        else:
            steps = await self.run_sync(tick)
        for jwt_step in jwt_steps:
            log.info("key.rotated", step=f"jwt_{jwt_step.kind}", reason=jwt_step.reason)
        for step in steps:
            log.info("key.rotated", step=step.kind, reason=step.reason, key_id=step.key_id)
        if self._needs_new_context():
            await self.run_sync(self._build_tls_context)
        after = self.keys.bundle.sequence if self.keys.bundle else None
        # Against what polls were last woken for, not ``before``: an operator's
        # rotation changes the bundle before it calls here, and must wake them all the same.
        if after != self._bundle_woken:
            self._bundle_woken = after
            log.info("bundle.updated", sequence=after)
            # Once per change, not once per tick; entries polls carry the bundle too.
            self.bundle_changed.wake_all()
            self.entries_changed.wake_all("bundle")
        if steps or jwt_steps or key_event:
            await self.anchor("key_event")

    # -- the audit anchor (rule 5) -----------------------------------------------------

    async def anchor(self, reason: str) -> Anchor | None:
        """Sign the chain's head now and publish it; None while the log is empty."""
        head = await self.run_sync(self.store.audit_head)
        if head is None:
            return None
        anchor = self.anchor_key.sign(str(self.td), head[0], head[1], iso(self.clock()))
        self.last_anchor = anchor
        log.info("audit.anchor", reason=reason, **anchor.to_json())
        if self.cfg.audit_anchor_file is not None:
            try:
                await trio.to_thread.run_sync(_append_line, self.cfg.audit_anchor_file, anchor)
            except OSError as exc:
                log.error(
                    "audit.anchor_file_failed", path=str(self.cfg.audit_anchor_file), error=exc
                )
        return anchor

    async def _anchor_loop(self) -> None:
        while True:
            await self.anchor("schedule")
            await trio.sleep(float(self.cfg.audit_anchor_every))

    def tick_interval(self) -> float:
        jwt_due = min(self.cfg.jwt_key_ttl / 100, self.cfg.jwt_propagation / 10)
        return max(0.2, min(30.0, self.cfg.intermediate_ttl / 100, jwt_due))

    def _prune(self) -> None:
        now = int(self.clock().timestamp())
        self.store.prune_svids(now - 3600)
        self.store.prune_tokens(now)
        self.store.prune_entry_log()

    async def _key_loop(self) -> None:
        last_prune = 0.0
        while True:
            await trio.sleep(self.tick_interval())
            try:
                await self.refresh_keys()
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    await self.run_sync(self._prune)
            except StoreUnavailable:
                pass  # `_watch_datastore` says so, once
            except Exception as exc:  # a failed tick is retried on the next one
                log.error("key.rotation_failed", error=exc)

    async def _watch_datastore(self) -> None:
        """Rule 7: notice a lost database within a second, say so once, and recover."""
        while True:
            await trio.sleep(DB_PING_SECONDS)
            try:
                await self.run_sync(self.store.ping)
            except StoreUnavailable as exc:
                if self.db_error is None:
                    log.error("ca.datastore_lost", datastore=self.store.shown, error=str(exc))
                self.db_error = str(exc)
                continue
            if self.db_error is not None:
                self.db_error = None
                log.info("ca.datastore_back", datastore=self.store.shown)
                await self._heard_missed_changes()

    def _on_reconnect(self) -> None:
        self.entries_changed.wake_all("resync")
        self._keys_notice.set()

    def _on_notice(self, payload: str) -> None:
        """A change committed through another CA server (`ca.cluster` rule 3)."""
        origin, _, payload = payload.partition(" ")
        if origin == self.server_name:
            return  # our own: the feed was woken when it committed
        kind, _, rest = payload.partition(" ")
        if kind == "agent":
            self.entries_changed.wake([rest], "other_server")
        elif kind == "keys":
            self._keys_notice.set()

    async def _heard_missed_changes(self) -> None:
        """Notices may have been lost: every poll re-checks once, keys are re-read."""
        self.entries_changed.wake_all("resync")
        self._keys_notice.set()

    async def _take_up_keys(self) -> None:
        """Key changes another server made: new signer, bundle, TLS context (rule 8)."""
        while True:
            await self._keys_notice.wait()
            self._keys_notice = trio.Event()
            try:
                await self.refresh_keys(take_up=True)
            except StoreUnavailable:
                pass
            except Exception as exc:
                log.error("key.rotation_failed", error=exc)

    # -- connections -------------------------------------------------------------------

    async def _agent_socket(self, api: AgentApi, sock: socket.socket) -> None:
        async with trio.SocketStream(trio.socket.from_stdlib_socket(sock)) as stream:
            await self._agent_connection(api, stream)

    async def _agent_connection(self, api: AgentApi, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            self._conn_limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            if (why := self._shedding()) is not None:
                self._shed(why)
                await stream.aclose()
                return
            await self._serve_agent(api, stream)
        finally:
            self._conn_limiter.release()

    def _shedding(self) -> str | None:
        """Why a new agent connection is to be closed unshaken now (rule 9), or None."""
        if self._overloaded() is not None:
            return f"more than {self.cfg.overload_queue} calls wait for the datastore"
        # The two newest probes must both be late (the pending one counts once it is):
        # one stall (a collector pass, a host that paused the process) sheds nothing,
        # while a herd keeps every probe late.
        pending = trio.current_time() - self._lag_probe_due
        newest = (
            (self.loop_lag, pending) if pending > LAG_SHED_S else (self._lag_before, self.loop_lag)
        )
        lag = min(newest)
        if lag > LAG_SHED_S:
            return f"the event loop runs {lag:.1f}s behind"
        return None

    def _shed(self, why: str) -> None:
        """Count a connection closed unshaken (rule 9); one log line per burst."""
        self.shed += 1
        now = trio.current_time()
        if now - self._shed_reported >= SHED_REPORT_S:
            log.warning("ca.shedding", shed=self.shed - self._shed_at_report, reason=why)
            self._shed_reported, self._shed_at_report = now, self.shed

    async def _watch_lag(self) -> None:
        """How late the event loop wakes a task that asked to be woken (rule 9)."""
        while True:
            self._lag_probe_due = trio.current_time() + LAG_PROBE_S
            await trio.sleep_until(self._lag_probe_due)
            self._lag_before = self.loop_lag
            self.loop_lag = trio.current_time() - self._lag_probe_due

    def _overloaded(self) -> int | None:
        """Retry-After seconds while too many calls wait for the datastore, else None."""
        queued = self.store_thread.queued
        return overload_retry_after(queued, self.cfg.overload_queue)

    def _denied(self, reason: str, detail: str, peer_id: SpiffeId | None, address: str) -> None:
        label = reason.split(":", 1)[0]  # "invalid_chain: <OpenSSL's words>" counts as one
        self.peers_denied[label] += 1
        log.warning(
            "peer.denied",
            peer_id=str(peer_id) if peer_id is not None else None,
            reason=label,
            detail=detail,
            peer=address,
            listener="agent_api",
        )

    def _is_agent(self, sid: SpiffeId) -> bool:
        """Agents on record, whatever their status: the API itself answers evicted or banned."""
        if str(sid) in self._on_record:
            return True
        if self.store.get_agent(str(sid)) is None:
            return False
        self._on_record.add(str(sid))
        return True

    async def _serve_agent(self, api: AgentApi, stream: trio.SocketStream) -> None:
        """An agent's first contact (handshake up to its first parked poll) takes its turn
        among `first_contacts` (`ca.first_contact`); the rest of the connection does not."""
        try:
            with trio.fail_after(self.cfg.handshake_timeout):
                await first_record(stream.socket)
            with trio.fail_after(FIRST_CONTACT_WAIT_S):
                turn = await self.first_contacts.acquire()
        except trio.TooSlowError:
            return
        try:
            await self._shake_and_serve(api, stream, partial(self.first_contacts.release, turn))
        finally:
            self.first_contacts.release(turn)

    async def _shake_and_serve(
        self, api: AgentApi, stream: trio.SocketStream, contact_over: Callable[[], None]
    ) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            address = f"{host}:{port}"
        except OSError:
            address = "unknown"
        ctx = self.tls_context
        assert ctx is not None
        conn = TLSStream(stream, ctx, server_side=True)
        try:
            if peer_gone(stream.socket):
                raise trio.BrokenResourceError("the agent left while it waited its turn")
            with trio.fail_after(self.cfg.handshake_timeout):
                await conn.do_handshake()
        except PeerRejected as exc:
            self._denied(exc.reason, str(exc), exc.peer_id, address)
            await conn.aclose()  # drops unread bytes first: the peer gets our alert
            return
        except TLSError as exc:
            if exc.reason is not None:
                self._denied(exc.reason, str(exc), None, address)
            await conn.aclose()  # drops unread bytes first: the peer gets our alert
            return
        except (trio.BrokenResourceError, trio.TooSlowError, trio.ClosedResourceError):
            await conn.aclose()  # drops unread bytes first: the peer gets our alert
            return
        ident = conn.peer_identity
        chain = conn.peer_chain
        try:
            known = (
                not isinstance(ident, SpiffeId)
                or str(ident) in self._on_record
                or await self.run_sync(partial(self._is_agent, ident))
            )
        except StoreUnavailable:
            # The database is away: every call but the (public) bundle needs it and will
            # answer 503 datastore_unavailable, which tells the agent to try another
            # server; closing here would only say "unreachable".
            known = True
        if not known and isinstance(ident, SpiffeId):
            self._denied("not_allowed", f"{ident} is not an agent on record", ident, address)
            await conn.aclose()
            return
        peer = AgentPeer(
            ident if isinstance(ident, SpiffeId) else None,
            serial_hex(chain[0].serial_number) if chain else None,
            address,
        )
        parked = False

        async def handle(req: http.Request) -> http.Response:
            nonlocal parked
            if not parked and req.query.get("wait", "0") != "0":
                parked = True  # the agent parks its poll: its first contact is over
                contact_over()
            return await api.handle(peer, req)

        async with conn:
            await http.serve_http(
                conn,
                handle,
                idle_timeout=api_idle_timeout(),
                request_timeout=self.cfg.request_timeout,
                drain=self.drain,
            )

    async def _admin_connection(self, api: AdminApi, stream: trio.SocketStream) -> None:
        """Serve one admin connection, or refuse it when ``admin_max_connections`` are open.

        A refused one still gets an answer (503 naming the cap, then close), read with a
        short deadline, so the CLI prints one clear line rather than a reset.
        """
        cred = stream_peer_credentials(stream)
        uid = cred.uid if cred else -1
        admission = self.admin_admission
        async with stream:
            reason = admission.admit(None)
            if reason is not None:
                await self._refuse_admin(stream, uid)
                return
            try:
                await self._serve_admin(api, stream, uid)
            finally:
                admission.release(None)

    async def _refuse_admin(self, stream: trio.SocketStream, uid: int) -> None:
        admission = self.admin_admission
        count = admission.report(trio.current_time())
        if count is not None:
            log.warning("admin.refused", reason="max_connections", refused=count, uid=uid)
        done = http.Drain()
        message = (
            f"admin socket busy: {admission.total} connections open"
            " (admin_max_connections); try again"
        )

        async def busy(request: http.Request) -> http.Response:
            done.start()  # one answer, then close
            return http.Response.json({"error": message, "code": "busy"}, status=503)

        await http.serve_http(stream, busy, idle_timeout=2, request_timeout=2, drain=done)

    async def _serve_admin(self, api: AdminApi, stream: trio.SocketStream, uid: int) -> None:
        await http.serve_http(
            stream,
            partial(api.handle, uid),
            idle_timeout=30,
            request_timeout=30,
            drain=self.drain,
        )

    def health(self) -> dict[str, object]:
        signer = self.keys.signer
        bundle = self.keys.bundle
        jwt_signer = self.jwt_keys.signer
        status = "ok" if signer is not None else "no signing key"
        if self.db_error is not None:
            status = "datastore unreachable"
        return {
            "status": status,
            "trust_domain": str(self.td),
            "server": self.server_name,
            "datastore": self.store.shown,
            "datastore_error": self.db_error,
            "signing_key": None
            if signer is None
            else {"id": signer.key_id, "not_after": iso(signer.not_after)},
            "bundle_sequence": None if bundle is None else bundle.sequence,
            "bundle_roots": 0 if bundle is None else len(bundle.x509_authorities),
            "svids_issued": self.authority.issued_total,
            "jwt_signing_key": None
            if jwt_signer is None
            else {"kid": jwt_signer.kid, "alg": jwt_signer.alg},
            "jwt_keys_published": len(self.jwt_keys.bundle.keys),
            "jwt_svids_issued": self.authority.jwt_issued_total,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }

    def ready(self) -> tuple[bool, str]:
        if self.db_error is not None:
            return False, f"datastore unreachable, signing nothing: {self.db_error}"
        if self.keys.signer is None:
            return False, "no active signing key"
        if self.tls_context is None:
            return False, "agent API not serving yet"
        return True, f"signing with {self.keys.signer.key_id}"

    async def _audit_verify_loop(self) -> None:
        """--audit-verify-every: the CA proves its own audit chain, and says when it cannot.

        A break is logged as ``audit.broken`` at every check until it is repaired, so a hook
        on that event hears of it (coalesced) and an operator who missed one line sees the
        next.  Read each round, so SIGHUP turns it on, off or changes the period.
        """
        while True:
            every = self.cfg.audit_verify_every
            await trio.sleep(every if every is not None else 60)
            if self.cfg.audit_verify_every is None:
                continue
            result = await self.run_sync(self.authority.check_audit)
            if result.ok:
                log.debug("audit.verified", records=result.records)

    async def reload(self) -> None:
        """SIGHUP (rule 5): apply the live settings of the re-read file."""
        if self._reload_config is None:
            log.warning("config.reload_failed", error="started without a config loader")
            return
        old = self.cfg
        new = await reread(old, self._reload_config, RESTART_ONLY, log)
        if new is None:
            return
        changed = [
            f.name for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(old, f.name)
        ]
        self.cfg = new
        setup_logging(new.log_level)
        self.hooks.update(check_hooks(new.hooks))
        self.authority.limits = _limits(new)
        self.authority.jwt_limits = jwt_limits(new)
        self.jwt_keys.policy = jwt_policy(new)
        throttle = ("attest_burst", "attest_refill", "token_max_failures")
        if any(name in changed for name in throttle):  # a new throttle forgets past failures
            self.authority.limit_attestation(
                new.attest_burst, float(new.attest_refill), new.token_max_failures
            )
        self.keys.policy = dataclasses.replace(
            self.keys.policy,
            intermediate_ttl=int(new.intermediate_ttl),
            root_ttl=int(new.root_ttl),
            root_propagation=int(new.root_propagation),
        )
        self._conn_limiter.total_tokens = new.max_connections
        log.info(
            "config.reloaded",
            changed=changed,
            default_svid_ttl=int(new.default_svid_ttl),
            max_svid_ttl=int(new.max_svid_ttl),
            max_connections=new.max_connections,
        )

    def _size_open_files(self) -> None:
        """Rule 6: room for ``max_connections``, or one line saying why there is not."""
        cfg = self.cfg
        needed = cfg.max_connections + cfg.admin_max_connections + OPEN_FILES_SPARE
        soft, hard = raise_open_files(needed)
        if soft < needed:
            log.warning(
                "ca.open_files_limited",
                open_files=soft,
                hard_limit=hard,
                needed=needed,
                max_connections=cfg.max_connections,
                detail=f"about {max(0, soft - OPEN_FILES_SPARE) // 2} agents can renew at"
                " once (two connections each; one at rest); raise the hard limit"
                " (ulimit -Hn, systemd LimitNOFILE) or lower max_connections",
            )

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._size_open_files()
        await self.run_sync(self._build_tls_context)
        agent_api = AgentApi(
            self.authority,
            self.run_sync,
            self.entries_changed,
            self.bundle_changed,
            on_denied=self._denied,
            overloaded=self._overloaded,
            signing=self.signing,
        )
        self.agent_api = agent_api

        async def keys_changed() -> None:
            # An operator's rotation is a key event (rule 5), whatever the tick finds.
            await self.refresh_keys(key_event=True)

        admin_api = AdminApi(
            self.authority,
            self.run_sync,
            self.entries_changed.wake,
            keys_changed,
            self.health,
            anchor_key=self.anchor_key,
            anchor_now=self.anchor,
            membership=self.membership,
        )
        agent_listener = await open_listener(self.cfg.listen)
        self.cfg.admin_socket.parent.mkdir(parents=True, exist_ok=True)
        admin_listener = await open_unix_listener(self.cfg.admin_socket, 0o600)
        addresses = {
            "listen": bound_address(agent_listener),
            "admin_socket": str(self.cfg.admin_socket),
        }
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as handlers:
                    async with trio.open_nursery() as services:
                        await services.start(self.hooks.run)
                        services.start_soon(self.signing.start)
                        services.start_soon(self._watch_lag)
                        services.start_soon(self._key_loop)
                        services.start_soon(self._anchor_loop)
                        services.start_soon(self._audit_verify_loop)
                        services.start_soon(watch_ready, self.ready)
                        if self.store.engine == "postgresql":
                            services.start_soon(self._watch_datastore)
                            services.start_soon(self._take_up_keys)
                            services.start_soon(
                                cluster.run_listener,
                                self.where.url,
                                self._on_notice,
                                self._on_reconnect,
                            )
                        services.start_soon(
                            partial(
                                accept_loop,
                                agent_listener,
                                handlers,
                                partial(self._agent_socket, agent_api),
                            )
                        )
                        services.start_soon(
                            partial(
                                trio.serve_listeners,
                                partial(self._admin_connection, admin_api),
                                [admin_listener],
                                handler_nursery=handlers,
                            )
                        )
                        if self.console is not None:
                            addresses["console"] = await services.start(
                                self.console.serve, handlers
                            )
                        if self.cfg.metrics is not None:
                            addresses["metrics"] = await services.start(
                                serve_health, self.cfg.metrics, self.registry, self.ready
                            )
                        if self.cfg.oidc_listen is not None and self.cfg.oidc_issuer:
                            addresses["oidc"] = await services.start(
                                serve_oidc,
                                self.cfg.oidc_listen,
                                self.cfg.oidc_issuer,
                                lambda: self.jwt_keys.bundle,
                                self.oidc_tls,
                                self.drain,
                            )
                        log.info(
                            "ca.started",
                            trust_domain=str(self.td),
                            datastore=self.store.shown,
                            server=self.server_name,
                            **addresses,
                        )
                        task_status.started(addresses)
                        async for signum in signals:
                            if signum == signal.SIGHUP:
                                await self.reload()
                                continue
                            log.info(
                                "ca.stopping",
                                signal=signal.Signals(signum).name,
                                drain_seconds=DRAIN_SECONDS,
                            )
                            break
                        services.cancel_scope.cancel()
                    # Idle connections close now, parked long polls answer now, requests in
                    # flight get DRAIN_SECONDS.
                    self.drain.start()
                    self.entries_changed.stop()
                    self.bundle_changed.stop()
                    handlers.cancel_scope.deadline = trio.current_time() + DRAIN_SECONDS
        finally:
            self.signing.close()
            self.cfg.admin_socket.unlink(missing_ok=True)
            self.store_thread.close()
            self.store.close()
        log.info("ca.stopped")


LAG_PROBE_S = 0.1
"""How often the lag probe asks to be woken."""
FIRST_CONTACTS = 64
"""Agents' first contacts run side by side; more wait their turn (`ca.first_contact`)."""
FIRST_CONTACT_LEASE_S = 2.0
"""Longest a first contact holds its turn (`ca.first_contact` rule 3)."""
FIRST_CONTACT_WAIT_S = 60.0
"""Longest a connection waits for its turn to shake hands; then it is closed unshaken, and
the agent comes back after its backoff.  20 s was tried: three herds of 10,000 agents
were fresh in 80 to 131 s (103 s with 60 s), with 2.1 to 3.6 connections per agent
instead of 1.5, so no gain for more churn (`bench.fleet`)."""
LAG_SHED_S = 1.0
"""Event-loop lag past which new agent connections are shed (rule 9)."""
SHED_REPORT_S = 10.0
"""Shortest spell between two ``ca.shedding`` lines: a herd is reported, not echoed."""
OPEN_FILES_SPARE = 256
"""Descriptors beyond the connection caps: the datastore, key files, listeners, logs."""


def raise_open_files(needed: int) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` toward ``needed``, as far as the hard limit allows.

    An agent holds one connection at rest (its poll) and two while it renews, so
    `max_connections` of 32,768 needs as many descriptors; the usual soft limit of
    1,024 would stop the CA at some 500 to 1,000 agents, each later one failing in
    accept with EMFILE.  The hard limit is the
    operator's (or systemd's ``LimitNOFILE``) to raise; the CA only uses what it is
    allowed.  Returns (soft limit now, hard limit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if ceiling > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError):
            pass
    return soft, hard


def _append_line(path: Path, anchor: Anchor) -> None:
    """One anchor per line, appended; the file holds public data, but 0600 like the rest."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (json.dumps(anchor.to_json(), separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


def api_idle_timeout() -> float:
    """Agents keep one connection open and long-poll on it; allow a poll plus margin."""
    return 90.0
