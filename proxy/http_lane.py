"""HTTP mode's plain exchanges, served from the relay's one task instead of the connection's.

Theory of operation: `proxy.http` serves a request in the connection's own trio
task, which waits twice per request (for the request, for the response) and
pays a trip through trio's scheduler, a cancel scope and the stream layers each
time: about five times HAProxy's CPU per small request.  TCP mode's relay
(`proxy.tcp.Relay`) shows the cure: one task per proxy, its own epoll set, and
plain calls that never wait.  A `Lane` puts one downstream connection of HTTP
mode in that set and serves the common exchange whole from there.

Rules:

1. What the lane takes: a request that came whole (its head, and its body if
   it has one, in what was read so far), that ``proxy.http`` would forward as
   is (HTTP/1.0 or 1.1, not CONNECT, no bearer hooks), while the pool has an
   idle connection to send it on.  Anything else
   is handed back to the connection's task (`Handback`) at the point where
   `proxy.http.next_request` would have returned, and served there as before:
   a request the lane will not forward, a head still arriving (or a pipelined
   one), a malformed head, a failure upstream (the task retries or answers
   502/504, `proxy.http_relay` rule 3), the end of the connection.  So every
   rule of `proxy.http` holds; the lane is only a faster way through its
   commonest path, with the same parser connections, head building (interim
   1xx responses included: passed on, never a reason to send a request
   twice), write coalescing (one write per read of the response), access line
   and counters.  For a request without a body the pooled connection is taken
   without the readability probe (`proxy.pool` rule 3): if it meets a closed
   one, the task sends it again.  A request with a body is never sent twice,
   so its connection is probed first.  A connection the lane gives back to the
   pool stays in the relay's epoll set, watched for reading (`_IdleWatch`):
   the next lane takes it over as it is, and a target that closes it while it
   sits idle has it dropped from the pool at once, before a request meets it.
   (Two ``epoll_ctl`` calls per request fewer: 10 % of both proxies' CPU per
   small request in two side-by-side runs of three, even in the third.)
2. The lane never waits.  A call that would block leaves the descriptor it
   needs in the relay's epoll set; a descriptor it no longer needs (the
   downstream one while an exchange runs, the upstream one while the response
   waits for the client to read) leaves the set when it next reports, so a
   pipelined byte or a hang-up cannot make the relay spin.
3. Deadlines stay trio's.  The connection's task waits for the lane inside a
   cancel scope whose deadline the lane sets: while it waits for a request,
   the idle timeout capped by the peer's certificate expiry, pushed back by
   activity as TCP mode's (`proxy.tcp` rule 3); if the expiry passes during an
   exchange, the exchange goes on under the idle timeout alone.
   When the scope fires, the task takes the connection back and ends it as
   ``proxy.http`` would: idle or peer_expired between requests, a timed-out
   exchange otherwise.
4. A drain ends the lanes that wait for a request at once; an exchange in
   flight is finished and its response says ``Connection: close``
   (`proxy.http` rule 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from proxy.http import (
    CHUNK,
    Checked,
    DownstreamError,
    Exchange,
    HttpStream,
    UpstreamError,
    forwarded_request,
    forwarded_response,
    has_body,
    refused,
    request_headers,
)
from proxy.pool import Pool, Upstream
from proxy.tcp import BUDGET, NO_FD, Deadline, End, Relay
from tally.ops.logs import get_logger
from tally.spiffe.spiffeid import SpiffeId
from tally.tls.plain import LENT_SIZE, WANT_READ, WANT_WRITE
from tally.wire import http1

if TYPE_CHECKING:  # the traffic owns the lanes: a type-only import back
    from proxy.traffic import Traffic

log = get_logger("tally.proxy")

_WAIT_REQUEST, _SEND_REQUEST, _RELAY_RESPONSE, _SEND_RESPONSE = range(4)
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass
class Handback:
    """Why the lane gave the connection back to its task, and what the task needs to go on.

    ``kind`` is one of:

    - ``ended``: the connection is over; ``why`` for `Traffic.ended` (None: nothing to say);
    - ``request``: ``request`` was read (its head only) and the task serves it;
    - ``partial``: input is waiting in the parser, for `proxy.http.next_request`;
    - ``malformed``: ``error`` is the parser's refusal of the head;
    - ``failed``: the exchange of ``request`` (sent as ``headers``) on ``up`` failed
      with ``error`` (`UpstreamError` or `DownstreamError`); ``ex`` says how far it got;
    - ``timeout``: the task's scope fired; the task decides what that means (rule 3).
    """

    kind: str
    why: str | None = None
    request: http1.Request | None = None
    headers: list[tuple[bytes, bytes]] | None = None
    error: Exception | None = None
    ex: Exchange | None = None
    up: Upstream | None = None


class Lane:
    """One downstream HTTP connection in the relay's epoll set (see the module's rules)."""

    __slots__ = (
        "_add",
        "_caller",
        "_drop",
        "_hard_at",
        "_host",
        "complete",
        "deadline",
        "down",
        "down_mask",
        "ex",
        "finished",
        "handback",
        "headers",
        "live",
        "relay",
        "request",
        "state",
        "t",
        "up",
        "up_mask",
    )

    def __init__(
        self,
        t: Traffic,
        down: HttpStream,
        *,
        caller: SpiffeId | None,
        hard_at: float,
        drop: frozenset[bytes],
        add: Checked,
    ) -> None:
        self.t = t
        self.relay: Relay = t.relay
        self.down = down
        self.up: Upstream | None = None
        self._caller = caller
        self._hard_at = hard_at
        self._drop = drop
        self._add = add
        self._host = str(t.cfg.target)
        self.state = _WAIT_REQUEST
        self.ex: Exchange | None = None
        self.request: http1.Request | None = None
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.complete = False
        self.down_mask = 0
        self.up_mask = 0
        self.handback: Handback | None = None
        self.finished = trio.Event()
        self.live = True
        self.deadline = Deadline(t.cfg.idle_timeout, hard_at)

    async def run(self) -> Handback:
        """Serve the connection until the lane hands it back (its task waits here)."""
        down_end = self.down.end
        assert down_end is not None
        idlers = self.t.idlers
        self.relay.add(down_end.fd, self)
        idlers.lanes.add(self)
        try:
            with self.deadline.scope:
                if idlers.draining:
                    self._give(Handback("ended", why="draining"))
                else:
                    self.relay.start(self)
                await self.finished.wait()
            while self._hard_stop_mid_exchange():
                with self.deadline.scope:
                    await self.finished.wait()
        finally:
            idlers.lanes.discard(self)
            self._forget()
        if self.handback is None:  # the scope fired before the lane gave the connection back
            self.handback = Handback(
                "timeout", request=self.request, headers=self.headers, ex=self.ex, up=self.up
            )
            self.up = None
        return self.handback

    def _hard_stop_mid_exchange(self) -> bool:
        """Whether the scope fired at the peer's hard stop while an exchange was in flight,
        which then goes on under the idle deadline alone (`proxy.http` rule 4)."""
        deadline = self.deadline
        if self.handback is not None or not deadline.scope.cancelled_caught:
            return False
        idle_at = deadline.pushed_at + deadline.idle_s
        if self.state == _WAIT_REQUEST or trio.current_time() >= idle_at:
            return False
        self.deadline = deadline.without_hard_stop()
        return True

    # -- the relay's side --------------------------------------------------------------

    def serve(self, now: float, ready: int = NO_FD) -> None:
        try:
            self._serve(now, ready)
        except Exception as exc:  # a bug must cost one connection, not every one
            log.error("relay.crashed", error=exc)
            self._give(Handback("ended", why="error", up=self.up))

    def abort(self) -> None:
        self._give(Handback("ended", why="reset", up=self.up))

    def drain(self) -> None:
        """Rule 4: end the lane now if it waits for a request; an exchange finishes first."""
        if self.live and self.state == _WAIT_REQUEST:
            self._give(Handback("ended", why="draining"))

    def _serve(self, now: float, ready: int) -> None:
        down = self.down
        down_end = down.end
        assert down_end is not None
        if ready == down_end.fd and self.state in (_SEND_REQUEST, _RELAY_RESPONSE):
            self._watch_down(0)  # rule 2: not needed while the target has the floor
            return
        up = self.up
        if up is not None and self.state == _SEND_RESPONSE:
            up_end = up.http.end
            assert up_end is not None
            if ready == up_end.fd:
                self._watch_up(0)
                return
        for _ in range(BUDGET):
            state = self.state
            if state == _WAIT_REQUEST:
                if not self._read_request(down, down_end):
                    return
            elif state == _SEND_REQUEST:
                if not self._send_request():
                    return
            elif state == _RELAY_RESPONSE:
                if not self._relay_response(now):
                    return
            elif not self._send_response(now):
                return
        self.relay.later(self)

    def _read_request(self, down: HttpStream, end: End) -> bool:
        """Read and judge the next request (rule 1); False once there is nothing to do now."""
        if down.has_input:  # pipelined: `proxy.http` serves it
            self._give(Handback("partial"))
            return False
        try:
            data = end.read(CHUNK)
        except _IO_ERRORS:
            self._give(Handback("ended", why="closed"))
            return False
        if data is None:
            self._watch_down(end.wants)
            return False
        down.conn.receive_data(data)
        try:
            event = down.conn.next_event()
        except http1.RemoteProtocolError as exc:
            self._give(Handback("malformed", error=exc))
            return False
        if event is http1.NEED_DATA:
            self._give(Handback("partial"))
            return False
        if type(event) is not http1.Request:  # ConnectionClosed
            self._give(Handback("ended", why="closed"))
            return False
        return self._begin(event)

    def _begin(self, request: http1.Request) -> bool:
        t = self.t
        pool = t.pool
        down = self.down.conn
        body = has_body(request)
        if (
            t.bearer is not None
            or pool is None
            or request.method == b"CONNECT"
            or refused(request) is not None
            or (body and not down.message_complete)
        ):
            self._give(Handback("request", request=request))
            return False
        try:
            headers = request_headers(request, self._host, drop=self._drop, add=self._add)
            head = forwarded_request(request, headers)
        except UpstreamError:  # the task fails it, and says why
            self._give(Handback("request", request=request))
            return False
        # A request with a body is never sent twice, so it must not meet a connection the
        # target closed while it sat idle (`proxy.pool` rule 3); one without is sent again.
        up, stale = pool.take(probe=body, watched=True)
        for old in stale:
            old.stream.close_now()  # type: ignore[attr-defined]
        if up is None:  # `proxy.http` dials
            self._give(Handback("request", request=request))
            return False
        self.request, self.headers, self.up = request, headers, up
        ex = self.ex = Exchange.of(request)
        up_end = up.http.end
        assert up_end is not None
        self.relay.add(up_end.fd, self)
        if isinstance(up.watch, _IdleWatch):  # still in the set, for reading (`proxy.pool` rule 3)
            up.watch.live = False
            up.watch = None
            self.up_mask = WANT_READ
        up.http.queue(head)
        while True:  # the body (if any) and the end, all parsed already
            event = down.next_event()
            up.http.queue(event)
            if type(event) is http1.EndOfMessage:
                break
            n = len(event.data)
            ex.bytes_in += n
            t.count_to(n)
        self.complete = False
        self.state = _SEND_REQUEST
        return True

    def _send_request(self) -> bool:
        up = self.up
        assert up is not None
        try:
            sent = up.http.write_now()
        except _IO_ERRORS as exc:
            self._failed(UpstreamError(f"sending failed: {exc!r}"))
            return False
        if not sent:
            self._watch_up(up.http.end.wants)  # type: ignore[union-attr]
            return False
        # The answer cannot be in yet: wait for it rather than pay a read that would block
        # (without read-ahead, OpenSSL holds no bytes the socket does not announce).
        self.state = _RELAY_RESPONSE
        self._watch_up(WANT_READ)
        return False

    def _relay_response(self, now: float) -> bool:
        """One read of the response, its events queued downstream and sent before the next
        read (`proxy.http` rules 1 and 5: one write per read, so a small response leaves
        as one write and a large one holds one read's worth here)."""
        up, ex, down = self.up, self.ex, self.down
        assert up is not None and ex is not None
        up_end = up.http.end
        assert up_end is not None
        try:
            # A body is read as TCP mode reads (`LENT_SIZE`); a head, by `CHUNK`, to its limit.
            data = up_end.read(LENT_SIZE if ex.response_started else CHUNK)
        except _IO_ERRORS as exc:
            self._failed(UpstreamError(f"reading failed: {exc!r}"))
            return False
        if data is None:
            self._watch_up(up_end.wants)
            return False
        up.http.conn.receive_data(data)
        self.deadline.touch(now)
        conn = up.http.conn
        while True:
            try:
                event = conn.next_event()
            except http1.ProtocolError as exc:
                self._failed(UpstreamError(f"malformed message: {exc}"))
                return False
            if event is http1.NEED_DATA:
                break
            kind = type(event)
            if kind is http1.Data:
                down.queue(event)
                n = len(event.data)
                ex.bytes_out += n
                self.t.count_from(n)
            elif kind is http1.EndOfMessage:
                down.queue(event)
                self.complete = True
                break
            elif kind is http1.Response or kind is http1.InformationalResponse:
                if not self._queue_head(event, now):
                    return False
            else:  # ConnectionClosed
                self._failed(UpstreamError("the connection closed in the middle of a message"))
                return False
        if down.pending:
            self.state = _SEND_RESPONSE
            return True
        return self._read_on(up_end)

    def _queue_head(self, event: http1.Response | http1.InformationalResponse, now: float) -> bool:
        """A response head, passed on as `proxy.http` passes it on; False if it failed."""
        ex = self.ex
        assert ex is not None
        closing = self.t.idlers.draining or now >= self._hard_at
        try:
            head = forwarded_response(event, ex, closing=closing)
        except UpstreamError as exc:
            self._failed(exc)
            return False
        try:
            self.down.queue(head)
        except http1.ProtocolError as exc:
            self._failed(DownstreamError(f"cannot relay this message: {exc}"))
            return False
        return True

    def _read_on(self, up_end: End) -> bool:
        """More of the response to read: now if the last read filled up, else once it comes."""
        self.state = _RELAY_RESPONSE
        if up_end.more:
            return True
        self._watch_up(WANT_READ)
        return False

    def _send_response(self, now: float) -> bool:
        down = self.down
        try:
            sent = down.write_now()
        except _IO_ERRORS as exc:
            self._failed(DownstreamError(f"sending failed: {exc!r}"))
            return False
        if not sent:
            self._watch_down(down.end.wants)  # type: ignore[union-attr]
            return False
        self.deadline.touch(now)
        up = self.up
        assert up is not None
        if self.complete:
            return self._done(now, up)
        if self.down_mask & WANT_WRITE:  # it was waiting to write: not any more (rule 2)
            self._watch_down(0)
        up_end = up.http.end
        assert up_end is not None
        return self._read_on(up_end)

    def _done(self, now: float, up: Upstream) -> bool:
        """The response is out whole: the exchange's bookkeeping, then the next request."""
        t, ex = self.t, self.ex
        assert t.pool is not None and ex is not None
        up_end = up.http.end
        assert up_end is not None
        self.up = None
        if not t.pool.keep(up):
            self.relay.drop(self, up_end.fd, self.up_mask)
            up.stream.close_now()  # type: ignore[attr-defined]
        elif self.up_mask == WANT_READ:  # it stays in the set while idle (`proxy.pool` rule 3)
            up.watch = _IdleWatch(self.relay, t.pool, up, up_end.fd)
            self.relay.add(up_end.fd, up.watch)
        else:
            self.relay.drop(self, up_end.fd, self.up_mask)
        self.up_mask = 0
        access(t, ex, self._caller if self._caller is not None else up.peer_id)
        self.ex = self.request = self.headers = None
        if now >= self._hard_at:  # closed after the response in flight
            self._give(Handback("ended", why="peer_expired"))
            return False
        if not self.down.reusable():
            self._give(Handback("ended"))
            return False
        if t.idlers.draining:
            self._give(Handback("ended", why="draining"))
            return False
        self.state = _WAIT_REQUEST
        self.deadline.idle_s = t.cfg.idle_timeout  # a reload reaches the next request
        self.deadline.touch(now)
        return True

    # -- bookkeeping -------------------------------------------------------------------

    def _failed(self, error: Exception) -> None:
        self._give(
            Handback(
                "failed",
                request=self.request,
                headers=self.headers,
                error=error,
                ex=self.ex,
                up=self.up,
            )
        )

    def _give(self, handback: Handback) -> None:
        if not self.live:
            return
        self.handback = handback
        self._forget()
        self.up = None  # the task owns it now
        self.finished.set()

    def _watch_down(self, want: int) -> None:
        if want != self.down_mask:
            self.relay.watch(self.down.end.fd, self.down_mask, want)  # type: ignore[union-attr]
            self.down_mask = want

    def _watch_up(self, want: int) -> None:
        if want != self.up_mask:
            self.relay.watch(self.up.http.end.fd, self.up_mask, want)  # type: ignore[union-attr]
            self.up_mask = want

    def _forget(self) -> None:
        if not self.live:
            return
        self.live = False
        down_end = self.down.end
        assert down_end is not None
        self.relay.drop(self, down_end.fd, self.down_mask)
        self.down_mask = 0
        up = self.up
        if up is not None and up.http.end is not None:
            self.relay.drop(self, up.http.end.fd, self.up_mask)
        self.up_mask = 0


class _IdleWatch:
    """A pooled connection's place in the relay's epoll set while it sits idle
    (`proxy.pool` rule 3): readable there means the target closed it, or spoke out of
    turn, so it leaves the pool and is closed at once.  A lane that takes it takes its
    place in the set over (``live`` cleared), with no ``epoll_ctl``."""

    __slots__ = ("fd", "live", "pool", "relay", "up")

    def __init__(self, relay: Relay, pool: Pool, up: Upstream, fd: int) -> None:
        self.relay = relay
        self.pool = pool
        self.up = up
        self.fd = fd
        self.live = True

    def serve(self, now: float, ready: int = NO_FD) -> None:
        self.pool.forget(self.up)
        self.up.stream.close_now()  # type: ignore[attr-defined]

    def abort(self) -> None:
        self.unwatch()

    def unwatch(self) -> None:
        if self.live:
            self.live = False
            self.relay.drop(self, self.fd, WANT_READ)


def access(t: Traffic, ex: Exchange, peer_id: SpiffeId | None) -> None:
    """One access-log line and one count by status class per request (`proxy.http_relay` rule 4)."""
    t.stats.requests[f"{ex.status // 100}xx"] += 1
    if t.cfg.access_log:  # held: its own write would cost as much (`tally.ops.logs` rule 5)
        log.info_held(
            "http.request",
            method=ex.method,
            path=ex.target,
            status=ex.status,
            peer_id=str(peer_id) if peer_id is not None else None,
            bytes_in=ex.bytes_in,
            bytes_out=ex.bytes_out,
            duration_ms=ex.duration_ms,
        )
