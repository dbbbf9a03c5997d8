"""What the Workload API server says: the calls it serves and the messages it streams.

Rules:

1. **Pure.**  No trio, socket, os or time: requests are judged and responses
   built from values alone, so tests call these functions directly.
2. **Checks in the order the standard implies.**  The request must be gRPC
   (POST, ``application/grpc``); then the ``workload.spiffe.io: true``
   header, before the path or the caller is looked at (INVALID_ARGUMENT);
   then the method (UNIMPLEMENTED for the WIT RPCs and unknown paths).
   The caller's identity comes last, from the backend.
3. **Each message is the complete current state** of what one caller may
   see (`X509Snapshot`), never a diff; an own trust domain is never repeated
   among the federated bundles.
4. **Method labels are a bounded set** (the standard's methods plus
   ``"unknown"``), so that stats keyed by them cannot grow with what peers send.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from tally.ops.net import PeerCred
from tally.wire import workload_pb as pb
from tally.wire.grpc import GrpcError, Request, Status, parse_request_headers

SECURITY_HEADER = "workload.spiffe.io"

_SERVICE = "/SpiffeWorkloadAPI/"
# Every method of the standard service, so that stats have a bounded set of labels.
KNOWN_METHODS = frozenset(
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


@dataclass(frozen=True)
class JwtSvidItem:
    spiffe_id: str
    token: str
    hint: str = ""


@dataclass(frozen=True)
class ValidatedJwt:
    spiffe_id: str
    claims: Mapping[str, object]


class InvalidJwt(Exception):
    """ValidateJWTSVID refused the token; ``reason`` is a fixed word (INVALID_ARGUMENT)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkloadBackend(Protocol):
    def watch_x509(
        self, peer: PeerCred
    ) -> AbstractAsyncContextManager[AsyncIterator[X509Snapshot]]:
        """Attest ``peer`` on enter (may raise NoIdentity); the iterator yields the
        current snapshot at once, then a complete new one on every change, and may
        raise NoIdentity when the caller loses its identity."""
        ...

    def x509_now(self, peer: PeerCred) -> X509Snapshot | None:
        """The snapshot `watch_x509` would yield first, when it is had without waiting
        (``peer`` attested from what is cached, and issued at least one SVID); None
        otherwise, and the call then goes the usual way (a thread, or the denial)."""
        ...

    async def fetch_jwt(
        self, peer: PeerCred, audience: Sequence[str], spiffe_id: str
    ) -> list[JwtSvidItem]:
        """JWT-SVIDs for the caller's identities (only ``spiffe_id`` when it is set);
        raises NoIdentity when there is none."""
        ...

    def watch_jwt_bundles(
        self, peer: PeerCred
    ) -> AbstractAsyncContextManager[AsyncIterator[Mapping[str, bytes]]]:
        """Like `watch_x509`, over the JWT bundles: ``"spiffe://<td>"`` to JWKS bytes."""
        ...

    async def validate_jwt(self, peer: PeerCred, audience: str, token: str) -> ValidatedJwt:
        """Validate for an attested caller with an identity; raises InvalidJwt."""
        ...


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
class Method:
    parse_request: Callable[[bytes], object]
    build_response: Callable[[X509Snapshot], bytes]


STREAMING_METHODS: Mapping[str, Method] = {
    "FetchX509SVID": Method(pb.X509SVIDRequest.FromString, x509_svid_response),
    "FetchX509Bundles": Method(pb.X509BundlesRequest.FromString, x509_bundles_response),
}


@dataclass(frozen=True)
class JwtMethod:
    parse_request: Callable[[bytes], object]


JWT_METHODS: Mapping[str, JwtMethod] = {
    "FetchJWTSVID": JwtMethod(pb.JWTSVIDRequest.FromString),
    "FetchJWTBundles": JwtMethod(pb.JWTBundlesRequest.FromString),
    "ValidateJWTSVID": JwtMethod(pb.ValidateJWTSVIDRequest.FromString),
}


def jwt_svid_request(message: bytes) -> tuple[list[str], str]:
    """The audiences and optional SPIFFE ID of a FetchJWTSVID request (INVALID_ARGUMENT
    when no audience is given, as the standard says)."""
    request = pb.JWTSVIDRequest.FromString(message)
    audience = [a for a in request.audience]
    if not audience or not all(audience):
        raise GrpcError(Status.INVALID_ARGUMENT, "audience must be specified")
    return audience, request.spiffe_id


def jwt_svid_response(items: Sequence[JwtSvidItem]) -> bytes:
    if not items:
        raise NoIdentity("no JWT-SVIDs")
    message = pb.JWTSVIDResponse(
        svids=[pb.JWTSVID(spiffe_id=i.spiffe_id, svid=i.token, hint=i.hint) for i in items]
    )
    return message.SerializeToString(deterministic=True)


def jwt_bundles_response(bundles: Mapping[str, bytes]) -> bytes:
    if not bundles:
        raise NoIdentity("no JWT bundles")
    return pb.JWTBundlesResponse(bundles=dict(bundles)).SerializeToString(deterministic=True)


def validate_request(message: bytes) -> tuple[str, str]:
    request = pb.ValidateJWTSVIDRequest.FromString(message)
    if not request.audience:
        raise GrpcError(Status.INVALID_ARGUMENT, "audience must be specified")
    if not request.svid:
        raise GrpcError(Status.INVALID_ARGUMENT, "svid must be specified")
    return request.audience, request.svid


def validate_response(result: ValidatedJwt) -> bytes:
    message = pb.ValidateJWTSVIDResponse(spiffe_id=result.spiffe_id)
    message.claims.update(dict(result.claims))
    return message.SerializeToString(deterministic=True)


def method_label(path: str) -> str:
    """The method a path names, or ``"unknown"`` for anything outside the standard service."""
    name = path.removeprefix(_SERVICE) if path.startswith(_SERVICE) else ""
    return name if name in KNOWN_METHODS else "unknown"


class Rejected(Exception):
    """A call refused from its headers alone; ``label`` is the method, for the stats."""

    def __init__(self, label: str, error: GrpcError) -> None:
        super().__init__(str(error))
        self.label = label
        self.error = error


def route_request(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, Request]:
    """The method label and request of a call this server serves (rule 2), or `Rejected`."""
    label = "unknown"
    try:
        request = parse_request_headers(headers)
        label = method_label(request.path)
        if request.metadata.get(SECURITY_HEADER) != "true":
            raise GrpcError(
                Status.INVALID_ARGUMENT, f"security header missing: {SECURITY_HEADER}: true"
            )
        if label not in STREAMING_METHODS and label not in JWT_METHODS:
            raise GrpcError(Status.UNIMPLEMENTED, f"method not implemented: {request.path}")
    except GrpcError as exc:
        raise Rejected(label, exc) from exc
    return label, request


def parse_request_message(method: Method | JwtMethod, message: bytes | None) -> None:
    """Check a call's one request message (a cardinality or decode error is INTERNAL)."""
    if message is None:
        raise GrpcError(Status.INTERNAL, "request ended without a message")
    if not message:
        return  # every message parses from no bytes (all fields unset): the usual request
    try:
        method.parse_request(message)
    except pb.DecodeError as exc:
        raise GrpcError(Status.INTERNAL, "request message does not parse") from exc


def only_no_identity(exc: BaseException) -> bool:
    """True for NoIdentity, also when a backend's nursery wrapped it in a group."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(NoIdentity)
        return rest is None
    return isinstance(exc, NoIdentity)
