"""PEM and DER encodings of certificate chains and private keys, as Tally reads and writes them.

Rules:

1. Strict in what is read: a chain in PEM holds only CERTIFICATE blocks (a key
   pasted in by mistake is an error, not ignored), concatenated DER must split
   exactly into certificates, and a private key must be one Tally can sign with.
2. Private keys are written unencrypted as PKCS#8: DER for the Workload API (the
   only encoding it and py-spiffe accept), PEM for files, which their mode guards.
3. Failures are `ProfileError` with the reasons "bad_pem", "bad_der" or "bad_key",
   like every other certificate fault (`tally.spiffe.x509profile` rule 5).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tally.spiffe.x509profile import PARSE_ERRORS, ProfileError, SigningKey

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def chain_to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(der_to_pem(cert.public_bytes(serialization.Encoding.DER)) for cert in certs)


def der_to_pem(der: bytes) -> bytes:
    """One certificate's DER as a PEM block, byte for byte what cryptography writes.

    Wrapping DER that is already in hand skips the second encoding of the certificate
    that ``public_bytes(Encoding.PEM)`` does: the CA's leaves need both forms.
    """
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def chain_from_pem(data: bytes) -> list[x509.Certificate]:
    """Read CERTIFICATE blocks; any other block (a key pasted in by mistake) is an error."""
    blocks = list(_PEM_BLOCK.finditer(data))
    if len(blocks) != data.count(b"-----BEGIN"):
        raise ProfileError("bad_pem", "malformed PEM: a BEGIN line has no matching END line")
    if not blocks:
        raise ProfileError("bad_pem", "no PEM CERTIFICATE block found")
    certs = []
    for number, block in enumerate(blocks, 1):
        label = block.group(1).decode("ascii")
        if label != "CERTIFICATE":
            raise ProfileError(
                "bad_pem", f"PEM block {number} is {label!r}, expected only 'CERTIFICATE' blocks"
            )
        try:
            certs.append(x509.load_pem_x509_certificate(block.group(0)))
        except PARSE_ERRORS as exc:
            raise ProfileError(
                "bad_pem", f"PEM block {number} is not a certificate: {exc}"
            ) from exc
    return certs


def chain_to_der(certs: Sequence[x509.Certificate]) -> bytes:
    """Concatenated DER, the Workload API's encoding of chains and bundles."""
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in certs)


def chain_from_der(data: bytes) -> list[x509.Certificate]:
    """Split concatenated DER certificates (each an ASN.1 SEQUENCE) and load each."""
    if not data:
        raise ProfileError("bad_der", "no DER certificate found")
    certs = []
    offset = 0
    while offset < len(data):
        end = _der_sequence_end(data, offset)
        try:
            certs.append(x509.load_der_x509_certificate(data[offset:end]))
        except PARSE_ERRORS as exc:
            raise ProfileError(
                "bad_der", f"DER certificate {len(certs) + 1} cannot be parsed: {exc}"
            ) from exc
        offset = end
    return certs


def _der_sequence_end(data: bytes, offset: int) -> int:
    """Return where the DER SEQUENCE starting at `offset` ends (definite lengths only)."""
    where = f"DER certificate at byte {offset}"
    if len(data) - offset < 2 or data[offset] != 0x30:
        raise ProfileError("bad_der", f"{where}: expected an ASN.1 SEQUENCE")
    first = data[offset + 1]
    if first < 0x80:
        start, length = offset + 2, first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or offset + 2 + count > len(data):
            raise ProfileError("bad_der", f"{where}: unsupported or truncated length")
        start = offset + 2 + count
        length = int.from_bytes(data[offset + 2 : start], "big")
    if start + length > len(data):
        raise ProfileError("bad_der", f"{where}: truncated ({length} bytes announced)")
    return start + length


def key_to_pkcs8_der(key: SigningKey) -> bytes:
    """PKCS#8 DER, the only private key encoding the Workload API (and py-spiffe) accept."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_to_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes) -> SigningKey:
    """Load an unencrypted PEM private key of a type Tally can sign with."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (*PARSE_ERRORS, TypeError) as exc:
        raise ProfileError("bad_key", f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ProfileError(
            "bad_key", f"unsupported private key {type(key).__name__}: use EC, RSA or Ed25519"
        )
    return key
