"""The sans-IO gRPC pieces: framing, status metadata, timeouts, request headers."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.wire.grpc import (
    GrpcError,
    MessageDecoder,
    Status,
    decode_grpc_message,
    encode_grpc_message,
    encode_message,
    parse_request_headers,
    parse_timeout,
    status_from_headers,
    trailers,
    trailers_only,
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _drain(decoder: MessageDecoder) -> list[bytes]:
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(0, 10_000)))
def test_framing_round_trip_in_any_chunking(payloads, cuts):
    wire = b"".join(encode_message(p) for p in payloads)
    decoder = MessageDecoder()
    got = []
    for chunk in _chunks(wire, cuts):
        decoder.receive_data(chunk)
        got.extend(_drain(decoder))
    decoder.end_of_stream()
    assert got == payloads


@given(st.binary(max_size=2000), st.integers(0, 1000))
def test_decoder_on_garbage_raises_only_grpc_error(data, limit):
    decoder = MessageDecoder(max_message_size=limit)
    try:
        decoder.receive_data(data)
        for message in _drain(decoder):
            assert len(message) <= limit
        decoder.end_of_stream()
    except GrpcError as exc:
        assert isinstance(exc.status, Status)
        assert exc.status is not Status.OK


def test_oversized_message_is_refused_from_its_prefix_alone():
    decoder = MessageDecoder(max_message_size=10)
    decoder.receive_data(b"\x00\x00\x00\x00\x0b")  # 11 bytes announced, none sent
    with pytest.raises(GrpcError) as info:
        decoder.next_message()
    assert info.value.status is Status.RESOURCE_EXHAUSTED


def test_message_at_the_limit_is_accepted():
    decoder = MessageDecoder(max_message_size=10)
    decoder.receive_data(encode_message(b"x" * 10))
    assert decoder.next_message() == b"x" * 10


@pytest.mark.parametrize(
    ("flag", "status"), [(1, Status.UNIMPLEMENTED), (2, Status.INTERNAL), (255, Status.INTERNAL)]
)
def test_compressed_or_unknown_flag_is_refused(flag, status):
    decoder = MessageDecoder()
    decoder.receive_data(bytes([flag]) + b"\x00\x00\x00\x01x")
    with pytest.raises(GrpcError) as info:
        decoder.next_message()
    assert info.value.status is status


def test_truncated_message_is_reported_at_end_of_stream():
    decoder = MessageDecoder()
    decoder.receive_data(encode_message(b"hello")[:-1])
    assert decoder.next_message() is None
    with pytest.raises(GrpcError) as info:
        decoder.end_of_stream()
    assert info.value.status is Status.INTERNAL


_ENCODED = re.compile(r"(?:[\x20-\x24\x26-\x7e]|%[0-9A-F]{2})*")


@given(st.text())
def test_grpc_message_round_trip(text):
    encoded = encode_grpc_message(text)
    assert _ENCODED.fullmatch(encoded)
    assert decode_grpc_message(encoded) == text


@given(st.text())
def test_grpc_message_decoding_never_fails(value):
    assert isinstance(decode_grpc_message(value), str)


def test_grpc_message_keeps_a_broken_escape():
    assert decode_grpc_message("50%zz done %4") == "50%zz done %4"
    assert decode_grpc_message("caf%C3%A9 %25") == "café %"


@given(st.sampled_from(Status), st.text())
def test_trailers_round_trip(status, message):
    assert status_from_headers(trailers(status, message)) == (status, message)
    headers = trailers_only(status, message)
    assert (b":status", b"200") in headers
    assert status_from_headers(headers) == (status, message)


def test_status_from_headers_without_status_or_with_an_unknown_one():
    assert status_from_headers([(b":status", b"200")]) is None
    assert status_from_headers([(b"grpc-status", b"99")]) == (Status.UNKNOWN, "")
    assert status_from_headers([(b"grpc-status", b"x")]) == (Status.UNKNOWN, "")


_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


@given(st.integers(0, 99_999_999), st.sampled_from(sorted(_UNITS)))
def test_timeout_round_trip(count, unit):
    assert parse_timeout(f"{count}{unit}") == pytest.approx(count * _UNITS[unit], rel=1e-12)


@given(st.text(max_size=12))
def test_timeout_garbage_raises_only_grpc_error_and_accepted_is_valid(value):
    try:
        seconds = parse_timeout(value)
    except GrpcError as exc:
        assert exc.status is Status.INTERNAL
    else:
        assert re.fullmatch(r"[0-9]{1,8}[HMSmun]", value)
        assert seconds >= 0


def test_timeout_rejects_nine_digits():
    with pytest.raises(GrpcError):
        parse_timeout("123456789S")


def _request():
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


def test_request_headers_give_path_metadata_and_deadline():
    extra = [(b"workload.spiffe.io", b"true"), (b"grpc-timeout", b"250m"), (b"X-A", b"2")]
    request = parse_request_headers(_request() + extra + [(b"x-a", b"3")])
    assert request.path == "/SpiffeWorkloadAPI/FetchX509SVID"
    assert request.metadata["x-a"] == "2"
    assert request.metadata["workload.spiffe.io"] == "true"
    assert request.timeout == pytest.approx(0.25)
    assert parse_request_headers(_request()).timeout is None


@pytest.mark.parametrize(
    ("change", "http_status"),
    [
        ({":method": b"GET"}, 405),
        ({"content-type": b"application/json"}, 415),
        ({"content-type": b"application/grpcx"}, 415),
    ],
)
def test_non_grpc_requests_are_refused_at_the_http_level(change, http_status):
    headers = dict(_request())
    headers.update({k.encode(): v for k, v in change.items()})
    with pytest.raises(GrpcError) as info:
        parse_request_headers(list(headers.items()))
    assert info.value.http_status == http_status


def test_grpc_content_type_variants_are_accepted():
    for content_type in (b"application/grpc+proto", b"application/grpc;charset=utf-8"):
        headers = dict(_request())
        headers[b"content-type"] = content_type
        assert parse_request_headers(list(headers.items())).path.endswith("FetchX509SVID")
