"""The proxy daemon: listener, handshakes, forwarding, hot swap, reload and drain.

Rules / theory of operation:

1. Hot swap is one assignment.  Each identity the source publishes (and each
   reload that changes the allow rules) becomes a new immutable TLS context,
   built right there in the source's task, and is published together with
   the identity as one `Current` value.  A handshake takes whatever is current
   when it starts; connections already up keep the context they began with.
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
"""

from __future__ import annotations

import dataclasses
import errno
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import listen, xfcc
from proxy.http import (
    DownstreamError,
    Exchange,
    HttpStream,
    Idlers,
    UpstreamError,
    exchange,
    has_body,
    next_request,
    request_headers,
    respond_error,
)
from proxy.identity import FileSource, Identity, IdentityError, Signature, WorkloadSource
from proxy.metrics import ProxyCollector, Stats, SvidInfo, registry_for
from proxy.pool import CLOSE_TIMEOUT_S, RETIRE_MARGIN_S, DialError, Pool, Upstream, close_quietly
from proxy.settings import ClientSettings, FileSourceSpec, ServerSettings
from proxy.tcp import Deadline, Relay
from tally.ops import net
from tally.ops.config import ConfigError
from tally.ops.errors import CommandError
from tally.ops.health import serve_health
from tally.ops.logs import get_logger, setup_logging
from tally.ops.net import ListenError
from tally.spiffe import authz
from tally.spiffe.spiffeid import SpiffeId
from tally.tls import stream as tls
from tally.tls.plain import PlainStream

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
)
XFCC = xfcc.HEADER.encode("ascii")
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def wall_clock() -> datetime:
    return datetime.now(UTC)


def make_verifier(identity: Identity, policy: authz.Policy) -> tls.PeerVerifier:
    trusted = identity.trusted()

    def verify(chain: list[x509.Certificate]) -> SpiffeId:
        try:
            return authz.check_chain(chain, trusted, policy)
        except authz.Refused as exc:
            raise tls.PeerRejected(exc.reason, str(exc), exc.peer_id) from exc

    return verify


@dataclass(frozen=True)
class Current:
    """What new handshakes use: published in one assignment (rule 1)."""

    identity: Identity
    context: tls.TLSContext


@dataclass(frozen=True)
class Peer:
    spiffe_id: SpiffeId
    leaf: x509.Certificate
    expires_at: float
    """trio time when its certificate expires (inf with --allow-expired-peer-connections)."""


def _address_of(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            name = stream.socket.getpeername()
        except OSError:
            return "unknown"
        if isinstance(name, tuple):
            return f"{name[0]}:{name[1]}"
    return "unix"


class Proxy:
    def __init__(
        self,
        cfg: ServerSettings | ClientSettings,
        *,
        reload: Callable[[], ServerSettings | ClientSettings],
        env: dict[str, str],
        clock: Callable[[], datetime] = wall_clock,
    ) -> None:
        self.cfg = cfg
        self.mode = "server" if isinstance(cfg, ServerSettings) else "client"
        self._reload_config = reload
        self.clock = clock
        self.policy = cfg.policy()
        self.current: Current | None = None
        self.stats = Stats()
        self.idlers = Idlers()
        self.relay = Relay()
        self.limiter = trio.CapacityLimiter(cfg.max_connections)
        spec = cfg.source(env)
        want = SpiffeId.parse(cfg.spiffe_id) if cfg.spiffe_id is not None else None
        self.source: FileSource | WorkloadSource
        if isinstance(spec, FileSourceSpec):
            self.source = FileSource(
                spec.cert, spec.key, spec.bundle, spec.federated, want=want, clock=clock
            )
        else:
            self.source = WorkloadSource(spec.endpoint_socket, want=want, clock=clock)
        self.pool: Pool | None = None
        if cfg.http:
            self.pool = Pool(
                self._dial if self.mode == "client" else self._dial_target,
                max_idle=cfg.pool_size,
                idle_s=cfg.pool_idle_timeout,
                stats=self.stats,
            )
        self.registry = registry_for(ProxyCollector(self.stats, self._svid_info, clock, self.mode))
        self.addresses: dict[str, str] = {}
        self._first = trio.Event()
        self._stop = trio.Event()
        self._stopping = False
        self.serving = trio.Event()
        """Set once the listener accepts connections (after the first SVID)."""
        self._handlers: trio.Nursery | None = None
        self._file_signature: Signature = ()

    # -- identity and hot swap ------------------------------------------------------------

    def _svid_info(self) -> SvidInfo | None:
        cur = self.current
        if cur is None:
            return None
        ident = cur.identity
        return SvidInfo(str(ident.spiffe_id), ident.serial, ident.not_after)

    def _context_for(self, identity: Identity) -> tls.TLSContext:
        verifier = make_verifier(identity, self.policy)
        if self.mode == "server":
            return tls.server_context(
                identity.chain,
                identity.key,
                roots=identity.roots(),
                client_auth="required",
                verifier=verifier,
                groups=self.cfg.tls_groups,
            )
        return tls.client_context(
            roots=identity.roots(),
            chain=identity.chain,
            key=identity.key,
            verifier=verifier,
            groups=self.cfg.tls_groups,
        )

    def publish(self, identity: Identity) -> None:
        """Put a checked identity into service for every handshake from now on (rule 1)."""
        old = self.current.identity if self.current is not None else None
        if identity.same_as(old):
            return
        try:
            context = self._context_for(identity)
        except ValueError as exc:
            log.warning("identity.update_rejected", reason="tls_context", error=str(exc))
            return
        self.current = Current(identity, context)
        fields: dict[str, object] = {
            "spiffe_id": str(identity.spiffe_id),
            "serial": identity.serial,
            "not_after": identity.not_after.isoformat(),
            "trust_domains": sorted(td.name for td in identity.bundles),
        }
        if old is None:
            log.info("svid.loaded", **fields)
            self._first.set()
            return
        self.stats.rotations += 1
        if old.chain != identity.chain:
            log.info("svid.rotated", old_serial=old.serial, **fields)
        if old.trusted() != identity.trusted():
            log.info("bundle.updated", **fields)

    def _rebuild_for_policy(self) -> None:
        cur = self.current
        if cur is not None:
            self.current = Current(cur.identity, self._context_for(cur.identity))

    async def _run_source(self) -> None:
        if isinstance(self.source, FileSource):
            await self.source.run(self.publish, self._file_signature)
        else:
            await self.source.run(self.publish)

    # -- readiness ------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "draining: not accepting new connections"
        cur = self.current
        if cur is None:
            why = self.source.last_error or "no answer yet"
            return False, f"waiting for the first SVID from {self.source.describe()}: {why}"
        if not self.serving.is_set():
            return False, "starting"
        ident = cur.identity
        left = (ident.not_after - self.clock()).total_seconds()
        if left <= 0:
            return False, (
                f"SVID {ident.serial} expired {-left:.0f}s ago and no new one arrived"
                f" ({self.source.last_error or 'no error reported'})"
            )
        return True, f"serving as {ident.spiffe_id}, SVID serial {ident.serial}, {left:.0f}s left"

    # -- handshakes -----------------------------------------------------------------------

    def _expires_at(self, leaf: x509.Certificate) -> float:
        if self.cfg.allow_expired_peer_connections:
            return math.inf
        left = (leaf.not_valid_after_utc - self.clock()).total_seconds()
        return trio.current_time() + left

    def _denied(self, reason: str, detail: str, peer_id: SpiffeId | None, where: str) -> None:
        label = reason.split(":", 1)[0]
        self.stats.handshakes["denied"] += 1
        self.stats.denied[label] += 1
        log.warning(
            "peer.denied",
            peer_id=str(peer_id) if peer_id is not None else None,
            reason=label,
            detail=detail,
            peer=where,
            mode=self.mode,
        )

    async def _handshake(self, stream: tls.TLSStream, where: str) -> Peer | None:
        """Run and judge a handshake; None (after logging and counting) if it failed."""
        with trio.move_on_after(self.cfg.handshake_timeout):
            try:
                await stream.do_handshake()
            except tls.PeerRejected as exc:
                self._denied(exc.reason, str(exc), exc.peer_id, where)
                return None
            except tls.TLSError as exc:
                if exc.reason is not None:
                    self._denied(exc.reason, str(exc), None, where)
                else:
                    self.stats.handshakes["failed"] += 1
                    log.info("handshake.failed", peer=where, error=str(exc), mode=self.mode)
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.stats.handshakes["failed"] += 1
                log.debug("handshake.failed", peer=where, error=exc, mode=self.mode)
                return None
            verified = stream.peer_identity
            chain = stream.peer_chain
            if not isinstance(verified, SpiffeId) or not chain:  # pragma: no cover - tls rule 4
                self.stats.handshakes["failed"] += 1
                return None
            self.stats.handshakes["resumed" if stream.resumed else "ok"] += 1
            leaf = chain[0]
            return Peer(verified, leaf, self._expires_at(leaf))
        self.stats.handshakes["timeout"] += 1
        log.info("handshake.timeout", peer=where, timeout_s=self.cfg.handshake_timeout)
        return None

    # -- the target -----------------------------------------------------------------------

    async def _connect_target(self) -> trio.SocketStream:
        """A connection to --target, or DialError."""
        try:
            with trio.fail_after(self.cfg.connect_timeout):
                return await net.connect(self.cfg.target)
        except trio.TooSlowError as exc:
            raise DialError(f"connecting to {self.cfg.target} timed out", timeout=True) from exc
        except OSError as exc:
            raise DialError(f"cannot connect to {self.cfg.target}: {exc.strerror or exc}") from exc

    async def _dial_target(self) -> Upstream:
        """Server mode, HTTP: a plain connection to the service for the pool."""
        stream = PlainStream(await self._connect_target())
        return Upstream(stream, HttpStream(stream, h11.CLIENT), None, math.inf)

    async def _dial(self) -> Upstream:
        """Client mode: a verified mTLS connection to the server proxy at --target."""
        cur = self.current
        assert cur is not None
        transport = await self._connect_target()
        stream = tls.TLSStream(transport, cur.context, server_side=False)
        peer = await self._handshake(stream, str(self.cfg.target))
        if peer is None:
            await close_quietly(stream)
            raise DialError(f"TLS handshake with {self.cfg.target} failed")
        own_left = (cur.identity.not_after - self.clock()).total_seconds()
        retire_at = min(peer.expires_at, trio.current_time() + own_left) - RETIRE_MARGIN_S
        return Upstream(
            stream, HttpStream(stream, h11.CLIENT), peer.spiffe_id, retire_at, peer.expires_at
        )

    def _count_to(self, n: int) -> None:
        self.stats.bytes_to_target += n

    def _count_from(self, n: int) -> None:
        self.stats.bytes_from_target += n

    def _ended(self, why: str, peer_id: SpiffeId | None) -> None:
        """Note why a connection ended: closed, reset, idle, draining, bad_request, peer_expired."""
        if why == "peer_expired":
            self.stats.closed_peer_expired += 1
            log.info("connection.peer_expired", peer_id=str(peer_id))
        else:
            log.debug("connection.ended", why=why, peer_id=str(peer_id) if peer_id else None)

    # -- server mode ----------------------------------------------------------------------

    async def _serve_inbound(self, stream: trio.SocketStream) -> None:
        cur = self.current
        assert cur is not None
        where = _address_of(stream)
        conn = tls.TLSStream(stream, cur.context, server_side=True)
        peer = await self._handshake(conn, where)
        if peer is None:
            await close_quietly(conn)
            return
        try:
            if self.cfg.http:
                stamp = xfcc.proxy_element(
                    str(cur.identity.spiffe_id),
                    peer.leaf.public_bytes(serialization.Encoding.DER),
                    str(peer.spiffe_id),
                )
                await self._relay_http(
                    conn, caller=peer.spiffe_id, hard_at=peer.expires_at, stamp=stamp.encode()
                )
            else:
                await self._tcp(conn, peer)
        finally:
            await close_quietly(conn)

    async def _tcp(self, conn: tls.TLSStream, peer: Peer) -> None:
        """Splice an authenticated connection to the target (both modes)."""
        try:
            target = PlainStream(await self._connect_target())
        except DialError as exc:
            log.warning("target.unreachable", target=str(self.cfg.target), error=str(exc))
            return
        try:
            why = await self.relay.splice(
                conn,
                target,
                Deadline(self.cfg.idle_timeout, peer.expires_at),
                self._count_to,
                self._count_from,
            )
            self._ended(why, peer.spiffe_id)
        finally:
            await close_quietly(target)

    def _access(self, ex: Exchange, peer_id: SpiffeId | None) -> None:
        self.stats.requests[f"{ex.status // 100}xx"] += 1
        if self.cfg.access_log:
            log.info(
                "http.request",
                method=ex.method,
                path=ex.target,
                status=ex.status,
                peer_id=str(peer_id) if peer_id is not None else None,
                bytes_in=ex.bytes_in,
                bytes_out=ex.bytes_out,
                duration_ms=ex.duration_ms,
            )

    @staticmethod
    async def _fail(down: HttpStream, ex: Exchange, exc: UpstreamError | DialError) -> None:
        if not ex.response_started:
            ex.status = 504 if exc.timeout else 502
            await respond_error(
                down, ex.status, "upstream timed out" if exc.timeout else "bad gateway"
            )

    # -- client mode ----------------------------------------------------------------------

    async def _serve_outbound(self, accepted: trio.SocketStream) -> None:
        stream = PlainStream(accepted)
        try:
            if self.cfg.http:
                await self._relay_http(stream, caller=None, hard_at=math.inf, stamp=None)
                return
            try:
                up = await self._dial()
            except DialError as exc:
                log.warning("target.failed", target=str(self.cfg.target), error=str(exc))
                return
            try:
                # `_dial` makes TLS streams; the pool's type is wider only for its tests.
                assert isinstance(up.stream, tls.TLSStream)
                why = await self.relay.splice(
                    stream,
                    up.stream,
                    Deadline(self.cfg.idle_timeout, up.peer_expires_at),
                    self._count_to,
                    self._count_from,
                )
                self._ended(why, up.peer_id)
            finally:
                await close_quietly(up.stream)
        finally:
            await close_quietly(stream)

    # -- HTTP mode (both directions) ------------------------------------------------------

    async def _relay_http(
        self,
        stream: trio.abc.Stream,
        *,
        caller: SpiffeId | None,
        hard_at: float,
        stamp: bytes | None,
    ) -> None:
        """Serve requests from ``stream``, each through a pooled connection to the target.

        ``caller`` is the authenticated peer in server mode (None for the local
        app in client mode), ``hard_at`` when its certificate expires, and
        ``stamp`` the XFCC value that replaces any the caller sent.
        """
        down = HttpStream(stream, h11.SERVER)
        drop = frozenset({XFCC}) if stamp is not None else frozenset()
        add = [(XFCC, stamp)] if stamp is not None else []

        def closing() -> bool:
            return self.idlers.draining or trio.current_time() >= hard_at

        while True:
            request, why = await next_request(down, self.idlers, self.cfg.idle_timeout, hard_at)
            if request is None:
                self._ended(why, caller)
                return
            ex = Exchange(
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"),
            )
            if request.method == b"CONNECT":
                ex.status = 405
                await respond_error(down, 405, "CONNECT is not relayed in HTTP mode")
                self._access(ex, caller)
                return
            pending = has_body(request)
            if not pending:
                await down.next_event()  # the EndOfMessage h11 already has
            headers = request_headers(request, str(self.cfg.target), drop=drop, add=add)
            ok, answered_by = await self._forward(down, request, headers, pending, ex, closing)
            self._access(ex, caller if caller is not None else answered_by)
            if not ok:
                return
            if trio.current_time() >= hard_at:  # closed after the response in flight
                self._ended("peer_expired", caller)
                return
            if not down.reusable():
                return

    async def _forward(
        self,
        down: HttpStream,
        request: h11.Request,
        headers: list[tuple[bytes, bytes]],
        pending: bool,
        ex: Exchange,
        closing: Callable[[], bool],
    ) -> tuple[bool, SpiffeId | None]:
        """One request through the pool; False when ``down`` must be closed."""
        pool = self.pool
        assert pool is not None
        for attempt in (1, 2):
            up: Upstream | None = None
            try:
                up = await pool.acquire()
                await exchange(
                    down,
                    up.http,
                    request,
                    headers,
                    body_pending=pending,
                    ex=ex,
                    idle_s=self.cfg.idle_timeout,
                    closing=closing,
                    count_to_target=self._count_to,
                    count_from_target=self._count_from,
                )
            except (UpstreamError, DialError) as exc:
                if up is not None:
                    await pool.discard(up)
                # A kept-alive connection the target closed just as we reused it: a request
                # without a body that got no answer yet is safe to send again.
                if attempt == 1 and up is not None and up.reused and not pending:
                    if not ex.response_started:
                        log.debug("pool.retry", error=str(exc))
                        continue
                log.warning("target.failed", target=str(self.cfg.target), error=str(exc))
                await self._fail(down, ex, exc)
                return False, up.peer_id if up is not None else None
            except DownstreamError:
                if up is not None:
                    await pool.discard(up)
                return False, up.peer_id if up is not None else None
            await pool.release(up)
            return True, up.peer_id
        raise AssertionError("unreachable: the second attempt always returns")

    # -- connections, signals, lifecycle -------------------------------------------------

    async def _connection(self, stream: trio.SocketStream, token: object) -> None:
        self.stats.connections_open += 1
        self.stats.connections_total += 1
        try:
            if self.mode == "server":
                await self._serve_inbound(stream)
            else:
                await self._serve_outbound(stream)
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
                if exc.errno not in _ACCEPT_RETRY:
                    raise
                log.error("accept.failed", error=exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                self.limiter.release_on_behalf_of(token)
                raise
            handlers.start_soon(self._connection, stream, token)

    async def _serve_when_ready(self, sock: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        await self._first.wait()
        listener = listen.start_listening(sock)
        self.serving.set()
        cur = self.current
        assert cur is not None
        log.info(
            "proxy.started",
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
        try:
            new = await trio.to_thread.run_sync(self._reload_config)
        except ConfigError as exc:
            log.warning("config.reload_failed", error=str(exc))
            return
        fixed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(self.cfg, name)]
        if fixed:
            log.warning("config.restart_needed", settings=fixed)
            new = dataclasses.replace(new, **{name: getattr(self.cfg, name) for name in fixed})
        old_policy = self.policy
        self.cfg = new
        self.policy = new.policy()
        self.limiter.total_tokens = new.max_connections
        setup_logging(new.log_level)
        if self.pool is not None:
            self.pool.max_idle = new.pool_size
            self.pool.idle_s = new.pool_idle_timeout
        if self.policy != old_policy:
            self._rebuild_for_policy()
        log.info(
            "config.reloaded",
            rules=self.policy.describe(),
            max_connections=new.max_connections,
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

    def _load_first(self) -> None:
        """The file source's first load happens before anything listens: bad files end the start."""
        if isinstance(self.source, FileSource):
            self._file_signature = self.source.signature()
            try:
                self.publish(self.source.load())
            except IdentityError as exc:
                raise CommandError(f"identity: {exc}") from exc

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = await listen.bind(self.cfg.listen)
        self.addresses["listen"] = listen.bound_name(sock)
        try:
            self._load_first()
            async with trio.open_nursery() as outer:
                await outer.start(self._signals)
                await outer.start(self.relay.run)
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
                        if self.pool is not None:
                            await services.start(self.pool.run)
                        services.start_soon(self._serve_when_ready, sock, handlers)
                        if self.current is None:
                            log.info(
                                "proxy.waiting",
                                source=self.source.describe(),
                                **self.addresses,
                            )
                        task_status.started(self.addresses)
                        await self._stop.wait()
                        services.cancel_scope.cancel()
                    self.idlers.drain()
                    handlers.cancel_scope.deadline = trio.current_time() + self.cfg.drain_timeout
                outer.cancel_scope.cancel()
        finally:
            sock.close()
            if self.cfg.listen.path is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await trio.Path(self.cfg.listen.path).unlink(missing_ok=True)
        log.info(
            "proxy.stopped",
            connections_total=self.stats.connections_total,
            open_connections=self.stats.connections_open,
        )
