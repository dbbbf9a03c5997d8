"""The X.509-SVID profile: what Tally's CA signs and what every Tally peer accepts.

Rules:

1. One profile, written down twice: the builders emit it and the validators
   check it, so the CA can check its own output before handing it out (SPIRE
   runs its validator on every SVID it signs). Root and signing CAs carry
   `spiffe://<td>`; leaves have an empty subject, one critical URI SAN with a
   non-root path, CA=false, keyUsage digitalSignature only and EKU
   serverAuth+clientAuth (digest section 2.5).
2. Pure: no OpenSSL store, no clock, no files. `verify_chain` takes `now`, the
   leaf's trust domain and that domain's roots; path building is a short walk
   leaf -> presented intermediates -> bundle authority, with every signature
   checked by `verify_directly_issued_by`.
3. Time is whole seconds, UTC, timezone-aware. ASN.1 time has no fraction, so
   a microsecond kept in memory would make "what we signed" and "what the peer
   sees" disagree.
4. A leaf never outlives its issuer: its `not_after` is capped at the issuer's,
   since a chain is only as valid as its shortest-lived link and a peer would
   reject the leaf at the moment the issuer expires anyway.
5. Failures are `ProfileError` with a stable machine `reason` (for metrics and
   audit: "expired", "not_yet_valid", "untrusted", "bad_signature",
   "wrong_trust_domain", "ca_leaf", "uri_san_count", "no_spiffe_id",
   "bad_spiffe_id", "root_path", "bad_key_usage", "bad_ext_key_usage",
   "no_basic_constraints", "san_not_critical", "not_ca", "ca_path",
   "path_len", "chain_too_long", "empty_chain", "unsupported_critical_extension",
   "malformed", "bad_csr", "bad_key", "bad_pem", "bad_der", "bad_time",
   "bad_lifetime", "bad_dns_name", "bad_serial", "issuer_key_mismatch") and a
   one-line human message naming the certificate.
6. The leaf signing path is the CA's hot loop: `LeafSigner` computes everything
   that depends only on the issuer once, down to the DER of the extensions every
   leaf carries (encoded by cryptography, copied into each leaf as they are: the
   same certificate, byte for byte, as the typed builder makes), and `build_leaf`
   keeps a few signers.  A CSR's signature is checked with the key loaded from it,
   once.  The validators stay whole: the CA runs `validate_leaf` on every leaf it
   signs, over the certificate as parsed back from its DER, so cheaper building can
   never let a leaf outside the profile out.
"""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

MAX_CSR_BYTES = 8 * 1024
MAX_CHAIN_LENGTH = 8
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # bounds the cost of checking a hostile CSR; Go's verifier stops here too
CSR_CURVES = ("secp256r1", "secp384r1")

# The extensions the validators understand. RFC 5280 says a certificate with any
# other *critical* extension must be rejected; name constraints are in that group
# because we do not enforce them, and accepting them unenforced would widen trust.
_KNOWN_EXTENSIONS = frozenset(
    {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.SubjectAlternativeName.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
    }
)
# What cryptography raises, eagerly or lazily, for bytes that are not a well-formed
# certificate or CSR. Several of these are not ValueErrors.
PARSE_ERRORS = (
    ValueError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
_SAN_OID = x509.SubjectAlternativeName.oid
_BASIC_CONSTRAINTS_OID = x509.BasicConstraints.oid
_KEY_USAGE_OID = x509.KeyUsage.oid
_EXT_KEY_USAGE_OID = x509.ExtendedKeyUsage.oid
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class ProfileError(ValueError):
    """A certificate, CSR or key outside the profile; `reason` is stable, the message is not."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)  # both in args, so the error pickles
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


def generate_key() -> ec.EllipticCurvePrivateKey:
    """P-256: fast to sign with, and accepted by every SPIFFE library."""
    return ec.generate_private_key(ec.SECP256R1())


def new_serial() -> int:
    """128 random bits: unpredictable (RFC 5280 wants >= 64) and within the 20-byte limit."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


# --- helpers ------------------------------------------------------------------------------


def _describe(cert: x509.Certificate) -> str:
    """Name a certificate in an error message by what an operator would search for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, *PARSE_ERRORS):
        uris = []
    try:
        name = uris[0] if uris else cert.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        name = "(unparsable subject)"
    return f"certificate {name!r} (serial {cert.serial_number:x})"


def _utc_seconds(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ProfileError("bad_time", f"{what} {value!r} must be timezone-aware (UTC)")
    return value.astimezone(UTC).replace(microsecond=0)


def _hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """The digest conventionally paired with the key (Ed25519 takes none)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def _check_public_key(public_key: CertificatePublicKeyTypes, what: str) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name in ("secp256r1", "secp384r1", "secp521r1"):
            return
    elif isinstance(public_key, rsa.RSAPublicKey):
        if MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
            return
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    raise ProfileError(
        "bad_key",
        f"{what}: unsupported key {type(public_key).__name__} "
        f"(expected EC P-256/P-384/P-521, RSA {MIN_RSA_BITS}-{MAX_RSA_BITS} bits or Ed25519)",
    )


def _check_dns_name(name: str) -> None:
    labels = name.split(".")
    if labels and labels[0] == "*":  # one leading wildcard label, as TLS allows
        labels = labels[1:]
    if not labels or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ProfileError(
            "bad_dns_name",
            f"invalid DNS name {name!r}: expected ASCII labels of letters, digits and '-', "
            "e.g. 'api.example.org' or '*.example.org'",
        )


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except PARSE_ERRORS as exc:
        raise ProfileError(
            "malformed",
            f"certificate (serial {cert.serial_number:x}) has malformed extensions: {exc}",
        ) from exc


def _check_critical_extensions(cert: x509.Certificate, exts: x509.Extensions) -> None:
    for ext in exts:
        if ext.critical and ext.oid not in _KNOWN_EXTENSIONS:
            raise ProfileError(
                "unsupported_critical_extension",
                f"{_describe(cert)} has critical extension {ext.oid.dotted_string} "
                "that Tally does not process",
            )


def _ski_of(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _aki_from(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski_of(issuer))


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_FIXED_EXTENSIONS = (
    x509.Extension(
        x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=False, path_length=None)
    ),
    x509.Extension(x509.KeyUsage.oid, True, _LEAF_KEY_USAGE),
    x509.Extension(
        x509.ExtendedKeyUsage.oid,
        False,
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
    ),
)
_EMPTY_NAME = x509.Name([])


def _lifetime(
    not_before: datetime, not_after: datetime, cap: datetime | None
) -> tuple[datetime, datetime]:
    start = _utc_seconds(not_before, "not_before")
    end = _utc_seconds(not_after, "not_after")
    if cap is not None:
        end = min(end, cap)
    if end <= start:
        raise ProfileError(
            "bad_lifetime",
            f"certificate would be valid from {start.isoformat()} to {end.isoformat()}: "
            "not_after must be later than not_before (and than the issuer's not_after cap)",
        )
    return start, end


# --- builders -----------------------------------------------------------------------------


def build_root(
    key: SigningKey,
    td: TrustDomain,
    not_before: datetime,
    not_after: datetime,
    *,
    subject_cn: str = "Tally Root CA",
) -> x509.Certificate:
    """A self-signed trust anchor for `td`, the kind that goes into bundles."""
    start, end = _lifetime(not_before, not_after, None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(td.id()))]),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, _hash_for(key))


def build_intermediate(
    public_key: CertificatePublicKeyTypes,
    td: TrustDomain,
    issuer: x509.Certificate,
    issuer_key: SigningKey,
    not_before: datetime,
    not_after: datetime,
    *,
    subject_cn: str = "Tally Signing CA",
) -> x509.Certificate:
    """A signing CA under `issuer` that may sign leaves only (pathLen 0).

    Its lifetime is capped at the issuer's like a leaf's (rule 4).
    """
    _check_public_key(public_key, "intermediate")
    _check_issuer_key(issuer, issuer_key)
    start, end = _lifetime(not_before, not_after, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(td.id()))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki_from(issuer), critical=False)
    )
    return builder.sign(issuer_key, _hash_for(issuer_key))


def _check_issuer_key(issuer: x509.Certificate, issuer_key: SigningKey) -> None:
    if issuer_key.public_key() != issuer.public_key():
        raise ProfileError(
            "issuer_key_mismatch", f"the signing key does not belong to {_describe(issuer)}"
        )


class LeafSigner:
    """Signs leaf SVIDs under one issuer, with every issuer-derived value computed once.

    Construction checks that the issuer is a signing CA and that the key is its
    key, so a misconfigured CA fails on its first leaf rather than emitting
    certificates nobody can verify.
    """

    __slots__ = ("_aki", "_fixed", "_hash", "_issuer_name", "_key", "_not_after")

    def __init__(self, issuer: x509.Certificate, issuer_key: SigningKey) -> None:
        validate_signing_cert(issuer)
        _check_issuer_key(issuer, issuer_key)
        self._issuer_name = issuer.subject
        self._not_after = issuer.not_valid_after_utc
        aki = x509.Extension(x509.AuthorityKeyIdentifier.oid, False, _aki_from(issuer))
        # The extensions every leaf of this issuer carries, encoded once by cryptography
        # and then copied into each leaf as they are: the same bytes as encoding them
        # per leaf, without reading each typed value back out (rule 6).
        self._fixed = tuple(_encoded(ext) for ext in _LEAF_FIXED_EXTENSIONS)
        self._aki = _encoded(aki)
        self._key = issuer_key
        self._hash = _hash_for(issuer_key)

    def sign(
        self,
        public_key: CertificatePublicKeyTypes,
        spiffe_id: SpiffeId,
        not_before: datetime,
        not_after: datetime,
        *,
        dns_names: Sequence[str] = (),
        serial: int | None = None,
    ) -> x509.Certificate:
        if spiffe_id.is_root:
            raise ProfileError(
                "root_path", f"leaf SPIFFE ID {str(spiffe_id)!r} must have a path below the root"
            )
        _check_public_key(public_key, f"leaf for {spiffe_id}")
        for name in dns_names:
            _check_dns_name(name)
        if serial is None:
            serial = new_serial()
        elif not 0 < serial < 2**159:
            raise ProfileError("bad_serial", f"serial {serial} must be positive and < 2**159")
        start, end = _lifetime(not_before, not_after, self._not_after)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        names.extend(x509.DNSName(name) for name in dns_names)
        # The constructor with prebuilt extensions skips the builder's copy per
        # call, which was a quarter of the cost of a leaf (module rule 6).
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer_name,
            subject_name=_EMPTY_NAME,
            public_key=public_key,
            serial_number=serial,
            not_valid_before=start.replace(tzinfo=None),
            not_valid_after=end.replace(tzinfo=None),
            extensions=[
                x509.Extension(
                    x509.SubjectAlternativeName.oid, True, x509.SubjectAlternativeName(names)
                ),
                *self._fixed,
                x509.Extension(
                    x509.SubjectKeyIdentifier.oid,
                    False,
                    x509.SubjectKeyIdentifier.from_public_key(public_key),
                ),
                self._aki,
            ],
        )
        return builder.sign(self._key, self._hash)


def _encoded(
    ext: x509.Extension[x509.ExtensionType],
) -> x509.Extension[x509.UnrecognizedExtension]:
    """``ext`` with its value already DER (cryptography's own encoding of it)."""
    return x509.Extension(
        ext.oid, ext.critical, x509.UnrecognizedExtension(ext.oid, ext.value.public_bytes())
    )


@functools.lru_cache(maxsize=8)
def _leaf_signer(issuer: x509.Certificate, issuer_key: SigningKey) -> LeafSigner:
    # Keyed by the issuer's DER and the key object; a rotation simply adds an entry.
    # The cache keeps up to 8 retired keys alive, so a CA that wants an old key
    # gone from memory promptly should hold its own LeafSigner instead.
    return LeafSigner(issuer, issuer_key)


def build_leaf(
    public_key: CertificatePublicKeyTypes,
    spiffe_id: SpiffeId,
    issuer: x509.Certificate,
    issuer_key: SigningKey,
    not_before: datetime,
    not_after: datetime,
    *,
    dns_names: Sequence[str] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """An X.509-SVID for `spiffe_id`, valid at most until the issuer expires (rule 4)."""
    return _leaf_signer(issuer, issuer_key).sign(
        public_key, spiffe_id, not_before, not_after, dns_names=dns_names, serial=serial
    )


# --- validators ---------------------------------------------------------------------------


@contextlib.contextmanager
def _malformed_is_profile_error() -> Iterator[None]:
    """Turn cryptography's lazy parse errors (names, extensions, keys) into our error.

    A peer's certificate is attacker-controlled input; whatever part of it fails
    to parse, callers should see one exception type with a reason.
    """
    try:
        yield
    except ProfileError:
        raise
    except PARSE_ERRORS as exc:
        raise ProfileError("malformed", f"malformed certificate: {exc}") from exc


def validate_leaf(cert: x509.Certificate) -> SpiffeId:
    """Check the leaf rules of digest 2.1, 2.2 and 2.4 items 2-4; return the leaf's ID."""
    with _malformed_is_profile_error():
        return _validate_leaf(cert)


def _validate_leaf(cert: x509.Certificate) -> SpiffeId:
    # One pass over the extensions, then lookups by OID: the CA runs this on every
    # leaf it signs (`ca.leaves` rule 3), and a scan per extension looked for was a
    # third of it.  cryptography refuses duplicate extensions when it parses them, so
    # the OID names exactly one extension, of the class that OID parses to.
    exts = _extensions(cert)
    _check_critical_extensions(cert, exts)
    by_oid = {ext.oid: ext for ext in exts}
    san = cast("x509.Extension[x509.SubjectAlternativeName] | None", by_oid.get(_SAN_OID))
    if san is None:
        raise ProfileError("no_spiffe_id", f"{_describe(cert)} has no URI SAN")
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise ProfileError("no_spiffe_id", f"{_describe(cert)} has no URI SAN")
    if len(uris) > 1:
        raise ProfileError(
            "uri_san_count", f"{_describe(cert)} has {len(uris)} URI SANs, an SVID has exactly one"
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise ProfileError("bad_spiffe_id", f"{_describe(cert)}: {exc}") from exc
    if spiffe_id.is_root:
        raise ProfileError(
            "root_path", f"{_describe(cert)}: a leaf SPIFFE ID must have a path below the root"
        )
    if not san.critical and len(cert.subject) == 0:
        raise ProfileError(
            "san_not_critical",
            f"{_describe(cert)} has an empty subject, so its SAN extension must be critical",
        )
    basic = cast("x509.Extension[x509.BasicConstraints] | None", by_oid.get(_BASIC_CONSTRAINTS_OID))
    if basic is None:
        raise ProfileError(
            "no_basic_constraints", f"{_describe(cert)} has no basicConstraints extension"
        )
    if basic.value.ca:
        raise ProfileError("ca_leaf", f"{_describe(cert)} is a CA certificate, not a leaf SVID")
    _check_leaf_key_usage(cert, by_oid.get(_KEY_USAGE_OID))
    eku = cast("x509.Extension[x509.ExtendedKeyUsage] | None", by_oid.get(_EXT_KEY_USAGE_OID))
    if eku is None:
        return spiffe_id
    if (
        ExtendedKeyUsageOID.SERVER_AUTH not in eku.value
        or ExtendedKeyUsageOID.CLIENT_AUTH not in eku.value
    ):
        raise ProfileError(
            "bad_ext_key_usage",
            f"{_describe(cert)}: extendedKeyUsage must include both serverAuth and clientAuth",
        )
    return spiffe_id


def _check_leaf_key_usage(
    cert: x509.Certificate, ext: x509.Extension[x509.ExtensionType] | None
) -> None:
    if ext is None:
        raise ProfileError("bad_key_usage", f"{_describe(cert)} has no keyUsage")
    usage = cast(x509.KeyUsage, ext.value)
    if not ext.critical:
        problem = "keyUsage must be critical"
    elif not usage.digital_signature:
        problem = "keyUsage must include digitalSignature"
    elif usage.key_cert_sign or usage.crl_sign:
        problem = "keyUsage of a leaf must not include keyCertSign or cRLSign"
    else:
        return
    raise ProfileError("bad_key_usage", f"{_describe(cert)}: {problem}")


def _check_issuer_basics(cert: x509.Certificate, exts: x509.Extensions) -> x509.BasicConstraints:
    """What any certificate that signs others must have: CA=true and keyCertSign."""
    _check_critical_extensions(cert, exts)
    try:
        basic = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise ProfileError("not_ca", f"{_describe(cert)} is not a CA (basicConstraints cA=true)")
    try:
        usage = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.key_cert_sign:
        raise ProfileError("bad_key_usage", f"{_describe(cert)}: CA keyUsage lacks keyCertSign")
    return basic


def validate_signing_cert(cert: x509.Certificate) -> None:
    """Check digest 2.3 for a CA certificate Tally signs with or publishes."""
    with _malformed_is_profile_error():
        _validate_signing_cert(cert)


def _validate_signing_cert(cert: x509.Certificate) -> None:
    exts = _extensions(cert)
    _check_issuer_basics(cert, exts)
    if not exts.get_extension_for_class(x509.KeyUsage).critical:
        raise ProfileError("bad_key_usage", f"{_describe(cert)}: CA keyUsage must be critical")
    try:
        san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.lower().startswith("spiffe:"):
            continue
        try:
            spiffe_id = SpiffeId.parse(uri)
        except SpiffeIdError as exc:
            raise ProfileError("bad_spiffe_id", f"{_describe(cert)}: {exc}") from exc
        if not spiffe_id.is_root:
            raise ProfileError(
                "ca_path", f"{_describe(cert)}: a CA's SPIFFE ID must not have a path"
            )


def _check_time(cert: x509.Certificate, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise ProfileError(
            "not_yet_valid",
            f"{_describe(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}",
        )
    if now > cert.not_valid_after_utc:
        raise ProfileError(
            "expired", f"{_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}"
        )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, TypeError, *PARSE_ERRORS):
        return False
    return True


def _claims_key_of(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if `cert`'s AKI names `issuer`'s key: a failed signature is then tampering."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except (x509.ExtensionNotFound, *PARSE_ERRORS):
        return False
    return aki.key_identifier is not None and aki.key_identifier == ski.digest


def _find_issuer(
    cert: x509.Certificate, candidates: Sequence[x509.Certificate], trust_domain: TrustDomain
) -> x509.Certificate:
    named = [c for c in candidates if c.subject == cert.issuer]
    for candidate in named:
        if _signed_by(cert, candidate):
            return candidate
    if any(_claims_key_of(cert, candidate) for candidate in named):
        raise ProfileError("bad_signature", f"{_describe(cert)} has an invalid signature")
    raise ProfileError(
        "untrusted",
        f"{_describe(cert)} was issued by {cert.issuer.rfc4514_string()!r}, which is neither "
        f"in the presented chain nor an authority of the bundle for {trust_domain}",
    )


def verify_chain(
    chain: Sequence[x509.Certificate],
    trust_domain: TrustDomain,
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> SpiffeId:
    """Full digest 2.4 validation of a presented chain (leaf first) against one trust domain.

    ``roots`` are the X.509 authorities of that trust domain's bundle.
    """
    if not chain:
        raise ProfileError("empty_chain", "no certificate was presented")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise ProfileError(
            "chain_too_long", f"{len(chain)} certificates presented, at most {MAX_CHAIN_LENGTH}"
        )
    if now.tzinfo is None or now.utcoffset() is None:
        raise ProfileError("bad_time", f"now {now!r} must be timezone-aware (UTC)")
    with _malformed_is_profile_error():
        return _verify_chain(chain, trust_domain, roots, now)


def _verify_chain(
    chain: Sequence[x509.Certificate],
    trust_domain: TrustDomain,
    anchors: Sequence[x509.Certificate],
    now: datetime,
) -> SpiffeId:
    leaf = chain[0]
    spiffe_id = validate_leaf(leaf)
    if spiffe_id.trust_domain != trust_domain:
        raise ProfileError(
            "wrong_trust_domain",
            f"{_describe(leaf)} is in trust domain {spiffe_id.trust_domain}, "
            f"but the bundle is for {trust_domain}",
        )
    _check_time(leaf, now)
    spare = list(chain[1:])
    current = leaf
    intermediates = 0  # CA certificates between the leaf and the current issuer
    while True:
        issuer = _find_issuer(current, [*anchors, *spare], trust_domain)
        basic = _check_issuer_basics(issuer, _extensions(issuer))
        _check_time(issuer, now)
        if basic.path_length is not None and intermediates > basic.path_length:
            raise ProfileError(
                "path_len",
                f"{_describe(issuer)} allows {basic.path_length} intermediate CA(s) below it, "
                f"the chain has {intermediates}",
            )
        if issuer in anchors:
            return spiffe_id
        spare.remove(issuer)
        current = issuer
        intermediates += 1


# --- CSRs ------------------------------------------------------------


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Load a CSR (PEM or DER) and check it; see `csr_public_key`."""
    return _load_csr(data)[0]


def csr_public_key(data: bytes) -> CertificatePublicKeyTypes:
    """The proven public key of a CSR: all the CA takes from it (the issuance hot path)."""
    return _load_csr(data)[1]


def _load_csr(data: bytes) -> tuple[x509.CertificateSigningRequest, CertificatePublicKeyTypes]:
    """Load a CSR (PEM or DER) whose only use is to carry a proven public key.

    The CA ignores the CSR's subject, SANs and extensions: which SPIFFE ID a key
    gets is decided by the registration entry the caller matched, never by what
    the requester asks for, so a compromised workload cannot request another
    identity. The signature is still checked, because it proves the requester
    holds the private key.
    """
    if len(data) > MAX_CSR_BYTES:
        raise ProfileError("bad_csr", f"CSR is {len(data)} bytes, at most {MAX_CSR_BYTES}")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
        public_key = csr.public_key()
    except (*PARSE_ERRORS, TypeError) as exc:
        raise ProfileError("bad_csr", f"not a PKCS#10 CSR in PEM or DER: {exc}") from exc
    if isinstance(public_key, ec.EllipticCurvePublicKey) and (
        public_key.curve.name not in CSR_CURVES
    ):
        raise ProfileError(
            "bad_csr", f"CSR key is on curve {public_key.curve.name}, expected P-256 or P-384"
        )
    try:
        _check_public_key(public_key, "CSR")
        valid = _csr_signature_valid(csr, public_key)
    except ProfileError as exc:
        raise ProfileError("bad_csr", exc.message) from exc
    except (*PARSE_ERRORS, TypeError) as exc:
        raise ProfileError("bad_csr", f"CSR signature cannot be checked: {exc}") from exc
    if not valid:
        raise ProfileError("bad_csr", "CSR signature is invalid (proof of key possession failed)")
    return csr, public_key


def _csr_signature_valid(
    csr: x509.CertificateSigningRequest, public_key: CertificatePublicKeyTypes
) -> bool:
    """Whether the CSR is signed by its own key: ``is_signature_valid``, with one key load.

    ``is_signature_valid`` loads the CSR's key again; for an ECDSA signature by an EC
    key (what agents send) the key already loaded checks the same signature over the
    same bytes with the same digest (the CA's hot path, `csr_public_key`).  A signature
    algorithm that does not fit the key fails here as it does there.
    """
    params = csr.signature_algorithm_parameters
    if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA)):
        return csr.is_signature_valid
    try:
        public_key.verify(csr.signature, csr.tbs_certrequest_bytes, params)
    except InvalidSignature:
        return False
    return True
