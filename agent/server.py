"""`tally agent run`: attest once, then keep identities fresh and serve them.

Rules:

1. A restart needs no token: the agent's own key and SVID are on disk.  A
   token is needed only on first start, after eviction, when the stored SVID
   is stale (the CA knows a newer one: a restored backup) or expired while the
   agent was down; then the agent says exactly that in one line instead of
   hanging.  Given a token, a refused stored SVID is replaced by re-attesting.
2. The newest bundle is kept on disk too, so an agent that was down through a
   root rotation still trusts the CA when it comes back.
3. One nursery: the CA loops (`agent.keeper`), the Workload API, metrics and
   the signal watcher.  SIGTERM drains the Workload API first (every call ends
   with a clean UNAVAILABLE, up to ``drain_timeout``), then stops the rest and
   removes the socket.
4. SIGHUP re-reads the ``--config`` file (`tally.ops.reload`): the log
   level, ``poll_wait`` and ``ca_timeout`` change at once (the next call to
   the CA takes them) and no Workload API stream is dropped; `RESTART_ONLY`
   keep their old value.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator

import trio
from prometheus_client.core import Metric

from agent import state
from agent.backend import AgentBackend
from agent.ca_client import CAClient, CAError, CAServers
from agent.keeper import SvidKeeper
from agent.renewal import FATAL_CODES
from agent.settings import AgentSettings
from agent.workload_server import WorkloadStats, serve_workload_api
from tally.ops import metrics
from tally.ops.admission import Admission
from tally.ops.clock import Clock, wall_clock
from tally.ops.errors import OperatorError
from tally.ops.health import serve_health, watch_ready
from tally.ops.hook_rules import check_hooks
from tally.ops.hooks import Hooks
from tally.ops.logs import get_logger, setup_logging
from tally.ops.net import open_unix_listener
from tally.ops.reload import reread
from tally.spiffe import pem, rotation, x509profile
from tally.spiffe.spiffeid import TrustDomain

log = get_logger("tally.agent")
# Changing these needs a restart; a reload that changes them says so and keeps the old value.
# The join token and the first-start bundle are read only at start, so they wait for one too.
RESTART_ONLY = (
    "trust_domain",
    "server",
    "trust_bundle",
    "join_token",
    "data_dir",
    "socket",
    "metrics",
)


class AgentStartError(OperatorError):
    pass


def _metrics(server: AgentServer) -> Iterator[Metric]:
    """What ``/metrics`` shows, read from the daemon's counters at scrape time."""
    keeper = server.keeper
    backend = server.backend
    if keeper is None or backend is None:
        return
    yield metrics.gauge("tally_agent_svids", "workload SVIDs held", len(keeper.svids))
    yield metrics.gauge("tally_agent_entries", "entries this agent serves", len(keeper.entries))
    yield metrics.counter("tally_agent_rotations", "SVIDs renewed", keeper.counters.rotations)
    yield metrics.counter_by(
        "tally_agent_rotation_failures",
        "failed calls to the CA, by reason",
        ["reason"],
        keeper.counters.by_reason,
    )
    yield metrics.gauge(
        "tally_agent_soonest_expiry_seconds",
        "seconds until the soonest held SVID (or the agent's own) expires",
        (keeper.soonest_expiry() - keeper.clock()).total_seconds(),
    )
    yield metrics.gauge(
        "tally_agent_bundle_sequence", "trust bundle sequence", keeper.bundle_sequence
    )
    yield metrics.gauge(
        "tally_agent_evicted", "1 once the CA evicted this agent", int(bool(keeper.evicted))
    )
    yield metrics.counter(
        "tally_agent_jwt_svids_fetched",
        "JWT-SVIDs fetched from the CA (the rest were served from the cache)",
        backend.jwt_cache.fetched,
    )
    jwt_keys = 0 if keeper.jwt_bundle is None else len(keeper.jwt_bundle.keys)
    yield metrics.gauge("tally_agent_jwt_keys", "JWT signing keys in the bundle held", jwt_keys)
    stats = server.workload_stats
    if stats is not None:
        yield metrics.gauge(
            "tally_agent_workload_clients",
            "Workload API connections open",
            stats.connections_open,
        )
        yield metrics.gauge(
            "tally_agent_workload_streams", "Workload API streams open", stats.streams_open
        )
        yield metrics.counter_by(
            "tally_agent_workload_requests",
            "Workload API calls finished, by method and status",
            ["method", "status"],
            stats.requests,
        )
    yield metrics.counter_by(
        "tally_agent_workload_refused",
        "Workload API connections refused over a cap, by reason",
        ["reason"],
        server.admission.refused,
    )
    yield metrics.counter(
        "tally_agent_workload_denied", "callers refused an identity", backend.stats.denied
    )


class AgentServer:
    def __init__(
        self,
        cfg: AgentSettings,
        clock: Clock = wall_clock,
        *,
        reload: Callable[[], AgentSettings] | None = None,
    ) -> None:
        self.cfg = cfg
        self._reload_config = reload
        self._client: CAClient | None = None
        self.clock = clock
        self.td = TrustDomain.parse(cfg.trust_domain)
        self.rng = random.Random()
        self.keeper: SvidKeeper | None = None
        self.backend: AgentBackend | None = None
        self.workload_stats: WorkloadStats | None = None
        self.admission = Admission(
            cfg.workload_max_connections, cfg.workload_max_connections_per_uid
        )
        self.hooks = Hooks("agent", check_hooks(cfg.hooks), identity=self._identity)
        self.registry = metrics.registry_of(
            lambda: [*_metrics(self), *self.hooks.metrics("tally_agent")]
        )
        state.prepare_dir(cfg.data_dir)
        stored = state.load_bundle(cfg.data_dir)
        if stored is not None:
            self.roots, self.sequence = stored
        elif cfg.trust_bundle is not None:
            try:
                self.roots = pem.chain_from_pem(cfg.trust_bundle.read_bytes())
            except (OSError, ValueError) as exc:
                raise AgentStartError(f"trust bundle {cfg.trust_bundle}: {exc}") from exc
            self.sequence = -1
        else:
            raise AgentStartError(
                "no trust bundle: give --trust-bundle (the CA's roots, from `tally ca bundle show`)"
                f" or keep the agent's data dir {cfg.data_dir}"
            )
        self.identity = state.load_identity(cfg.data_dir)

    def _usable(self, ident: state.AgentIdentity | None) -> bool:
        return ident is not None and ident.chain[0].not_valid_after_utc > self.clock()

    async def bootstrap(self, client: CAClient) -> state.AgentIdentity:
        ident = self.identity
        token = self.cfg.join_token
        if self._usable(ident):
            assert ident is not None
            client.set_identity(ident.chain, ident.key)
            if token is None or not await self._refused(client):
                log.info("agent.resumed", spiffe_id=str(x509profile.validate_leaf(ident.chain[0])))
                return ident
            # Evicted (or forgotten) while its SVID is still valid: the token brings it back.
            client.clear_identity()
        if token is None:
            if ident is not None:
                expired = ident.chain[0].not_valid_after_utc.isoformat()
                raise AgentStartError(
                    f"the agent's SVID expired at {expired} while it was down; "
                    "start it again with a new --join-token (tally ca token create)"
                )
            raise AgentStartError(
                f"no agent SVID in {self.cfg.data_dir}: give --join-token "
                "(tally ca token create) for the first start"
            )
        attempt = 0
        while True:
            key = x509profile.generate_key()
            try:
                issued, bundle_pem, sequence = await client.attest(token, key)
                break
            except CAError as exc:
                if exc.code != "unreachable":
                    raise AgentStartError(f"attestation refused by the CA: {exc.message}") from exc
                attempt += 1
                log.warning(
                    "rotation.failed", what="attestation", reason=exc.code, error=exc.message
                )
                await trio.sleep(rotation.backoff(attempt, self.rng))
        ident = state.AgentIdentity(key, issued.chain)
        state.save_identity(self.cfg.data_dir, ident)
        self.roots = pem.chain_from_pem(bundle_pem)
        self.sequence = sequence
        state.save_bundle(self.cfg.data_dir, self.roots, sequence)
        client.set_roots(self.roots)
        client.set_identity(ident.chain, ident.key)
        log.info("agent.attested", spiffe_id=issued.spiffe_id, serial=issued.serial)
        return ident

    async def _refused(self, client: CAClient) -> bool:
        """Does the CA refuse our stored identity?  Asked only when a token is at hand,
        so that a token kept in the environment is not spent on every restart."""
        try:
            await client.entries()
        except CAError as exc:
            if exc.code in FATAL_CODES:
                # A token the operator made for this agent's ID is the authority to take
                # over from whatever SVID the CA now holds for it (see `ca.authority`).
                log.info("agent.reattesting", reason=exc.code, detail=exc.message)
                return True
        return False

    def ready(self) -> tuple[bool, str]:
        keeper = self.keeper
        if keeper is None:
            return False, "not attested yet"
        if keeper.stale:
            return (
                False,
                "stale state: the CA knows a newer SVID for this agent; needs a new join token",
            )
        if keeper.evicted:
            return False, f"evicted by the CA ({keeper.evicted}); needs a new join token"
        if not keeper.entries_synced:
            return False, "entries not fetched from the CA yet"
        missing = [e.spiffe_id for eid, e in keeper.entries.items() if eid not in keeper.svids]
        if missing:
            return False, f"no SVID yet for {', '.join(sorted(missing)[:3])}"
        risky = keeper.at_risk()
        if risky:
            return False, f"close to expiry with no successor: {', '.join(sorted(risky)[:3])}"
        return True, f"{len(keeper.svids)} SVIDs fresh"

    def _identity(self) -> str | None:
        """This agent's SPIFFE ID, for hook payloads about no other identity."""
        return self.keeper.agent_id if self.keeper is not None else None

    async def reload(self) -> None:
        """SIGHUP (rule 4): apply the live settings of the re-read file."""
        if self._reload_config is None:
            log.warning("config.reload_failed", error="started without a config loader")
            return
        new = await reread(self.cfg, self._reload_config, RESTART_ONLY, log)
        if new is None:
            return
        self.cfg = new
        setup_logging(new.log_level)
        self.hooks.update(check_hooks(new.hooks))
        if self._client is not None:
            self._client.timeout = float(new.ca_timeout)
        if self.keeper is not None:
            self.keeper.poll_wait = float(new.poll_wait)
        log.info(
            "config.reloaded",
            log_level=new.log_level,
            poll_wait=float(new.poll_wait),
            ca_timeout=float(new.ca_timeout),
        )

    async def _serve_workloads(
        self,
        listener: trio.SocketListener,
        drain: trio.Event,
        served: trio.Event,
        *,
        task_status: trio.TaskStatus[WorkloadStats] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self.backend is not None
        try:
            await serve_workload_api(
                listener,
                self.backend,
                admission=self.admission,
                drain=drain,
                task_status=task_status,
            )
        finally:
            served.set()

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.cfg
        servers = CAServers(cfg.server_addresses(), self.rng)
        client = CAClient(servers, self.td, self.roots, timeout=float(cfg.ca_timeout))
        self._client = client
        cfg.socket.parent.mkdir(parents=True, exist_ok=True)
        listener = await open_unix_listener(cfg.socket, 0o666)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.hooks.run)
                nursery.start_soon(watch_ready, self.ready)
                nursery.start_soon(client.close_idle)  # one connection to the CA at rest
                addresses = {"socket": str(cfg.socket)}
                if cfg.metrics is not None:
                    addresses["metrics"] = await nursery.start(
                        serve_health, cfg.metrics, self.registry, self.ready
                    )
                ident = await self.bootstrap(client)
                self.keeper = SvidKeeper(
                    client,
                    ident,
                    self.roots,
                    self.sequence,
                    cfg.data_dir,
                    clock=self.clock,
                    rng=self.rng,
                    poll_wait=float(cfg.poll_wait),
                )
                self.backend = AgentBackend(self.keeper, str(self.td.id()))
                nursery.start_soon(self.keeper.run)
                drain = trio.Event()
                served = trio.Event()
                self.workload_stats = await nursery.start(
                    self._serve_workloads, listener, drain, served
                )
                log.info(
                    "agent.started",
                    spiffe_id=self.keeper.agent_id,
                    ca_server=str(client.server),
                    **addresses,
                )
                task_status.started(addresses)
                with trio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT, signal.SIGHUP
                ) as signals:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            await self.reload()
                            continue
                        log.info("agent.stopping", signal=signal.Signals(signum).name)
                        break
                drain.set()  # rule 3: every Workload API call ends cleanly, within a deadline
                with trio.move_on_after(float(self.cfg.drain_timeout)):
                    await served.wait()
                nursery.cancel_scope.cancel()
        finally:
            cfg.socket.unlink(missing_ok=True)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await client.aclose()
        log.info("agent.stopped")
