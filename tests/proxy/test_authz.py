"""tally.spiffe.authz: allow rules (hypothesis) and chain judgement (real certificates)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tally.spiffe import authz
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tests.pki import Authority

tds = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=8),
    min_size=1,
    max_size=3,
).map(".".join)
segments = st.text("ABCXYZabcxyz0189._-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(segments, min_size=1, max_size=4).map(lambda segs: "/" + "/".join(segs))
ids = st.builds(lambda td, path: SpiffeId(TrustDomain(td), path), tds, paths)


@given(ids)
def test_empty_policy_admits_nobody(peer):
    assert not authz.Policy().allows(peer)
    assert authz.Policy().empty


@given(st.lists(ids, min_size=1, max_size=5), ids)
def test_exact_ids_admit_exactly_those(allowed, peer):
    policy = authz.parse_policy(ids=[str(i) for i in allowed])
    assert policy.allows(peer) == (peer in allowed)
    assert all(policy.allows(i) for i in allowed)


@given(tds, ids)
def test_trust_domain_admits_every_member_and_nobody_else(td, peer):
    policy = authz.parse_policy(trust_domains=[td])
    assert policy.allows(peer) == (peer.trust_domain.name == td)


@given(ids, st.lists(segments, max_size=3), segments)
def test_prefix_matches_whole_segments_only(prefix, below, tail):
    policy = authz.parse_policy(path_prefixes=[str(prefix)])
    inside = SpiffeId(prefix.trust_domain, prefix.path + "".join("/" + s for s in below))
    assert policy.allows(inside)
    # Same characters, but the last segment is longer: not below the prefix.
    sibling = SpiffeId(prefix.trust_domain, prefix.path + tail.replace("/", ""))
    assert not policy.allows(sibling)
    assume(prefix.trust_domain.name != "other.test")
    elsewhere = SpiffeId(TrustDomain("other.test"), prefix.path)
    assert not policy.allows(elsewhere)


@given(ids)
def test_prefix_with_trailing_slash_means_the_same(prefix):
    with_slash = authz.parse_policy(path_prefixes=[str(prefix) + "/"])
    assert with_slash == authz.parse_policy(path_prefixes=[str(prefix)])


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
def test_garbage_rules_raise_only_rule_error(a, b, c):
    try:
        policy = authz.parse_policy(ids=[a], trust_domains=[b], path_prefixes=[c])
    except authz.RuleError as exc:
        assert str(exc)
        return
    # Accepted implies valid: every rule reads back as a real ID or trust domain.
    assert str(next(iter(policy.ids))) == a
    assert next(iter(policy.trust_domains)) == TrustDomain.parse(b)


@pytest.mark.parametrize(
    ("kind", "text", "fragment"),
    [
        ("ids", "spiffe://example.org", "use an allow-trust-domain rule"),
        ("ids", "example.org/web", "invalid SPIFFE ID"),
        ("path_prefixes", "spiffe://example.org/ns/*", "no wildcards"),
        ("trust_domains", "spiffe://example.org/web", "got a SPIFFE ID with a path"),
    ],
)
def test_rule_errors_name_the_rule(kind, text, fragment):
    with pytest.raises(authz.RuleError, match=fragment) as info:
        authz.parse_policy(**{kind: [text]})
    assert repr(text) in str(info.value)


# -- check_chain on real certificates ----------------------------------------------


@pytest.fixture(scope="module")
def pkis():
    return Authority.create("example.org"), Authority.create("other.org")


def trusted(*authorities):
    return {a.td: a.bundle.fingerprints() for a in authorities}


def verified(svid, authority):
    """What OpenSSL hands the verifier: the presented chain plus the root it ended in."""
    return [*svid.chain, authority.root]


POLICY = authz.parse_policy(ids=["spiffe://example.org/web"], trust_domains=["other.org"])


def test_allowed_peer_returns_its_id(pkis):
    ex, _ = pkis
    peer = authz.check_chain(verified(ex.svid("spiffe://example.org/web"), ex), trusted(ex), POLICY)
    assert peer == SpiffeId.parse("spiffe://example.org/web")


def test_disallowed_id_is_refused_with_its_id(pkis):
    ex, _ = pkis
    with pytest.raises(authz.Refused) as info:
        authz.check_chain(verified(ex.svid("spiffe://example.org/db"), ex), trusted(ex), POLICY)
    assert info.value.reason == "not_allowed"
    assert str(info.value.peer_id) == "spiffe://example.org/db"


def test_bundles_are_never_pooled(pkis):
    """other.org's CA minting an example.org ID: OpenSSL accepts the chain, we do not."""
    ex, other = pkis
    forged = other.foreign_svid("spiffe://example.org/web")
    with pytest.raises(authz.Refused) as info:
        authz.check_chain(verified(forged, other), trusted(ex, other), POLICY)
    assert info.value.reason == "wrong_trust_domain"
    assert str(info.value.peer_id) == "spiffe://example.org/web"


def test_trust_domain_without_bundle_is_refused(pkis):
    ex, other = pkis
    with pytest.raises(authz.Refused) as info:
        authz.check_chain(verified(other.svid("spiffe://other.org/x"), other), trusted(ex), POLICY)
    assert info.value.reason == "unknown_trust_domain"


def test_federated_peer_allowed_by_trust_domain(pkis):
    ex, other = pkis
    chain = verified(other.svid("spiffe://other.org/x"), other)
    assert authz.check_chain(chain, trusted(ex, other), POLICY).trust_domain.name == "other.org"


@pytest.mark.parametrize(
    ("uris", "ca", "reason"),
    [
        ([], False, "no_spiffe_id"),
        (["spiffe://example.org/web", "spiffe://example.org/db"], False, "uri_san_count"),
        (["spiffe://example.org/web"], True, "ca_leaf"),
        (["https://example.org/web"], False, "bad_spiffe_id"),
    ],
)
def test_leaf_outside_the_svid_profile_is_refused(pkis, uris, ca, reason):
    ex, _ = pkis
    with pytest.raises(authz.Refused) as info:
        authz.check_chain(verified(ex.odd_svid(uris, ca=ca), ex), trusted(ex), POLICY)
    assert info.value.reason == reason


def test_empty_chain_is_refused():
    with pytest.raises(authz.Refused) as info:
        authz.check_chain([], {}, POLICY)
    assert info.value.reason == "no_certificate"


def test_describe_lists_rules():
    assert POLICY.describe() == ["id=spiffe://example.org/web", "trust_domain=other.org"]
