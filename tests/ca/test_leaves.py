"""`ca.leaves`: what a batch's jobs become, and rule 3, that no certificate outside the
SPIFFE profile ever leaves `sign_jobs`, whatever the signer produced."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from ca.leaves import LeafJob, NotSigned, SignedLeaf, sign_jobs
from tally.spiffe import x509profile
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tests.ca.conftest import make_csr

NOW = datetime(2026, 12, 7, tzinfo=UTC)
TD = TrustDomain.parse("example.org")


@pytest.fixture(scope="module")
def issuer() -> tuple[x509.Certificate, x509profile.SigningKey]:
    key = x509profile.generate_key()
    root = x509profile.build_root(key, TD, NOW - timedelta(days=1), NOW + timedelta(days=10))
    return root, key


def job(key: ec.EllipticCurvePrivateKey, i: int, csr: str | None = None) -> LeafJob:
    return LeafJob(
        make_csr(key) if csr is None else csr,
        f"spiffe://example.org/w{i}",
        x509profile.new_serial(),
        NOW - timedelta(seconds=30),
        NOW + timedelta(hours=1),
        (f"w{i}.example.org",),
    )


def test_each_job_becomes_the_leaf_it_describes_in_der_and_pem(issuer) -> None:
    cert, key = issuer
    keys = [x509profile.generate_key() for _ in range(3)]
    batch = [job(k, i) for i, k in enumerate(keys)]
    batch.insert(1, job(keys[0], 9, csr="not a CSR"))
    answers = sign_jobs(x509profile.LeafSigner(cert, key), batch)
    assert isinstance(answers[1], NotSigned) and answers[1].code == "bad_csr"
    del answers[1], batch[1]
    for answer, want, k in zip(answers, batch, keys, strict=True):
        assert isinstance(answer, SignedLeaf)
        leaf = x509.load_der_x509_certificate(answer.der)
        assert answer.pem == leaf.public_bytes(Encoding.PEM)
        assert x509profile.validate_leaf(leaf) == SpiffeId.parse(want.spiffe_id)
        assert leaf.public_key() == k.public_key()
        assert leaf.serial_number == want.serial
        assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (
            want.not_before,
            want.not_after,
        )
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == list(want.dns_names)
        leaf.verify_directly_issued_by(cert)


def test_a_certificate_outside_the_profile_never_leaves(issuer, monkeypatch) -> None:
    """Rule 3: whatever the signer builds goes through the profile validator first.

    The signer is made to return a CA certificate (as a bug in building leaves
    might): `sign_jobs` refuses the whole batch rather than return it.
    """
    cert, key = issuer
    not_a_leaf = x509profile.build_intermediate(
        x509profile.generate_key().public_key(),
        TD,
        cert,
        key,
        NOW,
        NOW + timedelta(hours=1),
    )
    monkeypatch.setattr(x509profile.LeafSigner, "sign", lambda *_a, **_k: not_a_leaf)
    with pytest.raises(x509profile.ProfileError):
        sign_jobs(x509profile.LeafSigner(cert, key), [job(x509profile.generate_key(), 1)])
