"""The trio stream of Tally's TLS layer: TLS 1.3 over a connection's non-blocking socket.

Rules:

1. Timeouts belong to the caller: put ``trio.fail_after(handshake_timeout_s)`` around
   :meth:`TLSStream.do_handshake` and deadlines around reads.  A cancelled or timed
   out handshake leaves the stream broken; close it.
2. The peer is judged inside the handshake (`tally.tls.verify`), and a resumed
   handshake is judged by its context's caches (`tally.tls.contexts`, "Resumption").

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

Half-close.  TLS 1.3 made ``close_notify`` close only the sender's direction
(RFC 8446 section 6.1), so :meth:`TLSStream.send_eof` sends it and reading goes on.
"""

from __future__ import annotations

import os

import trio
from cryptography import x509
from OpenSSL import SSL, crypto

from tally.tls.contexts import RECORD_SIZE, TLSContext
from tally.tls.plain import WANT_WRITE, DirectionGuard
from tally.tls.relay_end import TLSEnd
from tally.tls.verify import PeerRejected, TLSError, failure_reason

RECEIVE_SIZE = 1 << 18
"""The default ``max_bytes`` of a receive: as many whole records as are already in."""
SEND_CHUNK = 1 << 18
"""Plaintext handed to OpenSSL per write call."""


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
        return TLSError(f"TLS handshake failed: {text}", reason=failure_reason(text))

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
        # The context's copy of a chain it has seen before: a peer's connections share
        # one set of certificate objects (about 3 KiB each) instead of one set each.
        self._peer_chain = self._ctx._remember_verified(
            key, self._peer_chain, self._peer_identity, verified
        )
        self._check.release()

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
                chunk = self._conn.recv(min(max_bytes - total, RECORD_SIZE))
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
            if len(chunk) < RECORD_SIZE:
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

    async def wait_ready(self, wants: int) -> None:
        """Wait until an end's call that would block (``wants``: `WANT_READ` or
        `WANT_WRITE`) can go on; for the HTTP relay, which drives this stream's end from a
        reading and a writing task, so the waits are shared as ``receive_some``'s are."""
        self._check_usable()
        await self._ready.wait(writable=wants == WANT_WRITE)
        self._check_usable()

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
