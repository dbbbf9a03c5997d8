from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.spiffe.pem import chain_to_der, chain_to_pem, key_to_pkcs8_der
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tally.spiffe.x509profile import (
    MAX_CSR_BYTES,
    LeafSigner,
    ProfileError,
    build_intermediate,
    build_leaf,
    build_root,
    csr_public_key,
    generate_key,
    new_serial,
    parse_csr,
    validate_leaf,
    validate_signing_cert,
    verify_chain,
)

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/ns/prod/web")


class Pki:
    """A root, an intermediate under it, and a leaf under that, all valid at NOW."""

    def __init__(self, td=TD):
        self.root_key = generate_key()
        self.root = build_root(
            self.root_key, td, NOW - timedelta(days=1), NOW + timedelta(days=365)
        )
        self.int_key = generate_key()
        self.inter = build_intermediate(
            self.int_key.public_key(),
            td,
            self.root,
            self.root_key,
            NOW - timedelta(hours=1),
            NOW + timedelta(days=1),
        )
        self.leaf_key = generate_key()
        self.leaf = build_leaf(
            self.leaf_key.public_key(),
            SpiffeId(td, "/ns/prod/web"),
            self.inter,
            self.int_key,
            NOW - timedelta(minutes=1),
            NOW + timedelta(hours=1),
        )
        self.td = td
        self.roots = (self.root,)


PKI = Pki()

LEAF_KU = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
BOTH_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
DEFAULT = object()
EMPTY_NAME = x509.Name([])


def custom_leaf(
    *,
    uris=(str(WEB),),
    dns=(),
    san=True,
    san_critical=True,
    subject=EMPTY_NAME,
    basic=DEFAULT,
    ku=DEFAULT,
    ku_critical=True,
    eku=DEFAULT,
    extra=(),
    not_before=NOW - timedelta(minutes=1),
    not_after=NOW + timedelta(hours=1),
    issuer=None,
    issuer_key=None,
    aki_from=None,
):
    """A leaf like build_leaf's, with exactly one thing changed by the caller."""
    issuer = issuer or PKI.inter
    issuer_key = issuer_key or PKI.int_key
    public_key = generate_key().public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=san_critical)
    basic = x509.BasicConstraints(ca=False, path_length=None) if basic is DEFAULT else basic
    if basic is not None:
        builder = builder.add_extension(basic, critical=True)
    ku = LEAF_KU if ku is DEFAULT else ku
    if ku is not None:
        builder = builder.add_extension(ku, critical=ku_critical)
    eku = BOTH_EKU if eku is DEFAULT else eku
    if eku is not None:
        builder = builder.add_extension(eku, critical=False)
    aki_source = aki_from or issuer
    ski = aki_source.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
    )
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def reason_of(func, *args):
    with pytest.raises(ProfileError) as info:
        func(*args)
    assert str(info.value)  # always a human message too
    assert "\n" not in str(info.value)
    return info.value.reason


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


# --- builders -----------------------------------------------------------------------------


def test_root_profile():
    root = PKI.root
    root.verify_directly_issued_by(root)
    assert ext(root, x509.BasicConstraints).critical
    assert ext(root, x509.BasicConstraints).value.ca
    ku = ext(root, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    uris = ext(root, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == ["spiffe://example.org"]
    ski = ext(root, x509.SubjectKeyIdentifier).value
    assert ext(root, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Tally Root CA"
    validate_signing_cert(root)


def test_intermediate_profile():
    inter = PKI.inter
    inter.verify_directly_issued_by(PKI.root)
    basic = ext(inter, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    root_ski = ext(PKI.root, x509.SubjectKeyIdentifier).value.digest
    assert ext(inter, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    validate_signing_cert(inter)


def test_leaf_profile():
    leaf = PKI.leaf
    assert len(leaf.subject) == 0
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    basic = ext(leaf, x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value == LEAF_KU
    assert ext(leaf, x509.ExtendedKeyUsage).value == BOTH_EKU
    inter_ski = ext(PKI.inter, x509.SubjectKeyIdentifier).value.digest
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == inter_ski
    assert ext(leaf, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        PKI.leaf_key.public_key()
    )
    leaf.verify_directly_issued_by(PKI.inter)
    assert validate_leaf(leaf) == WEB
    assert verify_chain([leaf, PKI.inter], PKI.td, PKI.roots, NOW) == WEB


def test_leaf_with_dns_names_and_serial():
    leaf = build_leaf(
        generate_key().public_key(),
        WEB,
        PKI.inter,
        PKI.int_key,
        NOW,
        NOW + timedelta(hours=1),
        dns_names=["web.example.org", "*.web.example.org"],
        serial=42,
    )
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org", "*.web.example.org"]
    assert leaf.serial_number == 42
    assert validate_leaf(leaf) == WEB


def test_a_leaf_is_byte_for_byte_the_profile_built_with_typed_extensions():
    """`LeafSigner` copies its constant extensions in pre-encoded; the certificate must
    be exactly the one cryptography builds from the typed profile (rule 1)."""
    public_key = generate_key().public_key()
    start, end = NOW, NOW + timedelta(hours=1)
    leaf = LeafSigner(PKI.inter, PKI.int_key).sign(
        public_key, WEB, start, end, dns_names=["web.example.org"], serial=77
    )
    inter_ski = ext(PKI.inter, x509.SubjectKeyIdentifier).value
    typed = (
        x509.CertificateBuilder()
        .issuer_name(PKI.inter.subject)
        .subject_name(x509.Name([]))
        .public_key(public_key)
        .serial_number(77)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(WEB)), x509.DNSName("web.example.org")]
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(LEAF_KU, critical=True)
        .add_extension(BOTH_EKU, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(inter_ski),
            critical=False,
        )
        .sign(PKI.int_key, hashes.SHA256())
    )
    assert leaf.tbs_certificate_bytes == typed.tbs_certificate_bytes


@pytest.mark.parametrize("name", ["", "a..b", "-a.b", "a_b.org", "é.org", "a.*.org", "a b"])
def test_bad_dns_names(name):
    args = (generate_key().public_key(), WEB, PKI.inter, PKI.int_key, NOW, NOW + timedelta(hours=1))
    with pytest.raises(ProfileError) as info:
        build_leaf(*args, dns_names=[name])
    assert info.value.reason == "bad_dns_name"


def test_times_are_whole_seconds_utc_and_leaf_is_capped():
    plus_two = timezone(timedelta(hours=2))
    leaf = build_leaf(
        generate_key().public_key(),
        WEB,
        PKI.inter,
        PKI.int_key,
        (NOW + timedelta(microseconds=999_999)).astimezone(plus_two),
        NOW + timedelta(days=30),
    )
    assert leaf.not_valid_before_utc == NOW
    assert leaf.not_valid_after_utc == PKI.inter.not_valid_after_utc  # capped


def test_intermediate_is_capped_at_root():
    root = build_root(PKI.root_key, TD, NOW, NOW + timedelta(days=2))
    inter = build_intermediate(
        generate_key().public_key(), TD, root, PKI.root_key, NOW, NOW + timedelta(days=9)
    )
    assert inter.not_valid_after_utc == root.not_valid_after_utc


def test_time_errors():
    args = (generate_key().public_key(), WEB, PKI.inter, PKI.int_key)
    naive = datetime(2026, 6, 1, 12, 0, 0)
    assert reason_of(build_leaf, *args, naive, NOW + timedelta(hours=1)) == "bad_time"
    assert reason_of(build_leaf, *args, NOW, NOW) == "bad_lifetime"
    # The issuer is gone before the leaf would start: capping leaves nothing.
    late = PKI.inter.not_valid_after_utc + timedelta(seconds=1)
    assert reason_of(build_leaf, *args, late, late + timedelta(hours=1)) == "bad_lifetime"
    assert reason_of(verify_chain, [PKI.leaf, PKI.inter], PKI.td, PKI.roots, naive) == "bad_time"


def test_leaf_builder_refusals():
    key = generate_key().public_key()
    times = (NOW, NOW + timedelta(hours=1))
    assert reason_of(build_leaf, key, TD.id(), PKI.inter, PKI.int_key, *times) == "root_path"
    assert reason_of(build_leaf, key, WEB, PKI.inter, generate_key(), *times) == (
        "issuer_key_mismatch"
    )
    assert reason_of(build_leaf, key, WEB, PKI.leaf, PKI.leaf_key, *times) == "not_ca"
    small = rsa.generate_private_key(65537, 1024).public_key()
    assert reason_of(build_leaf, small, WEB, PKI.inter, PKI.int_key, *times) == "bad_key"
    with pytest.raises(ProfileError) as info:
        build_leaf(key, WEB, PKI.inter, PKI.int_key, *times, serial=0)
    assert info.value.reason == "bad_serial"


def test_other_key_types():
    td = TrustDomain("ed.example")
    root_key = ed25519.Ed25519PrivateKey.generate()
    root = build_root(root_key, td, NOW, NOW + timedelta(days=1))
    rsa_key = rsa.generate_private_key(65537, 2048)
    leaf = build_leaf(
        rsa_key.public_key(),
        SpiffeId(td, "/rsa"),
        root,
        root_key,
        NOW,
        NOW + timedelta(hours=1),
    )
    assert verify_chain([leaf], td, (root,), NOW + timedelta(minutes=1)) == SpiffeId(td, "/rsa")
    p384 = ec.generate_private_key(ec.SECP384R1())
    root384 = build_root(p384, td, NOW, NOW + timedelta(days=1))
    assert isinstance(root384.signature_hash_algorithm, hashes.SHA384)


def test_leaf_signer_matches_build_leaf_profile():
    signer = LeafSigner(PKI.inter, PKI.int_key)
    leaf = signer.sign(generate_key().public_key(), WEB, NOW, NOW + timedelta(hours=1))
    assert verify_chain([leaf, PKI.inter], PKI.td, PKI.roots, NOW) == WEB
    assert [e.oid for e in leaf.extensions] == [e.oid for e in PKI.leaf.extensions]


def test_new_serial():
    serials = {new_serial() for _ in range(100)}
    assert len(serials) == 100
    assert all(0 < s < 2**128 for s in serials)


# --- validate_leaf: one mutation at a time -----------------------------------------------

NOT_A_LEAF_KU = x509.KeyUsage(True, False, False, False, False, True, False, False, False)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"basic": x509.BasicConstraints(ca=True, path_length=None)}, "ca_leaf"),
        ({"basic": None}, "no_basic_constraints"),
        ({"uris": (str(WEB), "spiffe://example.org/other")}, "uri_san_count"),
        ({"uris": ()}, "no_spiffe_id"),
        ({"uris": (), "dns": ("web.example.org",)}, "no_spiffe_id"),
        (
            {"san": False, "subject": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")])},
            "no_spiffe_id",
        ),
        ({"uris": ("spiffe://example.org",)}, "root_path"),
        ({"uris": ("https://example.org/web",)}, "bad_spiffe_id"),
        ({"uris": ("spiffe://example.org/web/",)}, "bad_spiffe_id"),
        ({"ku": NOT_A_LEAF_KU}, "bad_key_usage"),
        (
            {"ku": x509.KeyUsage(True, False, False, False, False, False, True, False, False)},
            "bad_key_usage",
        ),
        (
            {"ku": x509.KeyUsage(False, False, True, False, False, False, False, False, False)},
            "bad_key_usage",
        ),
        ({"ku_critical": False}, "bad_key_usage"),
        ({"ku": None}, "bad_key_usage"),
        ({"eku": x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])}, "bad_ext_key_usage"),
        ({"san_critical": False}, "san_not_critical"),
        (
            {
                "extra": [
                    (
                        x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
                        True,
                    )
                ]
            },
            "unsupported_critical_extension",
        ),
    ],
)
def test_single_mutation_is_rejected(changes, reason):
    leaf = custom_leaf(**changes)
    assert reason_of(validate_leaf, leaf) == reason
    assert reason_of(verify_chain, [leaf, PKI.inter], PKI.td, PKI.roots, NOW) == reason


def test_tolerated_variations():
    # EKU is optional; keyEncipherment is allowed; a subject makes a non-critical SAN fine;
    # an unknown non-critical extension is ignored.
    named = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    for leaf in [
        custom_leaf(eku=None),
        custom_leaf(ku=x509.KeyUsage(True, False, True, False, False, False, False, False, False)),
        custom_leaf(subject=named, san_critical=False),
        custom_leaf(
            extra=[
                (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), False)
            ]
        ),
    ]:
        assert verify_chain([leaf, PKI.inter], PKI.td, PKI.roots, NOW) == WEB


# --- verify_chain ---------------------------------------------------------------------------


def test_time_window_of_every_certificate():
    chain = [PKI.leaf, PKI.inter]
    assert verify_chain(chain, PKI.td, PKI.roots, PKI.leaf.not_valid_after_utc) == WEB
    after = PKI.leaf.not_valid_after_utc + timedelta(seconds=1)
    assert reason_of(verify_chain, chain, PKI.td, PKI.roots, after) == "expired"
    before = PKI.leaf.not_valid_before_utc - timedelta(seconds=1)
    assert reason_of(verify_chain, chain, PKI.td, PKI.roots, before) == "not_yet_valid"
    # A valid leaf under an issuer that is not yet valid (or already expired).
    early = custom_leaf(not_before=NOW - timedelta(days=3), not_after=NOW + timedelta(hours=1))
    at = NOW - timedelta(days=2)
    assert reason_of(verify_chain, [early, PKI.inter], PKI.td, PKI.roots, at) == "not_yet_valid"


def test_expired_intermediate():
    inter = x509.CertificateBuilder(
        issuer_name=PKI.root.subject,
        subject_name=PKI.inter.subject,
        public_key=PKI.int_key.public_key(),
        serial_number=new_serial(),
        not_valid_before=NOW - timedelta(days=2),
        not_valid_after=NOW - timedelta(days=1),
        extensions=list(PKI.inter.extensions),
    ).sign(PKI.root_key, hashes.SHA256())
    leaf = custom_leaf(issuer=inter)
    assert reason_of(verify_chain, [leaf, inter], PKI.td, PKI.roots, NOW) == "expired"


def test_wrong_trust_domain():
    other = Pki(TrustDomain("other.org"))
    assert reason_of(verify_chain, [other.leaf, other.inter], PKI.td, PKI.roots, NOW) == (
        "wrong_trust_domain"
    )
    assert verify_chain([other.leaf, other.inter], other.td, other.roots, NOW).member_of(
        TrustDomain("other.org")
    )


def test_signed_by_an_untrusted_ca_with_the_same_names():
    stranger = Pki()  # same trust domain, same subject names, different keys
    chain = [stranger.leaf, stranger.inter]
    assert reason_of(verify_chain, chain, PKI.td, PKI.roots, NOW) == "untrusted"
    # Presenting the stranger's root too does not help: it is not in the bundle.
    assert reason_of(verify_chain, [*chain, stranger.root], PKI.td, PKI.roots, NOW) == "untrusted"
    # Without the intermediate, the leaf's issuer is nowhere.
    assert reason_of(verify_chain, [PKI.leaf], PKI.td, PKI.roots, NOW) == "untrusted"


def test_tampered_signature():
    # Claims (by name and AKI) to come from our intermediate but was signed by another key.
    forged = custom_leaf(issuer_key=generate_key())
    assert reason_of(verify_chain, [forged, PKI.inter], PKI.td, PKI.roots, NOW) == "bad_signature"


def test_path_variations():
    chain = [PKI.leaf, PKI.inter]
    assert verify_chain([*chain, PKI.root], PKI.td, PKI.roots, NOW) == WEB  # root presented too
    assert verify_chain([PKI.leaf, PKI.root, PKI.inter], PKI.td, PKI.roots, NOW) == WEB  # any order
    direct = custom_leaf(issuer=PKI.root, issuer_key=PKI.root_key)
    assert verify_chain([direct], PKI.td, PKI.roots, NOW) == WEB  # leaf straight under the root
    # Root rotation: two roots with the same name in the bundle; either chain verifies.
    new = Pki()
    both = (PKI.root, new.root)
    assert verify_chain([new.leaf, new.inter], TD, both, NOW) == WEB
    assert verify_chain(chain, TD, both, NOW) == WEB
    assert reason_of(verify_chain, [], PKI.td, PKI.roots, NOW) == "empty_chain"
    assert reason_of(verify_chain, [PKI.leaf] + [PKI.inter] * 8, PKI.td, PKI.roots, NOW) == (
        "chain_too_long"
    )


def test_path_length_is_enforced():
    # root -> inter (pathLen 0) -> inter2 -> leaf: inter2 is one CA too many.
    key2 = generate_key()
    inter2 = build_intermediate(
        key2.public_key(),
        TD,
        PKI.inter,
        PKI.int_key,
        NOW - timedelta(minutes=5),
        NOW + timedelta(hours=2),
        subject_cn="Second",
    )
    leaf = custom_leaf(issuer=inter2, issuer_key=key2)
    assert reason_of(verify_chain, [leaf, inter2, PKI.inter], PKI.td, PKI.roots, NOW) == "path_len"


def test_a_leaf_cannot_issue():
    fake = custom_leaf(issuer=PKI.leaf, issuer_key=PKI.leaf_key, aki_from=PKI.leaf)
    assert reason_of(verify_chain, [fake, PKI.leaf, PKI.inter], PKI.td, PKI.roots, NOW) == "not_ca"


def test_validate_signing_cert_rules():
    assert reason_of(validate_signing_cert, PKI.leaf) == "not_ca"
    path_ca = x509.CertificateBuilder(
        issuer_name=PKI.root.subject,
        subject_name=PKI.inter.subject,
        public_key=PKI.int_key.public_key(),
        serial_number=new_serial(),
        not_valid_before=NOW,
        not_valid_after=NOW + timedelta(hours=1),
        extensions=[
            e for e in PKI.inter.extensions if not isinstance(e.value, x509.SubjectAlternativeName)
        ],
    )
    no_ku = path_ca.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/ca")]),
        critical=False,
    ).sign(PKI.root_key, hashes.SHA256())
    assert reason_of(validate_signing_cert, no_ku) == "ca_path"


# --- CSRs -------------------------------------------------------------------------------------


def make_csr(key, fmt=serialization.Encoding.PEM, name="anything"):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return csr.public_bytes(fmt)


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(65537, 2048),
        ed25519.Ed25519PrivateKey.generate(),
    ],
)
def test_csr_accepted(key):
    for fmt in (serialization.Encoding.PEM, serialization.Encoding.DER):
        csr = parse_csr(make_csr(key, fmt))
        assert csr.public_key() == key.public_key()


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP521R1()), rsa.generate_private_key(65537, 1024)],
)
def test_csr_weak_or_odd_keys_refused(key):
    assert reason_of(parse_csr, make_csr(key)) == "bad_csr"


def test_csr_bad_signature_and_size():
    der = bytearray(make_csr(generate_key(), serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    assert reason_of(parse_csr, bytes(der)) == "bad_csr"
    assert reason_of(parse_csr, b"0" * (MAX_CSR_BYTES + 1)) == "bad_csr"
    assert reason_of(parse_csr, b"") == "bad_csr"
    assert reason_of(parse_csr, chain_to_pem([PKI.leaf])) == "bad_csr"


@given(st.binary(max_size=600))
def test_csr_garbage_raises_only_profile_error(data):
    with pytest.raises(ProfileError) as info:
        parse_csr(data)
    assert info.value.reason == "bad_csr"


VALID_CSR_DER = make_csr(generate_key(), serialization.Encoding.DER)


def proves_its_key(data: bytes) -> bool:
    """What `parse_csr` must decide, spelled with cryptography's own signature check."""
    try:
        csr = x509.load_der_x509_csr(data)
        return csr.public_key() is not None and csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


@pytest.mark.parametrize(
    ("key", "digest"),
    [
        (ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
        (ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
        (ec.generate_private_key(ec.SECP256R1()), hashes.SHA512()),
        (rsa.generate_private_key(65537, 2048), hashes.SHA256()),
        (ed25519.Ed25519PrivateKey.generate(), None),
    ],
)
def test_a_csr_is_checked_as_is_signature_valid_checks_it(key, digest):
    """`csr_public_key` checks an ECDSA signature with the key it loaded once; its
    verdict is ``is_signature_valid``'s, for every key type, with any bit flipped."""
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, digest)
        .public_bytes(serialization.Encoding.DER)
    )
    assert csr_public_key(der) == key.public_key()
    for position in range(len(der) - 80, len(der)):  # the signature algorithm and value
        mutated = bytearray(der)
        mutated[position] ^= 0x01
        try:
            csr_public_key(bytes(mutated))
            accepted = True
        except ProfileError as exc:
            assert exc.reason == "bad_csr"
            accepted = False
        assert accepted == proves_its_key(bytes(mutated)), position


def test_a_csr_naming_another_digest_than_it_was_signed_with_is_refused():
    der = make_csr(generate_key(), serialization.Encoding.DER)
    sha256, sha384 = bytes.fromhex("2a8648ce3d040302"), bytes.fromhex("2a8648ce3d040303")
    # The outer signatureAlgorithm, after the signed part: now ecdsa-with-SHA384.
    at = der.rindex(sha256)
    relabelled = der[:at] + sha384 + der[at + len(sha384) :]
    assert not proves_its_key(relabelled)
    assert reason_of(csr_public_key, relabelled) == "bad_csr"


@given(st.integers(0, len(VALID_CSR_DER) - 1), st.integers(1, 255))
def test_a_mutated_csr_is_refused_as_bad_csr_or_still_proves_its_key(position, flip):
    data = bytes(VALID_CSR_DER[:position]) + bytes([VALID_CSR_DER[position] ^ flip])
    data += VALID_CSR_DER[position + 1 :]
    for check in (parse_csr, csr_public_key):
        try:
            check(data)
        except ProfileError as exc:
            assert exc.reason == "bad_csr"
        else:
            assert proves_its_key(data)


@settings(max_examples=300)
@given(st.data())
def test_mutated_leaf_never_escapes_as_another_error(data):
    der = bytearray(PKI.leaf.public_bytes(serialization.Encoding.DER))
    position = data.draw(st.integers(0, len(der) - 1))
    der[position] ^= data.draw(st.integers(1, 255))
    try:
        leaf = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning):
        # A serial that is not positive is only a warning today (an error "in a future
        # release" of cryptography); either way this leaf never reaches verify_chain.
        return
    try:
        assert verify_chain([leaf, PKI.inter], PKI.td, PKI.roots, NOW) == WEB
    except ProfileError:
        pass


# --- interop --------------------------------------------------------------------------------


def test_py_spiffe_accepts_our_svid():
    # Imported here: py-spiffe pulls in grpc, which only this test needs.
    from spiffe import X509Svid

    svid = X509Svid.parse_raw(chain_to_der([PKI.leaf, PKI.inter]), key_to_pkcs8_der(PKI.leaf_key))
    assert str(svid.spiffe_id) == str(WEB)
    assert svid.leaf == PKI.leaf


def test_profile_error_carries_reason_and_pickles():
    import pickle

    err = ProfileError("expired", "certificate 'x' expired")
    assert (err.reason, str(err)) == ("expired", "certificate 'x' expired")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, str(copy)) == ("expired", "certificate 'x' expired")
    assert isinstance(err, ValueError)
