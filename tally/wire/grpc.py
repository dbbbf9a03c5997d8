"""gRPC over HTTP/2, the parts that are not HTTP/2: message framing, status, metadata.

Rules / theory of operation:

1. No I/O here (no trio, no sockets).  HTTP/2 itself is ``h2``'s job; this
   module turns what ``h2`` hands over into gRPC calls and back, following
   the "gRPC over HTTP2" protocol document.
2. A gRPC message on a stream is a 5-byte prefix (1 byte "compressed" flag,
   4 bytes big-endian length) and the payload.  Tally never compresses and
   never advertises an encoding, so a peer that sets the flag is answered
   with UNIMPLEMENTED rather than guessed at.
3. Every limit is checked on the length prefix, before the payload is
   buffered: a peer cannot make us hold more than ``max_message_size`` bytes
   of one message.
4. A call ends with trailers ``grpc-status`` and, when there is something to
   say, ``grpc-message``: UTF-8, percent-encoded for everything outside
   printable ASCII and for ``%`` itself.  Decoding never fails; a broken
   escape is kept as it is, as the protocol document asks.
5. Everything a peer can get wrong raises :class:`GrpcError`, which carries
   the status to end the call with, so the shell has one thing to catch.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
"""gRPC's own default limit for a received message."""

_PREFIX = struct.Struct(">BI")

Headers = list[tuple[bytes, bytes]]


class Status(IntEnum):
    """The gRPC status codes (``grpc/doc/statuscodes.md``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(ValueError):
    """A call must end with ``status``; ``message`` is safe to send to the peer.

    ``http_status`` is not 200 only for requests that are not gRPC at all
    (wrong method or content type), which the protocol answers at the HTTP level.
    """

    def __init__(self, status: Status, message: str, *, http_status: int = 200) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message
        self.http_status = http_status


def encode_message(payload: bytes) -> bytes:
    """Frame one serialized message, uncompressed."""
    return _PREFIX.pack(0, len(payload)) + payload


class MessageDecoder:
    """Splits the DATA bytes of one stream back into messages.

    Feed with :meth:`receive_data`, drain with :meth:`next_message` until it
    returns None, and call :meth:`end_of_stream` when the peer ends the stream
    so that a message cut short is reported rather than silently dropped.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> bytes | None:
        if len(self._buffer) < _PREFIX.size:
            return None
        flag, length = _PREFIX.unpack_from(self._buffer)
        if flag == 1:
            raise GrpcError(Status.UNIMPLEMENTED, "compressed messages are not supported")
        if flag != 0:
            raise GrpcError(Status.INTERNAL, f"invalid message flag {flag}, expected 0 or 1")
        if length > self.max_message_size:
            raise GrpcError(
                Status.RESOURCE_EXHAUSTED,
                f"message of {length} bytes exceeds the limit of {self.max_message_size}",
            )
        end = _PREFIX.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_PREFIX.size : end])
        del self._buffer[:end]
        return payload

    def end_of_stream(self) -> None:
        if self._buffer:
            raise GrpcError(
                Status.INTERNAL, f"stream ended inside a message ({len(self._buffer)} bytes left)"
            )


# Percent-encoding of grpc-message: printable ASCII except "%" passes through.
_PASS_THROUGH = frozenset(range(0x20, 0x7F)) - {ord("%")}
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def encode_grpc_message(text: str) -> str:
    return "".join(
        chr(b) if b in _PASS_THROUGH else f"%{b:02X}" for b in text.encode("utf-8", "replace")
    )


def decode_grpc_message(value: str) -> str:
    """Undo :func:`encode_grpc_message`; malformed input yields its best reading, never an error."""
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), value.encode("utf-8", "replace"))
    return raw.decode("utf-8", "replace")


# grpc-timeout: at most 8 digits and a unit; the value is a duration in that unit.
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """Seconds from a ``grpc-timeout`` header value such as ``"10S"`` or ``"250m"``."""
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        raise GrpcError(
            Status.INTERNAL,
            f"invalid grpc-timeout {value[:40]!r}: expected 1-8 digits and a unit of H M S m u n",
        )
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


@dataclass(frozen=True)
class Request:
    """What a gRPC server needs from a request's HEADERS frame."""

    path: str
    metadata: Mapping[str, str]
    """Custom metadata, names lower-case; only the first value of a repeated name is kept."""
    timeout: float | None
    """Seconds from ``grpc-timeout``, or None when the client set no deadline."""


def parse_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> Request:
    """Check that a request is gRPC and pull out its path, metadata and deadline."""
    pseudo: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("ascii", "replace").lower()
        value = raw_value.decode("ascii", "replace")
        if name.startswith(":"):
            pseudo[name] = value
        else:
            metadata.setdefault(name, value)
    if pseudo.get(":method") != "POST":
        raise GrpcError(
            Status.INTERNAL,
            f"method {pseudo.get(':method', '')[:20]!r} is not allowed, expected POST",
            http_status=405,
        )
    content_type = metadata.get("content-type", "")
    if content_type != "application/grpc" and not content_type.startswith(
        ("application/grpc+", "application/grpc;")
    ):
        raise GrpcError(
            Status.INTERNAL,
            f"content-type {content_type[:60]!r} is not gRPC, expected application/grpc",
            http_status=415,
        )
    path = pseudo.get(":path", "")
    timeout_header = metadata.get("grpc-timeout")
    timeout = None if timeout_header is None else parse_timeout(timeout_header)
    return Request(path=path, metadata=metadata, timeout=timeout)


def response_headers() -> Headers:
    """The HEADERS that open a response which will carry messages."""
    return [(b":status", b"200"), (b"content-type", b"application/grpc")]


def trailers(status: Status, message: str = "") -> Headers:
    """The trailing HEADERS that end a call."""
    out = [(b"grpc-status", str(int(status)).encode("ascii"))]
    if message:
        out.append((b"grpc-message", encode_grpc_message(message).encode("ascii")))
    return out


def trailers_only(status: Status, message: str = "", *, http_status: int = 200) -> Headers:
    """A whole response in one HEADERS frame: for calls that end before any message."""
    return [
        (b":status", str(http_status).encode("ascii")),
        (b"content-type", b"application/grpc"),
        *trailers(status, message),
    ]


def status_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Status, str] | None:
    """The status a server ended a call with, read from its trailers; None if absent."""
    fields = {name.lower(): value for name, value in headers}
    raw_status = fields.get(b"grpc-status")
    if raw_status is None:
        return None
    try:
        status = Status(int(raw_status))
    except ValueError:
        status = Status.UNKNOWN
    message = decode_grpc_message(fields.get(b"grpc-message", b"").decode("ascii", "replace"))
    return status, message
