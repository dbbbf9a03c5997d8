"""Tally's Workload API client, on its own: parsing responses and endpoint addresses.

Calls against a running server are in ``tests/agent/test_workload_server.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.wire import workload_pb as pb
from tally.wire.grpc import Status
from tally.wire.workload_client import (
    EndpointError,
    WorkloadApiError,
    endpoint_from_env,
    endpoint_socket_of,
    parse_endpoint,
    parse_x509_svid_response,
)
from tests.agent.test_workload_server import SPIFFE_ID, cas, make_svid

__all__ = ["cas"]  # a fixture


def test_response_with_mismatched_spiffe_id_is_refused(cas):
    svid = make_svid(cas["example.org"], 7)
    message = pb.X509SVIDResponse(
        svids=[
            pb.X509SVID(
                spiffe_id="spiffe://example.org/other",
                x509_svid=svid.cert_chain_der,
                x509_svid_key=svid.private_key_pkcs8,
                bundle=svid.bundle_der,
            )
        ]
    )
    with pytest.raises(WorkloadApiError, match="URI SAN"):
        parse_x509_svid_response(message.SerializeToString())


@given(st.binary(max_size=300))
def test_response_parser_on_garbage_raises_only_its_error(payload):
    try:
        parse_x509_svid_response(payload)
    except WorkloadApiError as exc:
        assert exc.status is Status.INTERNAL


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_response_parser_on_garbage_certificates_raises_only_its_error(chain, bundle):
    message = pb.X509SVIDResponse(
        svids=[pb.X509SVID(spiffe_id=SPIFFE_ID, x509_svid=chain, bundle=bundle)]
    )
    with pytest.raises(WorkloadApiError):
        parse_x509_svid_response(message.SerializeToString())


# ---------------------------------------------------------------------------
# Endpoint addresses (SPIFFE_ENDPOINT_SOCKET, reference §5.5).

# Only "." segments name the root directory itself (pathlib drops them), which is no
# socket: those are refused (below), so the round trip leaves them out.
_SOCKET_PATHS = (
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"),
            min_size=1,
            max_size=12,
        ),
        min_size=1,
        max_size=4,
    )
    .map(lambda parts: "/" + "/".join(parts))
    .filter(lambda path: Path(path) != Path("/"))
)


@given(_SOCKET_PATHS)
def test_endpoint_round_trip(path):
    from urllib.parse import quote

    assert parse_endpoint("unix://" + quote(path)) == Path(path)
    assert parse_endpoint("unix:" + quote(path)) == Path(path)


@pytest.mark.parametrize("value", ["unix:///.", "unix:/./.", "unix:///"])
def test_an_endpoint_naming_the_root_directory_is_refused(value):
    with pytest.raises(EndpointError, match="must be absolute"):
        parse_endpoint(value)


@given(st.text(max_size=40))
def test_endpoint_garbage_raises_only_endpoint_error_and_accepted_is_absolute(value):
    try:
        path = parse_endpoint(value)
    except EndpointError:
        return
    assert value.startswith("unix:")
    assert str(path).startswith("/") and len(str(path)) > 1 and "\x00" not in str(path)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("/tmp/agent.sock", "scheme"),
        ("unix://host/tmp/agent.sock", "host"),
        ("unix://", "absolute"),
        ("unix:///tmp/a.sock?x=1", "query"),
        ("unix:///tmp/a.sock#f", "fragment"),
        ("tcp://127.0.0.1:8081", "tcp endpoints are not supported"),
        ("http://x/y", "scheme"),
    ],
)
def test_endpoint_rejections_name_the_value(value, why):
    with pytest.raises(EndpointError) as info:
        endpoint_from_env({"SPIFFE_ENDPOINT_SOCKET": value})
    assert why in str(info.value)
    assert "SPIFFE_ENDPOINT_SOCKET" in str(info.value)


def test_endpoint_from_env_requires_the_variable():
    with pytest.raises(EndpointError, match="SPIFFE_ENDPOINT_SOCKET is not set"):
        endpoint_from_env({})
    assert endpoint_from_env({"SPIFFE_ENDPOINT_SOCKET": "unix:///run/a.sock"}) == Path(
        "/run/a.sock"
    )


def test_explicit_address_may_be_a_plain_path():
    socket = Path("/run/tally/agent.sock")
    assert endpoint_socket_of("/run/tally/agent.sock") == socket
    assert endpoint_socket_of("unix:///run/tally/agent.sock") == socket
    assert endpoint_socket_of("unix:/run/tally/agent.sock") == socket
    with pytest.raises(EndpointError):
        endpoint_socket_of("")
