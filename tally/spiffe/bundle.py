"""X.509 trust bundles: the CA certificates a trust domain's SVIDs must chain to.

Rules:

1. A bundle always travels with the trust domain it belongs to, because the
   formats do not name it (digest 4.1); bundles of different trust domains are
   never merged.
2. Three encodings, one value: JWKS (federation and `tally ca bundle show`),
   PEM (files operators hand to agents) and concatenated DER (the Workload
   API). Each round-trips to an equal `Bundle`. Certificates compare by DER;
   order is kept (the first authority is the one the CA currently signs under)
   and duplicates are dropped.
3. Strict like go-spiffe when reading JWKS: duplicate JSON keys, a missing
   `keys` member, an `x509-svid` entry without exactly one certificate, a key
   that does not match its certificate or a non-CA certificate fail the whole
   bundle; entries with an unknown `use` or `kty`, without `x5c`, and
   `jwt-svid` keys (not part of an X.509 bundle) are skipped as the spec says.
4. Every authority is a CA certificate with a key JWKS can express (EC P-256,
   P-384, P-521, RSA or Ed25519), checked when the `Bundle` is built, so all
   three encodings always work.
5. An empty bundle is legal in JWKS and DER (the spec's "every key revoked")
   but not in PEM, which is typed by operators, where empty means a mistake.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tally.spiffe import strict_json
from tally.spiffe.pem import chain_from_der, chain_from_pem, chain_to_pem
from tally.spiffe.spiffeid import TrustDomain
from tally.spiffe.x509profile import PARSE_ERRORS, ProfileError

MAX_JWKS_BYTES = 1024 * 1024
MAX_SEQUENCE = 2**64 - 1  # go-spiffe reads spiffe_sequence into a uint64
MAX_REFRESH_HINT = 2**63 - 1  # and spiffe_refresh_hint into an int64

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class BundleError(ValueError):
    """A trust bundle that cannot be read or would not be a valid bundle."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_int(value: int) -> str:
    return _b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def public_key_jwk(key: object) -> dict[str, str]:
    """The RFC 7518 public parameters of a key (without `use`, `kid` or `x5c`)."""
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        size = (key.curve.key_size + 7) // 8
        numbers = key.public_numbers()
        return {
            "kty": "EC",
            "crv": _CURVES[key.curve.name],
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {"kty": "RSA", "n": _b64url_int(rsa_numbers.n), "e": _b64url_int(rsa_numbers.e)}
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    raise BundleError(
        f"unsupported authority key {type(key).__name__}: "
        "expected EC P-256/P-384/P-521, RSA or Ed25519"
    )


def _describe(cert: x509.Certificate) -> str:
    return f"certificate {cert.subject.rfc4514_string()!r} (serial {cert.serial_number:x})"


def _check_authority(cert: x509.Certificate) -> None:
    if not isinstance(cert, x509.Certificate):
        raise TypeError(f"bundle authorities must be x509.Certificate, got {cert!r}")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = basic.ca
        public_key_jwk(cert.public_key())
    except x509.ExtensionNotFound:
        is_ca = False
    except PARSE_ERRORS as exc:
        raise BundleError(f"{_describe(cert)} cannot be used as an authority: {exc}") from exc
    if not is_ca:
        raise BundleError(f"{_describe(cert)} is not a CA certificate (basicConstraints cA=true)")


def _check_int(value: object, name: str, maximum: int) -> int:
    # bool is an int in Python but `true` is not a number in JSON.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise BundleError(f"{name} must be an integer from 0 to {maximum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Bundle:
    """The X.509 authorities of one trust domain, with the bundle's version and poll hint."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    sequence: int = 0
    refresh_hint: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(f"trust_domain must be a TrustDomain, got {self.trust_domain!r}")
        unique: dict[bytes, x509.Certificate] = {}
        for cert in self.x509_authorities:
            _check_authority(cert)
            unique.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
        object.__setattr__(self, "x509_authorities", tuple(unique.values()))
        _check_int(self.sequence, "spiffe_sequence", MAX_SEQUENCE)
        if self.refresh_hint is not None:
            _check_int(self.refresh_hint, "spiffe_refresh_hint", MAX_REFRESH_HINT)

    def fingerprints(self) -> frozenset[bytes]:
        """SHA-256 of each authority's DER, for pinning and quick "did it change" checks."""
        return frozenset(
            hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
            for cert in self.x509_authorities
        )

    # --- JWKS ---------------------------------------------------------------------------

    def to_jwks(self) -> bytes:
        keys = []
        for cert in self.x509_authorities:
            der = cert.public_bytes(serialization.Encoding.DER)
            keys.append(
                {
                    "use": "x509-svid",
                    **public_key_jwk(cert.public_key()),
                    "x5c": [base64.b64encode(der).decode("ascii")],
                }
            )
        document: dict[str, Any] = {"keys": keys, "spiffe_sequence": self.sequence}
        if self.refresh_hint is not None:
            document["spiffe_refresh_hint"] = self.refresh_hint
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"

    @classmethod
    def from_jwks(cls, td: TrustDomain, data: bytes) -> Bundle:
        where = f"bundle for {td}"
        document = _load_json(data, where)
        if not isinstance(document, dict):
            raise BundleError(f"{where}: expected a JSON object (a JWK Set)")
        if "keys" not in document:
            raise BundleError(f"{where}: the required 'keys' member is missing")
        keys = document["keys"]
        if not isinstance(keys, list):
            raise BundleError(f"{where}: 'keys' must be a JSON array")
        try:
            sequence = _check_int(
                document.get("spiffe_sequence", 0), "spiffe_sequence", MAX_SEQUENCE
            )
            hint = document.get("spiffe_refresh_hint")
            if hint is not None:
                hint = _check_int(hint, "spiffe_refresh_hint", MAX_REFRESH_HINT)
        except BundleError as exc:
            raise BundleError(f"{where}: {exc}") from None
        authorities = []
        for number, jwk in enumerate(keys, 1):
            cert = _authority_from_jwk(jwk, f"{where}, key {number}")
            if cert is not None:
                authorities.append(cert)
        return cls(td, tuple(authorities), sequence, hint)

    # --- PEM and DER --------------------------------------------------------------------

    def to_pem(self) -> bytes:
        return chain_to_pem(self.x509_authorities)

    @classmethod
    def from_pem(cls, td: TrustDomain, data: bytes, sequence: int = 0) -> Bundle:
        try:
            certs = chain_from_pem(data)
        except ProfileError as exc:
            raise BundleError(f"bundle for {td}: {exc.message}") from exc
        return cls(td, tuple(certs), sequence)

    def to_der(self) -> bytes:
        """Concatenated DER certificates, the Workload API's `bundle` encoding."""
        return b"".join(
            cert.public_bytes(serialization.Encoding.DER) for cert in self.x509_authorities
        )

    @classmethod
    def from_der(cls, td: TrustDomain, data: bytes) -> Bundle:
        if not data:
            return cls(td, ())
        try:
            certs = chain_from_der(data)
        except ProfileError as exc:
            raise BundleError(f"bundle for {td}: {exc.message}") from exc
        return cls(td, tuple(certs))


def _load_json(data: bytes, where: str) -> object:
    if len(data) > MAX_JWKS_BYTES:
        raise BundleError(f"{where}: {len(data)} bytes, at most {MAX_JWKS_BYTES}")
    try:
        return strict_json.loads(data)
    except ValueError as exc:
        raise BundleError(f"{where}: not valid JSON: {exc}") from None


def _decode_b64url(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except ValueError:
        return None


def _same_key(jwk: dict[str, Any], expected: dict[str, str]) -> bool:
    """Compare key parameters by value, tolerating leading zero bytes in `n`/`e`."""
    for name, want in expected.items():
        if name in ("kty", "crv"):
            if jwk.get(name) != want:
                return False
            continue
        got = _decode_b64url(jwk.get(name))
        if got is None or int.from_bytes(got, "big") != int.from_bytes(
            _decode_b64url(want) or b"", "big"
        ):
            return False
    return True


def _authority_from_jwk(jwk: object, where: str) -> x509.Certificate | None:
    if not isinstance(jwk, dict):
        raise BundleError(f"{where}: expected a JSON object")
    if jwk.get("use") != "x509-svid" or jwk.get("kty") not in ("EC", "RSA", "OKP"):
        return None  # jwt-svid, wit-svid, unknown or missing: not ours to read
    x5c = jwk.get("x5c")
    if x5c is None or x5c == []:
        return None
    if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
        raise BundleError(f"{where}: an x509-svid entry must hold exactly one certificate in x5c")
    try:
        der = base64.b64decode(x5c[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except PARSE_ERRORS as exc:
        raise BundleError(f"{where}: x5c is not a base64 DER certificate: {exc}") from None
    try:
        _check_authority(cert)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if not _same_key(jwk, public_key_jwk(cert.public_key())):
        raise BundleError(f"{where}: the key parameters do not match the x5c certificate")
    return cert
