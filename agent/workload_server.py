"""The SPIFFE Workload API server: gRPC over HTTP/2 (``h2``) on a Unix socket.

Rules / theory of operation:

1. **Who is calling comes from the kernel.**  ``SO_PEERCRED`` is read once,
   when the connection is accepted, and every call on that connection is
   attested with it.  Nothing the peer sends names its identity.
2. **One task per connection, one task per call.**  The connection task runs
   a reader and a writer; each call (HTTP/2 stream) runs in its own task and
   never touches the socket.  A call hands finished messages to the
   connection, and the writer alone moves bytes to the peer.
3. **Only the newest state is worth sending.**  Every Workload API message
   is the complete current state, so a call keeps at most the message being
   sent and the newest one after it; a newer message replaces one that has
   not started yet.  With at most ``max_concurrent_streams`` calls, a
   connection's buffering is bounded however slowly the peer reads.
4. **Flow control is obeyed both ways.**  DATA goes out only within the
   peer's stream and connection windows, in frames of at most its maximum
   frame size, round-robin over the calls so that one large chain does not
   starve the others.  Received DATA is acknowledged as soon as it is
   consumed.
5. **A peer that stops reading is dropped, not waited for.**  If a write
   stalls, or queued data is held back by a closed flow-control window, for
   ``send_stall_timeout_s``, the connection is closed.  Control frames that
   ``h2`` answers on its own (PING and SETTINGS acks) are bounded too.  Other
   connections are separate tasks and never wait on this one.
6. **Nothing a peer sends can crash the server, or make it hold much.**  A
   malformed frame or a protocol violation closes that connection (after a
   GOAWAY when possible); a bad call ends that call with its gRPC status.
   Both are logged at debug on ``tally.workload``; only backend failures are
   logged louder.  ``h2`` buffers a frame whole before it checks the length
   the frame declares (up to 16 MiB), and a header block over up to 64
   CONTINUATION frames, so `_FrameGuard` reads the frame headers first and
   drops a connection that declares a frame over our maximum frame size or a
   header block over ``max_header_block``.  A connection with no call open
   for ``idle_timeout_s`` is closed, so idle connections do not pile up.
7. **Checks in the order the standard implies.**  The request must be gRPC
   (POST, ``application/grpc``); then the ``workload.spiffe.io: true``
   header, before the path or the caller is looked at (INVALID_ARGUMENT);
   then the method (UNIMPLEMENTED for the JWT and WIT RPCs and unknown paths);
   then the caller's identity (PERMISSION_DENIED "no identity issued").
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from tally.ops.net import PeerCred, peer_credentials
from tally.wire import workload_pb as pb
from tally.wire.grpc import (
    DEFAULT_MAX_MESSAGE_SIZE,
    GrpcError,
    MessageDecoder,
    Request,
    Status,
    encode_message,
    parse_request_headers,
    response_headers,
    trailers,
    trailers_only,
)

log = logging.getLogger("tally.workload")

SECURITY_HEADER = "workload.spiffe.io"

_SERVICE = "/SpiffeWorkloadAPI/"
# Every method of the standard service, so that stats have a bounded set of labels.
_KNOWN_METHODS = frozenset(
    {
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTSVID",
        "FetchJWTBundles",
        "ValidateJWTSVID",
        "FetchWITSVID",
        "FetchWITBundles",
    }
)


@dataclass(frozen=True)
class SvidItem:
    spiffe_id: str
    cert_chain_der: bytes
    """Leaf first, then intermediates; DER certificates concatenated."""
    private_key_pkcs8: bytes
    bundle_der: bytes
    """The CA certificates of the SVID's own trust domain, DER concatenated."""
    hint: str = ""


@dataclass(frozen=True)
class X509Snapshot:
    """Everything one caller may see right now; the first SVID is its default identity."""

    svids: tuple[SvidItem, ...]
    bundles: Mapping[str, bytes]
    """``"spiffe://<td>"`` to DER CA certificates: the own trust domain and federated ones."""


class NoIdentity(Exception):
    """The caller has no identity (yet, or any more); its calls end with PERMISSION_DENIED."""


class WorkloadBackend(Protocol):
    def watch_x509(
        self, peer: PeerCred
    ) -> AbstractAsyncContextManager[AsyncIterator[X509Snapshot]]:
        """Attest ``peer`` on enter (may raise NoIdentity); the iterator yields the
        current snapshot at once, then a complete new one on every change, and may
        raise NoIdentity when the caller loses its identity."""
        ...


@dataclass(frozen=True)
class WorkloadLimits:
    max_concurrent_streams: int = 100
    """Advertised in SETTINGS; a peer that opens more loses its connection."""
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    """Largest response; gRPC clients refuse bigger ones by default, so a call
    whose state outgrows it ends with RESOURCE_EXHAUSTED."""
    max_request_size: int = 64 * 1024
    """Largest request message; Workload API requests are empty or a few strings."""
    request_timeout_s: float = 10.0
    """Time to get the HTTP/2 preface after connecting, and a call's request message."""
    send_stall_timeout_s: float = 30.0
    """How long a peer may leave queued data unread before it is dropped."""
    max_control_backlog: int = 256 * 1024
    """Bytes ``h2`` may queue on its own (acks) while a write is stalled."""
    max_header_block: int = 64 * 1024
    """Bytes of one header block (HEADERS plus CONTINUATION frames) before the
    connection is dropped; requests need a few hundred."""
    idle_timeout_s: float = 300.0
    """A connection with no call open, and none started, for this long is closed
    with a GOAWAY (gRPC clients reconnect when they next call)."""


DEFAULT_LIMITS = WorkloadLimits()


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


# Bytes handed to h2 per writer round: large enough to fill a socket buffer,
# small enough that one round never holds much memory.
_WRITE_ROUND = 256 * 1024
_READ_SIZE = 64 * 1024
_LINGER_S = 1.0


def _trust_domain_key(spiffe_id: str) -> str:
    """``spiffe://td/path`` -> ``spiffe://td``, the form bundle maps are keyed by."""
    rest = spiffe_id.removeprefix("spiffe://")
    return "spiffe://" + rest.split("/", 1)[0]


def x509_svid_response(snapshot: X509Snapshot) -> bytes:
    """The FetchX509SVID message for a snapshot; own trust domains stay out of federated_bundles."""
    if not snapshot.svids:
        raise NoIdentity("snapshot has no SVIDs")
    own = {_trust_domain_key(item.spiffe_id) for item in snapshot.svids}
    message = pb.X509SVIDResponse(
        svids=[
            pb.X509SVID(
                spiffe_id=item.spiffe_id,
                x509_svid=item.cert_chain_der,
                x509_svid_key=item.private_key_pkcs8,
                bundle=item.bundle_der,
                hint=item.hint,
            )
            for item in snapshot.svids
        ],
        federated_bundles={td: der for td, der in snapshot.bundles.items() if td not in own},
    )
    return message.SerializeToString(deterministic=True)


def x509_bundles_response(snapshot: X509Snapshot) -> bytes:
    if not snapshot.bundles:
        raise NoIdentity("snapshot has no bundles")
    message = pb.X509BundlesResponse(bundles=dict(snapshot.bundles))
    return message.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class _Method:
    parse_request: Callable[[bytes], object]
    build_response: Callable[[X509Snapshot], bytes]


_STREAMING_METHODS: Mapping[str, _Method] = {
    "FetchX509SVID": _Method(pb.X509SVIDRequest.FromString, x509_svid_response),
    "FetchX509Bundles": _Method(pb.X509BundlesRequest.FromString, x509_bundles_response),
}


def _only_no_identity(exc: BaseException) -> bool:
    """True for NoIdentity, also when a backend's nursery wrapped it in a group."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(NoIdentity)
        return rest is None
    return isinstance(exc, NoIdentity)


class _Drop(Exception):
    """This connection must be closed at once; the message says why (for the debug log)."""


_PREFACE_SIZE = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
_FRAME_HEADER_SIZE = 9
_HEADER_BLOCK_TYPES = frozenset({0x1, 0x5, 0x9})  # HEADERS, PUSH_PROMISE, CONTINUATION
_END_HEADERS = 0x4


class _FrameGuard:
    """Follows frame boundaries in the bytes a peer sends, before ``h2`` buffers them
    (rule 6), so that a declared length is judged on the 9-byte header."""

    def __init__(self, max_frame_size: int, max_header_block: int) -> None:
        self._max_frame = max_frame_size
        self._max_block = max_header_block
        self._skip = _PREFACE_SIZE  # bytes that are not a frame header
        self._header = bytearray()
        self._block = 0  # header block bytes so far, while END_HEADERS is pending

    def check(self, data: bytes | bytearray) -> str | None:
        """Why the connection must be dropped, or None while the framing is within bounds."""
        at = 0
        while at < len(data):
            if self._skip:
                step = min(self._skip, len(data) - at)
                self._skip -= step
                at += step
                continue
            take = _FRAME_HEADER_SIZE - len(self._header)
            self._header += data[at : at + take]
            at += take
            if len(self._header) < _FRAME_HEADER_SIZE:
                return None
            length = int.from_bytes(self._header[:3], "big")
            kind, flags = self._header[3], self._header[4]
            self._header.clear()
            if length > self._max_frame:
                return f"frame of {length} bytes exceeds the maximum frame size {self._max_frame}"
            if kind in _HEADER_BLOCK_TYPES:
                self._block = 0 if flags & _END_HEADERS else self._block + length
                if self._block > self._max_block:
                    return f"header block exceeds {self._max_block} bytes"
            self._skip = length
        return None


class _Call:
    """One HTTP/2 stream: its request as it arrives and its response as it leaves."""

    def __init__(self, stream_id: int, method: str, request: Request, max_request: int) -> None:
        self.stream_id = stream_id
        self.method = method
        self.request = request
        self.cancel_scope = trio.CancelScope()
        # Receiving side.
        self._decoder = MessageDecoder(max_request)
        self.request_message: bytes | None = None
        self.request_ready = trio.Event()
        # Sending side: the message in flight, and the newest one after it.
        self.headers_sent = False
        self.current = b""
        self.offset = 0
        self.latest: bytes | None = None
        self.final: tuple[Status, str] | None = None
        self.last_digest = b""
        self.blocked_since: float | None = None
        """When queued data last found the peer's window closed; None while it flows."""
        # Why the call had to end early (a bad request frame, a reset); its trailers
        # are sent only if the stream still exists.
        self.aborted: tuple[Status, str] | None = None
        self.counted = False

    def receive(self, data: bytes) -> None:
        """Take request DATA; a second message or a bad frame aborts the call."""
        if self.aborted is not None:
            return
        try:
            self._decoder.receive_data(data)
            while (message := self._decoder.next_message()) is not None:
                if self.request_message is not None:
                    raise GrpcError(Status.INTERNAL, "more than one request message")
                self.request_message = message
                self.request_ready.set()
        except GrpcError as exc:
            self.abort(exc.status, exc.message)

    def end_of_request(self) -> None:
        try:
            self._decoder.end_of_stream()
        except GrpcError as exc:
            self.abort(exc.status, exc.message)
        self.request_ready.set()

    def abort(self, status: Status, message: str) -> None:
        if self.aborted is None:
            self.aborted = (status, message)
        self.request_ready.set()
        self.cancel_scope.cancel()

    def queue(self, payload: bytes) -> None:
        framed = encode_message(payload)
        if self.offset == 0:
            self.current = framed
        else:
            self.latest = framed

    @property
    def has_data(self) -> bool:
        return bool(self.current) or self.latest is not None


class _Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: PeerCred,
        backend: WorkloadBackend,
        limits: WorkloadLimits,
        stats: WorkloadStats,
    ) -> None:
        self._stream = stream
        self._peer = peer
        self._backend = backend
        self._limits = limits
        self._stats = stats
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
            },
        )
        self._calls: dict[int, _Call] = {}
        self._outbox = bytearray()
        self._wakeup = trio.Event()
        self._closing = False
        self._settings_seen = False
        self._guard_frames = _FrameGuard(self._h2.max_inbound_frame_size, limits.max_header_block)
        self._requests_seen = 0
        self._idle = False
        self._read_scope = trio.CancelScope()

    async def serve(self) -> None:
        self._h2.initiate_connection()
        self._collect()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._guard, self._write_loop)
            nursery.start_soon(self._idle_watch)
            await self._guard(self._read_loop)

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
        handshake_deadline = trio.current_time() + self._limits.request_timeout_s
        while True:
            data: bytes | bytearray | None = None
            deadline = math.inf if self._settings_seen else handshake_deadline
            with trio.CancelScope(deadline=deadline) as self._read_scope:
                data = await self._stream.receive_some(_READ_SIZE)
            if data is None and self._idle:
                log.debug("workload connection from pid %d idle, closing", self._peer.pid)
                self._h2.close_connection(h2.errors.ErrorCodes.NO_ERROR)
                self._close_gracefully()
                return
            if data is None:
                raise _Drop("no HTTP/2 preface within the request timeout")
            if not data:
                self._nursery.cancel_scope.cancel()
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
            self._collect()
            if len(self._outbox) > self._limits.max_control_backlog:
                raise _Drop("peer sends but does not read")
            self._wakeup.set()

    def _handle(self, event: h2.events.Event) -> bool:
        """Apply one h2 event; True when the peer has ended the connection."""
        if isinstance(event, h2.events.RequestReceived):
            self._requests_seen += 1
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.receive(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.end_of_request()
        elif isinstance(event, h2.events.StreamReset):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.abort(Status.CANCELLED, "reset by the client")
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_seen = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True
        return False

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        label = "unknown"
        try:
            request = parse_request_headers(event.headers)
            label = _method_label(request.path)
            if request.metadata.get(SECURITY_HEADER) != "true":
                raise GrpcError(
                    Status.INVALID_ARGUMENT, f"security header missing: {SECURITY_HEADER}: true"
                )
            if label not in _STREAMING_METHODS:
                raise GrpcError(Status.UNIMPLEMENTED, f"method not implemented: {request.path}")
        except GrpcError as exc:
            self._count(label, exc.status)
            log.debug("workload call on %s rejected: %s", label, exc)
            self._h2.send_headers(
                stream_id,
                trailers_only(exc.status, exc.message, http_status=exc.http_status),
                end_stream=True,
            )
            self._stop_request(stream_id)
            return
        call = _Call(stream_id, label, request, self._limits.max_request_size)
        self._calls[stream_id] = call
        self._nursery.start_soon(self._run_call, call)

    async def _idle_watch(self) -> None:
        """Close the connection once it has had no call for a whole period (rule 6):
        none open at the start and at the end of it, and none started in between."""
        period = self._limits.idle_timeout_s
        while True:
            quiet, seen = not self._calls, self._requests_seen
            await trio.sleep(period)
            if quiet and not self._calls and self._requests_seen == seen:
                # The reader is waiting for input; it says goodbye (one task reads).
                self._idle = True
                self._read_scope.cancel()
                return

    def _close_gracefully(self) -> None:
        """Stop every call and let the writer flush what h2 queued (a GOAWAY)."""
        for call in self._calls.values():
            call.abort(Status.UNAVAILABLE, "connection closing")
        self._calls.clear()
        self._closing = True
        self._collect()
        self._wakeup.set()

    # -- calls -----------------------------------------------------------------

    async def _run_call(self, call: _Call) -> None:
        self._stats.streams_open += 1
        try:
            with call.cancel_scope:
                status, message = await self._call(call)
                self._finish(call, status, message)
            if call.aborted is not None and call.stream_id in self._calls:
                self._finish(call, *call.aborted)
        finally:
            self._stats.streams_open -= 1
            if not call.counted:
                self._count(call.method, Status.CANCELLED)

    async def _call(self, call: _Call) -> tuple[Status, str]:
        timeout = math.inf if call.request.timeout is None else call.request.timeout
        with trio.move_on_after(timeout):
            method = _STREAMING_METHODS[call.method]
            try:
                await self._receive_request(call, method)
                await self._stream_snapshots(call, method)
            except GrpcError as exc:
                return exc.status, exc.message
            except Exception as exc:
                if _only_no_identity(exc):
                    return Status.PERMISSION_DENIED, "no identity issued"
                log.error("workload API backend failed on %s", call.method, exc_info=True)
                return Status.INTERNAL, "internal error"
            return Status.UNAVAILABLE, "identity stream ended, reconnect"
        return Status.DEADLINE_EXCEEDED, "deadline exceeded"

    async def _receive_request(self, call: _Call, method: _Method) -> None:
        with trio.move_on_after(self._limits.request_timeout_s):
            await call.request_ready.wait()
        if not call.request_ready.is_set():
            raise GrpcError(Status.DEADLINE_EXCEEDED, "request message not received in time")
        if call.request_message is None:
            raise GrpcError(Status.INTERNAL, "request ended without a message")
        try:
            method.parse_request(call.request_message)
        except pb.DecodeError as exc:
            raise GrpcError(Status.INTERNAL, "request message does not parse") from exc

    async def _stream_snapshots(self, call: _Call, method: _Method) -> None:
        async with self._backend.watch_x509(self._peer) as snapshots:
            async for snapshot in snapshots:
                payload = method.build_response(snapshot)
                if len(payload) > self._limits.max_message_size:
                    log.warning(
                        "workload API %s response of %d bytes exceeds the %d byte limit",
                        call.method,
                        len(payload),
                        self._limits.max_message_size,
                    )
                    raise GrpcError(Status.RESOURCE_EXHAUSTED, "response too large")
                digest = hashlib.sha256(payload).digest()
                if digest == call.last_digest:
                    continue  # nothing this method shows has changed
                call.last_digest = digest
                call.queue(payload)
                self._wakeup.set()

    def _finish(self, call: _Call, status: Status, message: str) -> None:
        if call.final is None:
            call.final = (status, message)
            self._count(call.method, status)
            call.counted = True
            self._wakeup.set()

    def _count(self, method: str, status: Status) -> None:
        self._stats.requests[(method, status.name)] += 1

    # -- writing ---------------------------------------------------------------

    def _collect(self) -> None:
        self._outbox += self._h2.data_to_send()

    async def _write_loop(self) -> None:
        while True:
            if not self._closing and len(self._outbox) < _WRITE_ROUND:
                self._pump()
            self._collect()
            if self._outbox:
                data = bytes(self._outbox)
                self._outbox.clear()
                with trio.move_on_after(self._limits.send_stall_timeout_s) as scope:
                    await self._stream.send_all(data)
                if scope.cancelled_caught:
                    raise _Drop("peer stopped reading (write stalled)")
                continue
            if self._closing:
                await self._linger()
                self._nursery.cancel_scope.cancel()
                return
            blocked = [c.blocked_since for c in self._calls.values() if c.blocked_since is not None]
            deadline = min(blocked, default=math.inf) + self._limits.send_stall_timeout_s
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
        """Move queued messages and trailers into h2, within the peer's windows,
        one frame per call per round so that every call makes progress."""
        budget = _WRITE_ROUND
        progress = True
        while budget > 0 and progress:
            progress = False
            for call in list(self._calls.values()):
                try:
                    moved = self._pump_call(call, budget)
                except h2.exceptions.ProtocolError as exc:
                    # The stream went away under us (reset, GOAWAY): end the call quietly.
                    log.debug("workload stream %d closed while sending: %s", call.stream_id, exc)
                    self._calls.pop(call.stream_id, None)
                    call.abort(Status.CANCELLED, "stream closed")
                    continue
                budget -= moved
                progress = progress or moved > 0
                if moved or not call.has_data:
                    call.blocked_since = None
                elif call.blocked_since is None:
                    call.blocked_since = trio.current_time()

    def _pump_call(self, call: _Call, budget: int) -> int:
        """Send what one call may send now; returns the number of bytes handed to h2."""
        stream_id = call.stream_id
        if not call.headers_sent:
            if call.has_data:
                self._h2.send_headers(stream_id, response_headers())
                call.headers_sent = True
            elif call.final is not None:
                self._h2.send_headers(stream_id, trailers_only(*call.final), end_stream=True)
                self._end_call(call)
                return 1
            else:
                return 0
        if not call.current and call.latest is not None:
            call.current, call.latest, call.offset = call.latest, None, 0
        if call.current:
            window = min(
                self._h2.local_flow_control_window(stream_id),
                self._h2.max_outbound_frame_size,
                budget,
            )
            if window <= 0:
                return 0
            chunk = call.current[call.offset : call.offset + window]
            self._h2.send_data(stream_id, chunk)
            call.offset += len(chunk)
            if call.offset == len(call.current):
                call.current, call.offset = b"", 0
            return len(chunk)
        if call.final is not None:
            self._h2.send_headers(stream_id, trailers(*call.final), end_stream=True)
            self._end_call(call)
            return 1
        return 0

    def _end_call(self, call: _Call) -> None:
        del self._calls[call.stream_id]
        self._stop_request(call.stream_id)

    def _stop_request(self, stream_id: int) -> None:
        """After a complete response, ask a client still sending to stop, without error."""
        stream = self._h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)


def _method_label(path: str) -> str:
    name = path.removeprefix(_SERVICE) if path.startswith(_SERVICE) else ""
    return name if name in _KNOWN_METHODS else "unknown"


async def serve_workload_connection(
    stream: trio.abc.Stream,
    peer: PeerCred,
    backend: WorkloadBackend,
    *,
    limits: WorkloadLimits = DEFAULT_LIMITS,
    stats: WorkloadStats | None = None,
) -> None:
    """Serve one accepted connection until the peer leaves or is dropped.

    Separate from :func:`serve_workload_api` so that tests can drive it over
    in-memory streams in virtual time.
    """
    stats = WorkloadStats() if stats is None else stats
    stats.connections_open += 1
    stats.connections_total += 1
    try:
        await _Connection(stream, peer, backend, limits, stats).serve()
    finally:
        stats.connections_open -= 1


async def serve_workload_api(
    listener: trio.SocketListener,
    backend: WorkloadBackend,
    *,
    limits: WorkloadLimits = DEFAULT_LIMITS,
    stats: WorkloadStats | None = None,
    task_status: trio.TaskStatus[WorkloadStats] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Workload API on an open Unix socket listener until cancelled.

    The listener is normally ``tally.ops.net.open_unix_listener(path, 0o666)``:
    any local process may connect, because what it gets depends on attestation.
    ``task_status.started`` reports the stats object the caller can read.
    """
    stats = WorkloadStats() if stats is None else stats

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                peer = peer_credentials(stream.socket)
            except OSError as exc:
                log.debug("workload connection without peer credentials: %s", exc)
                return
            await serve_workload_connection(stream, peer, backend, limits=limits, stats=stats)

    async with trio.open_nursery() as nursery:
        task_status.started(stats)
        await trio.serve_listeners(handle, [listener], handler_nursery=nursery)
