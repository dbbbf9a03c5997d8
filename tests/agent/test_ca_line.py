"""A new connection to the CA may wait its turn in the CA's line (`agent.ca_client` rule 7).

A real TLS server on loopback stands in for a CA whose first contacts take turns: it
accepts, keeps the connection waiting (virtual time), then shakes hands and answers.
The agent's call deadline (``ca_timeout``, 15 s) starts once the connection is up, so
a turn that comes after 40 s is still taken; only a wait past `LINE_WAIT_S` fails.
"""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

from agent.ca_client import LINE_WAIT_S, CAClient, CAError
from tally.ops.config import Address
from tally.spiffe import x509profile
from tally.tls.contexts import server_context
from tally.tls.stream import TLSStream
from tally.wire import http
from tests.pki import Authority

TIMEOUT = 15.0


async def _refuse(request: http.Request) -> http.Response:
    """Answer as the CA refuses an attestation: a JSON error with its code."""
    return http.Response.json({"code": "attestation_failed", "error": "unknown token"}, 403)


async def _call_through_a_line(
    nursery: trio.Nursery, clock: trio.testing.MockClock, line_s: float
) -> tuple[CAError, float]:
    # Real sockets and handshakes run between the virtual jumps.
    clock.autojump_threshold = 0.05
    ca = Authority.create("example.org")
    svid = ca.svid("spiffe://example.org/tally/ca")
    ctx = server_context(svid.chain, svid.key, client_auth="none")

    async def in_line_then_served(raw: trio.SocketStream) -> None:
        await trio.sleep(line_s)  # the CA serves first contacts in arrival order
        stream = TLSStream(raw, ctx, server_side=True)
        try:
            await stream.do_handshake()
            await http.serve_http(stream, _refuse)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the agent gave up first
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, in_line_then_served, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    client = CAClient(Address.parse(f"127.0.0.1:{port}"), ca.td, [ca.root], timeout=TIMEOUT)
    start = trio.current_time()
    with pytest.raises(CAError) as raised:
        await client.attest("a-join-token", x509profile.generate_key())
    await client.aclose()
    return raised.value, trio.current_time() - start


async def test_a_turn_that_comes_after_the_call_deadline_is_still_taken(nursery, mock_clock):
    refused, waited = await _call_through_a_line(nursery, mock_clock, line_s=40.0)
    # The CA's own answer, not "unreachable": the agent kept its place for 40 s.
    assert refused.code == "attestation_failed"
    assert 40.0 <= waited < 40.0 + TIMEOUT


async def test_a_line_longer_than_the_wait_fails_as_unreachable(nursery, mock_clock):
    refused, waited = await _call_through_a_line(nursery, mock_clock, line_s=LINE_WAIT_S + 30)
    assert refused.code == "unreachable"
    assert LINE_WAIT_S <= waited < LINE_WAIT_S + 1
