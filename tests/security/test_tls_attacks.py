"""TLS attacks on the two mTLS servers: the proxy's server mode and the CA's agent API.

Rules / theory of operation: one table of hostile client certificates is played
against both daemons, from three clients (Python's ``ssl``, ``openssl s_client``
and ``curl``), so the matrix of who refuses what is visible in the test names.  Every attack must (1) get no answer, (2) make the daemon log exactly one
``peer.denied`` line whose ``reason`` names the fault and whose ``peer_id`` names
the SPIFFE ID the leaf claimed, when it claimed exactly one, and (3) move the
denial counter for that reason.  Every attack is paired with its control: the
same client with the daemon's good certificate gets an answer at once, so a
refusal can never pass merely because the client or the daemon is broken.

Both daemons trust one throwaway PKI (``tests/pki.py``): the proxy through
``--bundle``, the CA because that PKI's root is its ``--upstream-cert``.  So one
forger signs leaves that are wrong in exactly one way for both, each claiming
the ID the daemon would otherwise admit: ``spiffe://example.org/web`` (on the
proxy's allow list) or the CA's own attested agent.  The CA takes clients
without a certificate by design (agents attest with a join token), so there
"no certificate" is refused per call, with a 401, not in the handshake.
Daemons are module-scoped: the whole file is a few dozen handshakes.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from agent.ca_client import CAClient
from tally.ops.config import Address
from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import TrustDomain
from tests.e2e.conftest import CA, make_ca
from tests.pki import Authority, Svid, now
from tests.proxy.backends import HttpServer
from tests.proxy.conftest import (
    Minted,
    Running,
    client_context,
    http_over,
    launch,
    mint,
    tls_connect,
)

pytestmark = pytest.mark.e2e

TD = "example.org"
WEB = "spiffe://example.org/web"
OTHER_TD_ID = "spiffe://other.org/web"


@dataclass
class Target:
    """One daemon under attack, with what its good client looks like."""

    running: Running
    good: Minted
    good_path: str  # a request only an admitted peer gets a 200 for
    denied_metric: str

    @property
    def good_id(self) -> str:
        return self.good.spiffe_id

    @property
    def bundle(self) -> Path:
        return self.good.bundle

    def denied_total(self, reason: str) -> float:
        return self.running.metric(self.denied_metric, reason=reason)


@pytest.fixture(scope="module")
def pki() -> Authority:
    return Authority.create(TD)


def save(svid: Svid, out: Path, spiffe_id: str, pki: Authority) -> Minted:
    """Files for all three clients: svid/key/bundle.pem as the proxy tests write them."""
    svid.write(out, pki.bundle)
    return with_chain_file(Minted(out, spiffe_id, format(svid.leaf.serial_number, "x")))


def with_chain_file(minted: Minted) -> Minted:
    """The intermediates alone in chain.pem: s_client's -cert sends only the leaf."""
    chain = pem.chain_from_pem(minted.cert.read_bytes())
    (minted.dir / "chain.pem").write_bytes(pem.chain_to_pem(chain[1:]))
    return minted


@pytest.fixture(scope="module")
def ca_daemon(pki, tmp_path_factory) -> Iterator[CA]:
    base = tmp_path_factory.mktemp("tls-ca")
    root, key = base / "upstream.pem", base / "upstream-key.pem"
    root.write_bytes(pem.chain_to_pem([pki.root]))
    key.write_bytes(pem.key_to_pem(pki.root_key))
    os.chmod(key, 0o600)
    ca = make_ca(base, "--upstream-cert", str(root), "--upstream-key", str(key), trust_domain=TD)
    yield ca
    ca.daemon.stop()


def attest_agent(ca: CA, pki: Authority, out: Path) -> Minted:
    """A real agent SVID: a join token redeemed on the agent API, as an agent does."""
    token = ca.json("token", "create", "--spiffe-id", "spiffe://example.org/agent/node-1")["token"]

    async def attest() -> Svid:
        client = CAClient(Address.parse(ca.listen), TrustDomain.parse(TD), [pki.root])
        key = x509profile.generate_key()
        try:
            issued, _bundle, _seq = await client.attest(token, key)
        finally:
            await client.aclose()
        return Svid(list(issued.chain), key)

    return save(trio.run(attest), out, "spiffe://example.org/agent/node-1", pki)


@pytest.fixture(scope="module")
def targets(pki, ca_daemon, tmp_path_factory) -> Iterator[dict[str, Target]]:
    base = tmp_path_factory.mktemp("tls-targets")
    backend = HttpServer()
    api_id = "spiffe://example.org/api"
    api = save(pki.svid(api_id), base / "api", api_id, pki)
    proxy = launch("server", "--target", backend.address, "--http", "--allow-id", WEB, *api.files())
    web = save(pki.svid(WEB), base / "web", WEB, pki)
    agent = attest_agent(ca_daemon, pki, base / "agent")
    ca = Running(ca_daemon.daemon, ca_daemon.listen, ca_daemon.metrics)
    yield {
        "proxy": Target(proxy, web, "/", "tally_proxy_peer_denied_total"),
        "ca": Target(ca, agent, "/v1/entries", "tally_ca_peer_denied_total"),
    }
    proxy.daemon.stop()
    backend.close()


# -- the attacks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[Authority, Target, Path, CA], Minted | None]  # None: no certificate
    reason: str
    names_peer: bool  # whether the leaf claims exactly one ID the denial must name
    tls12: bool = False


def _forged(svid: Callable[[Authority, str], Svid], claimed: Callable[[Target], str]):
    def make(pki: Authority, target: Target, out: Path, ca: CA) -> Minted:
        sid = claimed(target)
        return save(svid(pki, sid), out, sid, pki)

    return make


def _good_id(target: Target) -> str:
    return target.good_id


def _other_td(target: Target) -> str:
    return OTHER_TD_ID


def _expired(pki: Authority, sid: str) -> Svid:
    t = now()
    return pki.svid(sid, not_before=t - timedelta(hours=2), not_after=t - timedelta(hours=1))


def _not_yet_valid(pki: Authority, sid: str) -> Svid:
    t = now()
    return pki.svid(sid, not_before=t + timedelta(hours=1), not_after=t + timedelta(hours=2))


def _rogue_ca(pki: Authority, sid: str) -> Svid:
    """Same trust domain name, same ID, but a CA nobody trusts."""
    return Authority.create(TD).svid(sid)


def _other_ca(pki: Authority, sid: str) -> Svid:
    """A genuine SVID of another trust domain, whose bundle neither daemon has."""
    return Authority.create("other.org").svid(sid)


def _two_uris(pki: Authority, sid: str) -> Svid:
    return pki.odd_svid([sid, "spiffe://example.org/admin"])


def _no_uri(pki: Authority, sid: str) -> Svid:
    return pki.odd_svid([])


def _ca_leaf(pki: Authority, sid: str) -> Svid:
    return pki.odd_svid([sid], ca=True)


def _workload(pki: Authority, target: Target, out: Path, ca: CA) -> Minted:
    """A genuine SVID from the real CA, for a workload: valid, but not an admitted ID."""
    return with_chain_file(mint(ca, out, "spiffe://example.org/billing"))


def _no_cert(pki: Authority, target: Target, out: Path, ca: CA) -> None:
    return None


def _good(pki: Authority, target: Target, out: Path, ca: CA) -> Minted:
    return target.good


ATTACKS = [
    Attack("expired", _forged(_expired, _good_id), "expired", True),
    Attack("not_yet_valid", _forged(_not_yet_valid, _good_id), "not_yet_valid", True),
    Attack("untrusted_ca", _forged(_rogue_ca, _good_id), "untrusted", True),
    Attack("other_trust_domain", _forged(_other_ca, _other_td), "untrusted", True),
    Attack(
        "forged_trust_domain",
        _forged(Authority.foreign_svid, _other_td),
        "unknown_trust_domain",
        True,
    ),
    Attack("two_uri_sans", _forged(_two_uris, _good_id), "uri_san_count", False),
    Attack("no_uri_san", _forged(_no_uri, _good_id), "no_spiffe_id", False),
    Attack("ca_as_leaf", _forged(_ca_leaf, _good_id), "ca_leaf", True),
    Attack("disallowed_id", _workload, "not_allowed", True),
    Attack("no_certificate", _no_cert, "no_certificate", False),
    Attack("tls12_only", _good, "tls_version", False, tls12=True),
]


# -- the three clients ----------------------------------------------------------------------


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


def via_stdlib(port: int, bundle: Path, cert: Minted | None, path: str, tls12: bool) -> bytes:
    """The response, or the client's error as text: anything but HTTP means refused."""
    extra = {"maximum_version": ssl.TLSVersion.TLSv1_2} if tls12 else {}
    try:
        with tls_connect(port, client_context(cert, bundle, **extra)) as sock:
            return http_over(sock, path)
    except (ssl.SSLError, OSError) as exc:
        return repr(exc).encode()


def via_openssl(port: int, bundle: Path, cert: Minted | None, path: str, tls12: bool) -> bytes:
    args = [
        "openssl",
        "s_client",
        "-quiet",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(bundle),
    ]
    if cert is not None:
        args += ["-cert", str(cert.cert), "-key", str(cert.key)]
        args += ["-cert_chain", str(cert.dir / "chain.pem")]
    if tls12:
        args.append("-tls1_2")
    result = subprocess.run(args, input=request(path), capture_output=True, timeout=30, check=False)
    return result.stdout or result.stderr


def via_curl(port: int, bundle: Path, cert: Minted | None, path: str, tls12: bool) -> bytes:
    # -k: SPIFFE server certificates name no host; the attack is on the server's side.
    args = ["curl", "-sS", "-i", "-k", "--max-time", "20", f"https://127.0.0.1:{port}{path}"]
    if cert is not None:
        args += ["--cert", str(cert.cert), "--key", str(cert.key)]
    if tls12:
        args += ["--tlsv1.2", "--tls-max", "1.2"]
    result = subprocess.run(args, capture_output=True, timeout=30, check=False)
    return result.stdout or result.stderr


CLIENTS = {"stdlib": via_stdlib, "openssl": via_openssl, "curl": via_curl}


def answered(reply: bytes) -> bool:
    return reply.startswith(b"HTTP/1.1 ")


def control(target: Target, client: str) -> None:
    """The same client with the daemon's good certificate is served."""
    reply = CLIENTS[client](
        target.running.port, target.bundle, target.good, target.good_path, False
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


# -- the matrix -----------------------------------------------------------------------------


# The CA's handshake admits clients without a certificate (attestation): its refusal of
# them is per call, in test_ca_refuses_agent_calls_without_a_certificate below.
MATRIX = [
    pytest.param(daemon, attack, id=f"{daemon}-{attack.name}")
    for daemon in ("proxy", "ca")
    for attack in ATTACKS
    if (daemon, attack.name) != ("ca", "no_certificate")
]


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize(("daemon", "attack"), MATRIX)
def test_attack_is_refused_and_named(targets, pki, ca_daemon, tmp_path, daemon, attack, client):
    target = targets[daemon]
    cert = attack.make(pki, target, tmp_path / "cert", ca_daemon)
    log = target.running.daemon
    lines_before = len(log.events("peer.denied"))
    count_before = target.denied_total(attack.reason)

    reply = CLIENTS[client](
        target.running.port, target.bundle, cert, "/must-not-arrive", attack.tls12
    )

    assert not answered(reply), reply[:300]
    line = log.wait_for("peer.denied", timeout=20, count=lines_before + 1)
    assert line["reason"] == attack.reason, line
    expected_id = cert.spiffe_id if cert is not None and attack.names_peer else None
    assert line["peer_id"] == expected_id, line
    assert line["peer"].startswith("127.0.0.1:"), line
    assert target.denied_total(attack.reason) == count_before + 1
    if attack.tls12:
        assert b"protocol version" in reply.lower() or b"protocol_version" in reply.lower(), reply

    control(target, client)
    assert len(log.events("peer.denied")) == lines_before + 1, "one attack, one line"


def plain_http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        return http_over(sock, "/must-not-arrive")


@pytest.mark.parametrize("daemon", ["proxy", "ca"])
def test_plain_http_to_the_tls_port_is_refused(targets, daemon):
    target = targets[daemon]
    before = len(target.running.daemon.events("peer.denied"))
    count_before = target.denied_total("not_tls")
    assert not answered(plain_http(target.running.port))
    line = target.running.daemon.wait_for("peer.denied", timeout=20, count=before + 1)
    assert (line["reason"], line["peer_id"]) == ("not_tls", None), line
    assert target.denied_total("not_tls") == count_before + 1
    control(target, "stdlib")


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_ca_refuses_agent_calls_without_a_certificate(targets, client):
    """No certificate gets a handshake (attestation needs one) and a 401 for any agent call."""
    target = targets["ca"]
    reply = CLIENTS[client](target.running.port, target.bundle, None, "/v1/entries", False)
    assert reply.startswith(b"HTTP/1.1 401") and b"no_client_certificate" in reply, reply[:300]
    control(target, client)


def test_ca_logs_a_certificateless_agent_call_as_denied(targets):
    target = targets["ca"]
    log = target.running.daemon
    before = len(log.events("peer.denied"))
    count_before = target.denied_total("no_certificate")
    reply = via_stdlib(target.running.port, target.bundle, None, "/v1/entries", False)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:300]
    log.wait_for("peer.denied", timeout=20, count=before + 1)
    lines = log.events("peer.denied")[before:]
    assert [line["reason"] for line in lines] == ["no_certificate"], lines
    assert lines[0]["peer_id"] is None and lines[0]["peer"].startswith("127.0.0.1:"), lines
    assert "/v1/entries" in lines[0]["detail"], lines
    assert target.denied_total("no_certificate") == count_before + 1
    control(target, "stdlib")
