import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from tally.spiffe.bundle import MAX_SEQUENCE, Bundle, BundleError, public_key_jwk
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tally.spiffe.x509profile import SigningKey, build_leaf, build_root, generate_key

NOW = datetime(2026, 6, 1, tzinfo=UTC)
TD = TrustDomain("example.org")


P256_KEY = generate_key()
RSA_KEY = rsa.generate_private_key(65537, 2048)
ROOT_KEYS: list[SigningKey] = [
    P256_KEY,
    ec.generate_private_key(ec.SECP384R1()),
    ec.generate_private_key(ec.SECP521R1()),
    RSA_KEY,
    ed25519.Ed25519PrivateKey.generate(),
]
ROOTS = [build_root(key, TD, NOW, NOW + timedelta(days=30)) for key in ROOT_KEYS]


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def jwks(bundle):
    return json.loads(bundle.to_jwks())


def b64url_decode(text):
    assert "=" not in text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- the value ---------------------------------------------------------------------------


def test_order_kept_and_duplicates_dropped():
    a, b, c = ROOTS[:3]
    bundle = Bundle(TD, (b, a, b, c, a))
    assert bundle.x509_authorities == (b, a, c)
    assert bundle == Bundle(TD, (b, a, c))
    assert bundle != Bundle(TD, (a, b, c))  # order matters: the first is the current root


def test_constructor_checks():
    leaf_key = generate_key()
    leaf = build_leaf(
        leaf_key.public_key(),
        SpiffeId.parse("spiffe://example.org/w"),
        ROOTS[0],
        ROOT_KEYS[0],
        NOW,
        NOW + timedelta(hours=1),
    )
    with pytest.raises(BundleError, match="not a CA"):
        Bundle(TD, (leaf,))
    with pytest.raises(BundleError, match="spiffe_sequence"):
        Bundle(TD, (), sequence=-1)
    with pytest.raises(BundleError, match="spiffe_sequence"):
        Bundle(TD, (), sequence=MAX_SEQUENCE + 1)
    with pytest.raises(BundleError, match="spiffe_refresh_hint"):
        Bundle(TD, (), refresh_hint=-5)
    with pytest.raises(TypeError):
        Bundle("example.org", ())  # type: ignore[arg-type]


def test_fingerprints():
    bundle = Bundle(TD, tuple(ROOTS[:2]))
    assert bundle.fingerprints() == {hashlib.sha256(der(r)).digest() for r in ROOTS[:2]}
    assert Bundle(TD, ()).fingerprints() == frozenset()


# --- JWKS --------------------------------------------------------------------------------------


def test_jwks_shape():
    bundle = Bundle(TD, tuple(ROOTS), sequence=7, refresh_hint=300)
    doc = jwks(bundle)
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    assert len(doc["keys"]) == len(ROOTS)
    for key, cert in zip(doc["keys"], ROOTS, strict=True):
        assert key["use"] == "x509-svid"
        assert "kid" not in key
        assert key["x5c"] == [base64.b64encode(der(cert)).decode()]
    p256, p384, p521, rsa_key, ed = doc["keys"]
    assert (p256["kty"], p256["crv"]) == ("EC", "P-256")
    assert len(b64url_decode(p256["x"])) == 32 and len(b64url_decode(p256["y"])) == 32
    assert p384["crv"] == "P-384" and len(b64url_decode(p384["x"])) == 48
    assert p521["crv"] == "P-521" and len(b64url_decode(p521["y"])) == 66
    assert rsa_key["kty"] == "RSA" and b64url_decode(rsa_key["e"]) == b"\x01\x00\x01"
    assert (
        int.from_bytes(b64url_decode(rsa_key["n"]), "big")
        == RSA_KEY.public_key().public_numbers().n
    )
    assert (ed["kty"], ed["crv"]) == ("OKP", "Ed25519")
    assert (
        int.from_bytes(b64url_decode(p256["x"]), "big") == P256_KEY.public_key().public_numbers().x
    )


def test_jwks_without_refresh_hint():
    doc = jwks(Bundle(TD, (ROOTS[0],)))
    assert doc["spiffe_sequence"] == 0
    assert "spiffe_refresh_hint" not in doc


def test_jwks_round_trip():
    bundle = Bundle(TD, tuple(ROOTS), sequence=2**64 - 1, refresh_hint=60)
    assert Bundle.from_jwks(TD, bundle.to_jwks()) == bundle
    empty = Bundle(TD, (), sequence=3)
    assert Bundle.from_jwks(TD, empty.to_jwks()) == empty


def parse_doc(doc):
    return Bundle.from_jwks(TD, json.dumps(doc).encode())


def entry(cert=None):
    return {
        "use": "x509-svid",
        **public_key_jwk((cert or ROOTS[0]).public_key()),
        "x5c": [base64.b64encode(der(cert or ROOTS[0])).decode()],
    }


def test_jwks_skips_what_it_does_not_understand():
    jwt_key = {"use": "jwt-svid", "kid": "k1", **public_key_jwk(generate_key().public_key())}
    doc = {
        "keys": [
            jwt_key,
            {**entry(), "use": "wit-svid"},
            {**entry(), "use": None},
            {key: value for key, value in entry().items() if key != "use"},
            {**entry(), "kty": "oct"},
            {**entry(), "x5c": []},
            {key: value for key, value in entry().items() if key != "x5c"},
            entry(ROOTS[1]),
        ],
        "spiffe_sequence": 5,
        "extra_member": {"ignored": True},
    }
    bundle = parse_doc(doc)
    assert bundle.x509_authorities == (ROOTS[1],)
    assert bundle.sequence == 5
    assert bundle.refresh_hint is None


def test_jwks_defaults_and_empty():
    bundle = parse_doc({"keys": []})
    assert bundle.x509_authorities == ()
    assert bundle.sequence == 0


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"keys": [], "keys": []}', "duplicate JSON member 'keys'"),
        (b'{"keys": [{"use": "x509-svid", "use": "jwt-svid"}]}', "duplicate JSON member 'use'"),
        (b"{}", "'keys' member is missing"),
        (b'{"keys": {}}', "'keys' must be a JSON array"),
        (b'{"keys": [1]}', "expected a JSON object"),
        (b"[]", "expected a JSON object"),
        (b'{"keys": [], "spiffe_sequence": -1}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": 1.0}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": true}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": "1"}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": 18446744073709551616}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": NaN}', "NaN"),
        (b'{"keys": [], "spiffe_refresh_hint": -1}', "spiffe_refresh_hint"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b" " * (1024 * 1024 + 1), "at most"),
    ],
)
def test_jwks_rejects(raw, problem):
    with pytest.raises(BundleError, match=r"bundle for example\.org") as info:
        Bundle.from_jwks(TD, raw)
    assert problem in str(info.value)


def test_jwks_rejects_bad_entries():
    two = {**entry(), "x5c": entry()["x5c"] * 2}
    with pytest.raises(BundleError, match="exactly one certificate"):
        parse_doc({"keys": [two]})
    with pytest.raises(BundleError, match="exactly one certificate"):
        parse_doc({"keys": [{**entry(), "x5c": "MIIB"}]})
    with pytest.raises(BundleError, match="base64 DER"):
        parse_doc({"keys": [{**entry(), "x5c": ["not base64!"]}]})
    with pytest.raises(BundleError, match="base64 DER"):
        parse_doc({"keys": [{**entry(), "x5c": [base64.b64encode(b"junk").decode()]}]})
    mismatch = {**entry(ROOTS[0]), "x": entry(ROOTS[1])["x"]}  # P-384 x on a P-256 key
    with pytest.raises(BundleError, match="do not match"):
        parse_doc({"keys": [mismatch]})
    wrong_kty = {**entry(ROOTS[3]), "kty": "EC"}
    with pytest.raises(BundleError, match="do not match"):
        parse_doc({"keys": [wrong_kty]})
    leaf = build_leaf(
        generate_key().public_key(),
        SpiffeId.parse("spiffe://example.org/w"),
        ROOTS[0],
        ROOT_KEYS[0],
        NOW,
        NOW + timedelta(hours=1),
    )
    with pytest.raises(BundleError, match="not a CA"):
        parse_doc({"keys": [entry(leaf)]})


def test_jwks_tolerates_leading_zeros_in_rsa_parameters():
    key = entry(ROOTS[3])
    key["e"] = base64.urlsafe_b64encode(b"\x00\x01\x00\x01").rstrip(b"=").decode()
    assert parse_doc({"keys": [key]}).x509_authorities == (ROOTS[3],)


# --- PEM and DER --------------------------------------------------------------------------------


def test_pem_round_trip():
    bundle = Bundle(TD, tuple(ROOTS), sequence=4)
    pem = bundle.to_pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == len(ROOTS)
    assert Bundle.from_pem(TD, pem, sequence=4) == bundle


def test_pem_rejects():
    for data in (b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n"):
        with pytest.raises(BundleError, match=r"bundle for example\.org"):
            Bundle.from_pem(TD, data)
    key_pem = generate_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(BundleError, match="PRIVATE KEY"):
        Bundle.from_pem(TD, Bundle(TD, (ROOTS[0],)).to_pem() + key_pem)


def test_der_round_trip():
    bundle = Bundle(TD, tuple(ROOTS))
    assert bundle.to_der() == b"".join(der(r) for r in ROOTS)
    assert Bundle.from_der(TD, bundle.to_der()) == bundle
    assert Bundle.from_der(TD, b"") == Bundle(TD, ())


def test_py_spiffe_reads_our_der_bundle():
    # Imported here: py-spiffe pulls in grpc, which only this test needs.
    from spiffe import TrustDomain as PyTrustDomain
    from spiffe import X509Bundle

    theirs = X509Bundle.parse_raw(PyTrustDomain("example.org"), Bundle(TD, tuple(ROOTS)).to_der())
    assert {der(c) for c in theirs.x509_authorities} == {der(r) for r in ROOTS}


# --- properties ------------------------------------------------------------------------------------

bundles = st.builds(
    lambda picks, seq, hint: Bundle(TD, tuple(ROOTS[i] for i in picks), seq, hint),
    st.lists(st.integers(0, len(ROOTS) - 1), max_size=7),
    st.integers(0, MAX_SEQUENCE),
    st.none() | st.integers(0, 2**63 - 1),
)


@given(bundles)
def test_every_encoding_round_trips(bundle):
    assert Bundle.from_jwks(TD, bundle.to_jwks()) == bundle
    plain = Bundle(TD, bundle.x509_authorities)
    assert Bundle.from_der(TD, bundle.to_der()) == plain
    if bundle.x509_authorities:
        assert Bundle.from_pem(TD, bundle.to_pem()) == plain


@given(st.binary(max_size=400))
def test_garbage_bytes_raise_only_bundle_error(data):
    for parse in (Bundle.from_jwks, Bundle.from_pem, Bundle.from_der):
        try:
            parse(TD, data)
        except BundleError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["keys", "use", "kty", "x5c", "crv", "x", "y", "spiffe_sequence", "n"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(json_values)
def test_json_shaped_garbage_raises_only_bundle_error(doc):
    try:
        bundle = Bundle.from_jwks(TD, json.dumps(doc).encode())
    except BundleError:
        return
    assert isinstance(doc, dict) and isinstance(doc["keys"], list)
    assert bundle.x509_authorities == ()


@given(st.lists(st.sampled_from([entry(r) for r in ROOTS]), max_size=6), st.data())
def test_mutated_entries_raise_only_bundle_error(keys, data):
    doc = {"keys": [dict(k) for k in keys]}
    for key in doc["keys"]:
        field = data.draw(st.sampled_from(sorted(key)))
        key[field] = data.draw(json_values)
    try:
        parse_doc(doc)
    except BundleError:
        pass
