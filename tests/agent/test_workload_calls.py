"""The sans-IO call core, driven directly: a real ``h2`` client on the other side of
a server ``H2Connection``, bytes handed across by hand, and no I/O at all."""

from __future__ import annotations

import math

import h2.config
import h2.connection
import h2.events
import hpack

from agent.workload_calls import (
    DEFAULT_LIMITS,
    Call,
    FirstBlockDecoder,
    FirstBlockEncoder,
    pump,
    reject,
    server_connection,
    stall_deadline,
)
from agent.workload_messages import route_request
from tally.wire.grpc import GrpcError, MessageDecoder, Status, encode_message, status_from_headers

WINDOW = 65535  # HTTP/2's initial stream and connection window
FRAME = 16384  # HTTP/2's initial maximum frame size

HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"workload.spiffe.io", b"true"),
]


class Link:
    """A server connection and an h2 client, with the bytes between them moved by hand."""

    def __init__(self) -> None:
        self.server = server_connection(DEFAULT_LIMITS)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.server.initiate_connection()
        self.client.initiate_connection()
        self.data: dict[int, list[int]] = {}  # DATA frame sizes by stream
        self.status: dict[int, tuple[Status, str] | None] = {}
        self.reset: set[int] = set()
        self.deliver()

    def deliver(self, *, ack: bool = False) -> list[h2.events.Event]:
        """Move bytes both ways until neither side has more; the server's events."""
        server_events: list[h2.events.Event] = []
        while True:
            to_server = self.client.data_to_send()
            if to_server:
                server_events += self.server.receive_data(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                for event in self.client.receive_data(to_client):
                    self._on_client_event(event, ack)
            if not to_server and not to_client:
                return server_events

    def _on_client_event(self, event: h2.events.Event, ack: bool) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            self.data.setdefault(event.stream_id, []).append(len(event.data))
            if ack:
                self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            assert event.stream_id is not None
            self.status[event.stream_id] = status_from_headers(event.headers)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self.reset.add(event.stream_id)

    def open_call(self) -> Call:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, HEADERS)
        [event] = [e for e in self.deliver() if isinstance(e, h2.events.RequestReceived)]
        label, request = route_request(event.headers)
        return Call(stream_id, label, request, DEFAULT_LIMITS.max_request_size)

    def received(self, stream_id: int) -> int:
        return sum(self.data.get(stream_id, []))


# ---------------------------------------------------------------------------
# The request side.


def _call() -> Call:
    return Link().open_call()


def test_one_request_message_makes_the_request_done():
    call = _call()
    seen = []
    for part in (encode_message(b"")[:3], encode_message(b"")[3:]):  # half a message first
        call.receive(part)
        seen.append((call.request_done, call.request_message, call.aborted))
    assert seen == [(False, None, None), (True, b"", None)]


def test_a_second_request_message_aborts_the_call():
    call = _call()
    call.receive(encode_message(b"") * 2)
    assert call.aborted == (Status.INTERNAL, "more than one request message")
    call.receive(encode_message(b""))  # ignored from now on
    assert call.aborted[0] is Status.INTERNAL


def test_a_request_cut_short_aborts_the_call():
    call = _call()
    call.receive(encode_message(b"abc")[:6])
    call.end_of_request()
    assert call.request_done
    assert call.aborted is not None and call.request_message is None


def test_an_oversized_request_aborts_the_call():
    call = _call()
    call.receive(b"\x00" + (DEFAULT_LIMITS.max_request_size + 1).to_bytes(4, "big"))
    assert call.aborted is not None
    assert call.aborted[0] is Status.RESOURCE_EXHAUSTED


def test_the_first_abort_is_the_one_kept():
    call = _call()
    call.abort(Status.CANCELLED, "reset by the client")
    call.abort(Status.UNAVAILABLE, "connection closing")
    assert call.aborted == (Status.CANCELLED, "reset by the client")
    assert call.request_done


# ---------------------------------------------------------------------------
# The response side: only the newest state, never the same one twice.


def test_an_unchanged_message_is_not_offered_again():
    call = _call()
    assert call.offer(b"state 1")
    assert not call.offer(b"state 1")
    assert call.current == encode_message(b"state 1")


def test_a_newer_message_replaces_one_not_started():
    call = _call()
    call.offer(b"state 1")
    call.offer(b"state 2")
    assert call.current == encode_message(b"state 2")
    assert call.latest is None


def test_a_message_in_flight_finishes_and_only_the_newest_follows():
    link = Link()
    call = link.open_call()
    calls = {call.stream_id: call}
    big = b"a" * (WINDOW + 10_000)
    call.offer(big)
    pump(link.server, calls, now=0.0)
    assert 0 < call.offset < len(call.current)  # held back by the window
    call.offer(b"state 2")
    call.offer(b"state 3")
    assert call.latest == encode_message(b"state 3")
    link.deliver(ack=True)
    for _ in range(3):
        pump(link.server, calls, now=1.0)
        link.deliver(ack=True)
    assert link.received(call.stream_id) == len(encode_message(big)) + len(
        encode_message(b"state 3")
    )
    assert not call.has_data


# ---------------------------------------------------------------------------
# Flow control.


def test_data_stays_within_the_peers_window_and_frame_size():
    link = Link()
    call = link.open_call()
    calls = {call.stream_id: call}
    call.offer(b"x" * 100_000)
    assert pump(link.server, calls, now=5.0) == []
    link.deliver()  # the client does not acknowledge
    assert link.received(call.stream_id) == WINDOW
    assert max(link.data[call.stream_id]) <= FRAME
    assert call.blocked_since == 5.0
    assert stall_deadline(calls.values(), 30.0) == 35.0
    # Still closed later: blocked since the first time, not since the last look.
    pump(link.server, calls, now=9.0)
    assert call.blocked_since == 5.0


def test_an_opened_window_lets_the_rest_go():
    link = Link()
    call = link.open_call()
    calls = {call.stream_id: call}
    payload = b"x" * 100_000
    call.offer(payload)
    pump(link.server, calls, now=0.0)
    link.deliver(ack=True)  # WINDOW_UPDATEs go back
    pump(link.server, calls, now=1.0)
    link.deliver(ack=True)
    assert link.received(call.stream_id) == len(encode_message(payload))
    assert call.blocked_since is None
    assert stall_deadline(calls.values(), 30.0) == math.inf


def test_calls_share_a_round_so_none_is_starved():
    link = Link()
    first, second = link.open_call(), link.open_call()
    calls = {first.stream_id: first, second.stream_id: second}
    first.offer(b"1" * 40_000)
    second.offer(b"2" * 40_000)
    pump(link.server, calls, now=0.0, budget=2 * FRAME)
    link.deliver()
    assert link.data[first.stream_id] == [FRAME]
    assert link.data[second.stream_id] == [FRAME]


def test_the_connection_window_is_shared_by_every_call():
    link = Link()
    first, second = link.open_call(), link.open_call()
    calls = {first.stream_id: first, second.stream_id: second}
    first.offer(b"1" * 60_000)
    second.offer(b"2" * 60_000)
    pump(link.server, calls, now=0.0)
    link.deliver()
    assert link.received(first.stream_id) + link.received(second.stream_id) == WINDOW
    assert first.blocked_since == second.blocked_since == 0.0


# ---------------------------------------------------------------------------
# Ending calls.


def test_a_status_with_no_message_is_a_trailers_only_response():
    link = Link()
    call = link.open_call()
    calls = {call.stream_id: call}
    call.final = (Status.PERMISSION_DENIED, "no identity issued")
    pump(link.server, calls, now=0.0)
    link.deliver()
    assert calls == {}
    assert link.status[call.stream_id] == (Status.PERMISSION_DENIED, "no identity issued")
    assert call.stream_id not in link.data
    assert call.stream_id in link.reset  # the client is asked to stop sending


def test_trailers_follow_the_last_message():
    link = Link()
    call = link.open_call()
    calls = {call.stream_id: call}
    call.offer(b"state")
    call.final = (Status.UNAVAILABLE, "identity stream ended, reconnect")
    pump(link.server, calls, now=0.0)
    link.deliver()
    assert calls == {}
    assert link.received(call.stream_id) == len(encode_message(b"state"))
    assert link.status[call.stream_id] == (Status.UNAVAILABLE, "identity stream ended, reconnect")


def test_a_stream_reset_under_us_is_reported_and_the_call_aborted():
    link = Link()
    call = link.open_call()
    calls = {call.stream_id: call}
    link.client.reset_stream(call.stream_id)
    link.deliver()
    call.offer(b"state")
    [(gone, exc)] = pump(link.server, calls, now=0.0)
    assert gone is call and calls == {}
    assert call.aborted == (Status.CANCELLED, "stream closed")
    assert exc is not None


def test_a_rejected_call_ends_with_its_status_in_one_headers_frame():
    link = Link()
    stream_id = link.client.get_next_available_stream_id()
    link.client.send_headers(stream_id, HEADERS)
    link.deliver()
    reject(link.server, stream_id, GrpcError(Status.UNIMPLEMENTED, "method not implemented: x"))
    link.deliver()
    assert link.status[stream_id] == (Status.UNIMPLEMENTED, "method not implemented: x")
    assert stream_id in link.reset


def test_the_decoder_sees_whole_messages_across_frames():
    link = Link()
    call = link.open_call()
    calls = {call.stream_id: call}
    payload = bytes(range(256)) * 200  # 51200 bytes: four frames
    call.offer(payload)
    pump(link.server, calls, now=0.0)
    decoder = MessageDecoder(1 << 20)
    data = link.server.data_to_send()
    for event in link.client.receive_data(data):
        if isinstance(event, h2.events.DataReceived):
            decoder.receive_data(event.data)
    assert decoder.next_message() == payload


def test_a_remembered_first_header_block_leaves_the_same_headers_and_table():
    request = [
        (b":method", b"POST"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b"workload.spiffe.io", b"true"),
        (b"x-custom", b"a value long enough to be Huffman coded"),
    ]
    encoder = hpack.Encoder()
    encoder.header_table_size = 256  # a size update opens the first block
    first = encoder.encode(request)
    second = encoder.encode([*request[:3], (b"x-custom", b"another")])  # uses the table
    expected = hpack.Decoder()
    want = [expected.decode(first, raw=True), expected.decode(second, raw=True)]
    for _ in range(2):  # decoded once, then remembered
        decoder = FirstBlockDecoder()
        assert [decoder.decode(first, raw=True), decoder.decode(second, raw=True)] == want
        assert decoder.header_table.dynamic_entries == expected.header_table.dynamic_entries
        assert decoder.header_table_size == expected.header_table_size


def test_a_remembered_first_response_block_is_the_same_bytes_and_table():
    response = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailer = [(b"grpc-status", b"0")]
    expected = hpack.Encoder()
    expected.header_table_size = 256  # as when the peer's SETTINGS resize the table
    want = [expected.encode(response), expected.encode(trailer)]
    for _ in range(2):  # encoded once, then remembered
        encoder = FirstBlockEncoder()
        encoder.header_table_size = 256
        assert [encoder.encode(response), encoder.encode(trailer)] == want
        assert encoder.header_table.dynamic_entries == expected.header_table.dynamic_entries
    # A different context is a different block: it is encoded, not looked up.
    other = FirstBlockEncoder()
    assert other.encode(response) == hpack.Encoder().encode(response)
