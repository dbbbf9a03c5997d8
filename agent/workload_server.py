"""The SPIFFE Workload API server: the trio shell around `agent.workload_calls`.

Rules / theory of operation:

1. **Who is calling comes from the kernel.**  ``SO_PEERCRED`` is read once,
   when the connection is accepted, and every call on that connection is
   attested with it.  Nothing the peer sends names its identity.
2. **One task per connection, one task per call that waits.**  The
   connection's task is its reader; each call (HTTP/2 stream) that has to wait
   for something runs in its own task (a fetch usually does not: below).  A call
   hands finished messages to the connection, which sends at once what the
   socket takes without waiting (`_Connection._flush`, from whichever task
   has something to send); only the rest waits for a writer task, the one
   place that blocks on the socket, started the first time something has to
   wait (a full socket, a closed flow-control window, the closing linger).  A
   short call or a push thus costs no writer at all.  The idle and handshake
   timers are the reader's own cancel scope, the drain is started for every
   connection by the server's one task that waits for it, and the accept loop
   starts the connection's task directly (no wrapper task, which would only
   close the socket again), so a connection usually runs one task and each
   call one.  A usual fetch is one write: our SETTINGS and their ack wait for
   the first response when the request came with them
   (`_Connection._hold_or_flush`), and go out before the reader waits
   otherwise; the reader waits only when the kernel has nothing to read.
   An X.509 stream whose answer the backend has at once
   (`WorkloadBackend.x509_now`) is answered by the reader itself, and its task
   (which then waits for changes) starts only if the stream is still open
   ``_WATCH_AFTER_S`` later: the usual fetch closes its connection before
   that, so it costs no task, cancel scope or cancellation at all.  A change
   in that window reaches the stream when its task starts (it sends the
   current state, unless it is what was sent).
3. **Only the newest state is worth sending** and **flow control is obeyed
   both ways**: that bookkeeping is pure and lives in `agent.workload_calls`
   (a connection's buffering is bounded however slowly the peer reads).
   Received DATA is acknowledged as soon as it is consumed.
4. **A peer that stops reading is dropped, not waited for.**  If a write
   stalls, or queued data is held back by a closed flow-control window, for
   ``send_stall_timeout_s``, the connection is closed.  Control frames that
   ``h2`` answers on its own (PING and SETTINGS acks) are bounded too.  Other
   connections are separate tasks and never wait on this one.
5. **Nothing a peer sends can crash the server, or make it hold much.**  A
   malformed frame or a protocol violation closes that connection (after a
   GOAWAY when possible); a bad call ends that call with its gRPC status.
   Both are logged at debug on ``tally.workload``; only backend failures are
   logged louder.  A frame or header block over our limits is caught on its
   header (`agent.workload_calls.FrameGuard`).  A connection with no call open
   for ``idle_timeout_s`` is closed, so idle connections do not pile up.
6. **Checks in the order the standard implies** (`agent.workload_messages`),
   then the caller's identity (PERMISSION_DENIED "no identity issued").
7. **Connections are capped, in all and per uid** (`tally.ops.admission`).
   Over a cap a connection is accepted, sent our SETTINGS and a GOAWAY
   (ENHANCE_YOUR_CALM, "too many connections") and closed at once: a gRPC
   client sees the connection refused by the server, not a hang, and nothing
   is held for it.  One local user flooding the socket leaves the others served.
8. **A drain is a clean end, never a reset.**  When ``drain`` is set (SIGTERM)
   the listener closes and every connection is first told by a GOAWAY that
   names no stream (last stream id 2^31-1, as gRPC servers do) that it may
   open no more calls; each open call then ends after the message it is
   sending, with UNAVAILABLE "the agent is shutting down" in its trailers (a
   status every gRPC client retries), and a final GOAWAY closes the connection.
   The agent bounds the whole drain by its ``drain_timeout``.  After the final
   GOAWAY the connection half-closes and waits up to `_LINGER_S` for the peer to
   close: closing sooner would answer the peer's next frame with a reset, and a
   client busy elsewhere (a loaded host) would then lose the trailers it had not
   read yet.
"""

from __future__ import annotations

import logging
import math
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h2.errors
import h2.events
import h2.exceptions
import trio
from hyperframe.frame import GoAwayFrame

from agent.workload_calls import (
    DEFAULT_LIMITS,
    WRITE_ROUND,
    Call,
    FrameGuard,
    WorkloadLimits,
    pump,
    reject,
    release,
    server_connection,
    stall_deadline,
)
from agent.workload_messages import (
    JWT_METHODS,
    STREAMING_METHODS,
    InvalidJwt,
    JwtMethod,
    Method,
    Rejected,
    WorkloadBackend,
    X509Snapshot,
    jwt_bundles_response,
    jwt_svid_request,
    jwt_svid_response,
    only_no_identity,
    parse_request_message,
    route_request,
    validate_request,
    validate_response,
)
from tally.ops.admission import Admission
from tally.ops.logs import get_logger
from tally.ops.net import PeerCred, accept_loop, peer_credentials
from tally.tls.plain import WANT_READ, PlainStream
from tally.wire.grpc import GrpcError, Status

log = logging.getLogger("tally.workload")
events = get_logger("tally.workload")


@dataclass
class WorkloadStats:
    """Counters for the agent's metrics; plain numbers, safe to read at any time."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Finished calls by (method, status name); method is "unknown" for foreign paths."""
    connections_open: int = 0
    connections_total: int = 0
    connections_dropped: int = 0
    """Connections closed by us: protocol errors, stalled readers, timeouts."""
    streams_open: int = 0


_READ_SIZE = 64 * 1024
_READS_PER_YIELD = 16
_LINGER_S = 3.0
_DRAINING = "the agent is shutting down"
_ANY_STREAM = 2**31 - 1
_WATCH_AFTER_S = 0.05


_PAYLOADS: dict[tuple[int, int], tuple[Method, object, bytes]] = {}
_PAYLOADS_KEPT = 256


def _encoded(method: Method, snapshot: X509Snapshot) -> bytes:
    """``method.build_response(snapshot)``, encoded once for every stream that is sent the
    same snapshot object (the backend shares one per kind of caller): a rotation pushed to
    a thousand streams is encoded once, not a thousand times."""
    key = (id(method), id(snapshot))
    got = _PAYLOADS.get(key)
    if got is not None and got[0] is method and got[1] is snapshot:
        return got[2]
    payload = method.build_response(snapshot)
    if len(_PAYLOADS) >= _PAYLOADS_KEPT:
        _PAYLOADS.clear()
    _PAYLOADS[key] = (method, snapshot, payload)
    return payload


class _Drop(Exception):
    """This connection must be closed at once; the message says why (for the debug log)."""


class _CallTask:
    """What the task running one call waits on: its request, and its cancellation."""

    def __init__(self) -> None:
        self.cancel_scope = trio.CancelScope()
        self.request_ready = trio.Event()


class _Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: PeerCred,
        backend: WorkloadBackend,
        limits: WorkloadLimits,
        stats: WorkloadStats,
        drain: trio.Event,
    ) -> None:
        self._stream = stream
        # PlainStream's write that never waits (`_flush`); a test's in-memory stream has none.
        self._send_nowait: Callable[[bytes | bytearray], int] | None = (
            stream.send_some_nowait if isinstance(stream, PlainStream) else None
        )
        self._drain = drain
        self._draining = False
        self._peer = peer
        self._backend = backend
        self._limits = limits
        self._stats = stats
        self._h2 = server_connection(limits)
        self._calls: dict[int, Call] = {}
        """Calls still sending, by stream id (`agent.workload_calls.pump` removes them)."""
        self._tasks: dict[int, _CallTask] = {}
        """The task of every call still running, by stream id."""
        self._outbox = bytearray()
        self._unsent = False
        """The reader left queued bytes for the next flush (`_hold_or_flush`)."""
        self._sender: Call | None = None
        """The call whose first response will carry them, while it has not run yet."""
        self._new_calls: list[Call] = []
        """Calls whose request arrived in the frames just read, not started yet."""
        self._unwatched: dict[int, tuple[Call, float]] = {}
        """Streams answered without a task (rule 2), with when each arrived, by stream id."""
        self._watch_at = math.inf
        self._wakeup = trio.Event()
        self._writer = False
        self._watching_drain = False
        """Whether the writer task runs; it is started only when something must wait."""
        self._closing = False
        self._settings_seen = False
        self._guard_frames = FrameGuard(self._h2.max_inbound_frame_size, limits.max_header_block)
        self._idle_armed = False
        self._read_scope = trio.CancelScope()

    async def serve(self, live: set[_Connection] | None) -> None:
        """Serve until the peer leaves; ``live`` is the server's set of connections, which
        it drains itself (one task for all, rule 8), or None to watch ``drain`` here."""
        self._h2.initiate_connection()
        self._collect()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Our SETTINGS go out with the first response, or before the reader first waits
            # (gRPC clients wait for them before their first call).
            if self._send_nowait is None:
                self._flush()
            else:
                self._unsent = True
            if live is None:
                self._watching_drain = True
                nursery.start_soon(self._watch_drain)
            elif self._drain.is_set():  # accepted just before the drain began
                self.on_drain()
            if live is not None:
                live.add(self)
            try:
                await self._guard(self._read_loop)
            finally:
                if live is not None:
                    live.discard(self)
        for call, _arrived in self._unwatched.values():
            self._stats.streams_open -= 1
            self._count(call.method, Status.CANCELLED)
        for call in self._new_calls:  # the connection ended within the frames that brought them
            self._count(call.method, Status.CANCELLED)
        release(self._h2)

    async def _guard(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run the reader or writer; any way it fails closes this connection only."""
        try:
            await loop()
        except (_Drop, h2.exceptions.ProtocolError) as exc:
            self._stats.connections_dropped += 1
            log.debug("workload connection from pid %d dropped: %s", self._peer.pid, exc)
            self._nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("workload connection from pid %d broke: %r", self._peer.pid, exc)
            self._nursery.cancel_scope.cancel()
        except Exception:
            self._stats.connections_dropped += 1
            log.debug("workload connection from pid %d failed", self._peer.pid, exc_info=True)
            self._nursery.cancel_scope.cancel()

    # -- reading ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        # One scope for the whole connection (not one per read, nor a timer task): its
        # deadline is the handshake's until the peer's SETTINGS arrive, then the idle
        # close's while no call is open (`_arm_idle`), or the time to start the tasks of
        # streams answered without one (rule 2), after which it reads on.
        deadline = trio.current_time() + self._limits.request_timeout_s
        receive = self._receive_nowait()
        while True:
            with trio.CancelScope(deadline=deadline) as self._read_scope:
                await self._read_frames(receive)
                return
            if not self._unwatched:
                break
            self._start_watchers()  # the deadline was theirs (rule 2): read on
            deadline = self._read_scope.deadline
        if self._settings_seen:
            log.debug("workload connection from pid %d idle, closing", self._peer.pid)
            self._h2.close_connection(h2.errors.ErrorCodes.NO_ERROR)
            self._close_gracefully()
            return
        raise _Drop("no HTTP/2 preface within the request timeout")

    async def _read_frames(self, receive: Callable[[], Awaitable[bytes | bytearray]]) -> None:
        while True:
            data = await receive()
            if not data:
                self._end_tasks()
                return
            if (why := self._guard_frames.check(data)) is not None:
                self._stats.connections_dropped += 1
                log.debug("workload connection from pid %d: %s", self._peer.pid, why)
                self._h2.close_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                self._close_gracefully()
                return
            try:
                events = self._h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 has queued a GOAWAY: send it, then close.
                self._stats.connections_dropped += 1
                log.debug("workload connection from pid %d: %r", self._peer.pid, exc)
                self._close_gracefully()
                return
            for event in events:
                if self._handle(event):
                    self._nursery.cancel_scope.cancel()
                    return
            self._arm_idle()
            self._collect()
            if len(self._outbox) > self._limits.max_control_backlog:
                raise _Drop("peer sends but does not read")
            self._hold_or_flush()

    def _hold_or_flush(self) -> None:
        """Flush what reading queued (acks, refusals), or leave it to a call that has just
        got its whole request and is about to answer: the usual fetch is then one write
        (SETTINGS, their ack and the response together), not three, and one wake-up of
        the client instead of three.  Only an X.509 stream is waited for: its answer
        comes from the agent's memory (a JWT-SVID may need a call to the CA first).
        An X.509 stream the backend can answer at once is answered here (rule 2)."""
        new, self._new_calls = self._new_calls, []
        arrived = trio.current_time() if new else 0.0
        hold = None
        for call in new:
            ready = (
                call.method in STREAMING_METHODS
                and self._calls.get(call.stream_id) is call
                and call.request_done
                and call.aborted is None
            )
            if ready and self._answer_now(call):
                self._watch_later(call, arrived)
                continue
            self._start(call, arrived)
            if ready and hold is None and self._send_nowait is not None:
                hold = call
        if hold is not None:
            self._unsent, self._sender = True, hold
            return
        self._flush()

    def _answer_now(self, call: Call) -> bool:
        """Queue the stream's first message if the backend has it without waiting; False
        leaves the call to its task (which also gives every refusal its status)."""
        method = STREAMING_METHODS[call.method]
        try:
            parse_request_message(method, call.request_message)
        except GrpcError:
            return False
        snapshot = self._backend.x509_now(self._peer)
        if snapshot is None:
            return False
        payload = _encoded(method, snapshot)
        if len(payload) > self._limits.max_message_size:
            return False
        call.offer(payload)
        return True

    def _watch_later(self, call: Call, arrived: float) -> None:
        """Rule 2: the stream's task starts at ``_watch_at``, if the stream is still open."""
        if not self._unwatched:
            self._watch_at = arrived + _WATCH_AFTER_S
        self._unwatched[call.stream_id] = (call, arrived)
        self._stats.streams_open += 1
        self._arm_idle()

    def _start_watchers(self) -> None:
        """Rule 2: streams answered without a task are still open; give each its task."""
        watching, self._unwatched = self._unwatched, {}
        for call, arrived in watching.values():
            self._stats.streams_open -= 1  # counted again by its task
            self._start(call, arrived)
        self._arm_idle()

    def _start(self, call: Call, arrived: float) -> None:
        """Start the task of a call, and tell it what has happened to the call so far."""
        self._tasks[call.stream_id] = _CallTask()
        self._nursery.start_soon(self._run_call, call, arrived)
        self._signal(call)

    def _end_tasks(self) -> None:
        """The peer has gone: stop this connection's other tasks.  When they are only
        calls, each is cancelled on its own, so that this task, which is done anyway,
        is not sent a cancellation to unwind as well."""
        if self._writer or self._watching_drain:
            self._nursery.cancel_scope.cancel()
            return
        for task in self._tasks.values():
            task.cancel_scope.cancel()

    def _receive_nowait(self) -> Callable[[], Awaitable[bytes | bytearray]]:
        """The reader's read: on a PlainStream, one system call that waits only when the
        kernel has nothing yet (a read that finds data would otherwise also be a trip
        through trio's scheduler), yielding every `_READS_PER_YIELD` reads without a wait
        so that a peer that never stops sending does not hold the event loop."""
        if not isinstance(self._stream, PlainStream):
            stream = self._stream
            return lambda: stream.receive_some(_READ_SIZE)
        plain = self._stream
        end = plain.relay_end()
        unwaited = 0

        async def receive() -> bytes:
            nonlocal unwaited
            while (view := end.read(_READ_SIZE)) is None:
                unwaited = 0
                if self._unsent and self._sender is None:
                    self._flush()  # nothing more to wait for before a wait of our own
                await plain.wait_ready(WANT_READ)
            unwaited += 1
            if unwaited >= _READS_PER_YIELD:
                unwaited = 0
                await trio.lowlevel.checkpoint()
            return bytes(view)  # the view is lent until the next read of any stream

        return receive

    def _handle(self, event: h2.events.Event) -> bool:
        """Apply one h2 event; True when the peer has ended the connection."""
        if isinstance(event, h2.events.RequestReceived):
            self._idle_armed = False  # even a call refused at once is activity (rule 5)
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.receive(event.data)
                self._signal(call)
        elif isinstance(event, h2.events.StreamEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.end_of_request()
                self._signal(call)
        elif isinstance(event, h2.events.StreamReset):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.abort(Status.CANCELLED, "reset by the client")
                self._signal(call)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_seen = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True
        return False

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._draining:  # sent before the peer read our first GOAWAY
            self._count("unknown", Status.UNAVAILABLE)
            reject(self._h2, stream_id, GrpcError(Status.UNAVAILABLE, _DRAINING))
            self._end_if_drained()
            return
        try:
            label, request = route_request(event.headers)
        except Rejected as exc:
            self._count(exc.label, exc.error.status)
            log.debug("workload call on %s rejected: %s", exc.label, exc.error)
            reject(self._h2, stream_id, exc.error)
            return
        call = Call(stream_id, label, request, self._limits.max_request_size)
        self._calls[stream_id] = call
        self._new_calls.append(call)

    def _signal(self, call: Call) -> None:
        """Wake the call's task for what just happened to its state: a request, an abort.
        A stream without a task (rule 2) that is aborted ends here, as its task would."""
        task = self._tasks.get(call.stream_id)
        if task is None:
            if call.aborted is not None and self._unwatched.pop(call.stream_id, None) is not None:
                self._stats.streams_open -= 1
                if call.stream_id in self._calls:
                    self._finish(call, *call.aborted)
                else:
                    self._count(call.method, Status.CANCELLED)
            return
        if call.request_done:
            task.request_ready.set()
        if call.aborted is not None:
            task.cancel_scope.cancel()

    def _arm_idle(self) -> None:
        """Rule 5: once the handshake is done, the read scope's deadline is the idle close
        while no call is open, counted from the last request or the end of the last call;
        none while a call is open."""
        if not self._settings_seen:
            return
        if self._calls:
            # Set only when it changes: each set is a trip through trio's deadline heap.
            deadline = self._watch_at if self._unwatched else math.inf
            if self._read_scope.deadline != deadline:
                self._read_scope.deadline = deadline
            self._idle_armed = False
        elif not self._idle_armed:
            self._read_scope.deadline = trio.current_time() + self._limits.idle_timeout_s
            self._idle_armed = True

    async def _watch_drain(self) -> None:
        """For a connection served on its own (`serve_workload_connection`): the drain."""
        await self._drain.wait()
        self.on_drain()

    def on_drain(self) -> None:
        """Rule 8: on drain, forbid new calls and end the open ones after their message."""
        self._draining = True
        self._outbox += GoAwayFrame(
            0, last_stream_id=_ANY_STREAM, additional_data=b"draining"
        ).serialize()
        for call in list(self._calls.values()):  # a stream without a task ends at once
            call.abort(Status.UNAVAILABLE, _DRAINING)
            self._signal(call)
        self._end_if_drained()
        self._wake()

    def _end_if_drained(self) -> None:
        """Once draining and the last call has sent its trailers, say the final goodbye."""
        if self._draining and not self._calls and not self._closing:
            self._h2.close_connection(h2.errors.ErrorCodes.NO_ERROR)
            self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Stop every call and let the writer flush what h2 queued (a GOAWAY)."""
        calls = list(self._calls.values())
        self._calls.clear()
        for call in calls:
            call.abort(Status.UNAVAILABLE, "connection closing")
            self._signal(call)
        self._closing = True
        self._collect()
        self._wake()

    # -- calls -----------------------------------------------------------------

    async def _run_call(self, call: Call, arrived: float) -> None:
        self._stats.streams_open += 1
        try:
            with self._tasks[call.stream_id].cancel_scope:
                status, message = await self._call(call, arrived)
                self._finish(call, status, message)
            if call.aborted is not None and call.stream_id in self._calls:
                self._finish(call, *call.aborted)
        finally:
            if self._sender is call:  # it ended without sending: what it held goes now
                self._flush()
            del self._tasks[call.stream_id]
            self._stats.streams_open -= 1
            if not call.counted:
                self._count(call.method, Status.CANCELLED)

    async def _call(self, call: Call, arrived: float) -> tuple[Status, str]:
        # No deadline scope for a call without a deadline (most: streams have none).
        if call.request.timeout is None:
            return await self._answer(call)
        with trio.move_on_at(arrived + call.request.timeout):
            return await self._answer(call)
        return Status.DEADLINE_EXCEEDED, "deadline exceeded"

    async def _answer(self, call: Call) -> tuple[Status, str]:
        try:
            if call.method in JWT_METHODS:
                return await self._jwt_call(call)
            method = STREAMING_METHODS[call.method]
            await self._receive_request(call, method)
            await self._stream_snapshots(call, method)
        except InvalidJwt as exc:
            return Status.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc.reason}"
        except GrpcError as exc:
            return exc.status, exc.message
        except Exception as exc:
            if only_no_identity(exc):
                return Status.PERMISSION_DENIED, "no identity issued"
            log.error("workload API backend failed on %s", call.method, exc_info=True)
            return Status.INTERNAL, "internal error"
        return Status.UNAVAILABLE, "identity stream ended, reconnect"

    async def _jwt_call(self, call: Call) -> tuple[Status, str]:
        """The JWT profile: two unary calls and the JWT bundles stream."""
        await self._receive_request(call, JWT_METHODS[call.method])
        message = call.request_message or b""
        if call.method == "FetchJWTBundles":
            async with self._backend.watch_jwt_bundles(self._peer) as updates:
                async for bundles in updates:
                    self._send(call, jwt_bundles_response(bundles))
            return Status.UNAVAILABLE, "bundle stream ended, reconnect"
        if call.method == "FetchJWTSVID":
            audience, spiffe_id = jwt_svid_request(message)
            items = await self._backend.fetch_jwt(self._peer, audience, spiffe_id)
            self._send(call, jwt_svid_response(items))
            return Status.OK, ""
        audience_one, token = validate_request(message)
        result = await self._backend.validate_jwt(self._peer, audience_one, token)
        self._send(call, validate_response(result))
        return Status.OK, ""

    def _send(self, call: Call, payload: bytes) -> None:
        if len(payload) > self._limits.max_message_size:
            raise GrpcError(Status.RESOURCE_EXHAUSTED, "response too large")
        if call.offer(payload):
            self._flush()

    async def _receive_request(self, call: Call, method: Method | JwtMethod) -> None:
        ready = self._tasks[call.stream_id].request_ready
        if not ready.is_set():  # it usually came with the headers: no scope to set up then
            with trio.move_on_after(self._limits.request_timeout_s):
                await ready.wait()
            if not ready.is_set():
                raise GrpcError(Status.DEADLINE_EXCEEDED, "request message not received in time")
        if call.aborted is not None:  # a bad request frame (the wait above may not have run)
            raise GrpcError(*call.aborted)
        parse_request_message(method, call.request_message)

    async def _stream_snapshots(self, call: Call, method: Method) -> None:
        async with self._backend.watch_x509(self._peer) as snapshots:
            async for snapshot in snapshots:
                payload = _encoded(method, snapshot)
                if len(payload) > self._limits.max_message_size:
                    log.warning(
                        "workload API %s response of %d bytes exceeds the %d byte limit",
                        call.method,
                        len(payload),
                        self._limits.max_message_size,
                    )
                    raise GrpcError(Status.RESOURCE_EXHAUSTED, "response too large")
                if call.offer(payload):
                    self._flush()

    def _finish(self, call: Call, status: Status, message: str) -> None:
        if call.final is None:
            call.final = (status, message)
            self._count(call.method, status)
            call.counted = True
            self._flush()

    def _count(self, method: str, status: Status) -> None:
        self._stats.requests[(method, status.name)] += 1

    # -- writing ---------------------------------------------------------------

    def _wake(self) -> None:
        """Hand the rest to the writer task, starting it the first time (rule 2): a
        connection whose every write the socket takes at once never starts one."""
        self._wakeup.set()
        if not self._writer:
            self._writer = True
            self._nursery.start_soon(self._guard, self._write_loop)

    def _collect(self) -> None:
        self._outbox += self._h2.data_to_send()

    def _flush(self) -> None:
        """Send at once what the calls may send and the socket takes without waiting, and
        wake the writer only for the rest: a response or a push that fits the socket
        buffer then costs no trip through the writer task (rule 2: still only the
        connection's code moves bytes, and only one write is ever in progress)."""
        self._unsent, self._sender = False, None
        if self._closing or self._send_nowait is None:
            self._wake()
            return
        if len(self._outbox) < WRITE_ROUND:
            self._pump()
        self._collect()
        if self._outbox:
            # 0 while the writer is in the middle of a write: the bytes wait for it.
            del self._outbox[: self._send_nowait(self._outbox)]
        if self._outbox or self._closing or any(c.has_data for c in self._calls.values()):
            self._wake()

    async def _write_loop(self) -> None:
        while True:
            if not self._closing and len(self._outbox) < WRITE_ROUND:
                self._pump()
            self._collect()
            if self._outbox:
                data = bytes(self._outbox)
                self._outbox.clear()
                # Usually the socket takes it all at once: no deadline to set up then.
                sent = self._send_nowait(data) if self._send_nowait is not None else 0
                # No checkpoint when it does: the loop comes back here only while the calls
                # have more to send, which their flow-control windows bound, and otherwise
                # waits for `_wakeup` below (a trip through the scheduler per message was a
                # tenth of a rotation's push to a thousand streams).
                if sent < len(data):
                    with trio.move_on_after(self._limits.send_stall_timeout_s) as scope:
                        await self._stream.send_all(memoryview(data)[sent:])
                    if scope.cancelled_caught:
                        raise _Drop("peer stopped reading (write stalled)")
                continue
            if self._closing:
                await self._linger()
                self._nursery.cancel_scope.cancel()
                return
            deadline = stall_deadline(self._calls.values(), self._limits.send_stall_timeout_s)
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            if not self._wakeup.is_set():
                raise _Drop("peer stopped reading (flow-control window closed)")
            self._wakeup = trio.Event()

    async def _linger(self) -> None:
        """Half-close and drain briefly before closing, so that the kernel does not
        answer the peer's unread bytes with a reset that destroys our GOAWAY."""
        with trio.move_on_after(_LINGER_S):
            if isinstance(self._stream, trio.abc.HalfCloseableStream):
                await self._stream.send_eof()
            while await self._stream.receive_some(_READ_SIZE):
                pass

    def _pump(self) -> None:
        """Move what the calls may send now into h2 (`agent.workload_calls.pump`)."""
        for call, exc in pump(self._h2, self._calls, trio.current_time()):
            # The stream went away under us (reset, GOAWAY): the call ends quietly.
            log.debug("workload stream %d closed while sending: %s", call.stream_id, exc)
            self._signal(call)
        self._arm_idle()
        self._end_if_drained()


async def serve_workload_connection(
    stream: trio.abc.Stream,
    peer: PeerCred,
    backend: WorkloadBackend,
    *,
    limits: WorkloadLimits = DEFAULT_LIMITS,
    stats: WorkloadStats | None = None,
    drain: trio.Event | None = None,
) -> None:
    """Serve one accepted connection until the peer leaves, is dropped, or is drained.

    Separate from :func:`serve_workload_api` so that tests can drive it over
    in-memory streams in virtual time.
    """
    stats = WorkloadStats() if stats is None else stats
    drain = trio.Event() if drain is None else drain
    await _serve_connection(stream, peer, backend, limits, stats, drain, None)


async def _serve_connection(
    stream: trio.abc.Stream,
    peer: PeerCred,
    backend: WorkloadBackend,
    limits: WorkloadLimits,
    stats: WorkloadStats,
    drain: trio.Event,
    live: set[_Connection] | None,
) -> None:
    stats.connections_open += 1
    stats.connections_total += 1
    try:
        await _Connection(stream, peer, backend, limits, stats, drain).serve(live)
    finally:
        stats.connections_open -= 1


async def serve_workload_api(
    listener: trio.SocketListener,
    backend: WorkloadBackend,
    *,
    limits: WorkloadLimits = DEFAULT_LIMITS,
    stats: WorkloadStats | None = None,
    admission: Admission | None = None,
    drain: trio.Event | None = None,
    task_status: trio.TaskStatus[WorkloadStats] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Workload API on an open Unix socket listener until cancelled, or
    until ``drain`` is set and every connection has ended cleanly (rule 8).

    The listener is normally ``tally.ops.net.open_unix_listener(path, 0o666)``:
    any local process may connect, because what it gets depends on attestation.
    ``task_status.started`` reports the stats object the caller can read.
    ``admission`` caps the connections (rule 7); without it there is no cap.
    """
    stats = WorkloadStats() if stats is None else stats
    drain = trio.Event() if drain is None else drain
    live: set[_Connection] = set()
    """Every connection being served, for the drain (one task for all, not one each)."""

    async def handle(accepted: socket.socket) -> None:
        # PlainStream: one system call per read or write, without trio's socket wrapper
        # around each (most of a short connection's Python time otherwise).
        try:
            sock = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
        except BaseException:
            accepted.close()
            raise
        stream = PlainStream(sock)
        try:
            try:
                peer = peer_credentials(sock.socket)
            except OSError as exc:
                log.debug("workload connection without peer credentials: %s", exc)
                return
            if admission is None:
                await _serve_connection(stream, peer, backend, limits, stats, drain, live)
                return
            reason = admission.admit(peer.uid)
            if reason is not None:
                await _refuse(stream, peer, reason, admission, limits)
                return
            try:
                await _serve_connection(stream, peer, backend, limits, stats, drain, live)
            finally:
                admission.release(peer.uid)
        finally:
            stream.close_now()  # nothing in closing waits: no checkpoint for it

    async def stop_accepting(accepting: trio.CancelScope) -> None:
        await drain.wait()
        accepting.cancel()
        for connection in list(live):
            connection.on_drain()

    async with trio.open_nursery() as handlers:
        with trio.CancelScope() as accepting:
            handlers.start_soon(stop_accepting, accepting)
            task_status.started(stats)
            await accept_loop(listener, handlers, handle)


async def _refuse(
    stream: trio.abc.Stream,
    peer: PeerCred,
    reason: str,
    admission: Admission,
    limits: WorkloadLimits,
) -> None:
    """Answer a connection over a cap with SETTINGS and GOAWAY, then close it (rule 7).

    Nothing is read: the bytes fit an empty socket buffer, and the write is
    bounded anyway so a refused peer can never hold this task.
    """
    count = admission.report(trio.current_time())
    if count is not None:
        events.warning(
            "workload.refused",
            reason=reason,
            refused=count,
            uid=peer.uid,
            pid=peer.pid,
            open=admission.open,
        )
    conn = server_connection(limits)
    conn.initiate_connection()
    conn.close_connection(
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, additional_data=b"too many connections"
    )
    goodbye = conn.data_to_send()
    release(conn)
    with trio.move_on_after(1.0):
        try:
            await stream.send_all(goodbye)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
