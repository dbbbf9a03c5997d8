"""The sans-IO half of a Workload API connection: calls, framing limits, flow control.

Rules:

1. **Pure.**  No trio, socket, os or time.  ``h2`` is itself sans-IO, so the
   functions here act on an ``H2Connection`` and on `Call` state only; the
   shell (`agent.workload_server`) moves the bytes, runs the tasks and passes
   ``now`` in.
2. **Only the newest state is worth sending.**  Every Workload API message is
   the complete current state, so a call keeps at most the message being sent
   (``current``) and the newest one after it (``latest``); a newer message
   replaces one that has not started yet, and one equal to the last sent is
   not sent at all.
3. **Flow control is obeyed.**  DATA goes out only within the peer's stream
   and connection windows, in frames of at most its maximum frame size,
   round-robin over the calls so that one large chain does not starve the
   others (`pump`).  A call with data held back by a closed window records
   since when (``blocked_since``), so the shell can drop a peer that never
   opens it (`stall_deadline`).
4. **A declared length is judged on the 9-byte header.**  ``h2`` buffers a
   frame whole before it checks the length the frame declares (up to 16 MiB),
   and a header block over up to 64 CONTINUATION frames, so `FrameGuard`
   follows the frame headers first.
5. **A new connection costs little.**  Most Workload API connections carry
   one fetch, so what every connection repeats is done once: one h2
   configuration for all, the first request and response header blocks
   remembered (`FirstBlockDecoder`, `FirstBlockEncoder`: a fresh HPACK context
   makes them the same bytes each time), and a finished connection is emptied
   (`release`) so that reference counting frees it, not the cycle collector.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
import hpack
from hpack.struct import HeaderTuple

from tally.wire.grpc import (
    DEFAULT_MAX_MESSAGE_SIZE,
    GrpcError,
    MessageDecoder,
    Request,
    Status,
    encode_message,
    response_headers,
    trailers,
    trailers_only,
)

# Bytes handed to h2 per writer round: large enough to fill a socket buffer,
# small enough that one round never holds much memory.
WRITE_ROUND = 256 * 1024


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


_SERVER_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)
"""One for every connection: h2 only reads its configuration."""


def server_connection(limits: WorkloadLimits) -> h2.connection.H2Connection:
    """The server side of one HTTP/2 connection, advertising ``limits``.

    What a peer sends is validated as h2 does by default (a malformed request is a
    protocol error); what we send is not validated again nor normalised, because every
    header we send is built here and in `tally.wire.grpc` from constants, lower-case
    names and printable ASCII values (``grpc-message`` is percent-encoded), and h2's
    checks of it were a tenth of a short call's time.
    """
    conn = h2.connection.H2Connection(config=_SERVER_CONFIG)
    conn.decoder = FirstBlockDecoder()
    conn.encoder = FirstBlockEncoder()
    conn.local_settings = h2.settings.Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
        },
    )
    return conn


def release(conn: h2.connection.H2Connection) -> None:
    """Free a connection that is done with at once.  An ``H2Connection`` refers to itself
    (its table of frame handlers holds its own bound methods), so without this each
    connection would wait for Python's cycle collector, whose runs freeing them were a
    fourteenth of the agent's time under a stream of short fetches; emptying the
    object breaks the cycle and lets reference counting free it all."""
    vars(conn).clear()


_FIRST_BLOCKS: dict[
    tuple[bytes, int, int], tuple[list[HeaderTuple], int, list[tuple[bytes, bytes]]]
] = {}
_FIRST_BLOCKS_KEPT = 64
_FIRST_BLOCK_MAX = 1024


class FirstBlockDecoder(hpack.Decoder):
    """hpack's decoder, remembering what the first header block of a connection decodes
    to.  A client opens each connection with a fresh HPACK context, so its first
    request's header block is the same bytes every time it makes the same call, and
    decodes to the same headers and the same table: decoding it again (Huffman, a
    byte at a time in Python) was a twentieth of a short call's time.  Only the first
    block is remembered, and only with the limits it was decoded under; every later
    block, and any block that fails, is decoded as usual."""

    def __init__(self) -> None:
        super().__init__()
        self._fresh = True

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        if not self._fresh or not raw or len(data) > _FIRST_BLOCK_MAX:
            self._fresh = False
            return super().decode(data, raw)
        self._fresh = False
        key = (bytes(data), self.max_header_list_size, self.max_allowed_table_size)
        known = _FIRST_BLOCKS.get(key)
        if known is not None:
            headers, table_size, entries = known
            table = self.header_table
            if table_size != table.maxsize:
                table.maxsize = table_size
            for name, value in entries:
                table.add(name, value)
            return list(headers)
        decoded = list(super().decode(data, raw))
        if len(_FIRST_BLOCKS) >= _FIRST_BLOCKS_KEPT:
            _FIRST_BLOCKS.clear()
        table = self.header_table
        _FIRST_BLOCKS[key] = (decoded, table.maxsize, list(reversed(table.dynamic_entries)))
        return decoded


_Encoded = tuple[bytes, int, bool, list[int], list[tuple[bytes, bytes]]]
"""A header block, and the table it leaves: size, resized flag, pending size changes,
entries (oldest first)."""
_FIRST_RESPONSES: dict[tuple[object, ...], _Encoded] = {}


class FirstBlockEncoder(hpack.Encoder):
    """hpack's encoder, remembering the first header block of a connection, as
    `FirstBlockDecoder` does on the way in: our first response on every connection is
    the same headers from the same fresh context (SETTINGS may resize it, which is part
    of the key), so it encodes to the same bytes and leaves the same table."""

    def __init__(self) -> None:
        super().__init__()
        self._fresh = True

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:  # type: ignore[override]
        if not self._fresh:
            return super().encode(headers, huffman)
        self._fresh = False
        table = self.header_table
        listed = list(headers)
        key = (tuple(listed), huffman, table.maxsize, table.resized, tuple(self.table_size_changes))
        known = _FIRST_RESPONSES.get(key)
        if known is not None and not table.dynamic_entries:
            block, size, resized, changes, entries = known
            table.maxsize = size
            table.resized = resized
            self.table_size_changes = list(changes)
            for name, value in entries:
                table.add(name, value)
            return block
        block = super().encode(listed, huffman)
        if len(_FIRST_RESPONSES) >= _FIRST_BLOCKS_KEPT:
            _FIRST_RESPONSES.clear()
        _FIRST_RESPONSES[key] = (
            block,
            table.maxsize,
            table.resized,
            list(self.table_size_changes),
            list(reversed(table.dynamic_entries)),
        )
        return block


_PREFACE_SIZE = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
_FRAME_HEADER_SIZE = 9
_HEADER_BLOCK_TYPES = frozenset({0x1, 0x5, 0x9})  # HEADERS, PUSH_PROMISE, CONTINUATION
_END_HEADERS = 0x4


class FrameGuard:
    """Follows frame boundaries in the bytes a peer sends, before ``h2`` buffers them
    (rule 4), so that a declared length is judged on the 9-byte header."""

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


class Call:
    """One HTTP/2 stream: its request as it arrives and its response as it leaves."""

    def __init__(self, stream_id: int, method: str, request: Request, max_request: int) -> None:
        self.stream_id = stream_id
        self.method = method
        self.request = request
        # Receiving side.
        self._decoder = MessageDecoder(max_request)
        self.request_message: bytes | None = None
        self.request_done = False
        """The request message arrived, the request ended, or the call was aborted."""
        # Sending side: the message in flight, and the newest one after it.
        self.headers_sent = False
        self.current = b""
        self.offset = 0
        self.latest: bytes | None = None
        self.final: tuple[Status, str] | None = None
        self.last_offered: bytes | None = None
        """The last message queued: usually the very object every stream of the same
        snapshot shares (`agent.workload_server`), so that holding it costs nothing and
        comparing is one identity check."""
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
                self.request_done = True
        except GrpcError as exc:
            self.abort(exc.status, exc.message)

    def end_of_request(self) -> None:
        try:
            self._decoder.end_of_stream()
        except GrpcError as exc:
            self.abort(exc.status, exc.message)
        self.request_done = True

    def abort(self, status: Status, message: str) -> None:
        if self.aborted is None:
            self.aborted = (status, message)
        self.request_done = True

    def offer(self, payload: bytes) -> bool:
        """Queue a response message unless it equals the last one; True when queued."""
        if payload == self.last_offered:
            return False  # nothing this method shows has changed
        self.last_offered = payload
        self.queue(payload)
        return True

    def queue(self, payload: bytes) -> None:
        framed = encode_message(payload)
        if self.offset == 0:
            self.current = framed
        else:
            self.latest = framed

    @property
    def has_data(self) -> bool:
        return bool(self.current) or self.latest is not None


def reject(conn: h2.connection.H2Connection, stream_id: int, error: GrpcError) -> None:
    """End a call from its headers alone, with a trailers-only response."""
    conn.send_headers(
        stream_id,
        trailers_only(error.status, error.message, http_status=error.http_status),
        end_stream=True,
    )
    stop_request(conn, stream_id)


def stop_request(conn: h2.connection.H2Connection, stream_id: int) -> None:
    """After a complete response, ask a client still sending to stop, without error."""
    stream = conn.streams.get(stream_id)
    if stream is not None and not stream.closed:
        conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)


def pump(
    conn: h2.connection.H2Connection,
    calls: dict[int, Call],
    now: float,
    budget: int = WRITE_ROUND,
) -> list[tuple[Call, h2.exceptions.ProtocolError]]:
    """Move queued messages and trailers into ``conn``, within the peer's windows,
    one frame per call per round so that every call makes progress (rule 3).

    A call that is done leaves ``calls``.  Returns the calls whose stream went
    away under us (reset, GOAWAY), each with why: they have left ``calls`` and
    are aborted.
    """
    gone: list[tuple[Call, h2.exceptions.ProtocolError]] = []
    progress = True
    while budget > 0 and progress:
        progress = False
        for call in list(calls.values()):
            try:
                moved = _pump_call(conn, calls, call, budget)
            except h2.exceptions.ProtocolError as exc:
                calls.pop(call.stream_id, None)
                call.abort(Status.CANCELLED, "stream closed")
                gone.append((call, exc))
                continue
            budget -= moved
            progress = progress or moved > 0
            if moved or not call.has_data:
                call.blocked_since = None
            elif call.blocked_since is None:
                call.blocked_since = now
    return gone


def _pump_call(
    conn: h2.connection.H2Connection, calls: dict[int, Call], call: Call, budget: int
) -> int:
    """Send what one call may send now; returns the number of bytes handed to h2."""
    stream_id = call.stream_id
    if not call.headers_sent:
        if call.has_data:
            conn.send_headers(stream_id, response_headers())
            call.headers_sent = True
        elif call.final is not None:
            conn.send_headers(stream_id, trailers_only(*call.final), end_stream=True)
            _end_call(conn, calls, call)
            return 1
        else:
            return 0
    if not call.current and call.latest is not None:
        call.current, call.latest, call.offset = call.latest, None, 0
    if call.current:
        window = min(
            conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, budget
        )
        if window <= 0:
            return 0
        chunk = call.current[call.offset : call.offset + window]
        conn.send_data(stream_id, chunk)
        call.offset += len(chunk)
        if call.offset == len(call.current):
            call.current, call.offset = b"", 0
        return len(chunk)
    if call.final is not None:
        conn.send_headers(stream_id, trailers(*call.final), end_stream=True)
        _end_call(conn, calls, call)
        return 1
    return 0


def _end_call(conn: h2.connection.H2Connection, calls: dict[int, Call], call: Call) -> None:
    del calls[call.stream_id]
    stop_request(conn, call.stream_id)


def stall_deadline(calls: Iterable[Call], send_stall_timeout_s: float) -> float:
    """When the peer is overdue to open a window: infinity while nothing is held back."""
    blocked = [c.blocked_since for c in calls if c.blocked_since is not None]
    return min(blocked, default=math.inf) + send_stall_timeout_s
