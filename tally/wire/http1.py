"""HTTP/1.1 messages and framing: llhttp (through httptools) parses, a small state machine frames.

Tally's one HTTP/1.1 layer underneath `tally.wire.http` (CA API, hooks, console,
OIDC) and the proxy's HTTP mode (`proxy.http`).  It keeps h11's shape (a sans-I/O
`Connection` per connection, the same events and states) because that shape is
right; it exists because h11's pure-Python reader and state machine were about a
third of the proxy's CPU per request and a sixth of the CA's.

Rules:

1. llhttp, Node's parser, reads the peer in strict mode: CRLF line ends only,
   no folded headers, one Content-Length, no Content-Length beside
   Transfer-Encoding, valid tokens and field values; and here, no transfer
   coding but chunked (501).  What it refuses becomes `RemoteProtocolError` with the status
   to answer (``error_status_hint``).  A request that needs a Host (HTTP/1.1)
   must carry exactly one.
2. A head is bounded (``max_incomplete_event_size``): a head still incomplete
   after that many bytes, or a complete one whose target and fields add up to
   more, is refused with 431 before it is held any longer.
3. Bodies keep the peer's framing when passed on: an event per piece llhttp
   hands over, ``Data`` carrying the de-chunked bytes, ``EndOfMessage`` the
   trailers.  What we send is framed by its own headers: Content-Length is
   counted exactly, chunked is chunked, and a response with neither is chunked
   for an HTTP/1.1 peer or ends with the connection for an HTTP/1.0 one.
4. Keep-alive ends when either side says ``Connection: close`` or an
   HTTP/1.0 peer does not ask for keep-alive; both sides then end in
   ``MUST_CLOSE`` instead of ``DONE``, and a response we send says close.
5. One request at a time.  Bytes of a pipelined next request are parsed as
   they come but handed out only after `Connection.start_next_cycle`
   (``PAUSED`` until then).
6. httptools cannot tell llhttp that a response has no body because it
   answers a HEAD request, nor end a body at the connection's end; this module
   does both itself.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, overload

import httptools

__all__ = [
    "CLIENT",
    "CLOSED",
    "DONE",
    "ERROR",
    "IDLE",
    "MUST_CLOSE",
    "NEED_DATA",
    "PAUSED",
    "SEND_BODY",
    "SEND_RESPONSE",
    "SERVER",
    "Connection",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Headers",
    "InformationalResponse",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "Response",
    "tokens",
]


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


def _sentinel(name: str) -> Any:
    return _Sentinel(name, (), {})


class CLIENT(metaclass=_Sentinel):
    """The role of the side that sends requests."""


class SERVER(metaclass=_Sentinel):
    """The role of the side that sends responses."""


Role = type[CLIENT] | type[SERVER]

IDLE = _sentinel("IDLE")
SEND_RESPONSE = _sentinel("SEND_RESPONSE")
SEND_BODY = _sentinel("SEND_BODY")
DONE = _sentinel("DONE")
MUST_CLOSE = _sentinel("MUST_CLOSE")
CLOSED = _sentinel("CLOSED")
ERROR = _sentinel("ERROR")
NEED_DATA = _sentinel("NEED_DATA")
PAUSED = _sentinel("PAUSED")


class ProtocolError(Exception):
    """Something HTTP/1.1 forbids; ``error_status_hint`` is the status that answers it."""

    def __init__(self, message: str, error_status_hint: int = 400) -> None:
        super().__init__(message)
        self.error_status_hint = error_status_hint


class LocalProtocolError(ProtocolError):
    """We tried to send something HTTP/1.1 forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something HTTP/1.1 forbids."""


# RFC 9110 5.6.2 token (method, field name); 5.5 field value without CR, LF or NUL.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[^\x00\r\n]*")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def _bytes(value: bytes | str) -> bytes:
    if type(value) is bytes:  # what llhttp hands over: no copy
        return value
    return value.encode("ascii") if isinstance(value, str) else bytes(value)


class Headers(list[tuple[bytes, bytes]]):
    """A message's fields as (name, value) pairs, in order: names lower-cased as read from
    the peer, and as given (checked) in what we send, since some clients match case."""


def _headers(given: Any, parsed: bool) -> Headers:
    """Fields as given; unless ``parsed`` (llhttp read them, or the proxy passes on what
    it read), each is checked here."""
    if parsed:
        return given if isinstance(given, Headers) else Headers(given)
    out = Headers()
    for name, value in given:
        n, v = _bytes(name), _bytes(value).strip(b" \t")
        if not _TOKEN.fullmatch(n) or not _VALUE.fullmatch(v):
            raise LocalProtocolError(f"illegal header {n!r}: {v!r}")
        out.append((n, v))
    return out


def tokens(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The lower-cased tokens of every ``name`` field (``Connection: close, x``).

    ``name`` is lower case.  Names of another length are skipped before they are
    lower-cased: a message's heads are searched this way several times each.
    """
    found: set[bytes] = set()
    size = len(name)
    for n, v in headers:
        if len(n) == size and n.lower() == name:
            found.update(t.strip().lower() for t in v.split(b","))
    return found


def _get(headers: Headers, name: bytes) -> bytes | None:
    size = len(name)
    for n, v in headers:
        if len(n) == size and n.lower() == name:
            return v
    return None


def _count(headers: Headers, name: bytes) -> int:
    size = len(name)
    return sum(1 for n, _ in headers if len(n) == size and n.lower() == name)


class Request:
    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(
        self,
        *,
        method: bytes | str,
        target: bytes | str,
        headers: Any,
        http_version: bytes | str = b"1.1",
        _parsed: bool = False,
    ) -> None:
        self.method = _bytes(method)
        self.target = _bytes(target)
        self.headers = _headers(headers, _parsed)
        self.http_version = _bytes(http_version)
        if not _parsed:
            if not _TOKEN.fullmatch(self.method):
                raise LocalProtocolError(f"illegal method {self.method!r}")
            if not _TARGET.fullmatch(self.target):
                raise LocalProtocolError(f"illegal request target {self.target!r}")
        if self.http_version == b"1.1" and _count(self.headers, b"host") != 1:
            raise LocalProtocolError("an HTTP/1.1 request needs exactly one Host header")

    def __repr__(self) -> str:
        return f"Request(method={self.method!r}, target={self.target!r}, headers={self.headers!r})"


class _ResponseBase:
    __slots__ = ("headers", "http_version", "reason", "status_code")
    _low, _high = 100, 999

    def __init__(
        self,
        *,
        status_code: int,
        headers: Any,
        reason: bytes | str = b"",
        http_version: bytes | str = b"1.1",
        _parsed: bool = False,
    ) -> None:
        self.status_code = int(status_code)
        self.headers = _headers(headers, _parsed)
        self.reason = _bytes(reason)
        self.http_version = _bytes(http_version)
        if not self._low <= self.status_code <= self._high:
            raise LocalProtocolError(f"{type(self).__name__} with status {self.status_code}")
        if not _parsed and not _REASON.fullmatch(self.reason):
            raise LocalProtocolError(f"illegal reason phrase {self.reason!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code}, headers={self.headers!r})"


class InformationalResponse(_ResponseBase):
    __slots__ = ()
    _low, _high = 100, 199


class Response(_ResponseBase):
    __slots__ = ()
    _low, _high = 200, 999


class Data:
    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Data(<{len(self.data)} bytes>)"


class EndOfMessage:
    __slots__ = ("headers",)

    def __init__(self, headers: Any = ()) -> None:
        self.headers = _headers(headers, False) if headers else Headers()


class ConnectionClosed:
    __slots__ = ()


Event = Request | InformationalResponse | Response | Data | EndOfMessage | ConnectionClosed


class _Failure:
    """A parse error, queued behind the events that came before it."""

    __slots__ = ("error",)

    def __init__(self, error: RemoteProtocolError) -> None:
        self.error = error


class _Reader:
    """llhttp's callbacks, turned into events on the connection's queue."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.in_head = False
        self.head_bytes = 0
        self.url = b""
        self.reason = b""
        self.headers = Headers()
        self.fields_size = 0
        self.trailers: Headers | None = None
        self.interim = False

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.url = self.reason = b""
        self.headers = Headers()
        self.fields_size = 0
        self.trailers = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        value = value.rstrip(b" \t")
        pair = (name.lower(), value)
        if self.trailers is None:
            self.headers.append(pair)
            self.fields_size += len(name) + len(value) + 4
        else:
            self.trailers.append(pair)

    def on_headers_complete(self) -> None:
        self.in_head = False
        if len(self.url) + self.fields_size > self.conn._limit:
            raise RemoteProtocolError("head too large", 431)
        self.trailers = Headers()
        self.interim = self.conn._their_head(self, self.parser)

    def on_body(self, body: bytes) -> None:
        self.conn._events.append(Data(body))

    def on_message_complete(self) -> None:
        if not self.interim:  # a 1xx is a head alone, not a message of its own
            self.conn._events.append(EndOfMessage(self.trailers or ()))
        self.trailers = None

    parser: Any = None


_HINTS = (("invalid `Transfer-Encoding`", 501), ("PRI", 505), ("HTTP version", 505))


def _failure(exc: Exception) -> RemoteProtocolError:
    if isinstance(exc.__context__, RemoteProtocolError):
        return exc.__context__
    text = str(exc) or type(exc).__name__
    for marker, status in _HINTS:
        if marker in text:
            return RemoteProtocolError(text, status)
    return RemoteProtocolError(text)


class Connection:
    """One HTTP/1.1 connection's protocol state, seen from ``our_role``; no I/O."""

    def __init__(self, our_role: Role, max_incomplete_event_size: int = 16 * 1024) -> None:
        self.our_role = our_role
        self.their_role: Role = SERVER if our_role is CLIENT else CLIENT
        self.our_state: Any = IDLE
        self.their_state: Any = IDLE
        self.they_are_waiting_for_100_continue = False
        self._limit = max_incomplete_event_size
        self._events: deque[Event | _Failure] = deque()
        self._eof = False
        self._keep_alive = True
        self._their_version = b"1.1"
        self._request_method: bytes | None = None
        self._until_close = False  # their body ends with the connection (rule 6)
        self._head_only = False  # their next response answers our HEAD (rule 6)
        self._head_buffer = b""
        self._writer: _Writer | None = None
        self._reader = _Reader(self)
        self._parser = self._new_parser()

    def _new_parser(self) -> Any:
        kind = (
            httptools.HttpRequestParser
            if self.their_role is CLIENT
            else httptools.HttpResponseParser
        )
        parser = kind(self._reader)
        self._reader.parser = parser
        return parser

    # -- receiving ---------------------------------------------------------------------

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """(non-empty if input is received and not yet handed out, whether the peer closed)."""
        waiting = bool(self._events) or self._reader.in_head or bool(self._head_buffer)
        return (b"." if waiting else b""), self._eof

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take what the peer sent; ``b""`` means it closed its side."""
        if not data:
            self._eof = True
            return
        if self._events and isinstance(self._events[-1], _Failure):
            return  # nothing after an error is read
        if self._head_only:
            self._feed_head_only(bytes(data))
        else:
            self._feed(data)

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        reader = self._reader
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                # llhttp stops after a CONNECT or an Upgrade request (or a 101): we read on
                # as HTTP, and the proxy or server refuses what it will not serve.
                data = memoryview(data)[exc.args[0] :]
                if data:
                    continue
            except httptools.HttpParserError as exc:
                self._events.append(_Failure(_failure(exc)))
                return
            break
        if reader.in_head:
            reader.head_bytes += len(data)
            if reader.head_bytes > self._limit:
                self._events.append(_Failure(RemoteProtocolError("head too large", 431)))

    def _feed_head_only(self, data: bytes) -> None:
        """Rule 6: a response to HEAD ends with its head; llhttp sees the head alone."""
        self._head_buffer += data
        while self._head_only and self._head_buffer:
            end = self._head_buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head_buffer) > self._limit:
                    self._events.append(_Failure(RemoteProtocolError("head too large", 431)))
                return
            head, self._head_buffer = self._head_buffer[: end + 4], self._head_buffer[end + 4 :]
            before = len(self._events)
            self._feed(head)
            if self._events and isinstance(self._events[-1], _Failure):
                return
            final = any(isinstance(e, Response) for e in list(self._events)[before:])
            if final:
                if not isinstance(self._events[-1], EndOfMessage):
                    self._events.append(EndOfMessage())
                    self._parser = self._new_parser()
                self._head_only = False
        if not self._head_only and self._head_buffer:
            rest, self._head_buffer = self._head_buffer, b""
            self._feed(rest)

    def _their_head(self, reader: _Reader, parser: Any) -> bool:
        """Queue the head llhttp read; True if it is an interim (1xx) response."""
        version = parser.get_http_version().encode("ascii")
        headers = reader.headers
        for name, value in headers:
            if name == b"transfer-encoding" and value.lower() != b"chunked":
                raise RemoteProtocolError("only the chunked transfer coding is supported", 501)
        if self.their_role is CLIENT:
            try:
                request = Request(
                    method=parser.get_method(),
                    target=reader.url,
                    headers=headers,
                    http_version=version,
                    _parsed=True,
                )
            except LocalProtocolError as exc:  # no Host, or two
                raise RemoteProtocolError(str(exc)) from None
            self._events.append(request)
            return False
        status: int = parser.get_status_code()
        kind = InformationalResponse if status < 200 else Response
        self._events.append(
            kind(
                status_code=status,
                headers=headers,
                reason=reader.reason,
                http_version=version,
                _parsed=True,
            )
        )
        return status < 200

    def next_event(self) -> Any:
        """The next event from the peer, or NEED_DATA, or PAUSED (rule 5)."""
        state = self.their_state
        if state is ERROR:
            raise RemoteProtocolError("the peer's side is already in error")
        if state is DONE or state is MUST_CLOSE or state is CLOSED:
            if self._events:
                if state is not DONE:
                    self.their_state = ERROR
                    raise RemoteProtocolError("data after the peer said it would close")
                return PAUSED
            if self._eof:
                self.their_state = CLOSED
                return ConnectionClosed()
            return NEED_DATA
        if self._events:
            event = self._events.popleft()
            if isinstance(event, _Failure):
                self.their_state = ERROR
                raise event.error
            self._theirs(event)
            return event
        if self._eof:
            if state is IDLE and not self.trailing_data[0]:
                self.their_state = CLOSED
                return ConnectionClosed()
            if state is SEND_BODY and self._until_close:
                event = EndOfMessage()
                self._theirs(event)
                return event
            self.their_state = ERROR
            raise RemoteProtocolError("the peer closed the connection in the middle of a message")
        return NEED_DATA

    @property
    def message_complete(self) -> bool:
        """Whether the end of their current message is already read (it waits among the
        events still to be handed out): a body that came whole with its head."""
        return any(type(event) is EndOfMessage for event in self._events)

    def _theirs(self, event: Event) -> None:
        kind = type(event)
        if kind is Data:
            self.they_are_waiting_for_100_continue = False
        elif kind is EndOfMessage:
            self.their_state = DONE if self._keep_alive else MUST_CLOSE
            if self.our_state is DONE and not self._keep_alive:
                self.our_state = MUST_CLOSE
        elif kind is Request:
            assert isinstance(event, Request)
            self.their_state = SEND_BODY
            self.our_state = SEND_RESPONSE
            self._request_method = event.method
            self._their_version = event.http_version
            self._note_keep_alive(event.headers, event.http_version)
            if event.http_version == b"1.1" and b"100-continue" in tokens(event.headers, b"expect"):
                self.they_are_waiting_for_100_continue = True
        elif kind is Response:
            assert isinstance(event, Response)
            self.their_state = SEND_BODY
            self._their_version = event.http_version
            self._note_keep_alive(event.headers, event.http_version)
            status = event.status_code
            self._until_close = not (
                self._request_method == b"HEAD"
                or status in (204, 304)
                or _get(event.headers, b"content-length") is not None
                or b"chunked" in tokens(event.headers, b"transfer-encoding")
            )
        elif kind is ConnectionClosed:
            self.their_state = CLOSED

    def _note_keep_alive(self, headers: Headers, version: bytes) -> None:
        said = tokens(headers, b"connection")
        if b"close" in said or (version < b"1.1" and b"keep-alive" not in said):
            self._keep_alive = False

    # -- sending -----------------------------------------------------------------------

    @overload
    def send(self, event: ConnectionClosed) -> None: ...

    @overload
    def send(
        self, event: Request | InformationalResponse | Response | Data | EndOfMessage
    ) -> bytes: ...

    def send(self, event: Event) -> bytes | None:
        """The bytes that put ``event`` on the wire (None for ConnectionClosed)."""
        pieces = self.send_with_data_passthrough(event)
        if pieces is None:
            return None
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def send_with_data_passthrough(self, event: Event) -> list[Any] | None:
        """As `send`, in pieces; a ``Data`` event's bytes are one piece, never copied."""
        kind = type(event)
        if kind is Data:
            assert isinstance(event, Data)
            if self.our_state is not SEND_BODY or self._writer is None:
                raise LocalProtocolError(f"cannot send data in state {self.our_state!r}")
            return self._writer.data(event.data)
        if kind is EndOfMessage:
            assert isinstance(event, EndOfMessage)
            if self.our_state is not SEND_BODY or self._writer is None:
                raise LocalProtocolError(f"cannot end a message in state {self.our_state!r}")
            out = self._writer.end(event.headers)
            self._writer = None
            self.our_state = DONE if self._keep_alive else MUST_CLOSE
            if self.their_state is DONE and not self._keep_alive:
                self.their_state = MUST_CLOSE
            return out
        if kind is Response or kind is InformationalResponse:
            assert isinstance(event, _ResponseBase)
            return [self._send_response(event)]
        if kind is Request:
            assert isinstance(event, Request)
            return [self._send_request(event)]
        if kind is ConnectionClosed:
            self.our_state = CLOSED
            return None
        raise LocalProtocolError(f"cannot send {event!r}")

    def _send_request(self, event: Request) -> bytes:
        if self.our_role is not CLIENT or self.our_state is not IDLE:
            raise LocalProtocolError(f"cannot send a request in state {self.our_state!r}")
        headers = event.headers
        if b"close" in tokens(headers, b"connection"):
            self._keep_alive = False
        self._writer = _writer_for(headers)
        self._request_method = event.method
        self._head_only = event.method == b"HEAD"
        self.our_state = SEND_BODY
        head = [event.method, b" ", event.target, b" HTTP/1.1\r\n"]
        return _head(head, headers)

    def _send_response(self, event: _ResponseBase) -> bytes:
        if self.our_role is not SERVER or self.our_state not in (IDLE, SEND_RESPONSE):
            raise LocalProtocolError(f"cannot send a response in state {self.our_state!r}")
        headers = event.headers
        status = event.status_code
        if status < 200:
            self.they_are_waiting_for_100_continue = False
        else:
            headers, self._writer = self._framed(headers, status)
            self.our_state = SEND_BODY
        reason = event.reason or _reason(status)
        return _head([b"HTTP/1.1 %d " % status, reason, b"\r\n"], headers)

    def _framed(self, headers: Headers, status: int) -> tuple[Headers, _Writer]:
        """Rule 3 for a response: its framing, and the headers that announce it."""
        peer_1_1 = self._their_version == b"1.1" and self.their_state is not ERROR
        if self._request_method == b"HEAD" or status in (204, 304):
            writer: _Writer = _Writer(0)
        elif b"chunked" in tokens(headers, b"transfer-encoding") and peer_1_1:
            writer = _Writer(None)
        elif (length := _get(headers, b"content-length")) is not None:
            writer = _Writer(int(length) if length.isdigit() else 0)
        elif peer_1_1:
            headers = Headers([*headers, (b"transfer-encoding", b"chunked")])
            writer = _Writer(None)
        else:  # an HTTP/1.0 peer: the body ends with the connection
            headers = Headers([(n, v) for n, v in headers if n.lower() != b"transfer-encoding"])
            writer = _Writer(-1)
            self._keep_alive = False
        if not peer_1_1 and self.their_state is ERROR:
            self._keep_alive = False
        said = tokens(headers, b"connection")
        if not self._keep_alive or b"close" in said:
            self._keep_alive = False
            if b"close" not in said:
                headers = Headers([(n, v) for n, v in headers if n.lower() != b"connection"])
                headers.append((b"connection", b"close"))
        return headers, writer

    def start_next_cycle(self) -> None:
        """Both sides finished a message cleanly: ready for the next request."""
        if self.our_state is not DONE or self.their_state is not DONE:
            raise LocalProtocolError("the connection is not ready for another request")
        self.our_state = self.their_state = IDLE
        self._request_method = None
        self._until_close = False
        self.they_are_waiting_for_100_continue = False


class _Writer:
    """Our body's framing: a Content-Length to count down, chunked (None), or until close (-1)."""

    __slots__ = ("left",)

    def __init__(self, left: int | None) -> None:
        self.left = left

    def data(self, data: Any) -> list[Any]:
        n = len(data)
        if not n:
            return []
        left = self.left
        if left is None:
            return [b"%x\r\n" % n, data, b"\r\n"]
        if left >= 0:
            if n > left:
                raise LocalProtocolError("more data than the declared Content-Length")
            self.left = left - n
        return [data]

    def end(self, trailers: Headers) -> list[Any]:
        if self.left is None:
            return [_head([b"0\r\n"], trailers)]
        if self.left > 0:
            raise LocalProtocolError("less data than the declared Content-Length")
        return []


def _writer_for(headers: Headers) -> _Writer:
    if b"chunked" in tokens(headers, b"transfer-encoding"):
        return _Writer(None)
    length = _get(headers, b"content-length")
    return _Writer(int(length) if length is not None and length.isdigit() else 0)


def _head(first: list[bytes], headers: Headers) -> bytes:
    for name, value in headers:
        first += (name, b": ", value, b"\r\n")
    first.append(b"\r\n")
    return b"".join(first)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
