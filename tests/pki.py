"""A throwaway PKI for tests, built with Tally's own profile code (one for the suite).

Certificates are minted from real now truncated to whole seconds, because
OpenSSL checks validity against the real clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tally.spiffe import pem, x509profile
from tally.spiffe.bundle import Bundle
from tally.spiffe.spiffeid import SpiffeId, TrustDomain


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class Svid:
    chain: list[x509.Certificate]
    key: x509profile.SigningKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def write(self, directory: Path, bundle: Bundle) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "svid.pem").write_bytes(pem.chain_to_pem(self.chain))
        (directory / "key.pem").write_bytes(pem.key_to_pem(self.key))
        (directory / "bundle.pem").write_bytes(bundle.to_pem())


@dataclass
class Authority:
    """Root -> signing intermediate for one trust domain."""

    td: TrustDomain
    root: x509.Certificate
    root_key: x509profile.SigningKey
    inter: x509.Certificate
    inter_key: x509profile.SigningKey
    issued: list[Svid] = field(default_factory=list)

    @classmethod
    def create(cls, td: str) -> Authority:
        domain = TrustDomain.parse(td)
        t = now()
        root_key = x509profile.generate_key()
        root = x509profile.build_root(
            root_key, domain, t - timedelta(hours=1), t + timedelta(days=1), subject_cn=f"{td} root"
        )
        inter_key = x509profile.generate_key()
        inter = x509profile.build_intermediate(
            inter_key.public_key(),
            domain,
            root,
            root_key,
            t - timedelta(hours=1),
            t + timedelta(days=1),
        )
        return cls(domain, root, root_key, inter, inter_key)

    @property
    def bundle(self) -> Bundle:
        return Bundle(self.td, (self.root,))

    def svid(
        self,
        spiffe_id: str,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Svid:
        t = now()
        key = x509profile.generate_key()
        leaf = x509profile.build_leaf(
            key.public_key(),
            SpiffeId.parse(spiffe_id),
            self.inter,
            self.inter_key,
            not_before or t - timedelta(minutes=5),
            not_after or t + timedelta(hours=1),
        )
        return Svid([leaf, self.inter], key)

    def foreign_svid(self, spiffe_id: str) -> Svid:
        """A leaf claiming any ID (even another trust domain's), signed by this authority."""
        t = now()
        key = x509profile.generate_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.inter.subject)
            .public_key(key.public_key())
            .serial_number(x509profile.new_serial())
            .not_valid_before(t - timedelta(minutes=5))
            .not_valid_after(t + timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_usage(), critical=True)
        )
        return Svid([builder.sign(self.inter_key, hashes.SHA256()), self.inter], key)

    def odd_svid(self, uris: list[str], *, ca: bool = False) -> Svid:
        """A leaf with any number of URI SANs, or a CA flag: things no SVID may be."""
        t = now()
        key = x509profile.generate_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
            .issuer_name(self.inter.subject)
            .public_key(key.public_key())
            .serial_number(x509profile.new_serial())
            .not_valid_before(t - timedelta(minutes=5))
            .not_valid_after(t + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_leaf_usage(), critical=True)
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=False,
            )
        return Svid([builder.sign(self.inter_key, hashes.SHA256()), self.inter], key)


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
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
