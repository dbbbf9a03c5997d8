"""`tally ca run --console HOST:PORT`: the live, read-only web console (the trio shell).

Rules:

1. Read-only and public.  Three routes, all GET: the page (`ca.console_page`), a JSON
   snapshot and a stream of snapshots as server-sent events.  What they carry is
   built by `ca.console_view`, which repeats only public data; nothing here reads a
   key file, a token or a certificate body into a response.
2. Loopback by default.  A console on any other address must be TLS with
   client-certificate authentication: the client shows an X.509-SVID of this trust
   domain whose ID is one of ``console_admin_id``, judged in the handshake by the
   same checks as the agent API (`tally.spiffe.authz`).  The settings refuse the
   combination before the CA starts (`ca.settings`).  On loopback without TLS the
   ``Host`` header must name the loopback address, so a web page that rebinds its
   own name to 127.0.0.1 cannot read the console from a browser.
3. One snapshot for all.  A watcher task looks at the audit chain's head every
   `POLL_S` (every change the CA makes is an audit record) and rebuilds the
   snapshot when the head moved, or every `REFRESH_S` so that expiries show as
   time passes.  It builds in the CA's store thread, encodes once, and wakes every
   stream; with nobody watching it does nothing.
4. Bounded.  At most `MAX_CONNECTIONS` connections and `MAX_STREAMS` event streams;
   past them a connection is closed and a stream answered 503.  Every wait has a
   deadline: the handshake, each request (`tally.wire.http`), each write of a
   stream piece.  A drain (SIGTERM) ends every stream at once.
5. The console never takes the CA down: a snapshot that fails to build is logged
   and retried on the next tick; the CA goes on signing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca import console_page, console_view
from ca.authority import Authority
from ca.keys import PrivateKey, load_private_key
from ca.store import KeyRecord
from tally.ops.config import Address
from tally.ops.errors import OperatorError
from tally.ops.logs import get_logger
from tally.ops.net import bound_address, open_listener
from tally.spiffe import authz, pem
from tally.spiffe.spiffeid import SpiffeId
from tally.tls.contexts import TLSContext, server_context
from tally.tls.stream import TLSStream
from tally.tls.verify import PeerRejected, TLSError, authz_verifier
from tally.wire import http

T = TypeVar("T")
log = get_logger("tally.ca.console")

POLL_S = 0.5
REFRESH_S = 5.0
BUILD_SHARE = 10
KEEPALIVE_S = 15.0
VERIFY_EVERY_S = 10.0
SNAPSHOT_MAX_AGE_S = 1.0
MAX_CONNECTIONS = 32
MAX_STREAMS = 8
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 30.0
RETRY_MS = 2000
"""What a browser waits before reconnecting a dropped stream (a CA restart, a drain)."""


class ConsoleError(OperatorError):
    """The console's certificate or key cannot be used; the CA stops with one line."""


class RunSync(Protocol):
    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


@dataclass(frozen=True)
class ConsoleTLS:
    """The console's own certificate and the admin IDs whose client certificates it takes."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    admin_ids: frozenset[SpiffeId]


def load_tls(cert: Path | None, key: Path | None, admin_ids: list[str]) -> ConsoleTLS | None:
    """Read ``console_cert``/``console_key`` at startup (fail fast); None without them.

    The key file is held to the CA's own rule for keys: mode 0600, no symlink.
    """
    if cert is None or key is None:
        return None
    try:
        chain = tuple(pem.chain_from_pem(cert.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConsoleError(f"console certificate {cert}: {exc}") from exc
    private = load_private_key(key)
    if chain[0].public_key() != private.public_key():
        raise ConsoleError(f"console key {key} does not match certificate {cert}")
    return ConsoleTLS(chain, private, frozenset(SpiffeId.parse(i) for i in admin_ids))


class Feed:
    """The newest snapshot, encoded once as an event, and a wake-up for every stream."""

    def __init__(self) -> None:
        self.version = 0
        self.frame = b""
        self.snapshot: dict[str, object] | None = None
        self.built_at = -math.inf
        self._event = trio.Event()

    def publish(self, snapshot: dict[str, object]) -> None:
        data = json.dumps(snapshot, separators=(",", ":"))
        self.snapshot = snapshot
        self.frame = f"event: snapshot\ndata: {data}\n\n".encode()
        self.version += 1
        self.built_at = trio.current_time()
        self._event.set()
        self._event = trio.Event()

    def age(self) -> float:
        return trio.current_time() - self.built_at

    async def wait_newer(self, version: int) -> None:
        while self.version == version:
            await self._event.wait()


class Console:
    def __init__(
        self,
        authority: Authority,
        run: RunSync,
        address: Address,
        tls: ConsoleTLS | None,
        *,
        clock: Callable[[], float] = time.time,
        drain: http.Drain | None = None,
        limits: console_view.Limits = console_view.Limits(),  # noqa: B008 - frozen
    ) -> None:
        self.authority = authority
        self.run = run
        self.address = address
        self.tls = tls
        self.clock = clock
        self.drain = drain or http.Drain()
        self.limits = limits
        self.feed = Feed()
        self.streams = 0
        self.refused_streams = 0
        self.build_seconds = 0.0
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._audit: console_view.AuditState | None = None
        self._audit_checked = -math.inf
        self._fingerprints: dict[str, str] = {}
        self._tls_context: TLSContext | None = None
        self._tls_for: int | None = None
        self._hosts: frozenset[str] = frozenset()
        self._build_lock = trio.Lock()

    # -- snapshots (rule 3) -----------------------------------------------------------

    def _fingerprint(self, rec: KeyRecord) -> str:
        """SHA-256 of the key's certificate; of the stored public text for a key that has
        no certificate (a JWT key), so the page can tell keys apart without showing them."""
        if rec.id not in self._fingerprints:
            try:
                cert = pem.chain_from_pem(rec.cert_pem.encode())[0]
                digest = cert.fingerprint(hashes.SHA256()).hex()
            except (ValueError, IndexError):
                digest = hashlib.sha256(rec.cert_pem.encode()).hexdigest()
            self._fingerprints[rec.id] = digest
        return self._fingerprints[rec.id]

    def _head(self) -> int:
        records = self.authority.store.audit_records(limit=1)
        return records[-1].seq if records else 0

    def _collect(self) -> dict[str, object]:
        """Read everything a snapshot needs; runs in the CA's store thread."""
        store = self.authority.store
        now = self.clock()
        window = self.limits.window_s
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - window)) + ".000Z"
        records = store.audit_records(since_ts=since, limit=self.limits.timeline * 2)
        head = records[-1].seq if records else self._head()
        if (
            self._audit is None
            or (head != self._audit.head_seq and now - self._audit_checked >= VERIFY_EVERY_S)
            or now - self._audit_checked >= 6 * VERIFY_EVERY_S
        ):
            verdict = self.authority.check_audit()
            last = store.audit_records(limit=1)
            self._audit = console_view.AuditState(
                verdict.ok,
                verdict.records,
                verdict.problem,
                last[-1].seq if last else 0,
                last[-1].hash if last else "",
                int(now),
            )
            self._audit_checked = now
        keys = [
            console_view.KeyRow(
                r.id,
                r.kind,
                r.state,
                r.parent_id,
                r.not_before,
                r.not_after,
                r.created_at,
                r.activated_at,
                self._fingerprint(r),
                r.upstream,
            )
            for r in store.list_keys()
            if r.state != "removed"
        ]
        if self.authority.jwt_keys is not None:  # states and times only
            keys += console_view.jwt_key_rows(self.authority.jwt_keys.records(), now)
        return console_view.snapshot(
            trust_domain=str(self.authority.td),
            now=now,
            agents=store.list_agents(),
            entries=store.list_entries(),
            svids=store.latest_svids(int(now) - window, 100_000),
            records=records,
            keys=keys,
            audit=self._audit,
            limits=self.limits,
        )

    async def refresh(self, max_age: float = 0.0) -> None:
        """Build and publish a snapshot, unless one younger than ``max_age`` seconds is
        there (checked under the lock, so callers that queue up share one build)."""
        async with self._build_lock:
            if self.feed.snapshot is not None and self.feed.age() < max_age:
                return
            started = trio.current_time()
            self.feed.publish(await self.run(self._collect))
            self.build_seconds = trio.current_time() - started

    async def _watch(self) -> None:
        """Rule 3.  A snapshot is read in the thread that also signs, so the pause after
        one is at least `BUILD_SHARE` times what it took: on a fleet big enough to make
        snapshots slow the console takes a bounded share of the CA, never all of it."""
        last_head: int | None = None
        while True:
            await trio.sleep(max(POLL_S, BUILD_SHARE * self.build_seconds))
            if self.streams == 0:
                continue
            try:
                head = await self.run(self._head)
                stale = self.feed.age() >= REFRESH_S
                if head != last_head or stale:
                    await self.refresh()
                    last_head = head
            except Exception as exc:  # rule 5: logged, retried on the next tick
                log.error("console.refresh_failed", error=exc)

    # -- routes (rule 1) --------------------------------------------------------------

    async def handle(self, plain: bool, req: http.Request) -> http.Response:
        if plain and (req.header("host") or "").lower() not in self._hosts:
            return http.Response.json({"error": "unknown host"}, status=421)
        if req.method not in ("GET", "HEAD"):
            return http.Response(405, b'{"error":"read-only"}', headers=(("Allow", "GET, HEAD"),))
        if req.path == "/":
            return http.Response(
                200,
                console_page.PAGE,
                headers=console_page.HEADERS,
                content_type="text/html; charset=utf-8",
            )
        if req.path == "/favicon.ico":
            return http.Response(204)
        if req.path == "/api/snapshot":
            await self.refresh(max(SNAPSHOT_MAX_AGE_S, BUILD_SHARE * self.build_seconds))
            return http.Response(
                200,
                json.dumps(self.feed.snapshot, separators=(",", ":")).encode(),
                headers=(("Cache-Control", "no-store"),),
            )
        if req.path == "/api/events":
            if self.streams >= MAX_STREAMS:
                self.refused_streams += 1
                return http.Response.json(
                    {"error": f"at most {MAX_STREAMS} console streams at once"}, status=503
                )
            stream = self._events()
            await stream.asend(None)  # into its try: the slot is freed whatever happens
            return http.Response(
                200,
                headers=(("Cache-Control", "no-store"),),
                content_type="text/event-stream",
                stream=stream,
            )
        return http.Response.json({"error": "not found"}, status=404)

    async def _events(self) -> AsyncGenerator[bytes, None]:
        """One browser's stream: the newest snapshot now, then each new one, with comments
        in between so that proxies and the browser see the connection alive."""
        self.streams += 1
        try:
            yield b""  # primed by `handle`
            yield f"retry: {RETRY_MS}\n\n".encode()
            await self.refresh(max(POLL_S, BUILD_SHARE * self.build_seconds))
            version = -1
            while True:
                if self.feed.version != version:
                    version = self.feed.version
                    yield self.feed.frame
                    continue
                with trio.move_on_after(KEEPALIVE_S) as waited:
                    await self.feed.wait_newer(version)
                if waited.cancelled_caught:
                    yield b": keepalive\n\n"
        finally:
            self.streams -= 1

    # -- connections (rules 2 and 4) --------------------------------------------------

    def _context(self) -> TLSContext:
        """The TLS context for the bundle as it is now; rebuilt when the bundle changes."""
        assert self.tls is not None
        bundle = self.authority.bundle()
        if self._tls_context is None or self._tls_for != bundle.sequence:
            roots = list(bundle.x509_authorities)
            trusted = {self.authority.td: frozenset(authz.fingerprint(r) for r in roots)}
            self._tls_context = server_context(
                list(self.tls.chain),
                self.tls.key,
                roots=roots,
                client_auth="required",
                verifier=authz_verifier(trusted, authz.Policy(ids=self.tls.admin_ids)),
            )
            self._tls_for = bundle.sequence
        return self._tls_context

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            self._connections.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            if self.tls is None:
                async with stream:
                    await self._serve(stream, plain=True)
                return
            conn = TLSStream(stream, self._context(), server_side=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    await conn.do_handshake()
            except (PeerRejected, TLSError) as exc:
                peer = getattr(exc, "peer_id", None)
                log.warning("console.denied", reason=str(exc)[:200], peer_id=str(peer))
                await conn.aclose()
                return
            except (trio.BrokenResourceError, trio.TooSlowError, trio.ClosedResourceError):
                await conn.aclose()
                return
            async with conn:
                await self._serve(conn, plain=False)
        finally:
            self._connections.release()

    async def _serve(self, stream: trio.abc.Stream, *, plain: bool) -> None:
        await http.serve_http(
            stream,
            partial(self.handle, plain),
            idle_timeout=IDLE_TIMEOUT_S,
            request_timeout=REQUEST_TIMEOUT_S,
            drain=self.drain,
        )

    async def serve(
        self,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = await open_listener(self.address)
        bound = bound_address(listener)
        port = bound.rsplit(":", 1)[1]
        self._hosts = frozenset({bound, f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"})
        scheme = "http" if self.tls is None else "https"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            nursery.start_soon(
                partial(
                    trio.serve_listeners,
                    self._connection,
                    [listener],
                    handler_nursery=handler_nursery,
                )
            )
            log.info("console.started", url=f"{scheme}://{bound}/", tls=self.tls is not None)
            task_status.started(f"{scheme}://{bound}/")
