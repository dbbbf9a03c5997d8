"""JWT signing keys at the CA: the pure schedule, the manager on a real store and key
files with an injected clock, and JWT-SVID issuance with its sampled audit."""

from __future__ import annotations

import itertools
import json
import os

import jwt as pyjwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.authority import Authority, Denied
from ca.jwt_keys import (
    AuditSampler,
    JwtKeyManager,
    JwtKeyRecord,
    JwtLimits,
    JwtPolicy,
    decide,
)
from ca.keys import CAKeyError
from ca.store import Store
from tally.spiffe import jwt
from tally.spiffe.spiffeid import SpiffeId
from tests.ca.conftest import TD, Clock

POLICY = JwtPolicy(rotation=600, propagation=30, max_token_ttl=120)


def manager(tmp_path, store: Store, clock: Clock, policy: JwtPolicy = POLICY) -> JwtKeyManager:
    (tmp_path / "keys").mkdir(mode=0o700, parents=True, exist_ok=True)
    km = JwtKeyManager(store, tmp_path, TD, policy, clock)
    km.load()
    km.tick()
    return km


def events(store: Store, name: str) -> list:
    return [r for r in store.audit_records(event=name, limit=1000)]


# -- the schedule ----------------------------------------------------------------------


def simulate(policy: JwtPolicy, steps: int, dt: int):
    """Run `decide` as the shell would, recording which key signed when and what was
    published at each moment."""
    keys: list[JwtKeyRecord] = []
    history = []
    now = 0
    counter = 0
    for _ in range(steps):
        for _ in range(8):
            step = decide(keys, now, policy)
            if step is None:
                break
            if step.kind.startswith("create"):
                counter += 1
                is_active = step.kind == "create_active"
                keys.append(
                    JwtKeyRecord(
                        f"k{counter}",
                        "ES256",
                        "active" if is_active else "prepared",
                        now,
                        step.activate_at,
                        now if is_active else None,
                    )
                )
            else:
                for i, k in enumerate(keys):
                    if k.kid == step.kid:
                        if step.kind == "activate":
                            keys[i] = JwtKeyRecord(
                                k.kid, k.alg, "active", k.created_at, k.activate_at, now
                            )
                            for j, o in enumerate(keys):
                                if o.state == "active" and o.kid != k.kid:
                                    keys[j] = JwtKeyRecord(
                                        o.kid,
                                        o.alg,
                                        "retired",
                                        o.created_at,
                                        o.activate_at,
                                        o.activated_at,
                                        now,
                                        now + policy.max_token_ttl,
                                    )
                        else:
                            keys[i] = JwtKeyRecord(**{**k.__dict__, "state": "removed"})
        active = [k for k in keys if k.state == "active"]
        published = {k.kid for k in keys if k.state in ("prepared", "active", "retired")}
        history.append((now, active, published, {k.kid: k for k in keys}))
        now += dt
    return history


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=20, max_value=10_000),
    st.integers(min_value=1, max_value=5_000),
    st.integers(min_value=1, max_value=97),
)
def test_schedule_one_signer_published_before_use_kept_until_tokens_expire(rotation, ttl, dt):
    policy = JwtPolicy(rotation=rotation, propagation=rotation // 4, max_token_ttl=ttl)
    history = simulate(policy, 400, dt)
    first_signed: dict[str, int] = {}
    last_signed: dict[str, int] = {}
    for now, active, published, _ in history:
        assert len(active) == 1  # always exactly one key signs
        kid = active[0].kid
        first_signed.setdefault(kid, now)
        last_signed[kid] = now
        # every key that signed a token still valid now is published
        for other, last in last_signed.items():
            if now <= last + ttl:
                assert other in published, (now, other)
    # published before it signed, except the very first key
    first_seen: dict[str, int] = {}
    for now, _, published, _ in history:
        for kid in published:
            first_seen.setdefault(kid, now)
    for kid, when in first_signed.items():
        if kid != "k1":
            assert first_seen[kid] < when or rotation // 2 < dt


# -- the manager -----------------------------------------------------------------------


def test_first_start_makes_an_active_es256_key_in_a_0600_file(tmp_path, store, clock):
    km = manager(tmp_path, store, clock)
    assert km.signer is not None and km.signer.alg == "ES256"
    path = tmp_path / "keys" / f"jwt-{km.signer.kid}.pem"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert list(km.bundle.keys) == [km.signer.kid]
    created = events(store, "key.created")
    assert created and created[0].detail["kind"] == "jwt"


def test_rotation_publishes_first_then_signs_then_retires_then_removes(tmp_path, store, clock):
    km = manager(tmp_path, store, clock)
    first = km.signer.kid
    seq0 = store.bundle_sequence()
    clock.advance(300)  # half the rotation period: the successor is published
    km.tick()
    assert len(km.bundle.keys) == 2 and km.signer.kid == first
    assert store.bundle_sequence() > seq0
    second = next(k for k in km.bundle.keys if k != first)
    clock.advance(300)  # the rotation period: the successor signs
    km.tick()
    assert km.signer.kid == second
    assert first in km.bundle.keys  # retired, still published
    assert not (tmp_path / "keys" / f"jwt-{first}.pem").exists()  # never signs again
    clock.advance(POLICY.max_token_ttl + jwt.LEEWAY)
    km.tick()
    assert first not in km.bundle.keys
    names = [r.event for r in store.audit_records(limit=1000) if r.detail.get("kind") == "jwt"]
    assert names[:5] == [
        "key.created",
        "key.created",
        "key.activated",
        "key.retired",
        "key.removed",
    ]
    assert store.verify_audit().ok


def test_operator_rotation_waits_for_propagation(tmp_path, store, clock):
    km = manager(tmp_path, store, clock)
    first = km.signer.kid
    km.rotate("admin:uid=0")
    assert len(km.bundle.keys) == 2 and km.signer.kid == first
    with pytest.raises(CAKeyError):
        km.rotate("admin:uid=0")
    clock.advance(POLICY.propagation)
    km.tick()
    assert km.signer.kid != first


def test_keys_survive_a_restart_and_a_loose_file_is_refused(tmp_path, store, clock):
    km = manager(tmp_path, store, clock)
    clock.advance(300)
    km.tick()
    clock.advance(300)
    km.tick()  # one retired, one active
    again = manager(tmp_path, store, clock)
    assert dict(again.bundle.keys).keys() == dict(km.bundle.keys).keys()
    assert again.signer.kid == km.signer.kid
    path = tmp_path / "keys" / f"jwt-{km.signer.kid}.pem"
    path.chmod(0o644)
    with pytest.raises(CAKeyError, match="chmod 600"):
        JwtKeyManager(store, tmp_path, TD, POLICY, clock).load()


def test_rs256_keys_on_request(tmp_path, store, clock):
    km = manager(tmp_path, store, clock, JwtPolicy(600, 30, 120, key_type="rsa"))
    assert km.signer.alg == "RS256"
    jwks = json.loads(km.bundle.to_jwks())
    assert jwks["keys"][0]["kty"] == "RSA" and "d" not in jwks["keys"][0]


# -- issuance --------------------------------------------------------------------------


@pytest.fixture
def jwt_authority(tmp_path, authority: Authority, store, clock) -> Authority:
    authority.jwt_keys = manager(tmp_path, store, clock)
    authority.jwt_limits = JwtLimits(default_ttl=300, max_ttl=3600, issuer="https://oidc.test")
    authority.jwt_sampler = AuditSampler(3600)
    return authority


def agent_with_entry(a: Authority, name: str) -> tuple[SpiffeId, str, str]:
    from ca.authority import EntrySpec
    from ca.store import AgentRecord
    from tally.spiffe.selectors import Selector

    agent = SpiffeId.parse(f"spiffe://example.org/agent/{name}")
    with a.store._tx() as db:
        db.execute(
            "INSERT INTO agents VALUES (?, 'active', NULL, ?, NULL, NULL, 0, 0)",
            (str(agent), f"serial-{name}"),
        )
    assert isinstance(a.store.get_agent(str(agent)), AgentRecord)
    entry = a.create_entry(
        EntrySpec(
            SpiffeId.parse(f"spiffe://example.org/{name}/web"),
            agent,
            (Selector.parse("unix:uid:1000"),),
        ),
        "admin:uid=0",
    )
    return agent, f"serial-{name}", entry.id


def test_agent_gets_tokens_for_its_own_entries_only(jwt_authority):
    a = jwt_authority
    agent, serial, entry = agent_with_entry(a, "n1")
    _, _, other_entry = agent_with_entry(a, "n2")
    issued = a.sign_jwt(agent, serial, entry, ["reports"])
    svid = jwt.validate(issued.token, "reports", [a.jwt_bundle()], a.clock().timestamp())
    assert str(svid.spiffe_id) == "spiffe://example.org/n1/web"
    assert svid.expires_at - svid.claims["iat"] == 300
    assert svid.claims["iss"] == "https://oidc.test"
    # PyJWT agrees, from the published JWKS
    key = pyjwt.PyJWKSet.from_json(a.jwt_bundle().to_jwks().decode())[issued.kid].key
    got = pyjwt.decode(
        issued.token,
        key,
        algorithms=["ES256"],
        audience="reports",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert got["sub"] == "spiffe://example.org/n1/web"
    with pytest.raises(Denied) as info:
        a.sign_jwt(agent, serial, other_entry, ["reports"])
    assert info.value.code == "not_authorized"
    with pytest.raises(Denied):
        a.sign_jwt(agent, "not-its-serial", entry, ["reports"])
    with pytest.raises(Denied) as info:
        a.sign_jwt(agent, serial, entry, [])
    assert info.value.code == "bad_audience"


def test_issuance_is_audited_by_sampling_with_counts(jwt_authority, clock):
    a = jwt_authority
    agent, serial, entry = agent_with_entry(a, "n1")
    for _ in range(5):
        a.sign_jwt(agent, serial, entry, ["reports"])
    a.sign_jwt(agent, serial, entry, ["billing"])
    records = events(a.store, "jwt.issued")
    assert [r.detail["audience"] for r in records] == [["reports"], ["billing"]]
    clock.advance(3600)
    a.sign_jwt(agent, serial, entry, ["reports"])
    records = events(a.store, "jwt.issued")
    assert records[-1].detail["unrecorded"] == 4
    assert a.jwt_issued_total == 7
    # the token itself is never in the audit log
    assert all("token" not in r.detail for r in records)


def test_mint_is_always_audited_and_capped(jwt_authority):
    a = jwt_authority
    sid = SpiffeId.parse("spiffe://example.org/ops")
    a.mint_jwt(sid, ["vault"], 60, "admin:uid=0")
    a.mint_jwt(sid, ["vault"], None, "admin:uid=0")
    assert len(events(a.store, "jwt.issued")) == 2
    with pytest.raises(Denied) as info:
        a.mint_jwt(sid, ["vault"], 3601, "admin:uid=0")
    assert info.value.code == "ttl_too_long"
    with pytest.raises(Denied):
        a.mint_jwt(SpiffeId.parse("spiffe://other.org/x"), ["vault"], 60, "admin:uid=0")


def test_sampler_memory_is_bounded():
    sampler = AuditSampler(10)
    sampler.MAX_KEYS = 4
    for i in range(100):
        sampler.observe(("a", str(i), ("x",)), 1000 + i * 20)
    assert len(sampler._seen) <= 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(min_value=0, max_value=50)),
        max_size=60,
    ),
    st.integers(min_value=1, max_value=100),
)
def test_sampling_accounts_for_every_token(steps, window):
    """Every token is either a record or counted in the next record of its key; at most
    one record per key per window."""
    sampler = AuditSampler(window)
    now = 0
    records: dict[str, list[tuple[int, int]]] = {}
    for name, dt in steps:
        now += dt
        got = sampler.observe(("agent", name, ("aud",)), now)
        if got is not None:
            records.setdefault(name, []).append((now, got))
    for name, recs in records.items():
        seen = sum(1 for n, _ in steps if n == name)
        pending = sampler._seen[("agent", name, ("aud",))][1]
        assert len(recs) + sum(count for _, count in recs) + pending == seen
        times = [t for t, _ in recs]
        assert all(b - a >= window for a, b in itertools.pairwise(times))
