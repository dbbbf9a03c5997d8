"""What the Workload API server says, checked without a connection: request routing,
the request message, and the messages built from a snapshot."""

from __future__ import annotations

import pytest

from agent.workload_messages import (
    STREAMING_METHODS,
    NoIdentity,
    Rejected,
    X509Snapshot,
    method_label,
    only_no_identity,
    parse_request_message,
    route_request,
    x509_bundles_response,
    x509_svid_response,
)
from tally.wire import workload_pb as pb
from tally.wire.grpc import GrpcError, Status, encode_message
from tests.agent.test_workload_server import cas, snapshot

__all__ = ["cas"]  # a fixture


def test_federated_bundles_hold_foreign_trust_domains_only(cas):
    message = pb.X509SVIDResponse.FromString(x509_svid_response(snapshot(cas, serial=5)))
    assert list(message.federated_bundles) == ["spiffe://other.org"]
    assert message.svids[0].bundle == cas["example.org"].der


def test_empty_svids_are_never_sent(cas):
    with pytest.raises(NoIdentity):
        x509_svid_response(X509Snapshot((), {"spiffe://example.org": cas["example.org"].der}))


def test_bundles_response_carries_every_trust_domain(cas):
    message = pb.X509BundlesResponse.FromString(x509_bundles_response(snapshot(cas, serial=5)))
    assert dict(message.bundles) == {
        "spiffe://example.org": cas["example.org"].der,
        "spiffe://other.org": cas["other.org"].der,
    }
    with pytest.raises(NoIdentity):
        x509_bundles_response(X509Snapshot((), {}))


# ---------------------------------------------------------------------------
# Routing: gRPC first, then the security header, then the method.


def _headers(path="/SpiffeWorkloadAPI/FetchX509SVID", *, header=True, method=b"POST"):
    headers = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if header:
        headers.append((b"workload.spiffe.io", b"true"))
    return headers


@pytest.mark.parametrize("method", sorted(STREAMING_METHODS))
def test_streaming_methods_are_routed(method):
    label, request = route_request(_headers(f"/SpiffeWorkloadAPI/{method}"))
    assert label == method
    assert request.path == f"/SpiffeWorkloadAPI/{method}"


def test_security_header_is_checked_before_the_method():
    with pytest.raises(Rejected) as info:
        route_request(_headers("/no/such/method", header=False))
    assert info.value.label == "unknown"
    assert info.value.error.status is Status.INVALID_ARGUMENT
    assert "workload.spiffe.io" in info.value.error.message


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/SpiffeWorkloadAPI/FetchWITSVID", "FetchWITSVID"),
        ("/SpiffeWorkloadAPI/FetchWITBundles", "FetchWITBundles"),
        ("/SpiffeWorkloadAPI/Nope", "unknown"),
        ("/grpc.health.v1.Health/Check", "unknown"),
    ],
)
def test_other_methods_are_unimplemented_with_a_bounded_label(path, label):
    with pytest.raises(Rejected) as info:
        route_request(_headers(path))
    assert info.value.label == label
    assert info.value.error.status is Status.UNIMPLEMENTED


def test_a_request_that_is_not_grpc_is_refused_at_the_http_level():
    with pytest.raises(Rejected) as info:
        route_request(_headers(method=b"GET"))
    assert info.value.label == "unknown"
    assert info.value.error.http_status != 200


def test_method_label():
    assert method_label("/SpiffeWorkloadAPI/FetchX509Bundles") == "FetchX509Bundles"
    assert method_label("/Other/FetchX509Bundles") == "unknown"
    assert method_label("/SpiffeWorkloadAPI/") == "unknown"


def test_request_message_must_be_there_and_parse():
    method = STREAMING_METHODS["FetchX509SVID"]
    parse_request_message(method, b"")  # the empty request
    with pytest.raises(GrpcError, match="without a message") as info:
        parse_request_message(method, None)
    assert info.value.status is Status.INTERNAL
    with pytest.raises(GrpcError, match="does not parse"):
        parse_request_message(method, encode_message(b"\xff" * 8))


def test_no_identity_is_recognised_inside_a_group():
    assert only_no_identity(NoIdentity("x"))
    assert only_no_identity(ExceptionGroup("g", [NoIdentity("a"), NoIdentity("b")]))
    assert not only_no_identity(ExceptionGroup("g", [NoIdentity("a"), ValueError("b")]))
    assert not only_no_identity(ValueError("x"))
