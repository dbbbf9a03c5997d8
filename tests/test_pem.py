"""Tests for tally.spiffe.pem: chains and keys round-trip, and anything else is a ProfileError."""

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from tally.spiffe.pem import (
    chain_from_der,
    chain_from_pem,
    chain_to_der,
    chain_to_pem,
    der_to_pem,
    key_from_pem,
    key_to_pem,
    key_to_pkcs8_der,
)
from tally.spiffe.x509profile import ProfileError, generate_key
from tests.test_x509profile import PKI, reason_of


def test_pem_chain_round_trip_and_strictness():
    chain = [PKI.leaf, PKI.inter]
    pem = chain_to_pem(chain)
    assert chain_from_pem(pem) == chain
    assert chain_from_pem(b"# our chain\n" + pem + b"trailing words\n") == chain
    assert reason_of(chain_from_pem, b"") == "bad_pem"
    assert reason_of(chain_from_pem, b"hello") == "bad_pem"
    assert reason_of(chain_from_pem, key_to_pem(PKI.leaf_key) + pem) == "bad_pem"
    assert reason_of(chain_from_pem, pem[:-30]) == "bad_pem"
    broken = pem.replace(b"MII", b"MIX", 1)
    assert reason_of(chain_from_pem, broken) == "bad_pem"


def test_der_chain_round_trip():
    chain = [PKI.leaf, PKI.inter, PKI.root]
    assert chain_from_der(chain_to_der(chain)) == chain
    assert reason_of(chain_from_der, b"") == "bad_der"
    assert reason_of(chain_from_der, chain_to_der(chain)[:-1]) == "bad_der"
    assert reason_of(chain_from_der, chain_to_der(chain) + b"\x00") == "bad_der"


@given(st.binary(max_size=300))
def test_chain_garbage_raises_only_profile_error(data):
    for parse in (chain_from_pem, chain_from_der):
        try:
            parse(data)
        except ProfileError:
            pass


def test_keys_round_trip():
    for key in (
        generate_key(),
        rsa.generate_private_key(65537, 2048),
        ed25519.Ed25519PrivateKey.generate(),
    ):
        assert key_from_pem(key_to_pem(key)).public_key() == key.public_key()
        loaded = serialization.load_der_private_key(key_to_pkcs8_der(key), None)
        assert loaded.public_key() == key.public_key()
    assert reason_of(key_from_pem, b"nope") == "bad_key"
    assert reason_of(key_from_pem, chain_to_pem([PKI.root])) == "bad_key"


def test_der_to_pem_is_cryptographys_pem():
    for cert in (PKI.leaf, PKI.inter, PKI.root):
        der = cert.public_bytes(serialization.Encoding.DER)
        assert der_to_pem(der) == cert.public_bytes(serialization.Encoding.PEM)
