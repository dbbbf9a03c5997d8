"""HTTP/1.1 forwarding on `tally.wire.http1`, one request at a time, bodies streamed both ways.

Rules:

1. Streamed, never buffered whole.  Each body chunk is passed on as it
   arrives (the parser hands us what one read brought), in both directions, with the
   sender's framing kept (Content-Length stays Content-Length, chunked stays
   chunked), so memory per request is bounded by one read whatever the size.
   A request with a body runs two tasks, so a service that answers before it
   has read the whole body (or sends ``100 Continue``) is relayed as it
   happens.
2. Keep-alive is per side.  Hop-by-hop headers (``Connection`` and what it
   names, ``Keep-Alive``, ``TE``, ``Upgrade``...) are dropped when forwarding,
   so a client's ``Connection: close`` ends only the client's connection.
   Upgrades (WebSocket) are therefore not relayed in HTTP mode; TCP mode
   carries them.
3. Errors have an owner.  `UpstreamError` (the side we forward to failed) is
   answered with 502, or 504 on a timeout, if no response has started yet,
   otherwise the client connection is cut, because a half-sent response
   cannot be taken back.  `DownstreamError` (the side that sent the request
   failed) ends both; when the client's body broke the framing (bad
   chunking) and no response has started, the client gets a 400 first.  The
   target has then seen a head and part of a body, never a complete request.
   An exchange's idle deadline moves whenever bytes are read or written on
   either side; when it fires during a write to a client that stopped
   reading, the client is at fault (`DownstreamError`), not the target.
   Peers never see exception text.
7. A request has a total deadline (``request_timeout``, as Envoy's
   ``request_timeout`` or HAProxy's ``timeout http-request``), counted from
   its first byte to the end of its body, because the idle deadline alone is
   pushed back by every byte: a client trickling one byte per second would
   hold the connection forever.  On expiry while we wait on the client
   (`RequestTimeout`) it gets a 408 if no response has started, and the
   connection closes; when it fires while the target is not taking the body,
   the target is at fault (504).
4. Waiting for the next request is the only wait a drain or an expired peer
   certificate interrupts (`Idlers`); a request that has started is finished,
   and its response says ``Connection: close`` when we will close after it.
5. Writes are coalesced.  What we forward is queued and sent only before we
   would wait for more input, so a small response (head, body and end read
   in one go) leaves as one write, and on the TLS side as one record, instead
   of three.  A flush the kernel takes whole does not checkpoint: the wait
   for input that follows it is the exchange's checkpoint, and a trip through
   trio's scheduler per message was a tenth of a small request's cost.
6. Ambiguous framing is refused, not relayed.  The parser (`tally.wire.http1`
   rule 1) refuses a request with both Content-Length and Transfer-Encoding,
   which a target trusting the former would read as two (request smuggling),
   as well as folded headers (obs-fold) and bare LF line ends, with a 400; a
   request claiming an HTTP version other than 1.x gets a 505.  Either way
   the connection closes and the target sees nothing.
9. The proxy's own streams are driven through their relay ends
   (`tally.tls.plain.PlainEnd`, `tally.tls.relay_end.TLSEnd`), as TCP mode's
   relay drives them: a read or a write is one call that never waits, and the
   exchange waits on the socket (``wait_ready``) only when that call says it
   would block.  The stream API's layers per call (a guard, a checkpoint, and on
   TLS pyOpenSSL's exception per "would block", a buffer per read and a call per
   16 KiB record written) were a quarter of a small request's CPU.  A read that
   found its bytes waiting delivers a pending cancellation but yields to the
   scheduler only every `YIELD_EVERY` reads, so a fast peer cannot starve the
   other connections and deadlines still fire.
8. What the parser read is not validated again.  A forwarded head is built
   from fields llhttp already checked against the RFC grammar, so it is built
   with ``_parsed=True`` (the Host rule still applies), and body events are
   passed on as the same objects.  Only what the proxy adds itself (XFCC, a
   bearer token, a Host for HTTP/1.0) is checked, by `checked`.  Checking
   every header twice was a fifth of HTTP mode's CPU per request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar, cast

import trio

from proxy.tcp import Deadline, End
from tally.wire import http1

CHUNK = 1 << 16
"""Bytes per read.  Not more than ``MAX_HEAD_BYTES``, so a head is measured against its
limit before a second read is taken for it (tests/security/test_garbage.py's huge_header
case)."""
MAX_HEAD_BYTES = 64 * 1024
YIELD_EVERY = 8
"""Reads that found their bytes waiting, in a row, before one yields to the scheduler
(rule 9): a fast peer must not keep the other connections waiting."""
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"http2-settings"}
)
Headers = list[tuple[bytes, bytes]]
E = TypeVar("E", http1.Request, http1.Response, http1.InformationalResponse)
P = ParamSpec("P")
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, http1.ProtocolError)
# RFC 9110 5.1 field-name (token) and 5.5 field-value without obs-text: what we add ourselves.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_FIELD_VALUE = re.compile(rb"[\x21-\x7e]([\t\x20-\x7e]*[\x21-\x7e])?|")


class UpstreamError(Exception):
    """The side we forward to failed; ``timeout`` when it went silent."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class DownstreamError(Exception):
    """The side that sent the request failed or went away."""


class RequestTimeout(DownstreamError):
    """The client did not send the whole request within ``request_timeout`` (rule 7)."""

    def __init__(self, message: str, *, phase: str) -> None:
        super().__init__(message)
        self.phase = phase
        """``head`` or ``body``: what was still arriving."""


class MalformedBody(DownstreamError):
    """The request body broke HTTP/1.1 framing (bad chunking): answered 400 if we still can."""


class _Driven(Protocol):
    """A stream whose end the HTTP relay drives (`tally.tls.plain.PlainStream`,
    `tally.tls.stream.TLSStream`): calls that never wait, and a wait for the readiness
    one of them asked for."""

    def relay_end(self) -> End: ...

    async def wait_ready(self, wants: int) -> None: ...


class HttpStream:
    """One HTTP/1.1 connection bound to one trio stream, with an output queue (rule 5).

    The proxy's own streams are read and written through their relay end (rule 9),
    any other trio stream (the tests' memory streams) through the stream API.
    """

    def __init__(
        self, stream: trio.abc.Stream, role: type[http1.CLIENT] | type[http1.SERVER]
    ) -> None:
        self.stream = stream
        self.conn = http1.Connection(role, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._out: list[bytes] = []
        self._left: bytes | memoryview | None = None  # what a write left behind (`write_now`)
        self._end: End | None = None
        self._wait: Callable[[int], Awaitable[None]] | None = None
        if hasattr(stream, "relay_end") and hasattr(stream, "wait_ready"):
            driven = cast(_Driven, stream)
            try:
                self._end = driven.relay_end()
            except ValueError:  # a TLS stream before its handshake: the stream API
                pass
            else:
                self._wait = driven.wait_ready
        self._unyielded = 0
        self.sending = False
        """True while (or after) a write waits for the peer: who stalled, on a timeout."""
        self.due = math.inf
        """trio time by which the request being read must have arrived whole (rule 7)."""

    @property
    def has_input(self) -> bool:
        """Bytes (or EOF) already received and not yet parsed: a pipelined request."""
        data, closed = self.conn.trailing_data
        return bool(data) or closed

    async def receive(self, activity: Deadline | None = None) -> None:
        """Feed the parser one read (at most `CHUNK`), waiting only while nothing has arrived."""
        end = self._end
        if end is None:
            data = await self.stream.receive_some(CHUNK)
        else:
            assert self._wait is not None
            got = end.read(CHUNK)
            waited = got is None
            while got is None:
                await self._wait(end.wants)
                got = end.read(CHUNK)
            # llhttp hands on copies of what it is given: a lent read is safe to pass,
            # and once passed, a cancellation below loses nothing.
            self.conn.receive_data(got)
            if activity is not None:
                activity.touch()
            if waited:
                self._unyielded = 0
            elif self._unyielded < YIELD_EVERY:
                # Rule 9: a read that found its bytes waiting needs no trip through the
                # scheduler, but cancellation (deadlines, a drain) must still get in.
                self._unyielded += 1
                await trio.lowlevel.checkpoint_if_cancelled()
            else:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            return
        if activity is not None:
            activity.touch()
        self.conn.receive_data(bytes(data))

    async def next_event(self, activity: Deadline | None = None) -> object:
        while True:
            event = self.conn.next_event()
            if event is not http1.NEED_DATA:
                return event
            await self.receive(activity)

    def queue(self, event: http1.Event) -> None:
        """Serialize ``event`` behind what is queued.  A body chunk is kept as the very
        object the parser handed over (``send_with_data_passthrough``): a bulk body is then never
        copied here, only the small framing around it."""
        pieces = self.conn.send_with_data_passthrough(event)
        if pieces:
            self._out += pieces

    @property
    def end(self) -> End | None:
        """The relay end this stream is driven through (rule 9), or None for the stream API."""
        return self._end

    @property
    def pending(self) -> bool:
        """Output queued or left behind by a write that would have blocked."""
        return bool(self._out) or self._left is not None

    def write_now(self) -> bool:
        """Send the queue without waiting (driven streams only): True once all of it is out.

        What the kernel did not take stays, and is offered again first, as the same bytes
        (TLS requires it), by the next call once the end's ``wants`` is ready;
        ``sending`` stays True meanwhile.
        """
        end = self._end
        assert end is not None
        out = self._out
        self.sending = True  # stays True if the write fails
        while True:
            view = self._left
            if view is None:
                if not out:
                    break
                view = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
            n = end.write(view)
            if n is None:
                self._left = view
                return False
            self._left = memoryview(view)[n:] if n < len(view) else None
        self.sending = False
        return True

    async def flush(self, activity: Deadline | None = None) -> None:
        """Send the queue: at once if the kernel takes it all (no checkpoint, rule 5),
        else waiting for the socket between attempts."""
        end = self._end
        if end is None:
            if self._out:
                out = self._out
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                self.sending = True  # stays True if the write is cancelled or fails
                await self.stream.send_all(data)
                self.sending = False
                if activity is not None:
                    activity.touch()
            return
        if not self._out and self._left is None:
            return
        assert self._wait is not None
        while not self.write_now():
            await self._wait(end.wants)
        if activity is not None:
            activity.touch()

    async def send(self, event: http1.Event) -> None:
        self.queue(event)
        await self.flush()

    def reusable(self) -> bool:
        """Start the next cycle if both sides finished this one cleanly; False: close it."""
        if self.conn.our_state is http1.DONE and self.conn.their_state is http1.DONE:
            self.conn.start_next_cycle()
            return True
        return False


class _Drained(Protocol):
    def drain(self) -> None: ...


class Idlers:
    """Connections waiting for their next request, so a drain can wake them all at once:
    the tasks that wait (their scopes), and the lanes (`proxy.http_lane`) that may."""

    def __init__(self) -> None:
        self.draining = False
        self.scopes: set[trio.CancelScope] = set()
        self.lanes: set[_Drained] = set()

    @contextmanager
    def waiting(self, scope: trio.CancelScope) -> Iterator[None]:
        if self.draining:
            scope.cancel()
        self.scopes.add(scope)
        try:
            yield
        finally:
            self.scopes.discard(scope)

    def drain(self) -> None:
        self.draining = True
        for scope in list(self.scopes):
            scope.cancel()
        for lane in list(self.lanes):
            lane.drain()


async def next_request(
    down: HttpStream, idlers: Idlers, idle_s: float, hard_at: float, request_s: float = math.inf
) -> tuple[http1.Request | None, str]:
    """The next request, or None and why not: closed, idle, draining, peer_expired,
    bad_request, request_timeout.

    Only the wait for the first byte is interruptible (rule 4); once a request
    has begun, its head gets ``idle_s`` to arrive, and head and body together
    ``request_s`` (rule 7: ``down.due`` is set when its first byte is here).
    """
    if idlers.draining:
        return None, "draining"
    if trio.current_time() >= hard_at:
        return None, "peer_expired"
    try:
        if not down.has_input:
            with trio.CancelScope(deadline=min(trio.current_time() + idle_s, hard_at)) as scope:
                # `Idlers.waiting`, inlined as this runs per request; draining was
                # checked above, with no checkpoint since.
                idlers.scopes.add(scope)
                try:
                    await down.receive()
                finally:
                    idlers.scopes.discard(scope)
            if scope.cancelled_caught:
                return None, why_woken(idlers, hard_at)
        began = trio.current_time()
        down.due = began + request_s
        event: object = down.conn.next_event()  # usually the whole head came in one read
        if event is http1.NEED_DATA:
            event = None
            with trio.CancelScope(deadline=min(began + idle_s, down.due)):
                event = await down.next_event()
        if isinstance(event, http1.Request):
            refusal = refused(event)
            if refusal is None:
                return event, ""
            await respond_error(down, *refusal)
            return None, "bad_request"
        if event is None:
            await respond_error(down, 408, "request head took too long")
            return None, "request_timeout" if trio.current_time() >= down.due else "idle"
        return None, "closed"
    except http1.RemoteProtocolError as exc:
        await respond_error(down, exc.error_status_hint, "malformed request")
        return None, "bad_request"
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None, "closed"


def refused(request: http1.Request) -> tuple[int, str] | None:
    """Requests the parser accepts that must not be relayed (rule 6), as (status, text)."""
    if request.http_version not in (b"1.0", b"1.1"):  # llhttp reads HTTP/2.0 heads too
        return 505, "HTTP version not supported"
    return None


def why_woken(idlers: Idlers, hard_at: float) -> str:
    if idlers.draining:
        return "draining"
    return "peer_expired" if trio.current_time() >= hard_at else "idle"


def forwarded_headers(
    headers: Sequence[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()
) -> Headers:
    """Headers minus the hop-by-hop ones (rule 2) and ``drop``; names are lower case."""
    named = http1.tokens(headers, b"connection")
    if named:
        drop = drop | named
    return [(name, value) for name, value in headers if name not in HOP_BY_HOP and name not in drop]


def has_body(request: http1.Request) -> bool:
    """RFC 9112 6.3: a request has a body only if it says so."""
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def respond_error(
    down: HttpStream, status: int, text: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A short plain-text error (with ``extra`` headers), then the connection is done;
    best effort."""
    if down.conn.our_state not in (http1.IDLE, http1.SEND_RESPONSE):
        return
    body = f"{status} {text}\n".encode()
    try:
        await down.send(
            http1.Response(
                status_code=status,
                headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *extra,
                ],
            )
        )
        await down.send(http1.Data(data=body))
        await down.send(http1.EndOfMessage())
    except _IO_ERRORS:
        pass


@dataclass
class Exchange:
    """One request's journey, for the access log and the byte counters."""

    method: str
    target: str
    started: float = field(default_factory=trio.current_time)
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    response_started: bool = False
    timed_out: str = ""
    """The phase (``body``) that ``request_timeout`` cut off, if it did (rule 7)."""

    @classmethod
    def of(cls, request: http1.Request) -> Exchange:
        return cls(
            request.method.decode("ascii", "replace"), request.target.decode("ascii", "replace")
        )

    @property
    def duration_ms(self) -> float:
        return round((trio.current_time() - self.started) * 1000, 3)


Failure = type[UpstreamError] | type[DownstreamError]


async def _next_from(
    src: HttpStream, dst: HttpStream, activity: Deadline, src_fails: Failure, dst_fails: Failure
) -> object:
    """The next event from ``src``; before waiting for input, ``dst``'s queue goes out."""
    while True:
        try:
            event = src.conn.next_event()
        except http1.ProtocolError as exc:
            kind = MalformedBody if src_fails is DownstreamError else src_fails
            raise kind(f"malformed message: {exc}") from exc
        if isinstance(event, http1.ConnectionClosed):
            raise src_fails("the connection closed in the middle of a message")
        if event is not http1.NEED_DATA:
            return event
        await _flush(dst, dst_fails, activity)
        try:
            await src.receive(activity)
        except _IO_ERRORS as exc:
            raise src_fails(f"reading failed: {exc!r}") from exc


def _queue(dst: HttpStream, event: http1.Event, fails: Failure) -> None:
    try:
        dst.queue(event)
    except http1.ProtocolError as exc:
        raise fails(f"cannot relay this message: {exc}") from exc


async def _flush(dst: HttpStream, fails: Failure, activity: Deadline | None = None) -> None:
    try:
        await dst.flush(activity)
    except _IO_ERRORS as exc:
        raise fails(f"sending failed: {exc!r}") from exc


def _build(kind: Callable[P, E], *args: P.args, **fields: P.kwargs) -> E:
    """A head to forward, from fields the parser read (rule 8); a refusal fails the exchange."""
    try:
        return kind(*args, **fields, _parsed=True)  # type: ignore[arg-type]
    except http1.LocalProtocolError as exc:
        raise UpstreamError(f"cannot relay this message head: {exc}") from exc


def forwarded_request(request: http1.Request, headers: Headers) -> http1.Request:
    """The head that goes to the target, with ``headers`` (`request_headers`)."""
    return _build(
        http1.Request,
        method=request.method,
        target=request.target,
        headers=headers,
        http_version=b"1.1",
    )


def forwarded_response(
    event: http1.InformationalResponse | http1.Response, ex: Exchange, *, closing: bool
) -> http1.InformationalResponse | http1.Response:
    """The response head that goes back (rules 2 and 4), noted in ``ex`` if it is the
    final one; UpstreamError if it cannot be relayed (a 101 never can)."""
    if type(event) is http1.InformationalResponse:
        if event.status_code == 101:
            raise UpstreamError("the target switched protocols, which HTTP mode cannot relay")
        return _build(
            http1.InformationalResponse,
            status_code=event.status_code,
            headers=forwarded_headers(event.headers),
            reason=event.reason,
            http_version=b"1.1",
        )
    headers = forwarded_headers(event.headers)
    if closing:
        headers.append((b"connection", b"close"))
    ex.status = event.status_code
    ex.response_started = True
    return _build(
        http1.Response,
        status_code=event.status_code,
        headers=headers,
        reason=event.reason,
        http_version=b"1.1",
    )


def checked(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers the proxy adds, checked as the parser would have (rule 8); UpstreamError if not."""
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise UpstreamError(f"cannot relay this message head: bad added header {name!r}")
    return list(headers)


async def _relay_request_body(
    down: HttpStream, up: HttpStream, ex: Exchange, activity: Deadline, count: Callable[[int], None]
) -> None:
    """The body, streamed, until ``down.due`` (rule 7): then the one who stalled fails."""
    with trio.CancelScope(deadline=down.due) as scope:
        await _relay_body(down, up, ex, activity, count)
    if scope.cancelled_caught:
        if up.sending:  # the target stopped taking the body: not the client's fault
            raise UpstreamError("the target did not take the request body in time", timeout=True)
        raise RequestTimeout("the request body did not arrive in time", phase="body")


async def _relay_body(
    down: HttpStream, up: HttpStream, ex: Exchange, activity: Deadline, count: Callable[[int], None]
) -> None:
    while True:
        event = await _next_from(down, up, activity, DownstreamError, UpstreamError)
        if type(event) is http1.Data:
            _queue(up, event, UpstreamError)
            ex.bytes_in += len(event.data)
            count(len(event.data))
        elif type(event) is http1.EndOfMessage:
            _queue(up, event, UpstreamError)
            await _flush(up, UpstreamError, activity)
            return
        else:
            raise DownstreamError(f"unexpected {type(event).__name__} in a request body")


async def _relay_response(
    down: HttpStream,
    up: HttpStream,
    ex: Exchange,
    activity: Deadline,
    closing: Callable[[], bool],
    count: Callable[[int], None],
) -> None:
    while True:
        event = await _next_from(up, down, activity, UpstreamError, DownstreamError)
        if isinstance(event, http1.InformationalResponse | http1.Response):
            _queue(down, forwarded_response(event, ex, closing=closing()), DownstreamError)
        elif type(event) is http1.Data:
            _queue(down, event, DownstreamError)
            ex.bytes_out += len(event.data)
            count(len(event.data))
        elif type(event) is http1.EndOfMessage:
            _queue(down, event, DownstreamError)
            await _flush(down, DownstreamError, activity)
            return
        else:
            raise UpstreamError(f"unexpected {type(event).__name__} from the target")


async def exchange(
    down: HttpStream,
    up: HttpStream,
    request: http1.Request,
    headers: Headers,
    *,
    body_pending: bool,
    ex: Exchange,
    idle_s: float,
    closing: Callable[[], bool],
    count_to_target: Callable[[int], None],
    count_from_target: Callable[[int], None],
) -> None:
    """Send ``request`` upstream and relay its body and the response (rule 1).

    ``body_pending`` False means the caller already consumed the request's
    (empty) body, so the exchange can be retried on another connection.
    Raises UpstreamError or DownstreamError (rule 3).  If the response ends
    before the request body, the body is abandoned and ``down`` cannot be
    reused (`HttpStream.reusable` says so).
    """
    activity = Deadline(idle_s)
    with activity.scope:
        _queue(up, forwarded_request(request, headers), UpstreamError)
        if not body_pending:
            _queue(up, http1.EndOfMessage(), UpstreamError)
        await _flush(up, UpstreamError)
        if not body_pending:
            await _relay_response(down, up, ex, activity, closing, count_from_target)
            return
        try:
            async with trio.open_nursery() as nursery:

                async def body() -> None:
                    await _relay_request_body(down, up, ex, activity, count_to_target)

                async def response() -> None:
                    await _relay_response(down, up, ex, activity, closing, count_from_target)
                    nursery.cancel_scope.cancel()  # an unread rest of the body is abandoned

                nursery.start_soon(body)
                nursery.start_soon(response)
        except BaseExceptionGroup as group:
            error = _ours(group)
            if isinstance(error, MalformedBody) and not ex.response_started:
                ex.status = 400
                await respond_error(down, 400, "malformed request body")
            if isinstance(error, RequestTimeout):
                ex.timed_out = error.phase
                if not ex.response_started:
                    ex.status = 408
                    await respond_error(down, 408, "request body took too long")
            raise error from None
    if activity.scope.cancelled_caught:
        if down.sending:  # the response was flowing and the client stopped reading it
            raise DownstreamError(f"the client read nothing for {idle_s:g}s")
        raise UpstreamError(f"no progress for {idle_s:g}s", timeout=True)


def request_headers(
    request: http1.Request,
    host_fallback: str,
    *,
    drop: frozenset[bytes] = frozenset(),
    add: Sequence[tuple[bytes, bytes]] = (),
) -> Headers:
    """What goes upstream: forwarded headers, a Host if an HTTP/1.0 client sent none, ``add``.

    ``add`` is checked (rule 8) unless the caller already did (``checked``).
    """
    headers = forwarded_headers(request.headers, drop=drop)
    if not any(name == b"host" for name, _ in headers):
        headers += checked([(b"host", host_fallback.encode("ascii", "replace"))])
    headers += add if isinstance(add, Checked) else checked(add)
    return headers


class Checked(list[tuple[bytes, bytes]]):
    """Added headers that already went through `checked` once (a connection's XFCC stamp)."""


def _ours(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a two-task exchange: the client's failure first.

    Anything else (a Cancelled from an outer scope) is re-raised as the group;
    a Cancelled dropped here comes back at the next checkpoint anyway.
    """
    leaves = list(_leaves(group))
    for kind in (DownstreamError, UpstreamError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
