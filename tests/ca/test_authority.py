"""What the CA decides, called directly: real store, real keys, a clock the test moves.

The end-to-end tests keep one case per behaviour through the daemon; the cases
and their edges live here.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from ca.authority import (
    TOKEN_MAX_TTL,
    Authority,
    Denied,
    EntryPatch,
    EntrySpec,
    Issued,
    SignRequest,
    hash_secret,
)
from ca.leaves import NotSigned
from ca.store import EntryRecord
from tally.spiffe import x509profile
from tally.spiffe.selectors import Selector
from tally.spiffe.spiffeid import SpiffeId
from tests.ca.conftest import LIMITS, Clock, make_csr

ADMIN = "admin:uid=0"
PEER = "10.0.0.1:4000"
AGENT = SpiffeId.parse("spiffe://example.org/agent/node-1")
WEB = SpiffeId.parse("spiffe://example.org/web")


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


def sels(*texts: str) -> tuple[Selector, ...]:
    return tuple(Selector.parse(t) for t in texts)


def csr() -> str:
    return make_csr(x509profile.generate_key())


def refused(call: object, *args: object) -> Denied:
    assert callable(call)
    with pytest.raises(Denied) as info:
        call(*args)
    return info.value


def events(a: Authority) -> list[str]:
    """The audit trail's event names after the key manager's own first records."""
    return [r.event for r in a.store.audit_records() if not r.event.startswith("key.")]


def attest(a: Authority, agent: SpiffeId = AGENT, peer: str = PEER) -> Issued:
    token = a.create_token(agent, None, ADMIN)
    return a.attest(token.token, csr(), peer).svid


def entry(a: Authority, spiffe_id: SpiffeId = WEB, parent: SpiffeId = AGENT) -> EntryRecord:
    return a.create_entry(EntrySpec(spiffe_id, parent, sels("unix:uid:1000")), ADMIN)


# -- join tokens -----------------------------------------------------------------------------


def test_a_token_stores_only_the_hash_of_its_secret_and_is_audited(authority, clock):
    token = authority.create_token(AGENT, None, ADMIN)
    token_id, secret = token.token.split(".")
    assert token.token_id == token_id and token.spiffe_id == AGENT
    assert token.expires_at == clock.now + timedelta(seconds=LIMITS.token_ttl)
    record = authority.store.get_token(token_id)
    assert record is not None and record.secret_hash == hash_secret(secret)
    assert record.spiffe_id == str(AGENT) and record.used_at is None
    (created,) = authority.store.audit_records(event="token.created")
    assert created.spiffe_id == str(AGENT) and secret not in str(created.detail)


def test_a_token_without_an_id_attests_to_one_derived_from_the_token(authority):
    token = authority.create_token(None, None, ADMIN)
    assert token.spiffe_id == sid(f"spiffe://example.org/agent/join_token/{token.token_id}")
    assert authority.attest(token.token, csr(), PEER).svid.spiffe_id == token.spiffe_id


def test_token_ttl_is_between_one_second_and_thirty_days(authority, clock):
    for ttl in (0, -1, TOKEN_MAX_TTL + 1):
        exc = refused(authority.create_token, AGENT, ttl, ADMIN)
        assert (exc.status, exc.code) == (400, "bad_ttl")
    token = authority.create_token(AGENT, TOKEN_MAX_TTL, ADMIN)
    assert token.expires_at == clock.now + timedelta(days=30)


def test_a_token_is_only_for_an_agent_of_our_trust_domain(authority):
    exc = refused(authority.create_token, sid("spiffe://other.org/agent/x"), None, ADMIN)
    assert exc.code == "wrong_trust_domain"
    assert refused(authority.create_token, sid("spiffe://example.org"), None, ADMIN).code == (
        "bad_spiffe_id"
    )


# -- attestation -----------------------------------------------------------------------------


def test_attestation_spends_the_token_once(authority):
    token = authority.create_token(AGENT, None, ADMIN)
    attested = authority.attest(token.token, csr(), PEER)
    assert attested.svid.spiffe_id == AGENT
    assert attested.bundle.sequence == authority.bundle().sequence
    agent = authority.store.get_agent(str(AGENT))
    assert agent is not None and agent.status == "active" and agent.serial == attested.svid.serial
    exc = refused(authority.attest, token.token, csr(), PEER)
    assert (exc.status, exc.code) == (403, "attestation_failed")
    assert exc.message == "attestation failed: join token already used"
    assert events(authority)[-4:] == [
        "token.created",
        "agent.attested",
        "svid.issued",
        "attestation.failed",
    ]


def test_the_agent_svid_has_the_agent_ttl_and_passes_the_profile(authority, clock):
    issued = attest(authority)
    leaf = issued.chain[0]
    x509profile.validate_leaf(leaf)
    assert issued.not_after == clock.now + timedelta(seconds=LIMITS.agent_ttl)
    assert leaf.issuer == issued.chain[1].subject


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "malformed join token"),
        ("not-a-token", "malformed join token"),
        ("0123456789abcdef." + "A" * 43, "unknown join token"),
    ],
)
def test_a_bad_token_is_refused_and_audited(authority, token, reason):
    exc = refused(authority.attest, token, csr(), PEER)
    assert (exc.status, exc.message) == (403, f"attestation failed: {reason}")
    (failed,) = authority.store.audit_records(event="attestation.failed")
    assert failed.actor == f"peer:{PEER}" and failed.detail["reason"] == reason
    assert authority.attestation_failures == 1


def test_an_expired_token_is_refused(authority, clock):
    token = authority.create_token(AGENT, 60, ADMIN)
    clock.advance(60)
    assert refused(authority.attest, token.token, csr(), PEER).message.endswith("expired")


def test_a_token_tried_with_wrong_secrets_is_revoked(authority):
    authority.limit_attestation(100, 1.0, token_max_failures=2)
    token = authority.create_token(AGENT, None, ADMIN)
    wrong = token.token_id + "." + "x" * 43
    for _ in range(2):
        assert refused(authority.attest, wrong, csr(), PEER).message.endswith("unknown join token")
    assert refused(authority.attest, token.token, csr(), PEER).message.endswith("token revoked")
    (revoked,) = authority.store.audit_records(event="token.revoked")
    assert revoked.detail["token_id"] == token.token_id


def test_a_peer_past_its_failures_gets_429_before_its_token_is_read(authority):
    authority.limit_attestation(2, 3600.0, token_max_failures=5)
    for _ in range(2):
        refused(authority.attest, "bad", csr(), PEER)
    token = authority.create_token(AGENT, None, ADMIN)
    for _ in range(3):  # audited once per throttled spell
        exc = refused(authority.attest, token.token, csr(), PEER)
        assert (exc.status, exc.code) == (429, "rate_limited") and exc.retry_after
    assert events(authority).count("attestation.throttled") == 1
    assert authority.store.get_token(token.token_id).used_at is None
    attest(authority, sid("spiffe://example.org/agent/other"), "10.0.0.2:4000")


def test_a_bad_csr_does_not_spend_a_live_token(authority):
    token = authority.create_token(AGENT, None, ADMIN)
    for bad in (None, "-----BEGIN CERTIFICATE REQUEST-----\nnope\n"):
        exc = refused(authority.attest, token.token, bad, PEER)
        assert (exc.status, exc.code) == (400, "bad_csr")
    assert refused(authority.attest, token.token, None, PEER).message == "csr must be a PEM string"
    assert authority.store.get_token(token.token_id).used_at is None
    authority.attest(token.token, csr(), PEER)


def test_an_evicted_agent_may_attest_again_a_banned_one_never(authority):
    attest(authority)
    authority.set_agent_status(AGENT, "evicted", ADMIN)
    attest(authority)
    assert authority.get_agent(AGENT).status == "active"
    authority.set_agent_status(AGENT, "banned", ADMIN)
    token = authority.create_token(AGENT, None, ADMIN)
    exc = refused(authority.attest, token.token, csr(), PEER)
    assert exc.message == f"attestation failed: agent {AGENT} is banned"


# -- agents ----------------------------------------------------------------------------------


def test_an_agent_call_is_judged_on_status_and_serial(authority):
    assert refused(authority.check_agent, AGENT, "1").code == "unknown_agent"
    first = attest(authority)
    authority.check_agent(AGENT, first.serial)
    second = authority.renew_agent(AGENT, first.serial, csr())
    authority.check_agent(AGENT, first.serial)  # the one it replaced still counts
    third = authority.renew_agent(AGENT, second.serial, csr())
    exc = refused(authority.check_agent, AGENT, first.serial)
    assert (exc.status, exc.code) == (403, "stale_svid")
    assert refused(authority.renew_agent, AGENT, first.serial, csr()).code == "stale_svid"
    authority.set_agent_status(AGENT, "evicted", ADMIN)
    assert refused(authority.check_agent, AGENT, third.serial).code == "evicted"
    authority.set_agent_status(AGENT, "banned", ADMIN)
    assert refused(authority.check_agent, AGENT, third.serial).code == "banned"
    assert events(authority).count("svid.renewed") == 2
    assert events(authority)[-2:] == ["agent.evicted", "agent.banned"]


def test_a_stale_svid_is_refused_naming_the_current_serial(authority):
    first = attest(authority)
    second = authority.renew_agent(AGENT, first.serial, csr())
    third = authority.renew_agent(AGENT, second.serial, csr())
    exc = refused(authority.check_agent, AGENT, first.serial)
    assert exc.code == "stale_svid"
    assert exc.message == f"the CA knows a newer SVID for this agent (serial {third.serial})"


def test_a_new_token_for_the_same_id_reattests_and_is_audited(authority):
    """Recovery from a stale data dir: the operator's token for that ID is the authority."""
    first = attest(authority)
    again = attest(authority)  # a token made for AGENT, as `token create --spiffe-id`
    assert authority.get_agent(AGENT).serial == again.serial
    assert refused(authority.check_agent, AGENT, first.serial).code == "stale_svid"
    [record] = [r for r in authority.store.audit_records() if r.event == "agent.reattested"]
    assert record.serial == again.serial
    assert record.detail["previous_serial"] == first.serial
    assert record.detail["previous_status"] == "active"
    assert events(authority).count("agent.attested") == 1


def test_a_token_for_another_id_cannot_take_over_an_agent(authority):
    """A token without --spiffe-id names a fresh agent ID, never an existing one."""
    first = attest(authority)
    token = authority.create_token(None, None, ADMIN)
    other = authority.attest(token.token, csr(), PEER).svid
    assert other.spiffe_id != AGENT
    authority.check_agent(AGENT, first.serial)  # the live agent is untouched
    assert "agent.reattested" not in events(authority)


def test_unknown_agents_are_not_found(authority):
    assert refused(authority.get_agent, AGENT).status == 404
    assert refused(authority.set_agent_status, AGENT, "evicted", ADMIN).message == (
        f"no agent {AGENT}"
    )
    assert authority.list_agents() == []


# -- entries ---------------------------------------------------------------------------------


def test_entries_create_list_update_delete(authority):
    created = authority.create_entry(
        EntrySpec(WEB, AGENT, sels("unix:uid:1000", "unix:gid:5", "unix:uid:1000"), ttl=600),
        ADMIN,
    )
    assert created.selectors == ("unix:gid:5", "unix:uid:1000")  # sorted, duplicates dropped
    assert created.ttl == 600 and created.revision == authority.store.entries_revision()
    assert authority.get_entry(created.id) == created
    assert authority.store.list_entries(parent_id=str(AGENT)) == [created]
    updated = authority.update_entry(
        created.id, EntryPatch(ttl=None, dns_names=("web.example.org",), hint="h"), ADMIN
    )
    assert updated.ttl is None and updated.dns_names == ("web.example.org",)
    assert updated.selectors == created.selectors and updated.revision > created.revision
    authority.delete_entry(created.id, ADMIN)
    assert refused(authority.get_entry, created.id).message == f"no entry {created.id}"
    assert refused(authority.delete_entry, created.id, ADMIN).status == 404
    assert refused(authority.update_entry, created.id, EntryPatch(), ADMIN).status == 404
    assert events(authority) == ["entry.created", "entry.updated", "entry.deleted"]


def test_an_identical_entry_is_a_conflict(authority):
    entry(authority)
    exc = refused(authority.create_entry, EntrySpec(WEB, AGENT, sels("unix:uid:1000")), ADMIN)
    assert (exc.status, exc.code) == (409, "exists")
    assert events(authority) == ["entry.created"]


def test_entry_ids_are_ours_and_ttls_within_the_limit(authority):
    other = sid("spiffe://other.org/web")
    exc = refused(authority.create_entry, EntrySpec(WEB, other, sels("unix:uid:1")), ADMIN)
    assert exc.message == f"parent_id {other} is not in trust domain example.org"
    exc = refused(authority.create_entry, EntrySpec(WEB, AGENT, sels("unix:uid:1"), 0), ADMIN)
    assert (exc.code, exc.message) == ("bad_ttl", "ttl must be a positive number of seconds")
    too_long = EntrySpec(WEB, AGENT, sels("unix:uid:1"), LIMITS.max_ttl + 1)
    assert refused(authority.create_entry, too_long, ADMIN).code == "ttl_too_long"
    created = entry(authority)
    exc = refused(authority.update_entry, created.id, EntryPatch(spiffe_id=other), ADMIN)
    assert exc.code == "wrong_trust_domain"
    assert authority.get_entry(created.id) == created


def test_an_agent_sees_only_its_own_entries(authority):
    first = attest(authority)
    mine = entry(authority)
    entry(authority, sid("spiffe://example.org/db"), sid("spiffe://example.org/agent/other"))
    view = authority.entries_for(AGENT, first.serial)
    assert view.entries == (mine,) and view.revision == authority.store.entries_revision()


# -- issuance --------------------------------------------------------------------------------


def test_a_batch_signs_what_the_agent_serves_and_refuses_the_rest_item_by_item(authority, clock):
    agent = attest(authority)
    web = authority.create_entry(
        EntrySpec(WEB, AGENT, sels("unix:uid:1"), ttl=600, dns_names=("web.example.org",)), ADMIN
    )
    db = entry(authority, sid("spiffe://example.org/db"))
    theirs = entry(authority, sid("spiffe://example.org/x"), sid("spiffe://example.org/agent/o"))
    before = authority.issued_total
    results = authority.sign_batch(
        AGENT,
        agent.serial,
        [
            SignRequest(web.id, csr()),
            SignRequest(db.id, csr()),
            SignRequest(theirs.id, csr()),
            SignRequest(None, csr()),
            SignRequest(web.id, None),
        ],
    )
    signed_web, signed_db, *refusals = results
    assert isinstance(signed_web, Issued) and isinstance(signed_db, Issued)
    assert signed_web.spiffe_id == WEB and str(signed_db.spiffe_id) == db.spiffe_id
    assert signed_web.not_after == clock.now + timedelta(seconds=600)
    assert signed_db.not_after == clock.now + timedelta(seconds=LIMITS.default_ttl)
    san = signed_web.chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["web.example.org"]
    assert refusals == [
        NotSigned("not_authorized", "no such entry for this agent"),
        NotSigned("not_authorized", "no such entry for this agent"),
        NotSigned("bad_csr", "csr must be a PEM string"),
    ]
    assert authority.issued_total == before + 2
    issued = authority.store.audit_records(event="svid.issued")[-2:]
    assert [r.detail["entry_id"] for r in issued] == [web.id, db.id]


def test_a_batch_whose_leaf_breaks_the_profile_stores_and_returns_nothing(authority, monkeypatch):
    """Rule 3: a certificate outside the SPIFFE profile (here the signer returns a CA
    certificate, as a bug in building leaves might) is neither stored, audited nor
    returned; the batch fails whole."""
    agent = attest(authority)
    created = entry(authority)
    signer = authority.keys.signer
    assert signer is not None
    not_a_leaf = signer.cert
    monkeypatch.setattr(x509profile.LeafSigner, "sign", lambda *_a, **_k: not_a_leaf)
    before = (authority.issued_total, authority.store.svid_count(), events(authority))
    with pytest.raises(x509profile.ProfileError):
        authority.sign_batch(AGENT, agent.serial, [SignRequest(created.id, csr())])
    assert (authority.issued_total, authority.store.svid_count(), events(authority)) == before


def test_a_batch_from_a_replaced_svid_is_refused_whole(authority):
    first = attest(authority)
    second = authority.renew_agent(AGENT, first.serial, csr())
    authority.renew_agent(AGENT, second.serial, csr())
    created = entry(authority)
    exc = refused(authority.sign_batch, AGENT, first.serial, [SignRequest(created.id, csr())])
    assert exc.code == "stale_svid"


def test_mint_makes_the_key_keeps_the_ttl_limit_and_is_audited(authority, clock):
    minted = authority.mint(WEB, 120, ("a.example.org",), ADMIN)
    leaf = minted.svid.chain[0]
    assert leaf.public_key() == minted.private_key.public_key()
    assert minted.svid.not_after == clock.now + timedelta(seconds=120)
    assert authority.mint(WEB, None, (), ADMIN).svid.not_after == clock.now + timedelta(
        seconds=LIMITS.default_ttl
    )
    exc = refused(authority.mint, WEB, LIMITS.max_ttl + 1, (), ADMIN)
    assert exc.message == (
        f"ttl {LIMITS.max_ttl + 1}s is above the CA's maximum SVID TTL of {LIMITS.max_ttl}s"
    )
    assert refused(authority.mint, sid("spiffe://other.org/web"), None, (), ADMIN).status == 400
    assert [r.detail["kind"] for r in authority.store.audit_records(event="svid.issued")] == [
        "mint",
        "mint",
    ]


def test_everything_decided_leaves_an_unbroken_audit_chain(authority):
    agent = attest(authority)
    created = entry(authority)
    authority.sign_batch(AGENT, agent.serial, [SignRequest(created.id, csr())])
    authority.set_agent_status(AGENT, "evicted", ADMIN)
    result = authority.store.verify_audit()
    assert result.ok and result.records == len(authority.store.audit_records())


def test_clock_only_whole_seconds_reach_certificates(authority: Authority, clock: Clock):
    clock.advance(0.75)
    issued = attest(authority)
    assert issued.not_after.microsecond == 0
