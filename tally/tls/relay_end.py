"""The relay's end of a TLS stream: non-waiting reads and writes straight into OpenSSL.

The proxy's relay (`proxy.tcp.Relay`) moves every byte of an established
connection, so it drives each end with plain calls that never wait and does the
waiting itself (`tally.tls.plain.PlainEnd` is the plain counterpart).  A
:class:`TLSEnd` is made by `tally.tls.stream.TLSStream.relay_end` after the
handshake and keeps that stream's state current, so closing the stream afterwards
behaves as it would after its own reads and writes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import trio
from OpenSSL import SSL

# SSL_read/SSL_write and their error codes are reachable only through pyOpenSSL's binding.
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tally.tls.contexts import RECORD_SIZE
from tally.tls.plain import LENT_SIZE, WANT_READ, WANT_WRITE

if TYPE_CHECKING:  # the stream makes its end (TLSStream.relay_end): a type-only import back
    from tally.tls.stream import TLSStream

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

    def read(self, limit: int = LENT_SIZE) -> memoryview | bytes | None:
        """Whole records, up to ``limit`` bytes (from `RECORD_SIZE` to `LENT_SIZE`), lent."""
        if self._after is not None:
            return self._end_now()
        ssl, buf = self._ssl, self._buf
        n = total = _lib.SSL_read(ssl, buf, RECORD_SIZE)
        # Full records: a bulk transfer, with more behind them.
        while n == RECORD_SIZE and total <= limit - RECORD_SIZE:
            n = _lib.SSL_read(ssl, buf + total, RECORD_SIZE)
            if n > 0:
                total += n
        if total > 0 and self._unsaved:
            self._unsaved = False
            self._stream._save_session()
        if n > 0:
            self.more = n == RECORD_SIZE
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
