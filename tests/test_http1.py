"""tally.wire.http1: the HTTP/1.1 layer on llhttp, checked against h11 as an independent peer."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.wire import http1


def events(conn: http1.Connection, data: bytes = b"", *, eof: bool = False) -> list[object]:
    """Everything ``conn`` hands out after ``data`` (and EOF), up to NEED_DATA or PAUSED."""
    if data:
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is http1.NEED_DATA or event is http1.PAUSED:
            out.append(event)
            return out
        out.append(event)
        if isinstance(event, http1.ConnectionClosed):
            return out


def h11_parse_response(wire: bytes, method: str = "GET") -> list[Any]:
    """What h11, as the client that sent ``method``, reads from ``wire``."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(wire)
    out = []
    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        out.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return out


def test_a_request_with_a_chunked_body_and_trailers():
    conn = http1.Connection(http1.SERVER)
    got = events(
        conn,
        b"POST /up?x=1 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n",
    )
    request = got[0]
    assert isinstance(request, http1.Request)
    assert (request.method, request.target, request.http_version) == (b"POST", b"/up?x=1", b"1.1")
    assert request.headers == [(b"host", b"svc"), (b"transfer-encoding", b"chunked")]
    assert b"".join(e.data for e in got if isinstance(e, http1.Data)) == b"abcde"
    end = got[-2]
    assert isinstance(end, http1.EndOfMessage) and end.headers == [(b"x-sum", b"5")]
    assert conn.their_state is http1.DONE and conn.our_state is http1.SEND_RESPONSE


def test_pipelined_requests_wait_for_the_next_cycle():
    conn = http1.Connection(http1.SERVER)
    two = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    got = events(conn, two)
    assert [type(e) for e in got[:2]] == [http1.Request, http1.EndOfMessage]
    assert got[2] is http1.PAUSED
    assert conn.trailing_data[0]
    conn.send(http1.Response(status_code=204, headers=[]))
    conn.send(http1.EndOfMessage())
    conn.start_next_cycle()
    second = conn.next_event()
    assert isinstance(second, http1.Request) and second.target == b"/2"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_refusals_carry_the_status_to_answer(head: bytes, status: int):
    conn = http1.Connection(http1.SERVER, max_incomplete_event_size=16384)
    with pytest.raises(http1.RemoteProtocolError) as info:
        events(conn, head)
    assert info.value.error_status_hint == status
    assert conn.their_state is http1.ERROR


def test_a_head_arriving_in_pieces_is_cut_at_the_limit():
    conn = http1.Connection(http1.SERVER, max_incomplete_event_size=1000)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    for _ in range(3):
        conn.receive_data(b"y" * 400)
    with pytest.raises(http1.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.error_status_hint == 431


def test_a_response_to_head_has_no_body_and_the_next_one_does():
    conn = http1.Connection(http1.CLIENT)
    conn.send(http1.Request(method="HEAD", target="/", headers=[("host", "x")]))
    conn.send(http1.EndOfMessage())
    got = events(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert [type(e) for e in got[:2]] == [http1.Response, http1.EndOfMessage]
    assert got[2:] == [http1.NEED_DATA]
    conn.start_next_cycle()
    conn.send(http1.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(http1.EndOfMessage())
    got = events(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert b"".join(e.data for e in got if isinstance(e, http1.Data)) == b"hello"


def test_a_body_without_length_ends_with_the_connection():
    conn = http1.Connection(http1.CLIENT)
    conn.send(http1.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(http1.EndOfMessage())
    got = events(conn, b"HTTP/1.0 200 OK\r\n\r\nsome", eof=True)
    assert [type(e) for e in got] == [
        http1.Response,
        http1.Data,
        http1.EndOfMessage,
        http1.ConnectionClosed,
    ]
    assert conn.their_state is http1.CLOSED


def test_a_peer_that_closes_mid_body_is_an_error():
    conn = http1.Connection(http1.CLIENT)
    conn.send(http1.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(http1.EndOfMessage())
    with pytest.raises(http1.RemoteProtocolError):
        events(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsome", eof=True)


def test_interim_responses_come_before_the_final_one():
    conn = http1.Connection(http1.CLIENT)
    conn.send(http1.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(http1.EndOfMessage())
    got = events(
        conn, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
    )
    assert [type(e) for e in got[:4]] == [
        http1.InformationalResponse,
        http1.Response,
        http1.Data,
        http1.EndOfMessage,
    ]


def _served(request: bytes, response: http1.Response, body: bytes) -> bytes:
    conn = http1.Connection(http1.SERVER)
    events(conn, request)
    return b"".join(
        [
            conn.send(response) or b"",
            conn.send(http1.Data(body)) or b"",
            conn.send(http1.EndOfMessage()) or b"",
        ]
    )


def test_a_response_without_length_is_chunked_for_http11_and_closes_for_http10():
    response = http1.Response(status_code=200, headers=[("content-type", "text/plain")])
    wire = _served(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", response, b"hi")
    assert b"transfer-encoding: chunked" in wire and wire.endswith(b"2\r\nhi\r\n0\r\n\r\n")
    assert [type(e) for e in h11_parse_response(wire)][-1] is h11.EndOfMessage
    wire = _served(b"GET / HTTP/1.0\r\n\r\n", response, b"hi")
    assert b"connection: close" in wire and b"chunked" not in wire and wire.endswith(b"\r\n\r\nhi")


def test_connection_close_ends_keep_alive_on_both_sides():
    conn = http1.Connection(http1.SERVER)
    events(conn, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = conn.send(http1.Response(status_code=200, headers=[("content-length", "0")]))
    assert head is not None and b"connection: close\r\n" in head
    conn.send(http1.EndOfMessage())
    assert conn.our_state is http1.MUST_CLOSE and conn.their_state is http1.MUST_CLOSE
    with pytest.raises(http1.LocalProtocolError):
        conn.start_next_cycle()


def test_sent_bodies_match_their_declared_length():
    conn = http1.Connection(http1.CLIENT)
    conn.send(
        http1.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "3")])
    )
    with pytest.raises(http1.LocalProtocolError):
        conn.send(http1.Data(b"four"))
    conn = http1.Connection(http1.CLIENT)
    conn.send(
        http1.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "3")])
    )
    conn.send(http1.Data(b"ab"))
    with pytest.raises(http1.LocalProtocolError):
        conn.send(http1.EndOfMessage())


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "GE T", "target": "/", "headers": [("host", "x")]},
        {"method": "GET", "target": "/ x", "headers": [("host", "x")]},
        {"method": "GET", "target": "/", "headers": [("host", "x"), ("bad name", "v")]},
        {"method": "GET", "target": "/", "headers": [("host", "x"), ("x", "a\r\nInjected: 1")]},
        {"method": "GET", "target": "/", "headers": []},
    ],
)
def test_what_we_send_is_checked(fields):
    with pytest.raises(http1.LocalProtocolError):
        http1.Request(**fields)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)


@given(
    path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._~-", min_size=0, max_size=40),
    fields=st.lists(st.tuples(_token, _value), max_size=8),
    body=st.binary(max_size=300),
    chunked=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=6),
)
def test_requests_read_as_h11_reads_them(path, fields, body, chunked, cuts):
    """Any request h11 writes, in any split, reads here as h11 itself reads it."""
    fields = [(n, v) for n, v in fields if n not in ("host", "content-length", "transfer-encoding")]
    framing = (
        [("transfer-encoding", "chunked")] if chunked else [("content-length", str(len(body)))]
    )
    sender = h11.Connection(h11.CLIENT)
    wire = sender.send(
        h11.Request(method="POST", target="/" + path, headers=[("host", "svc"), *fields, *framing])
    )
    wire += sender.send(h11.Data(data=body)) if body else b""
    wire += sender.send(h11.EndOfMessage())
    reference = h11.Connection(h11.SERVER)
    reference.receive_data(wire)
    expected = []
    while not isinstance(event := reference.next_event(), h11.EndOfMessage):
        expected.append(event)
    ours = http1.Connection(http1.SERVER)
    got: list[object] = []
    at = 0
    for cut in [*cuts, len(wire)]:
        piece, at = wire[at : at + cut], at + cut
        if piece:
            ours.receive_data(piece)
        while (event := ours.next_event()) is not http1.NEED_DATA and event is not http1.PAUSED:
            got.append(event)
    head, want_head = got[0], expected[0]
    assert isinstance(head, http1.Request)
    assert (head.method, head.target) == (want_head.method, want_head.target)
    assert list(head.headers) == [(n, v) for n, v in want_head.headers]
    data = b"".join(e.data for e in got if isinstance(e, http1.Data))
    assert data == b"".join(e.data for e in expected if isinstance(e, h11.Data)) == body
    assert isinstance(got[-1], http1.EndOfMessage)


@given(
    status=st.sampled_from([200, 201, 204, 301, 304, 404, 500]),
    fields=st.lists(st.tuples(_token, _value), max_size=6),
    body=st.binary(max_size=300),
    http10_peer=st.booleans(),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_responses_we_frame_read_back_in_h11(status, fields, body, http10_peer, method):
    """Whatever framing we choose for a response, h11 as the client reads the same body."""
    fields = [
        (n, v) for n, v in fields if n not in ("content-length", "transfer-encoding", "connection")
    ]
    version = b"1.0" if http10_peer else b"1.1"
    server = http1.Connection(http1.SERVER)
    events(server, method.encode() + b" / HTTP/" + version + b"\r\nHost: x\r\n\r\n")
    wire = server.send(http1.Response(status_code=status, headers=fields)) or b""
    no_body = method == "HEAD" or status in (204, 304)
    if body and not no_body:
        wire += server.send(http1.Data(body)) or b""
    wire += server.send(http1.EndOfMessage()) or b""
    reader = h11.Connection(h11.CLIENT)
    reader.send(
        h11.Request(method=method, target="/", headers=[("host", "x")])
    )  # h11 sends 1.1 only
    reader.send(h11.EndOfMessage())
    reader.receive_data(wire)
    if server.our_state is http1.MUST_CLOSE:
        reader.receive_data(b"")
    got = []
    while not isinstance(event := reader.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA
        got.append(event)
    assert got[0].status_code == status
    expected = b"" if no_body else body
    assert b"".join(e.data for e in got if isinstance(e, h11.Data)) == expected


def test_a_message_is_complete_once_its_end_is_read():
    conn = http1.Connection(http1.SERVER)

    def complete() -> bool:  # read afresh each time (mypy would narrow the property)
        return conn.message_complete

    conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    assert isinstance(conn.next_event(), http1.Request)
    assert not complete()
    conn.receive_data(b"0\r\n\r\n")
    assert complete()
    got = events(conn)
    assert [type(e) for e in got[:2]] == [http1.Data, http1.EndOfMessage]
    assert not complete()  # handed out: nothing of it waits any more
