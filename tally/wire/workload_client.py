"""A SPIFFE Workload API client over trio and h2, for the proxy and ``tally agent api``.

Rules / theory of operation:

1. **Where to connect.**  The Workload API endpoint socket is a `Path`,
   resolved once at the edge: an address given explicitly wins
   (`endpoint_socket_of`); otherwise ``SPIFFE_ENDPOINT_SOCKET`` is used, and
   it must be a URI as the standard says (``unix:///path``; py-spiffe's
   ``unix:/path`` is accepted too).  An explicit address may also be a plain
   path.  Only Unix sockets are supported: the Tally agent serves nowhere
   else, and a ``tcp://`` endpoint is refused with a message that says so.
2. **One connection, one stream.**  A watch opens its own connection and asks
   for ``FetchX509SVID`` with the ``workload.spiffe.io: true`` header.
3. **The reader never waits for the consumer.**  A background task reads the
   stream continuously (so the server never sees a stalled reader) and keeps
   only the newest state; the consumer gets the newest state each time it
   asks, and states it was too slow to see are skipped, which is correct
   because every Workload API message is the complete state.
4. **Parsed and checked before it is handed out.**  A context holds
   ``cryptography`` objects; a message whose certificates or key do not parse,
   or whose SPIFFE ID differs from its leaf's URI SAN, is an error rather
   than a half-usable identity.
5. **One error type.**  Every failure, whether the server's status, a broken
   connection or a bad message, is a :class:`WorkloadApiError` carrying a
   gRPC status; bad addresses are :class:`EndpointError`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_der_private_key
from google.protobuf import json_format

from tally.wire import workload_pb as pb
from tally.wire.grpc import GrpcError, MessageDecoder, Status, encode_message, status_from_headers

__all__ = [
    "DEFAULT_FETCH_TIMEOUT_S",
    "ENDPOINT_ENV",
    "EndpointError",
    "Status",
    "WorkloadApiError",
    "X509Context",
    "X509Svid",
    "endpoint_from_env",
    "endpoint_socket_of",
    "fetch_x509",
    "parse_endpoint",
    "parse_x509_svid_response",
    "watch_x509",
]

T = TypeVar("T")
ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
FETCH_X509_SVID_PATH = "/SpiffeWorkloadAPI/FetchX509SVID"
DEFAULT_FETCH_TIMEOUT_S = 10.0

_EXPECTED_URI = "expected unix:///absolute/path/to/agent.sock"


class EndpointError(ValueError):
    """A Workload API address cannot be used; the message names it and what was expected."""


class WorkloadApiError(Exception):
    """A Workload API call failed; ``status`` says how (PERMISSION_DENIED: no identity yet)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    """Leaf first, then intermediates."""
    private_key: PrivateKeyTypes
    hint: str = ""

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True)
class X509Context:
    svids: tuple[X509Svid, ...]
    """Never empty; the first is the default identity."""
    bundles: Mapping[str, tuple[x509.Certificate, ...]]
    """CA certificates by trust domain *name* (``"example.org"``): the SVIDs' own
    trust domains and the federated ones."""

    @property
    def default_svid(self) -> X509Svid:
        return self.svids[0]


def parse_endpoint(value: str, *, source: str = "endpoint") -> Path:
    """The socket path of a Workload API URI such as ``unix:///run/tally/agent.sock``."""
    try:
        parts = urlsplit(value)
        path = unquote(parts.path, errors="strict")
    except ValueError as exc:
        raise EndpointError(f"{source} {value!r} is not a URI; {_EXPECTED_URI}") from exc
    if parts.scheme == "tcp":
        raise EndpointError(
            f"{source} {value!r}: tcp endpoints are not supported, the Tally agent "
            f"listens on a unix socket; {_EXPECTED_URI}"
        )
    if parts.scheme != "unix":
        raise EndpointError(f"{source} {value!r}: scheme must be unix; {_EXPECTED_URI}")
    if parts.netloc:
        raise EndpointError(f"{source} {value!r}: a host is not allowed; {_EXPECTED_URI}")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise EndpointError(f"{source} {value!r}: query and fragment are not allowed")
    if not path.startswith("/") or Path(path) == Path("/"):
        raise EndpointError(f"{source} {value!r}: the socket path must be absolute")
    if "\x00" in path:
        raise EndpointError(f"{source} {value!r}: the socket path contains a NUL byte")
    return Path(path)


def endpoint_from_env(env: Mapping[str, str]) -> Path:
    """The socket path named by ``SPIFFE_ENDPOINT_SOCKET`` in ``env``."""
    value = env.get(ENDPOINT_ENV)
    if not value:
        raise EndpointError(
            f"{ENDPOINT_ENV} is not set; set it to unix:///path/to/agent.sock "
            "or give the socket path explicitly"
        )
    return parse_endpoint(value, source=ENDPOINT_ENV)


def endpoint_socket_of(address: str) -> Path:
    """The endpoint socket of an explicit address: a ``unix:`` URI or a plain path."""
    if address.startswith("unix:") or "://" in address:
        return parse_endpoint(address)
    if not address or "\x00" in address:
        raise EndpointError(f"socket path {address!r} is empty or contains a NUL byte")
    return Path(address)


def _split_der(data: bytes, what: str) -> list[bytes]:
    """Concatenated DER certificates, one by one, using only the outer SEQUENCE lengths."""
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30 or offset + 2 > len(data):
            raise WorkloadApiError(Status.INTERNAL, f"{what}: not a DER certificate sequence")
        first = data[offset + 1]
        header = 2
        length = first
        if first & 0x80:
            count = first & 0x7F
            header += count
            if count == 0 or count > 4 or offset + header > len(data):
                raise WorkloadApiError(Status.INTERNAL, f"{what}: bad DER length")
            length = int.from_bytes(data[offset + 2 : offset + header], "big")
        end = offset + header + length
        if end > len(data):
            raise WorkloadApiError(Status.INTERNAL, f"{what}: truncated DER certificate")
        items.append(data[offset:end])
        offset = end
    if not items:
        raise WorkloadApiError(Status.INTERNAL, f"{what}: no certificates")
    return items


def _certificates(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_der_x509_certificate(der) for der in _split_der(data, what))
    except (ValueError, x509.InvalidVersion) as exc:
        raise WorkloadApiError(Status.INTERNAL, f"{what}: certificate does not parse") from exc


def _trust_domain(spiffe_id: str) -> str:
    return spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType, ValueError) as exc:
        raise WorkloadApiError(
            Status.INTERNAL, "X.509-SVID: certificate extensions do not parse"
        ) from exc
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def _parse_svid(message: pb.X509SVID) -> X509Svid:
    what = f"SVID {message.spiffe_id!r}"
    if not message.spiffe_id.startswith("spiffe://"):
        raise WorkloadApiError(Status.INTERNAL, f"{what}: not a SPIFFE ID")
    chain = _certificates(message.x509_svid, what)
    if _uri_sans(chain[0]) != [message.spiffe_id]:
        raise WorkloadApiError(Status.INTERNAL, f"{what}: differs from the leaf's URI SAN")
    try:
        key = load_der_private_key(message.x509_svid_key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise WorkloadApiError(Status.INTERNAL, f"{what}: private key does not parse") from exc
    return X509Svid(message.spiffe_id, chain, key, message.hint)


def parse_x509_svid_response(payload: bytes) -> X509Context:
    """Turn one FetchX509SVID message into parsed, consistent objects."""
    try:
        message = pb.X509SVIDResponse.FromString(payload)
    except pb.DecodeError as exc:
        raise WorkloadApiError(Status.INTERNAL, "X509SVIDResponse does not parse") from exc
    if not message.svids:
        raise WorkloadApiError(Status.INTERNAL, "X509SVIDResponse holds no SVIDs")
    svids = tuple(_parse_svid(item) for item in message.svids)
    bundles: dict[str, tuple[x509.Certificate, ...]] = {}
    for item in message.svids:
        td = _trust_domain(item.spiffe_id)
        bundles[td] = _certificates(item.bundle, f"bundle of {td}")
    for key, der in message.federated_bundles.items():
        td = _trust_domain(key)
        bundles.setdefault(td, _certificates(der, f"bundle of {td}"))
    return X509Context(svids, bundles)


async def _connect(endpoint_socket: Path) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(endpoint_socket)
    except OSError as exc:
        raise WorkloadApiError(
            Status.UNAVAILABLE, f"cannot connect to the Workload API at {endpoint_socket}: {exc}"
        ) from exc


async def _run_call(
    stream: trio.abc.Stream, path: str, on_message: Callable[[bytes], None], request: bytes = b""
) -> tuple[Status, str]:
    """One call on a fresh connection (``request`` is its one message, empty by default);
    hands each response message to ``on_message`` and returns the final status."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode("ascii")),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"workload.spiffe.io", b"true"),
        ],
    )
    conn.send_data(stream_id, encode_message(request), True)
    decoder = MessageDecoder()
    while True:
        await stream.send_all(conn.data_to_send())
        data = await stream.receive_some(64 * 1024)
        if not data:
            raise WorkloadApiError(Status.UNAVAILABLE, "the server closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                status = status_from_headers(event.headers)
                if status is not None:
                    return status
                if isinstance(event, h2.events.TrailersReceived):
                    raise WorkloadApiError(Status.INTERNAL, "trailers without grpc-status")
                if (b":status", b"200") not in event.headers:
                    raise WorkloadApiError(Status.UNKNOWN, "the server did not answer 200 OK")
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                decoder.receive_data(event.data)
                while (message := decoder.next_message()) is not None:
                    on_message(message)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                raise WorkloadApiError(Status.UNAVAILABLE, "the stream ended without a status")
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise WorkloadApiError(Status.UNAVAILABLE, "the server closed the connection")


class _Latest(Generic[T]):
    """The newest state from the reader, and how it ended; consumers skip stale ones."""

    def __init__(self) -> None:
        self.value: T | None = None
        self.version = 0
        self.error: WorkloadApiError | None = None
        self.ended = False
        self._changed = trio.Event()

    def publish(self, value: T) -> None:
        self.value = value
        self.version += 1
        self._wake()

    def finish(self, error: WorkloadApiError | None) -> None:
        self.error = error
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class _Updates(Generic[T]):
    """Async iterator over the newest states; see :func:`watch_x509`."""

    def __init__(self, latest: _Latest[T]) -> None:
        self._latest = latest
        self._seen = 0

    def __aiter__(self) -> _Updates[T]:
        return self

    async def __anext__(self) -> T:
        latest = self._latest
        while latest.version == self._seen:
            if latest.error is not None:
                raise latest.error
            if latest.ended:
                raise StopAsyncIteration
            await latest.changed()
        self._seen = latest.version
        assert latest.value is not None
        return latest.value


async def _read_contexts(
    stream: trio.abc.Stream,
    latest: _Latest[T],
    path: str,
    parse: Callable[[bytes], T],
) -> None:
    def on_message(payload: bytes) -> None:
        latest.publish(parse(payload))

    try:
        status, message = await _run_call(stream, path, on_message)
    except WorkloadApiError as exc:
        latest.finish(exc)
    except GrpcError as exc:
        latest.finish(WorkloadApiError(exc.status, exc.message))
    except h2.exceptions.ProtocolError as exc:
        latest.finish(WorkloadApiError(Status.INTERNAL, f"HTTP/2 protocol error: {exc}"))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        latest.finish(WorkloadApiError(Status.UNAVAILABLE, f"connection lost: {exc!r}"))
    else:
        latest.finish(None if status is Status.OK else WorkloadApiError(status, message))


@asynccontextmanager
async def watch_x509(endpoint_socket: Path | None = None) -> AsyncIterator[_Updates[X509Context]]:
    """Watch the caller's X.509 identities.

    Use as ``async with watch_x509(socket) as updates: async for ctx in updates: ...``.
    The first context arrives as soon as the server answers, then one after each
    change.  The iteration stops when the server ends the stream normally and raises
    :class:`WorkloadApiError` when it ends otherwise; callers that keep watching
    reconnect with backoff.  ``endpoint_socket`` None means ``SPIFFE_ENDPOINT_SOCKET``.
    Waiting for a context has no deadline: wrap it in ``trio.fail_after`` if needed.
    """
    async with _watch(endpoint_socket, FETCH_X509_SVID_PATH, parse_x509_svid_response) as updates:
        yield updates


@asynccontextmanager
async def _watch(
    endpoint_socket: Path | None, path: str, parse: Callable[[bytes], T]
) -> AsyncIterator[_Updates[T]]:
    """One streaming call, its newest message always at hand (`watch_x509`)."""
    if endpoint_socket is None:
        endpoint_socket = endpoint_from_env(os.environ)
    stream = await _connect(endpoint_socket)
    latest: _Latest[T] = _Latest()
    try:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_read_contexts, stream, latest, path, parse)
            try:
                yield _Updates(latest)
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task reports through `latest` and never raises, so a group
        # here only wraps what the caller's own block raised: hand it back as is.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def fetch_x509(
    endpoint_socket: Path | None = None, *, timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
) -> X509Context:
    """The caller's current X.509 identities; WorkloadApiError with DEADLINE_EXCEEDED
    when none arrives within ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        async with watch_x509(endpoint_socket) as updates:
            async for context in updates:
                return context
            raise WorkloadApiError(Status.UNAVAILABLE, "the stream ended before any identity")
    raise WorkloadApiError(
        Status.DEADLINE_EXCEEDED, f"no answer from the Workload API within {timeout_s} s"
    )


# -- the JWT profile ---------------------------------------------------------------------


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: str
    token: str
    """A bearer credential: never log it."""
    hint: str = ""


async def _unary(
    endpoint_socket: Path | None, path: str, request: bytes, timeout_s: float
) -> bytes:
    """One unary call: its one response message, or WorkloadApiError."""
    if endpoint_socket is None:
        endpoint_socket = endpoint_from_env(os.environ)
    got: list[bytes] = []
    with trio.move_on_after(timeout_s):
        stream = await _connect(endpoint_socket)
        async with stream:
            try:
                status, message = await _run_call(stream, path, got.append, request)
            except GrpcError as exc:
                raise WorkloadApiError(exc.status, exc.message) from exc
            except h2.exceptions.ProtocolError as exc:
                raise WorkloadApiError(Status.INTERNAL, f"HTTP/2 protocol error: {exc}") from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise WorkloadApiError(Status.UNAVAILABLE, f"connection lost: {exc!r}") from exc
            if status is not Status.OK:
                raise WorkloadApiError(status, message)
            if len(got) != 1:
                raise WorkloadApiError(Status.INTERNAL, f"{len(got)} messages for a unary call")
            return got[0]
    raise WorkloadApiError(
        Status.DEADLINE_EXCEEDED, f"no answer from the Workload API within {timeout_s} s"
    )


async def fetch_jwt_svids(
    endpoint_socket: Path | None,
    audience: Sequence[str],
    spiffe_id: str = "",
    *,
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
) -> list[JwtSvid]:
    """JWT-SVIDs for ``audience`` (the first is the default identity)."""
    request = pb.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id)
    payload = await _unary(
        endpoint_socket, "/SpiffeWorkloadAPI/FetchJWTSVID", request.SerializeToString(), timeout_s
    )
    try:
        message = pb.JWTSVIDResponse.FromString(payload)
    except pb.DecodeError as exc:
        raise WorkloadApiError(Status.INTERNAL, "JWTSVIDResponse does not parse") from exc
    if not message.svids:
        raise WorkloadApiError(Status.INTERNAL, "JWTSVIDResponse holds no SVIDs")
    return [JwtSvid(s.spiffe_id, s.svid, s.hint) for s in message.svids]


async def validate_jwt_svid(
    endpoint_socket: Path | None,
    audience: str,
    token: str,
    *,
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
) -> tuple[str, dict[str, Any]]:
    """Ask the agent to validate a token; the SPIFFE ID and the claims, or WorkloadApiError
    (INVALID_ARGUMENT with the reason when the token is refused)."""
    request = pb.ValidateJWTSVIDRequest(audience=audience, svid=token)
    payload = await _unary(
        endpoint_socket,
        "/SpiffeWorkloadAPI/ValidateJWTSVID",
        request.SerializeToString(),
        timeout_s,
    )
    try:
        message = pb.ValidateJWTSVIDResponse.FromString(payload)
    except pb.DecodeError as exc:
        raise WorkloadApiError(Status.INTERNAL, "ValidateJWTSVIDResponse does not parse") from exc
    claims = json_format.MessageToDict(message.claims)
    return message.spiffe_id, claims


def parse_jwt_bundles_response(payload: bytes) -> dict[str, bytes]:
    try:
        message = pb.JWTBundlesResponse.FromString(payload)
    except pb.DecodeError as exc:
        raise WorkloadApiError(Status.INTERNAL, "JWTBundlesResponse does not parse") from exc
    return {_trust_domain(k): bytes(v) for k, v in message.bundles.items()}


@asynccontextmanager
async def watch_jwt_bundles(
    endpoint_socket: Path | None = None,
) -> AsyncIterator[_Updates[dict[str, bytes]]]:
    """Watch the JWT bundles (trust domain name to JWKS bytes), like `watch_x509`."""
    async with _watch(
        endpoint_socket, "/SpiffeWorkloadAPI/FetchJWTBundles", parse_jwt_bundles_response
    ) as updates:
        yield updates
