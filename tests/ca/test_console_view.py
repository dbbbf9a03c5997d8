"""The console's snapshot, built from a real store and authority on a temporary SQLite file.

The rows come through `Console._collect`, the same reader the running console uses,
so what is tested is what a browser is sent.  Time is the test's clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from ca import console_view
from ca.authority import Authority, EntrySpec, SignRequest, iso
from ca.console import Console
from ca.settings import CASettings
from tally.ops.config import Address, ConfigError, is_loopback
from tally.spiffe.selectors import Selector
from tally.spiffe.spiffeid import SpiffeId
from tests.ca.conftest import make_csr

AGENT = SpiffeId.parse("spiffe://example.org/agent/node-1")
WEB = SpiffeId.parse("spiffe://example.org/web")


async def _never(fn):  # the console's RunSync; _collect is called directly here
    return fn()


def console(authority: Authority, clock) -> Console:
    return Console(
        authority, _never, Address.parse("127.0.0.1:0"), None, clock=lambda: clock().timestamp()
    )


def collect(authority, clock):
    """The snapshot as the browser gets it (untyped: the tests index into it freely)."""
    return json.loads(json.dumps(console(authority, clock)._collect()))


@pytest.fixture
def fleet(authority: Authority, clock):
    """One attested agent serving one entry with a fresh workload SVID (TTL 100 s)."""
    token = authority.create_token(AGENT, None, "admin:uid=0")
    agent_key = ec.generate_private_key(ec.SECP256R1())
    attested = authority.attest(token.token, make_csr(agent_key), "127.0.0.1:5000")
    entry = authority.create_entry(
        EntrySpec(WEB, AGENT, (Selector.parse("unix:uid:1000"),), ttl=100), "admin:uid=0"
    )
    key = ec.generate_private_key(ec.SECP256R1())
    [issued] = authority.sign_batch(
        AGENT, attested.svid.serial, [SignRequest(entry.id, make_csr(key))]
    )
    return token, attested, entry, issued, agent_key


def test_a_healthy_fleet_shows_its_agent_entry_svids_keys_and_audit(authority, clock, fleet):
    _token, attested, _entry, issued, _ = fleet
    snap = collect(authority, clock)
    [agent] = snap["agents"]
    assert agent["id"] == str(AGENT) and agent["health"] == "ok" and agent["severity"] == "ok"
    assert agent["serial"] == attested.svid.serial
    assert agent["expires"] == int(attested.svid.not_after.timestamp())
    assert agent["last_renewal"] == int(clock().timestamp())
    [shown] = snap["entries"]
    assert shown["selectors"] == ["unix:uid:1000"] and shown["parent_id"] == str(AGENT)
    assert shown["svid_state"] == "ok"
    soonest = snap["expiring"][0]
    assert soonest["spiffe_id"] == str(WEB) and soonest["serial"] == issued.serial
    lanes = {(e["event"], e["lane"]) for e in snap["timeline"]["events"]}
    assert ("svid.issued", "rotation") in lanes and ("key.created", "key") in lanes
    assert ("agent.attested", "change") in lanes
    groups = snap["keys"]["groups"]
    assert [k["state"] for k in groups["root"]] == ["active"]
    assert [k["state"] for k in groups["intermediate"]] == ["active"]
    assert len(groups["root"][0]["fingerprint"]) == 64
    assert {m["label"] for m in snap["keys"]["marks"]} == {
        "next prepared",
        "next activated",
        "next root",
    }
    assert snap["audit"]["ok"] is True and snap["audit"]["records"] >= 6
    assert snap["summary"]["agents_ok"] == 1 and snap["summary"]["entries"] == 1


def test_the_snapshot_holds_no_secret(authority, clock, fleet, tmp_path):
    token, _, _, _, _agent_key = fleet
    text = json.dumps(collect(authority, clock))
    secret = token.token.split(".", 1)[1]
    assert token.token not in text and secret not in text
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    assert "token_id" not in text  # audit details pass an allow list only
    for key_file in (tmp_path / "keys").glob("*.pem"):
        body = "".join(key_file.read_text().splitlines()[1:-1])
        assert body[:40] not in text


def test_an_agent_that_stops_renewing_turns_late_then_expired(authority, clock, fleet):
    _, attested, _, _, _ = fleet
    life = (attested.svid.not_after - clock()).total_seconds()
    clock.advance(life * 0.6)
    [agent] = collect(authority, clock)["agents"]
    assert (agent["health"], agent["severity"]) == ("late", "warn")
    clock.advance(life * 0.5)
    snap = collect(authority, clock)
    [agent] = snap["agents"]
    assert (agent["health"], agent["severity"]) == ("expired", "bad")
    assert snap["summary"]["agents_bad"] == 1


def test_an_evicted_agent_is_red_and_its_expired_svid_is_a_failure(authority, clock, fleet):
    _, _, _, issued, _ = fleet
    authority.set_agent_status(AGENT, "evicted", "admin:uid=0")
    clock.advance(120)  # the workload SVID (100 s) expires, with no successor
    snap = collect(authority, clock)
    [agent] = snap["agents"]
    assert (agent["health"], agent["severity"]) == ("evicted", "bad")
    failures = [e for e in snap["timeline"]["events"] if e["lane"] == "failure"]
    assert {"agent.evicted", "svid.expired"} <= {e["event"] for e in failures}
    expired = next(e for e in failures if e["event"] == "svid.expired")
    assert expired["serial"] == issued.serial
    assert snap["expiring"][0]["state"] == "expired"
    assert snap["entries"][0]["svid_state"] == "expired"


def test_a_rotation_shows_the_retired_key_and_the_new_signer(authority, clock, fleet):
    before = authority.keys.signer.key_id
    authority.keys.rotate_intermediate("admin:uid=0")
    groups = collect(authority, clock)["keys"]["groups"]
    states = {k["id"]: k["state"] for k in groups["intermediate"]}
    assert states[before] == "retired"
    assert states[authority.keys.signer.key_id] == "active"


def test_a_renewed_workload_svid_replaces_the_old_one_in_the_list(authority, clock, fleet):
    _, attested, entry, first, _ = fleet
    clock.advance(40)
    key = ec.generate_private_key(ec.SECP256R1())
    [second] = authority.sign_batch(
        AGENT, attested.svid.serial, [SignRequest(entry.id, make_csr(key))]
    )
    snap = collect(authority, clock)
    serials = [s["serial"] for s in snap["expiring"] if s["spiffe_id"] == str(WEB)]
    assert serials == [second.serial]
    rotations = [e["serial"] for e in snap["timeline"]["events"] if e["lane"] == "rotation"]
    assert first.serial in rotations and second.serial in rotations


def test_lists_are_capped_and_say_how_many_there_are(authority, clock, fleet):
    for n in range(5):
        authority.create_entry(
            EntrySpec(
                SpiffeId.parse(f"spiffe://example.org/svc-{n}"),
                AGENT,
                (Selector.parse(f"unix:uid:{n}"),),
            ),
            "admin:uid=0",
        )
    c = console(authority, clock)
    c.limits = console_view.Limits(entries=3, timeline=4)
    snap = json.loads(json.dumps(c._collect()))
    assert len(snap["entries"]) == 3 and snap["summary"]["entries"] == 6
    assert len(snap["timeline"]["events"]) == 4


# -- pure judgements ---------------------------------------------------------------------


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1)))
def test_audit_times_parse_back_to_the_moment_written(moment):
    when = moment.replace(tzinfo=UTC, microsecond=moment.microsecond // 1000 * 1000)
    assert console_view.parse_ts(iso(when)) == pytest.approx(when.timestamp(), abs=1e-3)


@given(st.text(max_size=60))
def test_any_text_as_an_audit_time_parses_or_is_refused(text):
    value = console_view.parse_ts(text)
    assert value is None or isinstance(value, float)


def test_times_that_are_not_utc_are_refused():
    assert console_view.parse_ts("2026-11-29T00:00:00.000+01:00") is None
    assert console_view.parse_ts("2026-11-29T00:00:00.000") is None
    assert console_view.parse_ts("yesterday") is None


@given(st.integers(0, 2**40), st.integers(1, 2**20), st.floats(0, 2, allow_nan=False))
def test_life_state_follows_the_fraction_of_life_gone(issued, life, fraction):
    now = issued + fraction * life
    state = console_view.life_state(issued, issued + life, now)
    gone = (now - issued) / life  # as rounded in floating point
    if now >= issued + life:
        assert state == "expired"
    elif gone >= console_view.RENEWAL_LATE:
        assert state == "late"
    else:
        assert state == "ok"


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.text(), st.integers(), st.none())))
def test_only_allowed_detail_fields_reach_the_page(detail):
    safe = console_view.safe_detail(detail)
    assert set(safe) <= set(console_view.SAFE_DETAIL)
    assert all(isinstance(v, str) and len(v) <= 120 for v in safe.values())


@given(st.sampled_from(["active", "evicted", "banned"]), st.sampled_from(["ok", "late", "expired"]))
def test_a_record_status_outranks_the_svid(status, life):
    health = console_view.agent_health(status, life)
    assert health == (status if status != "active" else life)
    assert console_view.SEVERITY[health] in ("ok", "warn", "bad")


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("::", False),
        ("example.org", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def _settings(**kw) -> CASettings:
    cfg = CASettings(trust_domain="example.org", **kw)
    cfg.validate()
    return cfg


def test_the_console_off_loopback_needs_client_certificates(tmp_path):
    with pytest.raises(ConfigError, match=r"not a loopback address.*client-certificate"):
        _settings(console=Address.parse("0.0.0.0:8080"))
    with pytest.raises(ConfigError, match="needs at least one 'console_admin_id'"):
        _settings(
            console=Address.parse("0.0.0.0:8080"),
            console_cert=tmp_path / "c.pem",
            console_key=tmp_path / "k.pem",
        )
    with pytest.raises(ConfigError, match="go together"):
        _settings(console=Address.parse("127.0.0.1:8080"), console_cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="not in trust domain"):
        _settings(
            console=Address.parse("0.0.0.0:8080"),
            console_cert=tmp_path / "c.pem",
            console_key=tmp_path / "k.pem",
            console_admin_id=["spiffe://elsewhere.org/admin"],
        )
    with pytest.raises(ConfigError, match="HOST:PORT"):
        _settings(console=Address.parse("unix:/tmp/console.sock"))
    _settings(console=Address.parse("127.0.0.1:0"))
    _settings(
        console=Address.parse("0.0.0.0:8080"),
        console_cert=tmp_path / "c.pem",
        console_key=tmp_path / "k.pem",
        console_admin_id=["spiffe://example.org/admin"],
    )


def test_timeline_window_drops_old_events(authority, clock, fleet):
    clock.advance(console_view.Limits().window_s + 200)
    assert collect(authority, clock)["timeline"]["events"] == []


@dataclass(frozen=True)
class JwtRecord:
    """A JWT key record as `ca.jwt_keys` keeps it (plain values: the view takes no store)."""

    kid: str
    alg: str
    state: str
    created_at: int
    activate_at: int
    activated_at: int | None = None
    retired_at: int | None = None
    remove_at: int | None = None


def test_jwt_keys_join_the_key_schedule_with_their_states():
    now = 10_000
    rows = console_view.jwt_key_rows(
        [
            JwtRecord("old", "ES256", "retired", 1000, 1100, 1100, 5000, 12_000),
            JwtRecord("cur", "ES256", "active", 5000, 5000, 5000),
            JwtRecord("next", "ES256", "prepared", 9000, 11_000),
            JwtRecord("gone", "ES256", "removed", 10, 20, 20, 30, 40),
        ],
        now,
    )
    view = json.loads(json.dumps(console_view.keys_view(rows, now)))
    shown = {k["id"]: k for k in view["groups"]["jwt"]}
    assert set(shown) == {"old", "cur", "next"}
    assert shown["old"]["not_after"] == 12_000 and shown["cur"]["not_after"] == now
    assert shown["next"]["not_after"] == 11_000 and shown["next"]["state"] == "prepared"
    assert {"key": "next", "t": 11_000, "label": "activates"} in view["marks"]
    assert shown["cur"]["fingerprint"] == "cur"  # the kid; no JWK, no key material
