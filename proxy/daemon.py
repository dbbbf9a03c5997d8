"""The proxy daemon: its nurseries, the accept loop, readiness, reload and drain.

The work is elsewhere: `proxy.hotswap` (the identity and TLS context new
handshakes take), `proxy.traffic` (what every connection shares),
`proxy.inbound` (server mode), `proxy.outbound` (client mode) and
`proxy.http_relay` (HTTP mode).  This module starts and stops them.

Rules / theory of operation:

1. Hot swap is one assignment (`proxy.hotswap` rule 1); the identity source
   runs in the services nursery and publishes into it.
2. Authorization runs inside the handshake (`tally.tls.stream` rule 4) through
   `tally.spiffe.authz`; a refused peer never reaches the target.  Every refusal is
   one ``peer.denied`` line and one count by reason.
3. Two nurseries, as DESIGN says: `services` (source, pool sweep, accept
   loop) and `handlers` (one task per connection).  SIGTERM cancels the
   services, closes the listener, wakes HTTP connections idling between
   requests so they close, and gives the rest ``drain_timeout``; a second
   SIGTERM cuts them at once.  The signal receiver lives until the end, so a
   SIGHUP during the drain is handled rather than killing the process.
4. ``max_connections`` is a capacity limiter taken *before* accept: beyond
   it, new connections wait in the kernel's backlog instead of being accepted
   and dropped (ghostunnel's limit works the same way).  SIGHUP can change it.
5. Each connection's handler catches its own errors: one broken connection
   never takes the proxy down.
6. As one of ``--workers`` (`proxy.workers`, a `WorkerSlot`), the proxy binds
   its share of the listener (`proxy.listen` rule 3), takes its exact share
   of ``max_connections`` (`WorkerSlot.share`, again at every SIGHUP), names
   its start and stop ``proxy.worker_started``/``proxy.worker_stopped`` (the
   supervisor says ``proxy.started`` for the whole) and leaves a Unix socket
   path to the supervisor.  Should the supervisor die, the worker drains as
   on SIGTERM (`_orphaned`).  Everything else, its identity source
   included, is the single proxy's.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from proxy import listen
from proxy.bearer import BearerGate, BearerHooks, TokenSource
from proxy.hotswap import HotSwap, Mode
from proxy.identity import FileSource, IdentityError, Signature, WorkloadSource
from proxy.inbound import dial_service, serve_inbound
from proxy.metrics import ProxyCollector, Stats
from proxy.outbound import dial_server, serve_outbound
from proxy.pool import CLOSE_TIMEOUT_S, Pool, close_quietly
from proxy.settings import ClientSettings, FileSourceSpec, ServerSettings, WorkloadSourceSpec
from proxy.traffic import Traffic
from tally.ops import metrics
from tally.ops.clock import Clock, wall_clock
from tally.ops.errors import CommandError
from tally.ops.health import serve_health, watch_ready
from tally.ops.hook_rules import check_hooks
from tally.ops.hooks import Hooks
from tally.ops.logs import HELD_FLUSH_S, flush_held, get_logger, setup_logging
from tally.ops.net import ACCEPT_CAPACITY_ERRNOS, ListenError
from tally.ops.reload import reread
from tally.spiffe.spiffeid import SpiffeId

log = get_logger("tally.proxy")

# Changing these needs a restart; a reload that changes them says so and keeps the old value.
RESTART_ONLY = (
    "listen",
    "target",
    "workload_socket",
    "spiffe_id",
    "cert",
    "key",
    "bundle",
    "federated_bundle",
    "http",
    "metrics",
    "tls_groups",
    "workers",
)
ORPHAN_CHECK_S = 1.0


@dataclass(frozen=True)
class WorkerSlot:
    """Which of ``count`` workers this process is, and the Unix listener it inherited."""

    index: int
    count: int
    fd: int | None = None
    parent: int | None = None
    """The supervisor's pid: should this process's parent change, it has died."""

    def share(self, total: int) -> int:
        """This worker's part of ``total`` connections: the parts add up to it exactly."""
        return total // self.count + (1 if self.index < total % self.count else 0)

    @classmethod
    def parse(cls, text: str, fd: int | None, parent: str | None = None) -> WorkerSlot:
        index, _, count = text.partition("/")
        slot = cls(int(index), int(count), fd, int(parent) if parent else None)
        if not 0 <= slot.index < slot.count:
            raise ValueError(f"bad worker slot {text!r}")
        return slot


class Proxy:
    def __init__(
        self,
        cfg: ServerSettings | ClientSettings,
        *,
        reload: Callable[[], ServerSettings | ClientSettings],
        env: dict[str, str],
        clock: Clock = wall_clock,
        worker: WorkerSlot | None = None,
    ) -> None:
        mode: Mode = "server" if isinstance(cfg, ServerSettings) else "client"
        self.worker = worker
        self.mode = mode
        self._reload_config = reload
        self.clock = clock
        self.stats = Stats()
        self.swap = HotSwap(mode, cfg.policy(), groups=cfg.tls_groups, stats=self.stats)
        self.traffic = Traffic(cfg, mode=mode, clock=clock, stats=self.stats, swap=self.swap)
        self.limiter = trio.CapacityLimiter(self._connection_share(cfg.max_connections))
        spec = cfg.source(env)
        want = SpiffeId.parse(cfg.spiffe_id) if cfg.spiffe_id is not None else None
        self.source: FileSource | WorkloadSource
        if isinstance(spec, FileSourceSpec):
            self.source = FileSource(
                spec.cert, spec.key, spec.bundle, spec.federated, want=want, clock=clock
            )
        else:
            self.source = WorkloadSource(spec.endpoint_socket, want=want, clock=clock)
        if cfg.http:
            self.traffic.pool = Pool(
                partial(dial_server if mode == "client" else dial_service, self.traffic),
                max_idle=cfg.pool_size,
                idle_s=cfg.pool_idle_timeout,
                stats=self.stats,
            )
        self.hooks = Hooks("proxy", check_hooks(cfg.hooks), identity=self._identity)
        self._bearer_socket: Path | None = None
        if cfg.http and isinstance(spec, WorkloadSourceSpec):
            self.traffic.bearer = bearer_hooks(cfg, spec.endpoint_socket)
            self._bearer_socket = spec.endpoint_socket
        if isinstance(cfg, ServerSettings) and not cfg.client_cert:
            self.swap.client_auth = "none"
        collector = ProxyCollector(self.stats, self.swap.svid_info, clock, mode)
        self.registry = metrics.registry_of(
            lambda: [*collector.collect(), *self.hooks.metrics("tally_proxy")]
        )
        self.addresses: dict[str, str] = {}
        self._stop = trio.Event()
        self._stopping = False
        self.serving = trio.Event()
        """Set once the listener accepts connections (after the first SVID)."""
        self._handlers: trio.Nursery | None = None
        self._file_signature: Signature = ()

    def _connection_share(self, total: int) -> int:
        return total if self.worker is None else self.worker.share(total)

    def _identity(self) -> str | None:
        """Who this proxy is, for hook payloads about no other identity."""
        cur = self.swap.current
        return str(cur.identity.spiffe_id) if cur is not None else None

    @property
    def cfg(self) -> ServerSettings | ClientSettings:
        """The settings in force: a SIGHUP replaces them in `Traffic`, the one copy."""
        return self.traffic.cfg

    async def _run_source(self) -> None:
        if isinstance(self.source, FileSource):
            await self.source.run(self.swap.publish, self._file_signature)
        else:
            await self.source.run(self.swap.publish)

    # -- readiness ------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "draining: not accepting new connections"
        cur = self.swap.current
        if cur is None:
            why = self.source.last_error or "no answer yet"
            return False, f"waiting for the first SVID from {self.source.describe()}: {why}"
        if not self.serving.is_set():
            return False, "starting"
        bearer = self.traffic.bearer
        if bearer is not None and bearer.require is not None and not bearer.require.ready.is_set():
            return False, "waiting for the JWT bundles (--require-jwt) from the Workload API"
        ident = cur.identity
        left = (ident.not_after - self.clock()).total_seconds()
        if left <= 0:
            return False, (
                f"SVID {ident.serial} expired {-left:.0f}s ago and no new one arrived"
                f" ({self.source.last_error or 'no error reported'})"
            )
        return True, f"serving as {ident.spiffe_id}, SVID serial {ident.serial}, {left:.0f}s left"

    async def _connection(self, stream: trio.SocketStream, token: object) -> None:
        self.stats.connections_open += 1
        self.stats.connections_total += 1
        try:
            if self.mode == "server":
                await serve_inbound(self.traffic, stream)
            else:
                await serve_outbound(self.traffic, stream)
        except Exception as exc:  # rule 5
            log.error("connection.crashed", error=exc)
        finally:
            if stream.socket.fileno() != -1:  # the handler closes it on every normal path
                await close_quietly(stream)
            self.stats.connections_open -= 1
            self.limiter.release_on_behalf_of(token)

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        while True:
            token = object()
            try:  # the accept below is the loop's checkpoint; this need not be another
                self.limiter.acquire_on_behalf_of_nowait(token)
            except trio.WouldBlock:
                await self.limiter.acquire_on_behalf_of(token)
            try:
                stream = await listener.accept()
            except OSError as exc:
                self.limiter.release_on_behalf_of(token)
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept.failed", error=exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                self.limiter.release_on_behalf_of(token)
                raise
            handlers.start_soon(self._connection, stream, token)

    async def _serve_when_ready(self, sock: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        await self.swap.first.wait()
        listener = listen.start_listening(sock)
        self.serving.set()
        cur = self.swap.current
        assert cur is not None
        log.info(
            "proxy.started" if self.worker is None else "proxy.worker_started",
            **({"worker": self.worker.index} if self.worker is not None else {}),
            mode=self.mode,
            http=self.cfg.http,
            target=str(self.cfg.target),
            spiffe_id=str(cur.identity.spiffe_id),
            serial=cur.identity.serial,
            source="file" if isinstance(self.source, FileSource) else "workload",
            **self.addresses,
        )
        try:
            await self._accept_loop(listener, handlers)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await listener.aclose()

    async def _reload(self) -> None:
        """SIGHUP: re-read the config file, apply what can change live, reload the files."""
        if isinstance(self.source, FileSource):
            self.source.reload_now()
        new = await reread(self.cfg, self._reload_config, RESTART_ONLY, log)
        if new is None:
            return
        self.traffic.cfg = new
        policy = new.policy()
        self.limiter.total_tokens = self._connection_share(new.max_connections)
        setup_logging(new.log_level)
        pool = self.traffic.pool
        if pool is not None:
            pool.max_idle = new.pool_size
            pool.idle_s = new.pool_idle_timeout
        self.swap.set_policy(policy)
        self.hooks.update(check_hooks(new.hooks))
        if self.traffic.bearer is not None and self.traffic.bearer.require is not None:
            self.traffic.bearer.require.policy = policy
        log.info(
            "config.reloaded",
            rules=policy.describe(),
            max_connections=new.max_connections,
            max_peer_lifetime=new.max_peer_lifetime,
            max_peer_age=new.max_peer_age,
            hooks=[spec.describe() for spec in self.hooks.specs],
        )

    async def _signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self._reload()
                elif not self._stopping:
                    log.info(
                        "proxy.draining",
                        signal=signal.Signals(signum).name,
                        open_connections=self.stats.connections_open,
                        drain_timeout_s=self.cfg.drain_timeout,
                    )
                    self._stopping = True
                    self._stop.set()
                elif self._handlers is not None:
                    log.info("proxy.drain_cut", open_connections=self.stats.connections_open)
                    self._handlers.cancel_scope.cancel()

    async def _orphaned(self, parent: int) -> None:
        """Rule 6: a worker whose supervisor died drains and exits, as on SIGTERM."""
        while True:  # a poll: no event announces a dead parent
            await trio.sleep(ORPHAN_CHECK_S)
            if os.getppid() != parent:
                break
        if not self._stopping:
            log.info("proxy.draining", why="the supervisor is gone")
            self._stopping = True
            self._stop.set()

    def _load_first(self) -> None:
        """The file source's first load happens before anything listens: bad files end the start."""
        if isinstance(self.source, FileSource):
            self._file_signature = self.source.signature()
            try:
                self.swap.publish(self.source.load())
            except IdentityError as exc:
                raise CommandError(f"identity: {exc}") from exc

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self.worker is not None and self.worker.fd is not None:
            sock = listen.adopt(self.worker.fd)
        else:
            sock = await listen.bind(self.cfg.listen, reuse_port=self.worker is not None)
        self.addresses["listen"] = listen.bound_name(sock)
        try:
            self._load_first()
            async with trio.open_nursery() as outer:
                await outer.start(self._signals)
                await outer.start(self.hooks.run)
                await outer.start(self.traffic.relay.run)
                if self.cfg.http:  # only HTTP mode holds lines (`http` needs a restart)
                    outer.start_soon(_write_held_lines)
                if self.cfg.metrics is not None:
                    try:
                        self.addresses["metrics"] = await outer.start(
                            serve_health, self.cfg.metrics, self.registry, self.ready
                        )
                    except ListenError as exc:
                        raise CommandError(f"--metrics: {exc}") from exc
                async with trio.open_nursery() as handlers:
                    self._handlers = handlers
                    async with trio.open_nursery() as services:
                        services.start_soon(self._run_source)
                        services.start_soon(watch_ready, self.ready)
                        if self.worker is not None and self.worker.parent is not None:
                            outer.start_soon(self._orphaned, self.worker.parent)
                        bearer = self.traffic.bearer
                        if bearer is not None and bearer.require is not None:
                            assert self._bearer_socket is not None
                            services.start_soon(bearer.require.watch, self._bearer_socket)
                        if self.traffic.pool is not None:
                            await services.start(self.traffic.pool.run)
                        services.start_soon(self._serve_when_ready, sock, handlers)
                        if self.swap.current is None:
                            log.info(
                                "proxy.waiting",
                                source=self.source.describe(),
                                **self.addresses,
                            )
                        task_status.started(self.addresses)
                        await self._stop.wait()
                        services.cancel_scope.cancel()
                    self.traffic.idlers.drain()
                    handlers.cancel_scope.deadline = trio.current_time() + self.cfg.drain_timeout
                outer.cancel_scope.cancel()
        finally:
            sock.close()
            if self.cfg.listen.path is not None and self.worker is None:  # rule 6
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await trio.Path(self.cfg.listen.path).unlink(missing_ok=True)
        log.info(
            "proxy.stopped" if self.worker is None else "proxy.worker_stopped",
            connections_total=self.stats.connections_total,
            open_connections=self.stats.connections_open,
        )


async def _write_held_lines() -> None:
    """HTTP mode's request lines are held (`tally.ops.logs` rule 5): write them this often."""
    while True:
        await trio.sleep(HELD_FLUSH_S)
        flush_held()


def bearer_hooks(cfg: ServerSettings | ClientSettings, endpoint_socket: Path) -> BearerHooks | None:
    """`proxy.bearer` for --inject-jwt (client) or --require-jwt (server), if set."""
    if isinstance(cfg, ClientSettings) and cfg.inject_jwt is not None:
        return BearerHooks(inject=TokenSource(endpoint_socket, cfg.inject_jwt, cfg.spiffe_id))
    if isinstance(cfg, ServerSettings) and cfg.require_jwt is not None:
        return BearerHooks(require=BearerGate(cfg.require_jwt, cfg.policy()))
    return None
