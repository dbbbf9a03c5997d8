"""Plain (unencrypted) socket streams for the proxy's data path, with one call per read or write.

Rules / theory of operation: a proxy moves every byte twice per direction, so
the cost of a stream call is paid four times per request.  trio's
``SocketStream`` goes through its socket wrapper for each call (an async
context manager, a conflict detector, a retry helper), which measured here is
most of a small request's Python time.  `PlainStream` keeps trio's
contract (one sender and one receiver at a time, a checkpoint per call,
``BrokenResourceError``/``ClosedResourceError``) but reads and writes the
non-blocking descriptor directly and parks on trio's I/O wait only when the
kernel says "would block".  It wraps a trio ``SocketStream``, which still owns
the socket and closes it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading

import trio

RECEIVE_SIZE = 1 << 16
LENT_SIZE = 1 << 18
"""The most a relay read returns: a bulk transfer moves in few, large chunks (each
costs the relay's Python once; 256 KiB took a twentieth off the inbound's instructions
per MiB against 64 KiB), and the buffer is one per thread, not per connection.  It is
also what a direction holds, copied, while its reader is slow: a sixteenth of what
Linux may queue for the same socket by default (``tcp_wmem``'s 4 MiB)."""
WANT_READ = select.EPOLLIN
WANT_WRITE = select.EPOLLOUT


class DirectionGuard:
    """Refuses a second task in one direction of a stream, like trio's own conflict
    detector; shared by the plain and the TLS streams."""

    __slots__ = ("_what", "busy")

    def __init__(self, what: str) -> None:
        self._what = what
        self.busy = False

    def __enter__(self) -> None:
        if self.busy:
            raise trio.BusyResourceError(f"another task is already {self._what} on this stream")
        self.busy = True

    def __exit__(self, *exc_info: object) -> None:
        self.busy = False


class PlainStream(trio.abc.HalfCloseableStream):
    """A connected TCP or Unix stream socket, read and written with os.read/os.write."""

    __slots__ = ("_closed", "_fd", "_receiving", "_sending", "_sent_eof", "transport")

    def __init__(self, transport: trio.SocketStream) -> None:
        self.transport = transport
        self._fd = transport.socket.fileno()
        self._sending = DirectionGuard("sending")
        self._receiving = DirectionGuard("receiving")
        self._closed = False
        self._sent_eof = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport.socket

    def _check_open(self) -> None:
        # The descriptor number may be reused by a new socket once this one is closed,
        # so no call may touch it after aclose().
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            if self._sent_eof:
                raise trio.ClosedResourceError("send_eof() was called on this stream")
            view = memoryview(data).cast("B")
            waited = False
            while view:
                try:
                    sent = os.write(self._fd, view)
                except BlockingIOError:
                    waited = True
                    await self._wait(writable=True)
                    continue
                except OSError as exc:
                    raise _broken(exc) from exc
                view = view[sent:]
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()

    def send_some_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel takes now, without waiting or a checkpoint; 0 if nothing.

        For the Workload API server (`agent.workload_server`), which flushes each
        response from the task that built it: a checkpoint there would be a trip through
        trio's scheduler per message for nothing.  What is left goes through `send_all`.
        """
        if self._closed or self._sent_eof or self._sending.busy:
            return 0
        try:
            return os.write(self._fd, data)
        except OSError:  # would block, or broken: `send_all` waits or reports it
            return 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receiving:
            if max_bytes is None:
                max_bytes = RECEIVE_SIZE
            elif max_bytes < 1:
                raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            waited = False
            while True:
                try:
                    data = os.read(self._fd, max_bytes)
                except BlockingIOError:
                    waited = True
                    await self._wait(writable=False)
                    continue
                except OSError as exc:
                    raise _broken(exc) from exc
                break
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def wait_ready(self, wants: int) -> None:
        """Wait until an end's call that would block (``wants``: `WANT_READ` or
        `WANT_WRITE`) can go on; for the HTTP relay, which drives this stream's end."""
        await self._wait(writable=wants == WANT_WRITE)

    async def _wait(self, *, writable: bool) -> None:
        self._check_open()
        if writable:
            await trio.lowlevel.wait_writable(self.transport.socket)
        else:
            await trio.lowlevel.wait_readable(self.transport.socket)
        self._check_open()

    async def send_eof(self) -> None:
        with self._sending:
            await trio.lowlevel.checkpoint()
            self._check_open()
            if self._sent_eof:
                return
            self._shut_write()

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            await self._wait(writable=True)

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """`aclose` without its checkpoint: nothing in closing waits."""
        self._closed = True
        self.transport.socket.close()

    def _shut_write(self) -> None:
        """Send the half-close (send_eof's and the relay's)."""
        self._sent_eof = True
        try:
            self.transport.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer is gone already: so is our side
                raise _broken(exc) from exc

    def relay_end(self) -> PlainEnd:
        """This stream for the proxy's relay (`proxy.tcp.Relay`), which owns it until it ends."""
        self._check_open()
        return PlainEnd(self)


_buffers = threading.local()


def _lent_buffer() -> bytearray:
    buf: bytearray | None = getattr(_buffers, "plain", None)
    if buf is None:
        buf = _buffers.plain = bytearray(LENT_SIZE)
    return buf


def _broken(exc: OSError) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class PlainEnd:
    """A plain stream as the relay drives it: calls that never wait.

    The relay's contract for an end (`tally.tls.relay_end.TLSEnd` is the other one):
    ``read`` returns data, ``b""`` at the end of the stream, or None when it
    would block.  The data is *lent*: a view of a buffer this thread's ends
    share, valid until the next read of any end, so the relay writes it at once
    and copies only what it could not write (no allocation and no copy per
    chunk on the way through).  ``write`` returns how many bytes it took, or None; ``shut``
    sends the half-close and returns False when it would block.  After a None
    or False, ``wants`` says which readiness of ``fd`` (``WANT_READ`` or
    ``WANT_WRITE``) lets the call go on.  After data, ``more`` says whether
    reading again at once is likely to find more (the read filled its buffer);
    when not, the relay waits for the socket instead of paying for a read that
    would only say "would block".  Failures raise ``trio.BrokenResourceError``.
    """

    __slots__ = ("_into", "_lent", "_stream", "fd", "more", "wants")

    def __init__(self, stream: PlainStream) -> None:
        self._stream = stream
        # The relay reads in the thread that made its ends: this thread's buffer.
        buf = _lent_buffer()
        self._into = (buf,)
        self._lent = memoryview(buf)
        self.fd = stream._fd
        self.wants = WANT_READ
        self.more = True

    def read(self, limit: int = LENT_SIZE) -> memoryview | bytes | None:
        """Up to ``limit`` bytes (at most `LENT_SIZE`), lent."""
        into = self._into if limit >= LENT_SIZE else (self._lent[:limit],)
        try:
            n = os.readv(self.fd, into)
        except BlockingIOError:
            self.wants = WANT_READ
            return None
        except OSError as exc:
            raise _broken(exc) from exc
        self.more = n == limit
        return self._lent[:n] if n else b""

    def write(self, data: bytes | memoryview) -> int | None:
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            self.wants = WANT_WRITE
            return None
        except OSError as exc:
            raise _broken(exc) from exc

    def shut(self) -> bool:
        self._stream._shut_write()
        return True
