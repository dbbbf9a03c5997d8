"""HTTP/1.1 servers and clients over any trio stream (TCP, Unix socket or TLSStream).

Rules:

1. `tally.wire.http1` owns the protocol; this module only moves bytes and time.  One request at a
   time per connection, kept alive until either side says close.
2. Every network wait has a deadline.  A server waits ``idle_timeout`` for the first
   byte of a request and then ``request_timeout`` for the rest of it (headers and
   body); a client bounds each whole call, connect included, with ``timeout``.
   Handlers themselves are not timed: long polls are legitimate.
3. The peer never sees our exception text.  A handler's :class:`HttpError` becomes
   ``{"error": message}`` with its status; anything else a handler raises becomes a
   generic 500, and the traceback goes to the ``tally.wire.http`` log.  Errors in the
   peer's bytes become 400/408/413/431/501/505 with fixed messages.  A request
   whose framing is ambiguous (both Content-Length and Transfer-Encoding) or
   that claims an HTTP version other than 1.0 or 1.1 is refused, never guessed at.
4. A peer cannot crash a server.  Transport, TLS and protocol failures end the
   connection quietly; :func:`serve_http` never raises them.  It does not close the
   stream either: the caller opened it and closes it (``async with stream:``).
5. Client failures are one exception, :class:`HttpClientError`, with the cause
   chained, so a caller can still tell a refused TLS peer from a timeout.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import parse_qsl

import trio

from tally.tls.verify import PeerRejected, TLSError
from tally.wire import http1

log = logging.getLogger("tally.http")

Headers = tuple[tuple[str, str], ...]

RECEIVE_SIZE = 1 << 16
LINGER_S = 1.0
"""After an error response, how long we keep reading so the peer gets to see it."""
_LINGER_BYTES = 1 << 20
_RESERVED_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding", "connection"})
# RFC 9110 section 5.6.2 token, and a field value without CR/LF (obs-text refused).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


class HttpError(Exception):
    """Raised by a handler to answer ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpClientError(Exception):
    """A request could not be completed: connect, transport, protocol or timeout failure."""


def _decode_headers(raw: Sequence[tuple[bytes, bytes]]) -> Headers:
    # llhttp has checked that names are tokens (ASCII); values may hold obs-text: latin-1.
    return tuple((name.decode("ascii"), value.decode("latin-1")) for name, value in raw)


def _find_header(headers: Headers, name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _check_header(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not an HTTP token")
    if not _FIELD_VALUE.fullmatch(value):
        raise ValueError(f"header {name!r} must be one line of printable ASCII, got {value!r}")


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Headers
    body: bytes

    @property
    def path(self) -> str:
        """The target without its query string, as sent (not percent-decoded)."""
        return self.target.split("?", 1)[0]

    @cached_property
    def query(self) -> dict[str, str]:
        """Query parameters, percent-decoded; when a name repeats, the last value wins.
        Parsed once: the CA's routes read several (a parked poll: ``since``, ``wait``, ...)."""
        return dict(parse_qsl(self.target.partition("?")[2], keep_blank_values=True))

    def header(self, name: str) -> str | None:
        """The first value of a header, matched case-insensitively."""
        return _find_header(self.headers, name)

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; anything else is the client's mistake (400)."""
        try:
            value = json.loads(self.body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise HttpError(400, "request body is not valid JSON") from exc
        if not isinstance(value, dict):
            raise HttpError(400, f"request body must be a JSON object, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: Headers = ()
    content_type: str = "application/json"
    stream: AsyncGenerator[bytes, None] | None = None
    """A body sent piece by piece as it is produced (chunked), e.g. server-sent events;
    the connection closes after it.  Each piece is written under the request deadline,
    so a peer that stops reading is dropped, and a drain ends the stream at once."""

    def __post_init__(self) -> None:
        # Checked while the handler runs, so a bad response is the handler's 500
        # rather than a protocol error half way through writing it.
        if not 200 <= self.status <= 599:
            raise ValueError(f"response status must be 200-599, got {self.status}")
        _check_header("content-type", self.content_type)
        for name, value in self.headers:
            _check_header(name, value)
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"response header {name!r} is set by the HTTP layer")

    @classmethod
    def json(cls, obj: object, status: int = 200) -> Response:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), content_type="text/plain; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, message: str) -> Response:
    return Response.json({"error": message}, status=status)


# -- server ------------------------------------------------------------------------------

_PROTOCOL_MESSAGES = {
    400: "bad request",
    414: "request target too long",
    431: "request headers too large",
    501: "transfer coding not supported",
}


class _Refuse(Exception):
    """Internal: answer this request with an error and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.response = _error(status, message)


class _Quit(Exception):
    """Internal: end the connection without another word (idle peer, peer not reading)."""


_PEER_ERRORS = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    TLSError,
    PeerRejected,
    OSError,
    _Quit,
)


class Drain:
    """A server's stop signal for its connections: idle ones close at once, busy ones
    after the response in flight, streamed responses (`Response.stream`) at their next
    wait.  One per server, shared by its connections."""

    def __init__(self) -> None:
        self.started = False
        self._idle: set[trio.CancelScope] = set()
        self._streams: set[trio.CancelScope] = set()  # streamed responses (`Response.stream`)

    def start(self) -> None:
        self.started = True
        for scope in (*self._idle, *self._streams):
            scope.cancel()


async def serve_http(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    idle_timeout: float = 30,
    request_timeout: float = 30,
    max_body: int = 1 << 20,
    max_header_bytes: int = 16384,
    drain: Drain | None = None,
) -> None:
    """Answer requests on ``stream`` until the peer leaves, misbehaves or is too slow,
    or the server drains.

    Returns normally whatever the peer does; only cancellation propagates.
    """
    server = _Server(
        stream, handler, idle_timeout, request_timeout, max_body, max_header_bytes, drain or Drain()
    )
    try:
        while await server.one_cycle():
            pass
    except _PEER_ERRORS:
        return
    except http1.LocalProtocolError:
        log.exception("HTTP layer tried to send something HTTP/1.1 forbids; connection dropped")


class _Server:
    """One connection's request loop; the state is the HTTP/1.1 connection and two deadlines."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        idle_timeout: float,
        request_timeout: float,
        max_body: int,
        max_header_bytes: int,
        drain: Drain,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.drain = drain
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.conn = http1.Connection(http1.SERVER, max_incomplete_event_size=max_header_bytes)
        self.deadline: float | None = None  # set once the first byte of a request is in
        self.method = "GET"  # of the request being answered: HEAD responses carry no body

    async def one_cycle(self) -> bool:
        """Read one request and answer it; False when the connection should end."""
        self.deadline = None
        self.method = "GET"
        try:
            request = await self._read_request()
        except http1.RemoteProtocolError as exc:
            status = exc.error_status_hint
            await self._refuse(_Refuse(status, _PROTOCOL_MESSAGES.get(status, "bad request")))
            return False
        except _Refuse as refusal:
            await self._refuse(refusal)
            return False
        if request is None:
            return False
        response = await self._call_handler(request)
        if response.stream is not None:
            await self._send_stream(response, response.stream)
            return False
        await self._write(self._render(response, close=self.drain.started))
        if self.drain.started:
            return False
        if self.conn.our_state is http1.DONE and self.conn.their_state is http1.DONE:
            self.conn.start_next_cycle()
            return True
        return False

    async def _next_event(self) -> object:
        """The next HTTP/1.1 event (never NEED_DATA); callers act on the types they expect."""
        while True:
            event = self.conn.next_event()
            if event is not http1.NEED_DATA:
                return event
            await self._receive()

    async def _receive(self) -> None:
        """Feed one chunk: under the idle deadline, or mid-request the request deadline."""
        if self.deadline is None and self.conn.trailing_data[0]:
            self.deadline = trio.current_time() + self.request_timeout
        idle = self.deadline is None
        deadline = (
            trio.current_time() + self.idle_timeout if self.deadline is None else self.deadline
        )
        if idle and self.drain.started:
            raise _Quit("server draining")
        with trio.move_on_at(deadline) as scope:
            if idle:
                self.drain._idle.add(scope)
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            finally:
                self.drain._idle.discard(scope)
        if scope.cancelled_caught:
            if idle:
                raise _Quit("server draining" if self.drain.started else "idle timeout")
            raise _Refuse(408, "request timeout")
        if data and self.deadline is None:
            self.deadline = trio.current_time() + self.request_timeout
        self.conn.receive_data(bytes(data) if isinstance(data, bytearray) else data)

    async def _read_request(self) -> Request | None:
        event = await self._next_event()
        if not isinstance(event, http1.Request):
            return None  # ConnectionClosed: the peer left between requests
        self.method = event.method.decode("ascii")
        # http1 has refused an oversized head (431) and Content-Length beside
        # Transfer-Encoding (400) already: `tally.wire.http1` rules 1 and 2.
        if event.http_version not in (b"1.0", b"1.1"):
            raise _Refuse(505, "HTTP version not supported")
        headers = _decode_headers(event.headers)
        declared = _find_header(headers, "content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise _Refuse(413, f"request body exceeds {self.max_body} bytes")
        if self.conn.they_are_waiting_for_100_continue:
            await self._write(
                self.conn.send(http1.InformationalResponse(status_code=100, headers=[]))
            )
        body = bytearray()
        while isinstance(part := await self._next_event(), http1.Data):
            body += part.data
            if len(body) > self.max_body:
                raise _Refuse(413, f"request body exceeds {self.max_body} bytes")
        return Request(self.method, event.target.decode("ascii"), headers, bytes(body))

    async def _call_handler(self, request: Request) -> Response:
        try:
            response: object = await self.handler(request)
        except HttpError as exc:
            return _error(exc.status if 400 <= exc.status <= 599 else 500, exc.message)
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            return _error(500, "internal error")
        if not isinstance(response, Response):
            log.error(
                "handler for %s %s returned %s, not a Response",
                request.method,
                request.path,
                type(response).__name__,
            )
            return _error(500, "internal error")
        return response

    async def _send_stream(self, response: Response, stream: AsyncGenerator[bytes, None]) -> None:
        """Send the head, then each piece the generator yields until it ends or the server
        drains; the generator is closed whatever happens."""
        headers = [("content-type", response.content_type), *response.headers]
        try:
            await self._write(
                self.conn.send(http1.Response(status_code=response.status, headers=headers))
            )
            while self.method != "HEAD" and not self.drain.started:
                # Only the wait for the next piece is cut by a drain, never a write, so
                # the peer always sees the stream end cleanly (the last chunk).
                piece: bytes | None = None
                with trio.CancelScope() as scope:
                    self.drain._streams.add(scope)
                    try:
                        piece = await anext(stream)
                    except StopAsyncIteration:
                        piece = None
                    finally:
                        self.drain._streams.discard(scope)
                if piece is None or scope.cancelled_caught:
                    break
                if piece:
                    await self._write(self.conn.send(http1.Data(data=piece)))
            await self._write(self.conn.send(http1.EndOfMessage()))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(LINGER_S):
                await stream.aclose()

    def _render(self, response: Response, *, close: bool = False) -> bytes:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        out = self.conn.send(http1.Response(status_code=response.status, headers=headers))
        if response.body and self.method != "HEAD" and response.status not in (204, 304):
            out += self.conn.send(http1.Data(data=response.body))
        return out + self.conn.send(http1.EndOfMessage())

    async def _write(self, data: bytes) -> None:
        with trio.move_on_after(self.request_timeout) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise _Quit("peer is not reading")

    async def _refuse(self, refusal: _Refuse) -> None:
        """Answer a request we will not serve, then half-close and let the peer read it."""
        if self.conn.our_state not in (http1.IDLE, http1.SEND_RESPONSE):
            return  # a response is already under way: nothing sensible left to say
        await self._write(self._render(refusal.response, close=True))
        await _linger(self.stream)


async def _linger(stream: trio.abc.Stream) -> None:
    """Closing with unread input makes TCP send a reset, which can destroy the response
    we just sent before the peer reads it; so half-close and drain for a moment."""
    with trio.move_on_after(LINGER_S):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        drained = 0
        while drained < _LINGER_BYTES:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            drained += len(data)


# -- client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientResponse:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        return _find_header(self.headers, name)

    def json(self) -> Any:
        """The decoded body; raises ValueError if it is not JSON."""
        return json.loads(self.body)


class _Stale(Exception):
    """A kept-alive connection turned out closed before the server saw our request."""

    def __init__(self) -> None:
        super().__init__("the server closed the kept-alive connection before answering")


_TRANSPORT_ERRORS = (
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    http1.ProtocolError,
    TLSError,
    PeerRejected,
    OSError,
    _Stale,
)


class HttpClient:
    """One kept-alive HTTP/1.1 connection, opened on demand by ``connect``.

    Calls are serialized.  If the server closed the idle connection since the last
    call, the request is sent once more on a fresh connection, but only when the
    server cannot have acted on it: writing failed, or the connection ended before
    a single byte of response.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[trio.abc.Stream]],
        *,
        host: str = "localhost",
        max_body: int = 16 << 20,
        max_header_bytes: int = 16384,
    ) -> None:
        self._connect = connect
        self._host = host
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._stream: trio.abc.Stream | None = None
        self._conn: http1.Connection | None = None
        self._lock = trio.Lock()
        self._fresh = False
        self.connections_opened = 0

    async def request(
        self,
        method: str,
        target: str,
        *,
        json_body: object | None = None,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        timeout: float = 10,  # noqa: ASYNC109 - one bound for connect, send and receive
        connect_timeout: float | None = None,
    ) -> ClientResponse:
        """Send one request and read the whole response, all within ``timeout`` seconds.

        With ``connect_timeout``, opening a connection first has that long of its own,
        not counted in ``timeout``: for a server that makes new connections wait their
        turn (the CA in a herd), where giving up on the wait loses the turn.
        """
        request, body = self._build(method, target, json_body, body, headers)
        async with self._lock:
            try:
                if connect_timeout is not None and self._stream is None:
                    with trio.fail_after(connect_timeout):
                        await self._open()
                with trio.fail_after(timeout):
                    try:
                        return await self._exchange(request, body)
                    except _Stale:
                        return await self._exchange(request, body)
            except HttpClientError:
                await self._discard()
                raise
            except _TRANSPORT_ERRORS as exc:
                await self._discard()
                raise HttpClientError(f"{method} {target}: {_explain(exc)}") from exc
            except BaseException:
                await self._discard()  # cancelled mid-exchange: the connection is unusable
                raise

    async def _open(self) -> None:
        try:
            self._stream = await self._connect()
        except Exception as exc:
            raise HttpClientError(f"cannot connect: {_explain(exc)}") from exc
        self.connections_opened += 1
        self._conn = http1.Connection(
            http1.CLIENT, max_incomplete_event_size=self._max_header_bytes
        )
        self._fresh = True  # no request sent on it yet: a failure is not a stale connection

    def _build(
        self,
        method: str,
        target: str,
        json_body: object | None,
        body: bytes,
        headers: Sequence[tuple[str, str]],
    ) -> tuple[http1.Request, bytes]:
        if json_body is not None:
            if body:
                raise ValueError("pass either json_body or body, not both")
            body = json.dumps(json_body, separators=(",", ":")).encode()
            headers = (("content-type", "application/json"), *headers)
        try:
            request = http1.Request(
                method=method,
                target=target,
                headers=[("host", self._host), ("content-length", str(len(body))), *headers],
            )
        except http1.LocalProtocolError as exc:
            raise ValueError(f"invalid request {method} {target!r}: {exc}") from exc
        return request, body

    async def _exchange(self, request: http1.Request, body: bytes) -> ClientResponse:
        if self._stream is None or self._conn is None:
            await self._open()
        reused, self._fresh = not self._fresh, False
        stream, conn = self._stream, self._conn
        assert stream is not None and conn is not None
        out = (
            conn.send(request) + conn.send(http1.Data(data=body)) + conn.send(http1.EndOfMessage())
        )
        try:
            await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if reused:
                await self._discard()
                raise _Stale from exc
            raise
        response = await self._read_response(stream, conn, reused)
        if conn.our_state is http1.DONE and conn.their_state is http1.DONE:
            conn.start_next_cycle()
        else:
            await self._discard()  # the server asked to close, or spoke HTTP/1.0
        return response

    async def _read_response(
        self, stream: trio.abc.Stream, conn: http1.Connection, reused: bool
    ) -> ClientResponse:
        got_bytes = False
        head: http1.Response | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is http1.NEED_DATA:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except trio.BrokenResourceError as exc:
                    if reused and not got_bytes:
                        await self._discard()
                        raise _Stale from exc
                    raise
                if not data and not got_bytes:
                    if reused:
                        await self._discard()
                        raise _Stale
                    raise HttpClientError("the server closed the connection without answering")
                got_bytes = True
                conn.receive_data(bytes(data) if isinstance(data, bytearray) else data)
            elif isinstance(event, http1.Response):
                head = event
            elif isinstance(event, http1.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise HttpClientError(f"response body exceeds {self._max_body} bytes")
            elif isinstance(event, http1.EndOfMessage) and head is not None:
                return ClientResponse(head.status_code, _decode_headers(head.headers), bytes(body))
            elif not isinstance(event, http1.InformationalResponse):
                raise HttpClientError("the server closed the connection mid-response")

    async def _discard(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        """Close the kept-alive connection, if any; a later request opens a new one."""
        async with self._lock:
            stream, self._stream, self._conn = self._stream, None, None
            if stream is not None:
                await stream.aclose()


def _explain(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
