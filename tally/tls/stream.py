"""Tally's one TLS layer: pyOpenSSL contexts from in-memory keys, driven on trio sockets.

Rules:

1. Private keys never touch disk.  The stdlib ``ssl`` module loads keys only from
   files, so contexts are built with pyOpenSSL from ``cryptography`` objects.
2. TLS 1.3 only, in both directions.  Nothing here negotiates anything older.
3. A context is never mutated once built.  Rotating a certificate means building a
   new :class:`TLSContext` and handing the new reference to the next handshake;
   connections already up keep the context they started with (DESIGN "hot swap").
4. Authorization happens *inside* the handshake.  OpenSSL first checks the peer's
   chain against the context's roots; when that succeeds it calls us once per chain
   depth, root first, and at depth 0 we run the caller's ``PeerVerifier`` on the
   chain we recorded.  A verifier that raises :class:`PeerRejected` makes OpenSSL
   fail the handshake itself, so a refused peer never gets a usable connection.
   When OpenSSL finds a fault above the leaf (an unknown issuer, say) we record
   the verdict but let it walk on down to the leaf and refuse there, so that
   every refusal names the SPIFFE ID the peer claimed (``PeerRejected.peer_id``):
   that is what an operator searches the logs for.
   The verdict is kept on the connection (pyOpenSSL's own error capture lives on the
   shared ``Context`` and would leak between concurrent handshakes) and raised by
   :meth:`TLSStream.do_handshake` once OpenSSL gives up.
5. Timeouts belong to the caller: put ``trio.fail_after(handshake_timeout_s)`` around
   :meth:`TLSStream.do_handshake` and deadlines around reads.  A cancelled or timed
   out handshake leaves the stream broken; close it.

Theory of operation of :class:`TLSStream`.  OpenSSL is bound to the connection's
non-blocking socket and does its own reads and writes: no buffer is copied through
Python between the kernel and the cipher, which is where a proxy in Python spends
its time.  Every OpenSSL call is synchronous and either succeeds or raises
``WantReadError``/``WantWriteError``, meaning "call again once the socket is
readable/writable"; we then park on trio's I/O wait for that socket.  One task
sends and one task receives at a time (full duplex: the proxy pumps both
directions from two tasks).  A receive can need to write (the reply to a peer's
KeyUpdate) and a send to read; a second task waiting for the same readiness of
the same socket waits for the first one's wake-up instead, since trio allows one
waiter per direction.  In TLS 1.3 a read never waits on a write the peer must
take first, so neither direction can block the other.  An OpenSSL write that
stopped part way through a record must be finished before anything else is
sent, so a send cancelled while waiting breaks the stream.

Resumption.  Servers hand out TLS 1.3 session tickets (stateful ones: the server's
session cache keeps the client's chain) and client contexts keep the last session
per server name, so a reconnect can skip certificate work.  A resumed
handshake carries no certificates, so OpenSSL's verify callback does not run; the
peer must still be judged by this context.  A context remembers the verdict it
reached on each leaf (by its exact DER) until the earliest expiry on the verified
chain, and a resumed handshake with that leaf takes the verdict; otherwise the
chain stored in the session is checked against the context's roots again (at the
current time, so an expired certificate is refused) and the verifier reruns.
The verdict depends only on the leaf, the context's roots and verifier (all
fixed) and the time (the expiry bound), so remembering it changes nothing but
the cost.  Sessions and verdicts never cross contexts: a rotation or a reload
of the allow rules starts with empty caches.

Half-close.  TLS 1.3 made ``close_notify`` close only the sender's direction
(RFC 8446 section 6.1), so :meth:`TLSStream.send_eof` sends it and reading goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL, crypto

# OpenSSL's own wording for a verification error code (X509_verify_cert_error_string)
# is reachable only through pyOpenSSL's binding; its X509StoreContextError uses the same.
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

# The one SPIFFE ID a leaf claims, read leniently (any leaf, even one we refuse).
from tally.spiffe.authz import _claimed_id as claimed_id
from tally.spiffe.spiffeid import SpiffeId
from tally.tls.plain import LENT_SIZE, WANT_READ, WANT_WRITE, DirectionGuard

log = logging.getLogger("tally.tls")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
ClientAuth = Literal["none", "optional", "required"]

RECEIVE_SIZE = 1 << 18
"""The default ``max_bytes`` of a receive: as many whole records as are already in."""
CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
"""TLS 1.3 suites, best first: the order of Go's crypto/tls and BoringSSL (so of SPIRE,
ghostunnel and Envoy) on CPUs with AES instructions.  AES-128-GCM runs 10 AES rounds per
block where OpenSSL's first choice, AES-256-GCM, runs 14, and its key schedule hashes with
SHA-256, which current x86 and ARM CPUs compute in hardware.  128-bit keys are not a
connection's weak point; AES-256 stays second for peers that prefer it."""
GROUPS = "X25519MLKEM768:X25519:P-256"
"""Key exchange groups by default, best first (the proxy's ``tls_groups`` changes them).

A client sends a key share for the first only: the post-quantum hybrid, which Tally,
Go >= 1.24 and OpenSSL >= 3.5 peers all accept.  OpenSSL's default sends a second share,
plain X25519, which costs a client about a tenth of a resumed handshake's instructions
and is only used by peers without the hybrid; those now ask for X25519 with a
HelloRetryRequest, one round trip more, and get it."""
_RECORD = 1 << 14  # TLS plaintext records are at most 16 KiB: OpenSSL returns one per read
SEND_CHUNK = 1 << 18
"""Plaintext handed to OpenSSL per write call."""
SESSION_TIMEOUT_S = 300
"""How long a server honours a session ticket; clients keep at most this long too."""
_CLIENT_SESSIONS_MAX = 64
_VERIFIED_MAX = 4096
# SSL_MODE_NO_AUTO_CHAIN from ssl.h, which pyOpenSSL does not export: without it OpenSSL
# completes a leaf-only chain from the trust store and sends our roots along with it.
_MODE_NO_AUTO_CHAIN = 0x8

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h (part of the ABI, never renumbered).
_NOT_YET_VALID = 9
_EXPIRED = 10
_UNTRUSTED = frozenset(
    {
        2,  # unable to get issuer certificate
        18,  # self-signed leaf
        19,  # self-signed certificate in chain
        20,  # unable to get local issuer certificate
        21,  # unable to verify the first certificate
        27,  # certificate not trusted
    }
)
# OpenSSL's wording when the two sides share no protocol version (a TLS 1.2-only peer).
_VERSION_ERRORS = (
    "unsupported protocol",
    "no protocols available",
    "wrong version number",
    "protocol version",
)


class PeerRejected(Exception):
    """The peer was refused; ``reason`` is a short fixed word for logs and metrics.

    ``peer_id`` is the SPIFFE ID the peer's leaf claimed, when it had one, even if
    the refusal came before anyone trusted that claim (an expired or unknown
    certificate): a log line that names who knocked is worth more than one that
    does not.  Peers only ever see a TLS alert; the message is for our own logs.
    """

    def __init__(self, reason: str, message: str = "", peer_id: SpiffeId | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.peer_id = peer_id


class TLSError(Exception):
    """The TLS protocol failed (bad alert, unsupported version, corrupt record...).

    ``reason`` is set, to a fixed word like :attr:`PeerRejected.reason`, when the peer
    could never have got through (it speaks no TLS 1.3, or no TLS at all): servers
    log and count those as refusals rather than as failures.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


PeerVerifier = Callable[[list[x509.Certificate]], object]
"""Called with the verified chain, leaf first and ending in the trusted root.

Raise :class:`PeerRejected` to refuse the peer; the return value becomes
:attr:`TLSStream.peer_identity`.  Runs inside OpenSSL's callback: keep it fast, and
pure: its answer may depend on the chain only, because the context remembers it for
resumed handshakes with the same leaf.  Build a new context when the rules change.
"""


def _x509_error_text(code: int) -> str:
    raw = _lib.X509_verify_cert_error_string(code)
    return str(_ffi.string(raw).decode("ascii", "replace")) if raw != _ffi.NULL else str(code)


def _rejection_for(code: int, text: str, depth: int, cert: x509.Certificate | None) -> PeerRejected:
    """Map an X.509 verification error to a fixed reason; the message keeps OpenSSL's detail."""
    if code == _EXPIRED:
        reason = "expired"
    elif code == _NOT_YET_VALID:
        reason = "not_yet_valid"
    elif code in _UNTRUSTED:
        reason = "untrusted"
    else:
        reason = f"invalid_chain: {text}"
    who = cert.subject.rfc4514_string() if cert is not None else "?"
    return PeerRejected(reason, f"{text} (certificate at depth {depth}, subject {who!r})")


def _failure_reason(text: str) -> str | None:
    """The refusal reason for a handshake this peer could never pass, else None."""
    if "http request" in text:
        return "not_tls"
    if any(marker in text for marker in _VERSION_ERRORS):
        return "tls_version"
    return None


def _run_verifier(verifier: PeerVerifier | None, chain: list[x509.Certificate]) -> object:
    """Run the caller's hook; a bug in it refuses the peer loudly instead of escaping into C."""
    if verifier is None:
        return None
    try:
        return verifier(chain)
    except PeerRejected:
        raise
    except Exception as exc:
        log.exception("peer verifier crashed; refusing the peer")
        raise PeerRejected("verifier_error", f"peer verifier raised {type(exc).__name__}") from exc


class _PeerCheck:
    """Per-connection verification state, reachable from OpenSSL's callback via app data."""

    __slots__ = ("by_depth", "chain", "identity", "ran", "rejection", "verifier")

    def __init__(self, verifier: PeerVerifier | None) -> None:
        self.verifier = verifier
        self.by_depth: dict[int, x509.Certificate] = {}
        self.chain: list[x509.Certificate] | None = None
        self.identity: object = None
        self.rejection: PeerRejected | None = None
        self.ran = False

    def on_verify(self, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        self.ran = True
        current = cert.to_cryptography()
        self.by_depth[depth] = current
        if not ok and self.rejection is None:
            self.rejection = _rejection_for(code, _x509_error_text(code), depth, current)
        if self.rejection is not None:
            if depth > 0:
                return True  # walk on to the leaf, which is refused (rule 4)
            if self.rejection.peer_id is None:
                self.rejection.peer_id = claimed_id(current)
            return False
        if depth != 0 or self.chain is not None:
            return True
        chain = [self.by_depth[d] for d in sorted(self.by_depth)]
        try:
            self.identity = _run_verifier(self.verifier, chain)
        except PeerRejected as exc:
            self.rejection = exc
            return False
        self.chain = chain
        return True


def _verify_callback(
    conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int
) -> bool:
    check = conn.get_app_data()
    if not isinstance(check, _PeerCheck):  # a Connection we did not make: refuse
        return False
    return check.on_verify(cert, code, depth, ok)


@dataclass(frozen=True, slots=True)
class _Verified:
    """A peer's chain as presented, what the verifier said, and until when that holds."""

    chain: tuple[x509.Certificate, ...]
    identity: object
    valid_until: float  # the earliest not_after on the verified chain, as a Unix time


class TLSContext:
    """An immutable TLS 1.3 configuration: our chain and key, the roots we trust, the verifier.

    Build one with :func:`server_context` or :func:`client_context`.  The only state
    that changes after construction is the client's session cache, which is a cache:
    losing it costs a full handshake, never correctness.
    """

    __slots__ = ("_client_auth", "_sessions", "_ssl", "_verified", "_verifier", "server_side")

    def __init__(
        self,
        ssl_context: SSL.Context,
        *,
        server_side: bool,
        client_auth: ClientAuth,
        verifier: PeerVerifier | None,
    ) -> None:
        self._ssl = ssl_context
        self.server_side = server_side
        self._client_auth = client_auth
        self._verifier = verifier
        self._sessions: OrderedDict[str, SSL.Session] = OrderedDict()
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    @property
    def client_auth(self) -> ClientAuth:
        return self._client_auth

    def _new_connection(
        self, sock: trio.socket.SocketType, server_hostname: str | None
    ) -> tuple[SSL.Connection, _PeerCheck, bool]:
        """A fresh OpenSSL connection on `sock`; the flag says a session was offered."""
        # pyOpenSSL only asks the socket for its fileno(); trio's socket has one.
        conn = SSL.Connection(self._ssl, cast("socket.socket", sock))
        check = _PeerCheck(self._verifier)
        conn.set_app_data(check)
        session = None
        if self.server_side:
            conn.set_accept_state()
        else:
            if server_hostname is not None:
                conn.set_tlsext_host_name(server_hostname.encode("idna"))
            session = self._sessions.get(server_hostname or "")
            if session is not None:
                conn.set_session(session)
            conn.set_connect_state()
        return conn, check, session is not None

    def _remember_session(self, server_hostname: str | None, session: SSL.Session) -> None:
        key = server_hostname or ""
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > _CLIENT_SESSIONS_MAX:
            self._sessions.popitem(last=False)

    def _forget_session(self, server_hostname: str | None) -> None:
        self._sessions.pop(server_hostname or "", None)

    def _remember_verified(
        self,
        leaf_der: bytes,
        chain: list[x509.Certificate],
        identity: object,
        verified: list[x509.Certificate],
    ) -> None:
        until = min(c.not_valid_after_utc for c in verified).timestamp()
        self._verified[leaf_der] = _Verified(tuple(chain), identity, until)
        self._verified.move_to_end(leaf_der)
        while len(self._verified) > _VERIFIED_MAX:
            self._verified.popitem(last=False)

    def _recall_verified(self, leaf_der: bytes) -> _Verified | None:
        """A verdict this context reached on the same leaf, while its chain is still valid."""
        known = self._verified.get(leaf_der)
        if known is None:
            return None
        if time.time() >= known.valid_until:
            del self._verified[leaf_der]
            return None
        return known

    def _reverify(
        self, leaf: x509.Certificate, presented: list[x509.Certificate]
    ) -> tuple[list[x509.Certificate], object]:
        """Check a resumed session's stored chain against our roots now, then run the verifier."""
        store = self._ssl.get_cert_store()
        if store is None:  # pragma: no cover - OpenSSL always gives a context a store
            raise PeerRejected("untrusted", "context has no certificate store")
        untrusted = [crypto.X509.from_cryptography(c) for c in presented]
        ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), untrusted)
        try:
            verified = [c.to_cryptography() for c in ctx.get_verified_chain()]
        except crypto.X509StoreContextError as exc:
            code, depth, text = exc.errors[0], exc.errors[1], str(exc.errors[2])
            cert = exc.certificate.to_cryptography() if exc.certificate is not None else None
            rejection = _rejection_for(int(code), text, int(depth), cert)
            rejection.peer_id = claimed_id(leaf)
            raise rejection from exc
        return verified, _run_verifier(self._verifier, verified)


def set_groups(ctx: SSL.Context, groups: str) -> None:
    """Set the key exchange groups, colon-separated and best first; ValueError names a bad one."""
    # pyOpenSSL has no call for this; its binding has (X25519MLKEM768 needs OpenSSL >= 3.5).
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii", "replace")) != 1:
        _lib.ERR_clear_error()
        raise ValueError(f"OpenSSL does not know all of the key exchange groups {groups!r}")


def _base_context(
    method: int,
    chain: Sequence[x509.Certificate],
    key: PrivateKey | None,
    roots: Sequence[x509.Certificate],
    groups: str,
) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    ctx.set_tls13_ciphersuites(CIPHERSUITES)
    set_groups(ctx, groups)
    # Idle connections give their record buffers back (about 34 KiB each); a
    # close without close_notify reads as a plain end of stream, as on TCP.
    ctx.set_mode(_MODE_NO_AUTO_CHAIN | SSL.MODE_RELEASE_BUFFERS)
    ctx.set_options(_lib.SSL_OP_IGNORE_UNEXPECTED_EOF)
    if chain:
        if key is None:
            raise ValueError("a certificate chain was given without its private key")
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        try:
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise ValueError(
                f"private key does not match certificate {chain[0].subject.rfc4514_string()!r}"
            ) from exc
    elif key is not None:
        raise ValueError("a private key was given without a certificate chain")
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always gives a context a store
        raise ValueError("OpenSSL context has no certificate store")
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    return ctx


def server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    *,
    roots: Sequence[x509.Certificate] = (),
    client_auth: ClientAuth = "required",
    verifier: PeerVerifier | None = None,
    groups: str = GROUPS,
) -> TLSContext:
    """A server context presenting ``chain`` (leaf first); clients are checked against ``roots``.

    ``client_auth="optional"`` requests a certificate and verifies one if sent; the
    verifier only runs for clients that present one.
    """
    if not chain:
        raise ValueError("a server needs a certificate chain, got an empty one")
    if client_auth not in ("none", "optional", "required"):
        raise ValueError(f"client_auth must be none, optional or required, got {client_auth!r}")
    if client_auth != "none" and not roots:
        raise ValueError(f"client_auth={client_auth} needs at least one root to verify clients")
    ctx = _base_context(SSL.TLS_SERVER_METHOD, chain, key, roots, groups)
    if client_auth == "none":
        ctx.set_verify(SSL.VERIFY_NONE)
    elif client_auth == "optional":
        ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    else:
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_callback)
    # Stateful tickets: the server's session cache keeps the client's whole chain,
    # which a resumed handshake needs to check the client again (see "Resumption").
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_session_id(b"tally")
    ctx.set_timeout(SESSION_TIMEOUT_S)
    return TLSContext(ctx, server_side=True, client_auth=client_auth, verifier=verifier)


def client_context(
    *,
    roots: Sequence[x509.Certificate],
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKey | None = None,
    verifier: PeerVerifier | None = None,
    groups: str = GROUPS,
) -> TLSContext:
    """A client context that trusts ``roots`` and presents ``chain`` when the server asks.

    There is no hostname check: SPIFFE peers are named by their URI SAN, which is
    the verifier's job.  ``server_hostname`` on the stream only sets SNI.
    """
    ctx = _base_context(SSL.TLS_CLIENT_METHOD, chain, key, roots, groups)
    ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    ctx.set_timeout(SESSION_TIMEOUT_S)
    return TLSContext(ctx, server_side=False, client_auth="none", verifier=verifier)


def _describe(exc: SSL.Error) -> str:
    """OpenSSL's error queue as one line: the reason strings, without library noise."""
    reasons = [
        str(item[2])
        for item in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])
        if isinstance(item, tuple) and len(item) == 3
    ]
    return "; ".join(reasons) or type(exc).__name__


class _Readiness:
    """Waits for a socket to be readable or writable, shared by a sending and a receiving task.

    trio lets one task wait for each readiness of a socket; a second one waits for
    the first one's wake-up, then both retry their OpenSSL call.
    """

    __slots__ = ("_sock", "_waiting")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._waiting: dict[bool, trio.Event] = {}

    async def wait(self, writable: bool) -> None:
        other = self._waiting.get(writable)
        if other is not None:
            await other.wait()
            return
        woken = self._waiting[writable] = trio.Event()
        try:
            if writable:
                await trio.lowlevel.wait_writable(self._sock)
            else:
                await trio.lowlevel.wait_readable(self._sock)
        finally:
            del self._waiting[writable]
            woken.set()


_DISCARD_MAX = 1 << 18


def _discard_unread(fd: int) -> None:
    """Read and drop what has arrived (up to `_DISCARD_MAX`), without waiting."""
    dropped = 0
    while dropped < _DISCARD_MAX:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # would block, reset, or already closed: nothing (more) to drop
            return
        if not chunk:
            return
        dropped += len(chunk)


def _eof_text(text: str) -> bool:
    return "unexpected eof" in text.lower()


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS 1.3 on a trio socket stream, safe for one sending and one receiving task at once.

    ``send_all``/``receive_some`` run the handshake if nobody has yet, but call
    :meth:`do_handshake` yourself under a deadline to learn why a peer failed.
    """

    def __init__(
        self,
        transport: trio.SocketStream,
        ctx: TLSContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        if server_side != ctx.server_side:
            side = "server" if server_side else "client"
            raise ValueError(f"a {side} stream needs a {side} context")
        if not isinstance(transport, trio.SocketStream):
            raise TypeError(f"TLS runs on a trio.SocketStream, got {type(transport).__name__}")
        self.transport = transport
        self._ctx = ctx
        self._server_hostname = server_hostname
        self._conn, self._check, self._offered_session = ctx._new_connection(
            transport.socket, server_hostname
        )
        self._ready = _Readiness(transport.socket)
        self._send_guard = DirectionGuard("sending")
        self._recv_guard = DirectionGuard("receiving")
        self._handshake_lock = trio.Lock()
        self._handshook = False
        self._handshake_error: BaseException | None = None
        self._broken: BaseException | None = None
        self._closed = False
        self._recv_eof = False
        self._sent_eof = False
        self._peer_chain: list[x509.Certificate] = []
        self._peer_identity: object = None
        self._resumed = False
        self._session_saved = False

    # -- what the handshake established -------------------------------------------

    @property
    def peer_chain(self) -> list[x509.Certificate]:
        """The peer's certificates as it sent them, leaf first; empty before the handshake."""
        return list(self._peer_chain)

    @property
    def peer_identity(self) -> object:
        """What the verifier returned for this peer; None without a verifier or a peer cert."""
        return self._peer_identity

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed an earlier session instead of exchanging certificates."""
        return self._resumed

    @property
    def version(self) -> str | None:
        """The protocol version name ("TLSv1.3") once the handshake is done."""
        return self._conn.get_protocol_version_name() if self._handshook else None

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("this TLS stream is broken") from self._broken

    # -- handshake -----------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake now (idempotent).

        Raises :class:`PeerRejected` if the peer's certificate was refused,
        :class:`TLSError` for other protocol failures, and trio.BrokenResourceError
        if the transport died.  Not bounded in time: wrap it in ``trio.fail_after``.
        In TLS 1.3 a client finishes before the server has judged the client's
        certificate, so a client learns of its own rejection on the first read.
        """
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def _ensure_handshake(self) -> None:
        async with self._handshake_lock:
            if self._handshook:
                return
            self._check_usable()
            if self._handshake_error is not None:
                raise trio.BrokenResourceError(
                    "the TLS handshake already failed"
                ) from self._handshake_error
            try:
                await self._handshake()
            except BaseException as exc:
                self._handshake_error = exc
                if self._broken is None:
                    self._broken = exc
                if self._offered_session:
                    self._ctx._forget_session(self._server_hostname)
                raise

    async def _handshake(self) -> None:
        while True:
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                await self._ready.wait(writable=False)
            except SSL.WantWriteError:
                await self._ready.wait(writable=True)
            except (SSL.ZeroReturnError, SSL.SysCallError) as exc:
                raise trio.BrokenResourceError(
                    "the peer closed the connection during the TLS handshake"
                ) from exc
            except SSL.Error as exc:
                if self._check.rejection is None and _eof_text(_describe(exc)):
                    raise trio.BrokenResourceError(
                        "the peer closed the connection during the TLS handshake"
                    ) from exc
                raise self._handshake_failure(exc) from exc
            else:
                break
        self._finish_handshake()
        self._handshook = True

    def _handshake_failure(self, exc: SSL.Error) -> Exception:
        if self._check.rejection is not None:
            return self._check.rejection
        text = _describe(exc)
        if self._ctx.server_side and "peer did not return a certificate" in text:
            return PeerRejected("no_certificate", "the client sent no certificate")
        return TLSError(f"TLS handshake failed: {text}", reason=_failure_reason(text))

    def _finish_handshake(self) -> None:
        if self._check.rejection is not None:
            # Unreachable while the callback refuses at depth 0; kept so that a verdict
            # can never be lost if OpenSSL ever finished without showing us the leaf.
            raise self._check.rejection
        peer = self._conn.get_peer_certificate()
        if peer is None:
            return
        key = crypto.dump_certificate(crypto.FILETYPE_ASN1, peer)
        if self._check.chain is None:
            # No verify callback although the peer has a certificate: a resumed session.
            self._resumed = True
            known = self._ctx._recall_verified(key)
            if known is not None:
                self._peer_chain, self._peer_identity = list(known.chain), known.identity
                return
        leaf = peer.to_cryptography()
        presented = self._conn.get_peer_cert_chain(as_cryptography=True) or []
        if presented and presented[0] == leaf:  # clients see the leaf in the chain, servers not
            presented = presented[1:]
        self._peer_chain = [leaf, *presented]
        if self._check.chain is not None:
            verified, self._peer_identity = self._check.chain, self._check.identity
        else:
            verified, self._peer_identity = self._ctx._reverify(leaf, presented)
        self._ctx._remember_verified(key, self._peer_chain, self._peer_identity, verified)

    # -- trio.abc.Stream -------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_guard:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            waited = False
            if not self._handshook:
                await self._implicit_handshake()
                waited = True
            if self._sent_eof:
                raise trio.ClosedResourceError("send_eof() was called on this TLS stream")
            view = memoryview(data).cast("B")
            while view:
                try:
                    sent = self._conn.send(view[:SEND_CHUNK])
                except (SSL.WantWriteError, SSL.WantReadError) as want:
                    waited = True
                    try:
                        await self._ready.wait(writable=isinstance(want, SSL.WantWriteError))
                    except BaseException as exc:
                        # OpenSSL holds the rest of a record it began: nothing else may follow.
                        self._broken = exc
                        raise
                    continue
                except SSL.Error as exc:
                    err = self._fail(exc, "send")
                    raise trio.BrokenResourceError(str(err)) from err
                view = view[sent:]
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._recv_guard:
            if max_bytes is None:
                max_bytes = RECEIVE_SIZE
            elif not isinstance(max_bytes, int):
                raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
            elif max_bytes < 1:
                raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            waited = False
            if not self._handshook:
                await self._implicit_handshake()
                waited = True
            data = b""
            if not self._recv_eof:
                data, blocked = await self._receive(max_bytes)
                waited = waited or blocked
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def _receive(self, max_bytes: int) -> tuple[bytes, bool]:
        """Decrypt what has arrived, up to max_bytes, waiting only while nothing has.

        One read returns one record.  A full record suggests a bulk transfer with
        more already in the socket, so reading goes on; a short one is usually a
        message's end, and asking again would only cost a failed read.
        """
        waited = False
        parts: list[bytes] = []
        total = 0
        while total < max_bytes:
            try:
                chunk = self._conn.recv(min(max_bytes - total, _RECORD))
            except SSL.WantReadError:
                if parts:
                    break
                waited = True
                await self._ready.wait(writable=False)
                continue
            except SSL.WantWriteError:  # the reply to a KeyUpdate did not fit
                if parts:
                    break
                waited = True
                await self._ready.wait(writable=True)
                continue
            except SSL.ZeroReturnError:
                self._recv_eof = True
                break
            except SSL.Error as exc:
                if parts:
                    break  # deliver what decrypted cleanly; the next call reports the error
                if isinstance(exc, SSL.SysCallError) and exc.args[0] == -1:
                    self._recv_eof = True  # end of stream without close_notify
                    break
                err = self._fail(exc, "receive")
                raise trio.BrokenResourceError(str(err)) from err
            parts.append(chunk)
            total += len(chunk)
            if len(chunk) < _RECORD:
                break
        if parts and not self._session_saved:
            self._save_session()
        return (parts[0] if len(parts) == 1 else b"".join(parts)), waited

    def _fail(self, exc: SSL.Error, during: str) -> TLSError:
        """Break the stream for an OpenSSL failure; callers raise BrokenResourceError from it."""
        cause = TLSError(f"TLS {during} failed: {_describe(exc)}")
        cause.__cause__ = exc
        self._broken = cause
        return cause

    async def _implicit_handshake(self) -> None:
        try:
            await self._ensure_handshake()
        except (PeerRejected, TLSError) as exc:
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    async def send_eof(self) -> None:
        """Send close_notify: TLS 1.3 closes only our direction, so we can still read."""
        with self._send_guard:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            if not self._handshook:
                await self._implicit_handshake()
            if self._sent_eof:
                await trio.lowlevel.checkpoint()
                return
            self._sent_eof = True
            while True:
                try:
                    self._conn.shutdown()
                except SSL.WantWriteError:
                    await self._ready.wait(writable=True)
                    continue
                except SSL.Error as exc:
                    err = self._fail(exc, "shutdown")
                    raise trio.BrokenResourceError(str(err)) from err
                break
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            self._check_usable()
            await self._ready.wait(writable=True)

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it at once, then close the socket.

        The close_notify is skipped when the handshake never finished, when the
        stream is broken, or when another task is mid-send (it would cut into a
        record).  Nothing here waits for the peer.  Bytes the peer sent that nobody
        read (a refused peer's first flight, a plain-HTTP request) are discarded
        first: closing over unread bytes makes the kernel send a reset, which can
        destroy our alert before the peer reads it.
        """
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """`aclose` without its checkpoint: nothing in closing waits."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._handshook and self._broken is None and not self._send_guard.busy:
                if not self._sent_eof:
                    self._sent_eof = True
                    try:
                        self._conn.shutdown()
                    except SSL.Error:
                        pass
            if not self._recv_guard.busy:
                _discard_unread(self.transport.socket.fileno())
        finally:
            self.transport.socket.close()

    def relay_end(self) -> TLSEnd:
        """This stream for the proxy's relay (`proxy.tcp.Relay`), which owns it until it ends."""
        self._check_usable()
        if not self._handshook:
            raise ValueError("the relay takes a TLS stream only after its handshake")
        return TLSEnd(self)

    def _save_session(self) -> None:
        """Keep a client's session for the next connection from the same context.

        Called at the first application data: a TLS 1.3 server sends its tickets
        right after the handshake, so by then the session is resumable.
        """
        self._session_saved = True
        if self._ctx.server_side:
            return
        session = self._conn.get_session()
        if session is not None:
            self._ctx._remember_session(self._server_hostname, session)


_ERROR_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ERROR_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
_ERROR_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_buffers = threading.local()


def _lent_buffer() -> Any:
    """This thread's buffer for lent reads (OpenSSL fills it without holding the GIL)."""
    buf = getattr(_buffers, "tls", None)
    if buf is None:
        buf = _buffers.tls = _ffi.new("char[]", LENT_SIZE)
    return buf


class TLSEnd:
    """A TLS stream as the relay drives it: calls that never wait (see `tally.tls.plain.PlainEnd`).

    The stream's own state follows what the relay does (end of stream seen or
    sent, broken), so closing the stream afterwards behaves as after
    ``receive_some``/``send_all``.  An OpenSSL write that would block must be
    retried with the same bytes, which the relay does: it keeps what it could
    not write and offers it again.  A read returns whole records while they come
    full (a bulk transfer, with more behind them: ``more``) up to `LENT_SIZE`, and stops
    at a short one (usually a message's end).  Without read-ahead OpenSSL takes
    from the socket only the records it returns, so "readable" on the socket is
    an exact signal.  An error after some records is reported by the next read,
    after those records are delivered.

    The relay calls these per chunk on every connection, so they call
    ``SSL_read``/``SSL_write`` directly on pyOpenSSL's connection (its ``_ssl``)
    and map "would block" from the return code: pyOpenSSL's wrappers raise an
    exception for it and allocate a buffer per read, which cost more than the
    call itself.  Anything else goes through pyOpenSSL's own error mapping, which
    also empties OpenSSL's error queue.
    """

    __slots__ = (
        "_after",
        "_buf",
        "_conn",
        "_lent",
        "_ssl",
        "_stream",
        "_unsaved",
        "fd",
        "more",
        "wants",
    )

    def __init__(self, stream: TLSStream) -> None:
        self._after: BaseException | bool | None = None
        self._stream = stream
        self._conn = stream._conn
        self._ssl = stream._conn._ssl
        # The relay reads in the thread that made its ends: this thread's buffer.
        self._buf = _lent_buffer()
        self._lent = memoryview(_ffi.buffer(self._buf, LENT_SIZE))
        self._unsaved = not stream._session_saved
        # pyOpenSSL turns on partial writes, with which SSL_write returns after each
        # 16 KiB record: a call, and a copy of what is left, per record.
        # Without it one call writes the whole chunk or says "would block", and the
        # relay retries with the same bytes, as OpenSSL then requires.
        _lib.SSL_clear_mode(self._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        self.fd = stream.transport.socket.fileno()
        self.wants = WANT_READ
        self.more = True

    def read(self) -> memoryview | bytes | None:
        if self._after is not None:
            return self._end_now()
        ssl, buf = self._ssl, self._buf
        n = total = _lib.SSL_read(ssl, buf, _RECORD)
        while n == _RECORD and total <= LENT_SIZE - _RECORD:  # full records: a bulk transfer
            n = _lib.SSL_read(ssl, buf + total, _RECORD)
            if n > 0:
                total += n
        if total > 0 and self._unsaved:
            self._unsaved = False
            self._stream._save_session()
        if n > 0:
            self.more = n == _RECORD
            return self._lent[:total]
        if total < 0:
            total = 0
        code = _lib.SSL_get_error(ssl, n)
        if code == _ERROR_WANT_READ or code == _ERROR_WANT_WRITE:
            if total:
                self.more = False
                return self._lent[:total]
            self.wants = WANT_READ if code == _ERROR_WANT_READ else WANT_WRITE
            return None
        self._after = self._outcome(code, n)
        if total:  # deliver what decrypted cleanly; the next read reports the end
            self.more = True
            return self._lent[:total]
        return self._end_now()

    def _outcome(self, code: int, n: int) -> BaseException | bool:
        """What a failed SSL_read means: True for an end of stream, else the error."""
        if code == _ERROR_ZERO_RETURN:
            return True
        try:
            self._conn._raise_ssl_error(self._ssl, n)
        except SSL.SysCallError as exc:
            if exc.args[0] == -1:
                return True  # end of stream without close_notify: an end all the same
            return self._broken(exc, "receive")
        except SSL.Error as exc:
            return self._broken(exc, "receive")
        return self._broken(SSL.Error("SSL_read read nothing"), "receive")

    def _end_now(self) -> bytes:
        after = self._after
        if isinstance(after, BaseException):
            raise after
        self._stream._recv_eof = True
        return b""

    def write(self, data: bytes | memoryview) -> int | None:
        n = _lib.SSL_write(self._ssl, _ffi.from_buffer(data), len(data))
        if n > 0:
            return n  # type: ignore[no-any-return]
        code = _lib.SSL_get_error(self._ssl, n)
        if code == _ERROR_WANT_WRITE:
            self.wants = WANT_WRITE
            return None
        if code == _ERROR_WANT_READ:
            self.wants = WANT_READ
            return None
        try:
            self._conn._raise_ssl_error(self._ssl, n)
        except SSL.Error as exc:
            raise self._broken(exc, "send") from exc
        raise self._broken(SSL.Error("SSL_write wrote nothing"), "send")

    def shut(self) -> bool:
        self._stream._sent_eof = True
        try:
            self._conn.shutdown()
        except SSL.WantWriteError:
            self.wants = WANT_WRITE
            return False
        except SSL.Error as exc:
            raise self._broken(exc, "shutdown") from exc
        return True

    def _broken(self, exc: SSL.Error, during: str) -> trio.BrokenResourceError:
        err = self._stream._fail(exc, during)
        broken = trio.BrokenResourceError(str(err))
        broken.__cause__ = err
        return broken
