"""Guessing join tokens against a real CA: rate-limited, audited, and a known id gets revoked.

Theory: a token's secret is 256 random bits, so the defence is not against
success but against cost and noise.  Each failed attestation is an audit
record naming the token id (never the secret) and takes one from the calling
address's bucket; past the burst the CA answers 429 with ``Retry-After``
without reading the token, and the audit log stops growing.  A token id tried
with wrong secrets is revoked, because its id has leaked.  Every attack here
has its control: a right secret, another address, the same token later.

Single use, expiry, eviction at renewal and a ban surviving a new token are
in tests/e2e/test_ca.py (test_token_single_use_expiry_eviction_and_ban).

The attacks come from distinct loopback addresses (127.0.0.x), so the tests
share one CA without sharing a bucket.
"""

from __future__ import annotations

import http.client
import json
import secrets
import ssl
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ca_client import make_csr
from ca import throttle
from ca.throttle import AttestThrottle, peer_key
from tally.app.launch import run_cli
from tally.spiffe import x509profile
from tests.e2e.conftest import CA, make_ca

KEY = x509profile.generate_key()
_contexts: dict[str, ssl.SSLContext] = {}


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory) -> Iterator[CA]:
    ca = make_ca(tmp_path_factory.mktemp("tokens"))
    yield ca
    ca.daemon.stop()


def attest(ca: CA, token: str, source: str) -> tuple[int, dict, http.client.HTTPResponse]:
    """POST /v1/attest from ``source`` with a client of our own, headers and all."""
    ctx = _contexts.get(ca.listen)
    if ctx is None:
        ctx = ssl.create_default_context(cadata=ca.json("bundle", "show")["bundle"])
        ctx.check_hostname = False  # the CA's certificate names a SPIFFE ID, not a host
        _contexts[ca.listen] = ctx
    host, port = ca.listen.rsplit(":", 1)
    conn = http.client.HTTPSConnection(
        host, int(port), context=ctx, source_address=(source, 0), timeout=30
    )
    try:
        body = json.dumps({"token": token, "csr": make_csr(KEY)})
        conn.request("POST", "/v1/attest", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), resp
    finally:
        conn.close()


def new_token(ca: CA, *extra: str) -> str:
    return ca.json("token", "create", *extra)["token"]


def wrong_secret(token: str | None = None) -> str:
    """A guess: the id of ``token`` (or a made-up id) with a random secret."""
    token_id = token.split(".")[0] if token else secrets.token_hex(8)
    return f"{token_id}.{secrets.token_urlsafe(32)}"


def audit(ca: CA, event: str) -> list[dict]:
    return ca.json("audit", "list", "--event", event, "--limit", "5000")["records"]


def test_guessing_is_throttled_per_address_and_the_audit_stops_growing(shared_ca: CA):
    ca = shared_ca
    attacker, bystander = "127.0.0.10", "127.0.0.11"
    guesses = [wrong_secret() for _ in range(10)]
    sent = {g.split(".")[1] for g in guesses}
    # A success takes nothing from the bucket: the attacker's address attests first.
    assert attest(ca, new_token(ca), attacker)[0] == 200
    for guess in guesses:  # the default burst is 10
        status, body, _ = attest(ca, guess, attacker)
        assert (status, body["code"]) == (403, "attestation_failed")
    valid = new_token(ca)
    for _ in range(5):  # throttled: even a valid token is not looked at
        status, body, resp = attest(ca, valid, attacker)
        assert (status, body["code"]) == (429, "rate_limited")
        assert 1 <= int(resp.headers["Retry-After"]) <= 6  # one refill (6 s) at most
        assert "127.0.0.10" in body["error"] and "\n" not in body["error"]
    # The valid token was not spent, and another address is not throttled.
    assert attest(ca, valid, bystander)[0] == 200
    failed = [
        r for r in audit(ca, "attestation.failed") if r["actor"].startswith("peer:127.0.0.10:")
    ]
    assert len(failed) == 10
    assert {r["detail"]["token_id"] for r in failed} == {g.split(".")[0] for g in guesses}
    # Five 429s, one audit record: flooding grows the log by failures, not requests.
    throttled = [r for r in audit(ca, "attestation.throttled") if r["detail"]["peer"] == attacker]
    assert len(throttled) == 1
    text = ca.cli("audit", "list", "--limit", "5000", "--output", "json").stdout
    assert not any(secret in text for secret in sent)
    assert not any(secret in line for line in ca.daemon.raw for secret in sent)
    assert ca.json("audit", "verify")["ok"]


def test_a_token_id_tried_with_wrong_secrets_is_revoked(shared_ca: CA):
    ca = shared_ca
    attacker = "127.0.0.12"
    target = ca.json("token", "create", "--spiffe-id", "spiffe://example.org/agent/victim")
    control = new_token(ca)
    # Control: four wrong secrets leave a token usable by its holder.
    for _ in range(4):
        assert attest(ca, wrong_secret(control), attacker)[0] == 403
    assert attest(ca, control, attacker)[0] == 200
    for _ in range(5):
        status, body, _ = attest(ca, wrong_secret(target["token"]), attacker)
        # The id is never confirmed to the guesser: same answer as for an unknown id.
        assert body["error"] == "attestation failed: unknown join token"
    status, body, _ = attest(ca, target["token"], "127.0.0.13")
    assert status == 403 and body["error"] == "attestation failed: join token revoked"
    revoked = audit(ca, "token.revoked")
    assert [r["detail"]["token_id"] for r in revoked] == [target["token_id"]]
    assert ca.daemon.wait_for("token.revoked")["token_id"] == target["token_id"]
    assert ca.cli("agent", "show", "spiffe://example.org/agent/victim", check=False).returncode
    assert ca.json("audit", "verify")["ok"]


def test_throttle_settings_are_honoured_and_the_bucket_refills(ca_factory):
    ca = ca_factory("--attest-burst", "2", "--attest-refill", "4s")
    token = new_token(ca)  # made first: a CLI run can take seconds on a loaded machine
    started = time.monotonic()
    for _ in range(2):
        assert attest(ca, wrong_secret(), "127.0.0.1")[0] == 403
    status, _, resp = attest(ca, token, "127.0.0.1")
    waited = time.monotonic() - started
    assert status == 429, "the third attempt came after a whole refill period"
    # The wait left is the refill period less what has passed since the bucket began to
    # refill, rounded up: 4 on a quick machine, less on a slow one, never 0.
    assert max(1, 4 - waited - 1) <= int(resp.headers["Retry-After"]) <= 4, waited
    assert ca.daemon.wait_for("attestation.throttled")["peer"] == "127.0.0.1"
    # Refilled on the CA's clock: poll until it lets the next attempt through.
    valid = new_token(ca)
    deadline = time.monotonic() + 20
    while (status := attest(ca, valid, "127.0.0.1")[0]) == 429:
        assert time.monotonic() < deadline, "the bucket never refilled"
        time.sleep(0.1)  # a poll interval, not a timing assumption
    assert status == 200


def test_throttle_settings_are_checked(tmp_path):
    for flag, value in (("--attest-burst", "0"), ("--token-max-failures", "0")):
        result = run_cli(
            "ca", "run", "--trust-domain", "example.org", "--data-dir", str(tmp_path), flag, value
        )
        assert result.returncode != 0 and flag.strip("-").replace("-", "_") in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# -- the bucket itself, on a clock the test moves ------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_spends_refills_and_reports_one_refusal_per_spell():
    clock = Clock()
    bucket = AttestThrottle(burst=3, refill=6.0, clock=clock)
    assert bucket.retry_after("a") == 0
    for _ in range(3):
        bucket.failed("a")
    assert bucket.retry_after("a") == 6 and bucket.retry_after("b") == 0
    assert bucket.refuse("a") and not bucket.refuse("a")  # audited once
    clock.now += 5.5
    assert bucket.retry_after("a") == 1
    clock.now += 0.5
    assert bucket.retry_after("a") == 0
    bucket.failed("a")  # the spell ended with a failure; the next one is reported again
    assert bucket.retry_after("a") == 6 and bucket.refuse("a")
    clock.now += 1e9  # never more than the burst, however long it rested
    for _ in range(3):
        assert bucket.retry_after("a") == 0
        bucket.failed("a")
    assert bucket.retry_after("a") > 0


def test_bucket_table_is_bounded(monkeypatch):
    monkeypatch.setattr(throttle, "MAX_PEERS", 50)
    clock = Clock()
    bucket = AttestThrottle(burst=2, refill=1.0, clock=clock)
    bucket.failed("old")
    bucket.failed("old")
    for i in range(200):
        bucket.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(bucket) == 50
    assert bucket.retry_after("old") == 0  # the least recently seen went first


@given(st.ip_addresses(), st.integers(0, 65535), st.ip_addresses())
def test_peer_key_ignores_the_port_and_groups_ipv6_by_64(ip, port, other):
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    bare = f"{ip}:{port}"  # what the CA makes of getpeername(), brackets or not
    assert peer_key(text) == peer_key(bare) == peer_key(f"{ip}:1")
    same_net = ip.version == other.version == 6 and (
        int(ip) >> 64 == int(other) >> 64 and ip.ipv4_mapped is None and other.ipv4_mapped is None
    )
    if same_net or ip == other:
        assert peer_key(bare) == peer_key(f"{other}:{port}")
    elif ip.version == other.version == 4:
        assert peer_key(bare) != peer_key(f"{other}:{port}")


@given(st.text(max_size=80))
def test_peer_key_takes_any_text(address):
    assert isinstance(peer_key(address), str)
