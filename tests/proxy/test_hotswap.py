"""proxy.hotswap: publishing identities and allow rules, checked by real handshakes in-process."""

from __future__ import annotations

import pytest

from proxy.hotswap import HotSwap
from proxy.metrics import Stats
from tally.spiffe import authz
from tally.tls.contexts import client_context, server_context
from tally.tls.verify import PeerRejected
from tests.pki import Authority
from tests.proxy.inprocess import identity_of
from tests.test_tls import _close_socket_pairs as _close_socket_pairs
from tests.test_tls import handshake_both, tls_pair


@pytest.fixture
def ex() -> Authority:
    return Authority.create("example.org")


def allow(*ids: str) -> authz.Policy:
    return authz.parse_policy(ids=list(ids))


def server_swap(policy: authz.Policy) -> HotSwap:
    return HotSwap("server", policy, groups="X25519:P-256", stats=Stats())


async def connect_as(ex: Authority, swap: HotSwap, spiffe_id: str) -> dict[str, BaseException]:
    """Handshake a client holding ``spiffe_id`` against ``swap``'s current context."""
    assert swap.current is not None
    peer = ex.svid(spiffe_id)
    ctx = client_context(roots=[ex.root], chain=peer.chain, key=peer.key)
    client, server = tls_pair(ctx, swap.current.context)
    return await handshake_both(client, server)


def test_the_first_identity_is_published_and_announced(ex):
    swap = server_swap(allow("spiffe://example.org/web"))
    assert swap.svid_info() is None and not swap.first.is_set()
    identity = identity_of(ex, ex.svid("spiffe://example.org/api"))
    swap.publish(identity)
    cur = swap.current
    assert cur is not None and cur.identity is identity
    assert swap.first.is_set()
    assert swap.stats.rotations == 0
    info = swap.svid_info()
    assert info is not None
    assert (info.spiffe_id, info.serial) == ("spiffe://example.org/api", identity.serial)


def test_a_rotation_is_one_new_current_and_the_old_one_is_left_alone(ex):
    swap = server_swap(allow("spiffe://example.org/web"))
    first = identity_of(ex, ex.svid("spiffe://example.org/api"))
    swap.publish(first)
    before = swap.current
    second = identity_of(ex, ex.svid("spiffe://example.org/api"))
    swap.publish(second)
    after = swap.current
    assert after is not before and after is not None and before is not None
    assert after.identity is second and after.context is not before.context
    assert before.identity is first  # what handshakes already under way hold is unchanged
    assert swap.stats.rotations == 1


def test_publishing_what_is_current_changes_nothing(ex):
    swap = server_swap(allow("spiffe://example.org/web"))
    svid = ex.svid("spiffe://example.org/api")
    swap.publish(identity_of(ex, svid))
    before = swap.current
    swap.publish(identity_of(ex, svid))  # the same files read again (SIGHUP)
    assert swap.current is before
    assert swap.stats.rotations == 0


def test_a_bundle_update_alone_is_a_new_current(ex):
    other = Authority.create("other.org")
    swap = server_swap(allow("spiffe://example.org/web"))
    svid = ex.svid("spiffe://example.org/api")
    swap.publish(identity_of(ex, svid))
    before = swap.current
    swap.publish(identity_of(ex, svid, other))
    assert swap.current is not before and swap.current is not None
    assert set(swap.current.identity.trusted()) == {ex.td, other.td}
    assert swap.stats.rotations == 1


async def test_handshakes_take_the_allow_rules_of_the_current_context(ex):
    swap = server_swap(allow("spiffe://example.org/web"))
    swap.publish(identity_of(ex, ex.svid("spiffe://example.org/api")))
    assert await connect_as(ex, swap, "spiffe://example.org/web") == {}
    refused = await connect_as(ex, swap, "spiffe://example.org/db")
    assert isinstance(refused["server"], PeerRejected)
    assert refused["server"].reason == "not_allowed"

    before = swap.current
    swap.set_policy(allow("spiffe://example.org/db"))
    assert swap.current is not before and swap.current is not None and before is not None
    assert swap.current.identity is before.identity
    assert await connect_as(ex, swap, "spiffe://example.org/db") == {}
    assert "server" in await connect_as(ex, swap, "spiffe://example.org/web")


def test_the_same_rules_again_keep_the_context(ex):
    swap = server_swap(allow("spiffe://example.org/web"))
    swap.publish(identity_of(ex, ex.svid("spiffe://example.org/api")))
    before = swap.current
    swap.set_policy(allow("spiffe://example.org/web"))
    assert swap.current is before


def test_new_rules_before_any_identity_are_kept_for_the_first(ex):
    swap = server_swap(allow("spiffe://example.org/web"))
    swap.set_policy(allow("spiffe://example.org/db"))
    assert swap.current is None
    assert swap.policy == allow("spiffe://example.org/db")


async def test_a_client_swap_verifies_the_server_it_reaches(ex):
    swap = HotSwap("client", allow("spiffe://example.org/api"), groups="X25519", stats=Stats())
    swap.publish(identity_of(ex, ex.svid("spiffe://example.org/web")))
    assert swap.current is not None
    for name, want in (("spiffe://example.org/api", True), ("spiffe://example.org/db", False)):
        server = ex.svid(name)
        ctx = server_context(server.chain, server.key, roots=[ex.root], client_auth="required")
        client_end, server_end = tls_pair(swap.current.context, ctx)
        errors = await handshake_both(client_end, server_end)
        assert ("client" not in errors) is want, name
        if want:
            assert str(client_end.peer_identity) == name
