"""The OIDC discovery endpoint in process: its documents, its settings, and TLS."""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime
from functools import partial

import pytest
import trio

from ca.authority import Authority
from ca.jwt_keys import JwtPolicy
from ca.keys import KeyManager
from ca.oidc import discovery_document, keys_document, serve_oidc, tls_context
from ca.schedule import Policy
from ca.settings import CASettings
from ca.store import Store
from tally.ops.config import Address, ConfigError
from tally.spiffe import pem
from tally.spiffe.spiffeid import SpiffeId
from tally.wire import http
from tests.ca.conftest import LIMITS, TD
from tests.ca.test_jwt_keys import manager


def settings(**kw) -> CASettings:
    return CASettings(trust_domain="example.org", **kw)


def test_discovery_names_the_issuer_and_its_keys():
    doc = discovery_document("https://oidc.example.org")
    assert doc["issuer"] == "https://oidc.example.org"
    assert doc["jwks_uri"] == "https://oidc.example.org/keys"
    assert "ES256" in doc["id_token_signing_alg_values_supported"]


def test_keys_are_public_only(tmp_path, clock):
    for key_type in ("ec", "rsa"):
        (tmp_path / key_type).mkdir()
        store = Store.open(tmp_path / key_type / "ca.db")
        km = manager(tmp_path / key_type, store, clock, JwtPolicy(600, 30, 120, key_type))
        for key in keys_document(km.bundle)["keys"]:
            assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
            assert key["use"] == "sig" and key["alg"] in ("ES256", "RS256")


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"oidc_listen": Address.parse("127.0.0.1:0")}, "needs 'oidc_issuer'"),
        (
            {"oidc_listen": Address.parse("0.0.0.0:8080"), "oidc_issuer": "https://x.org"},
            "loopback only",
        ),
        ({"oidc_issuer": "http://x.org"}, "expected https://"),
        ({"oidc_cert": "c.pem"}, "go together"),
        ({"jwt_key_type": "dsa"}, "expected ec or rsa"),
        ({"default_jwt_ttl": 7200}, "above 'max_jwt_ttl'"),
    ],
)
def test_settings_refuse_what_cannot_work(kw, problem):
    with pytest.raises(ConfigError, match=problem):
        settings(**kw).validate()


def test_plain_http_on_loopback_and_tls_elsewhere_are_fine():
    settings(oidc_listen=Address.parse("127.0.0.1:0"), oidc_issuer="https://x.org").validate()
    settings(
        oidc_listen=Address.parse("0.0.0.0:0"),
        oidc_issuer="https://x.org",
        oidc_cert="c.pem",
        oidc_key="k.pem",
    ).validate()


async def test_served_over_tls_with_cache_control(tmp_path, store, clock):
    clock.now = datetime.now(UTC)  # the certificate is checked against real time
    keys = KeyManager(store, tmp_path, TD, Policy(86400, 10 * 365 * 86400, 3600), clock)
    keys.load()
    keys.tick()
    authority = Authority(store, keys, TD, LIMITS, clock)
    km = manager(tmp_path / "jwt", store, clock)
    minted = authority.mint(SpiffeId.parse("spiffe://example.org/oidc"), 600, ("localhost",), "t")
    cert, key = tmp_path / "oidc.pem", tmp_path / "oidc-key.pem"
    cert.write_bytes(minted.svid.chain_pem)
    key.write_bytes(pem.key_to_pem(minted.private_key))
    key.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        tls_context(cert, key)
    key.chmod(0o600)
    ctx = tls_context(cert, key)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            partial(
                serve_oidc,
                Address.parse("127.0.0.1:0"),
                "https://oidc.example.org",
                lambda: km.bundle,
                ctx,
                http.Drain(),
            )
        )
        port = int(address.rsplit(":", 1)[1])
        client_ctx = ssl.create_default_context(cadata=minted.bundle.to_pem().decode())
        stream = await trio.open_ssl_over_tcp_stream(
            "localhost", port, ssl_context=client_ctx, https_compatible=True
        )
        async with stream:
            await stream.send_all(
                b"GET /keys HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"cache-control: public, max-age=60" in head.lower()
        assert [k["kid"] for k in json.loads(body)["keys"]] == list(km.bundle.keys)
        nursery.cancel_scope.cancel()
