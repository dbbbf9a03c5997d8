"""Leaf SVIDs from CSRs: the pure, CPU-heavy half of issuance.

Rules:

1. Nothing here reads the store, the clock or a key file: a `LeafJob` carries
   everything decided about a certificate (its SPIFFE ID, serial and
   lifetime, all chosen by the CA's main process from the registration entry,
   `ca.authority` rule 2), so signing a job gives the same certificate in the
   main process as in a signing worker (`ca.signing_pool`), byte for byte up
   to the signature's randomness.
2. A CSR contributes its proven public key and nothing else; a CSR that does
   not prove its key, or holds a key outside the profile, is `NotSigned` with
   code ``bad_csr`` and the batch goes on.
3. Every certificate signed here has passed the SPIFFE profile validator
   (`ca.authority` rule 3) before it leaves this module: the whole of
   `x509profile.validate_leaf`, on the certificate cryptography parsed from the
   signed DER, not a shortcut over what was asked for.
4. A leaf is encoded once: its DER, and the PEM the agent gets wrapped from that
   DER (`pem.der_to_pem`), both made here, in a signing worker, so the CA's main
   process (the serial part of a batch) only loads the DER back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import SpiffeId


@dataclass(frozen=True)
class NotSigned:
    """Why one request of a batch got no SVID; the rest of the batch goes on."""

    code: str
    message: str


@dataclass(frozen=True)
class LeafJob:
    """One certificate to sign, as the main process decided it; ``csr`` is unread."""

    csr: str
    spiffe_id: str
    serial: int
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class SignedLeaf:
    """A signed, validated leaf: its DER (to load) and PEM (to send) forms."""

    der: bytes
    pem: bytes


def sign_leaf(
    signer: x509profile.LeafSigner,
    public_key: CertificatePublicKeyTypes,
    spiffe_id: SpiffeId,
    not_before: datetime,
    not_after: datetime,
    dns_names: Sequence[str] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """Sign one leaf and hold it to the profile (rule 3)."""
    cert = signer.sign(
        public_key, spiffe_id, not_before, not_after, dns_names=dns_names, serial=serial
    )
    x509profile.validate_leaf(cert)
    return cert


def sign_jobs(
    signer: x509profile.LeafSigner, jobs: Sequence[LeafJob]
) -> list[SignedLeaf | NotSigned]:
    """Check each job's CSR and sign it; one answer per job, in order."""
    out: list[SignedLeaf | NotSigned] = []
    for job in jobs:
        try:
            public_key = x509profile.csr_public_key(job.csr.encode())
        except ValueError as exc:
            out.append(NotSigned("bad_csr", str(exc)))
            continue
        cert = sign_leaf(
            signer,
            public_key,
            SpiffeId.parse(job.spiffe_id),
            job.not_before,
            job.not_after,
            job.dns_names,
            job.serial,
        )
        der = cert.public_bytes(Encoding.DER)
        out.append(SignedLeaf(der, pem.der_to_pem(der)))
    return out
