"""HTTP mode, both directions: a connection's requests, one at a time, each through the pool.

`proxy.http` moves one exchange; this loop strings them together for one
downstream connection (the server proxy's authenticated peer, or the client
proxy's local app) and decides what each outcome means for it:

1. The server proxy replaces any ``X-Forwarded-Client-Cert`` a caller sent
   with its own stamp (`proxy.xfcc`); the client proxy forwards headers as
   they are.
2. ``CONNECT`` is refused with 405: tunnels are TCP mode's job.
3. A request without a body that met a kept-alive connection the target had
   just closed is sent once more on another; anything else that failed
   upstream is answered 502 (504 on a timeout) if no response has started.
4. One access-log line and one count by status class per request.
5. A request that did not arrive whole within ``request_timeout`` (`proxy.http`
   rule 7) is counted by phase and logged once (``http.request_timeout``,
   without the path or headers, which may carry secrets); the connection
   closes.
6. The plain exchanges (a request that came whole, on an idle pooled
   connection) are served from the relay's one task (`proxy.http_lane`);
   this task waits for the lane to hand the connection back and then serves
   what the lane does not, from where it stopped, by the rules above.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from proxy import xfcc
from proxy.bearer import AUTHORIZATION, CHALLENGE, TokenError
from proxy.http import (
    Checked,
    DownstreamError,
    Exchange,
    HttpStream,
    UpstreamError,
    checked,
    exchange,
    has_body,
    next_request,
    refused,
    request_headers,
    respond_error,
    why_woken,
)
from proxy.http_lane import Lane, access
from proxy.pool import DialError, Upstream, close_quietly
from proxy.traffic import Traffic
from tally.ops.logs import get_logger
from tally.spiffe.spiffeid import SpiffeId
from tally.wire import http1

log = get_logger("tally.proxy")

XFCC = xfcc.HEADER.encode("ascii")


async def relay_http(
    t: Traffic,
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
    down = HttpStream(stream, http1.SERVER)
    # A server proxy drops a caller's XFCC even when it has no stamp of its own to add
    # (no client certificate, --no-client-cert): nobody may forge one.
    server = t.bearer is not None and t.bearer.require is not None
    drop = frozenset({XFCC}) if stamp is not None or server else frozenset()
    try:  # checked once per connection, not per request (`proxy.http` rule 8)
        add = Checked(checked([(XFCC, stamp)]) if stamp is not None else [])
    except UpstreamError as exc:
        log.warning("xfcc.unusable", error=str(exc))
        add = Checked()
    host = str(t.cfg.target)
    # Rule 6: the relay's task serves the plain exchanges of the proxy's own streams
    # (while it runs: a proxy shutting down serves its last requests here).
    lanes = down.end is not None

    def closing() -> bool:
        return t.idlers.draining or trio.current_time() >= hard_at

    while True:
        request: http1.Request | None = None
        if lanes and t.relay.running and not down.has_input:
            lane = Lane(t, down, caller=caller, hard_at=hard_at, drop=drop, add=add)
            back = await lane.run()
            if back.kind == "ended":
                if back.up is not None:
                    await close_quietly(back.up.stream)
                if back.why is not None:
                    t.ended(back.why, caller)
                return
            if back.kind == "malformed":
                assert isinstance(back.error, http1.RemoteProtocolError)
                await respond_error(down, back.error.error_status_hint, "malformed request")
                t.ended("bad_request", caller)
                return
            if back.kind in ("failed", "timeout"):
                if back.ex is None:  # the scope fired between requests
                    t.ended(why_woken(t.idlers, hard_at), caller)
                    return
                assert back.request is not None and back.headers is not None and back.up
                error = back.error or _stalled(down, t.cfg.idle_timeout)
                ok, answered_by = await _forward(
                    t, down, back.request, back.headers, has_body(back.request), back.ex,
                    closing, first=(back.up, error),
                )  # fmt: skip
                if not _finished(t, down, back.ex, ok, caller or answered_by, caller, hard_at):
                    return
                continue
            if back.kind == "request":
                assert back.request is not None
                request = back.request
                down.due = trio.current_time() + t.cfg.request_timeout
                refusal = refused(request)
                if refusal is not None:
                    await respond_error(down, *refusal)
                    t.ended("bad_request", caller)
                    return
            # "partial": the head is still arriving, or a pipelined one waits: below.
        if request is None:
            request, why = await next_request(
                down, t.idlers, t.cfg.idle_timeout, hard_at, t.cfg.request_timeout
            )
            if request is None:
                if why == "request_timeout":
                    _timed_out(t, "head", caller)
                t.ended(why, caller)
                return
        ex = Exchange.of(request)
        if request.method == b"CONNECT":
            ex.status = 405
            await respond_error(down, 405, "CONNECT is not relayed in HTTP mode")
            access(t, ex, caller)
            return
        bearer = await _bearer(t, down, request, caller, ex)
        if bearer is None:
            return
        token_id, bearer_drop, bearer_add = bearer
        pending = has_body(request)
        # The EndOfMessage of a request without a body: the parser has it already, no wait.
        if not pending and down.conn.next_event() is http1.NEED_DATA:
            await down.next_event()
        try:
            if bearer_add:
                extra: list[tuple[bytes, bytes]] = [*add, *bearer_add]
                headers = request_headers(request, host, drop=drop | bearer_drop, add=extra)
            else:
                headers = request_headers(request, host, drop=drop, add=add)
        except UpstreamError as exc:
            log.warning("target.failed", target=host, error=str(exc))
            await _fail(down, ex, exc)
            access(t, ex, caller)
            return
        ok, answered_by = await _forward(t, down, request, headers, pending, ex, closing)
        peer_id = caller if caller is not None else token_id or answered_by
        if not _finished(t, down, ex, ok, peer_id, caller, hard_at):
            return


def _finished(
    t: Traffic,
    down: HttpStream,
    ex: Exchange,
    ok: bool,
    peer_id: SpiffeId | None,
    caller: SpiffeId | None,
    hard_at: float,
) -> bool:
    """An exchange's bookkeeping (rules 4 and 5); True if the connection takes another."""
    if ex.timed_out:
        _timed_out(t, ex.timed_out, peer_id, ex.bytes_in)
    access(t, ex, peer_id)
    if not ok:
        return False
    if trio.current_time() >= hard_at:  # closed after the response in flight
        t.ended("peer_expired", caller)
        return False
    return down.reusable()


def _stalled(down: HttpStream, idle_s: float) -> UpstreamError | DownstreamError:
    """What an exchange's idle deadline means (`proxy.http` rule 3): who stalled."""
    if down.sending:  # the response was flowing and the client stopped reading it
        return DownstreamError(f"the client read nothing for {idle_s:g}s")
    return UpstreamError(f"no progress for {idle_s:g}s", timeout=True)


async def _forward(
    t: Traffic,
    down: HttpStream,
    request: http1.Request,
    headers: list[tuple[bytes, bytes]],
    pending: bool,
    ex: Exchange,
    closing: Callable[[], bool],
    *,
    first: tuple[Upstream, Exception] | None = None,
) -> tuple[bool, SpiffeId | None]:
    """One request through the pool; False when ``down`` must be closed.

    ``first`` is an attempt the lane made already (`proxy.http_lane` rule 1): its
    connection and how it failed, judged here as if this loop had made it.
    """
    pool = t.pool
    assert pool is not None
    for attempt in (1, 2):
        up: Upstream | None = None
        try:
            if first is not None and attempt == 1:
                up, failure = first
                raise failure
            up = await pool.acquire()
            await exchange(
                down,
                up.http,
                request,
                headers,
                body_pending=pending,
                ex=ex,
                idle_s=t.cfg.idle_timeout,
                closing=closing,
                count_to_target=t.count_to,
                count_from_target=t.count_from,
            )
        except (UpstreamError, DialError) as exc:
            if up is not None:
                await pool.discard(up)
            # A kept-alive connection the target closed just as we reused it: a request
            # without a body that got no answer yet is safe to send again (rule 3).
            if attempt == 1 and up is not None and up.reused and not pending:
                if not ex.response_started:
                    log.debug("pool.retry", error=str(exc))
                    continue
            log.warning("target.failed", target=str(t.cfg.target), error=str(exc))
            await _fail(down, ex, exc)
            return False, up.peer_id if up is not None else None
        except DownstreamError:
            if up is not None:
                await pool.discard(up)
            return False, up.peer_id if up is not None else None
        await pool.release(up)
        return True, up.peer_id
    raise AssertionError("unreachable: the second attempt always returns")


async def _bearer(
    t: Traffic, down: HttpStream, request: http1.Request, caller: SpiffeId | None, ex: Exchange
) -> tuple[SpiffeId | None, frozenset[bytes], list[tuple[bytes, bytes]]] | None:
    """Apply `proxy.bearer` to one request: the token's SPIFFE ID and the headers to drop
    and add, or None once the request has been answered (401, 503) and must end here."""
    hooks = t.bearer
    if hooks is None:
        return None, frozenset(), []
    token_id: SpiffeId | None = None
    if hooks.require is not None:
        verdict = hooks.require.check(request.headers, t.clock().timestamp())
        if verdict.reason is not None:
            t.stats.denied[verdict.reason] += 1
            log.warning(
                "peer.denied",
                peer_id=str(verdict.spiffe_id or caller) if verdict.spiffe_id or caller else None,
                reason=verdict.reason,
                detail="the request's bearer JWT-SVID was refused",
                mode=t.mode,
            )
            ex.status = 401
            await respond_error(down, 401, "a valid JWT-SVID is required", extra=[CHALLENGE])
            access(t, ex, caller)
            return None
        token_id = verdict.spiffe_id
    if hooks.inject is None:
        return token_id, frozenset(), []
    try:
        token = await hooks.inject.token(t.clock().timestamp())
    except TokenError as exc:
        log.warning("jwt.unavailable", audience=hooks.inject.audience, error=str(exc))
        ex.status = 503
        await respond_error(down, 503, "no JWT-SVID available for this request")
        access(t, ex, caller)
        return None
    return token_id, frozenset({AUTHORIZATION}), hooks.inject.headers(token)


def _timed_out(t: Traffic, phase: str, peer_id: SpiffeId | None, bytes_in: int = 0) -> None:
    t.stats.request_timeouts[phase] += 1
    log.warning(
        "http.request_timeout",
        phase=phase,
        timeout_s=t.cfg.request_timeout,
        bytes_in=bytes_in,
        peer_id=str(peer_id) if peer_id is not None else None,
    )


async def _fail(down: HttpStream, ex: Exchange, exc: UpstreamError | DialError) -> None:
    if not ex.response_started:
        ex.status = 504 if exc.timeout else 502
        await respond_error(down, ex.status, "upstream timed out" if exc.timeout else "bad gateway")
