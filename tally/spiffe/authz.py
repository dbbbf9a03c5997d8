"""Who may talk to whom: the proxy's peer checks, as pure functions of a certificate chain.

Rules:

1. Trust is per trust domain, never pooled.  OpenSSL verifies a peer's chain
   against the roots of *every* trust domain we know (it has one store), so a
   chain it accepts may end in the root of another trust domain than the one
   the leaf claims.  `check_chain` therefore demands that the root the chain
   ended in belongs to the bundle of the trust domain named in the leaf's
   SPIFFE ID; otherwise the CA of ``other.org`` could mint ``example.org``
   identities (digest 2.4: "the bundle of the trust domain of the SVID").
2. The leaf must be an X.509-SVID (`x509profile.validate_leaf`): exactly one
   URI SAN holding a SPIFFE ID with a path, not a CA.  Only then are the
   allow rules consulted.
3. A rule matches whole path segments: ``spiffe://example.org/ns/prod`` as a
   prefix admits ``/ns/prod`` and ``/ns/prod/api`` but not
   ``/ns/production``, so that a prefix can never be widened by naming a
   workload cleverly.  There are no wildcards to get wrong.
4. An empty policy admits nobody.  Refusals carry a short fixed ``reason``
   for logs and metric labels; the message with the detail stays in our logs.
5. Pure: no clock (OpenSSL checked validity), no I/O, no trio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from tally.spiffe.x509profile import ProfileError, validate_leaf


class RuleError(ValueError):
    """An allow rule that cannot be read; the message names it and what was expected."""


class Refused(Exception):
    """A peer that fails the checks; ``peer_id`` is its SPIFFE ID when it had a readable one."""

    def __init__(self, reason: str, message: str, peer_id: SpiffeId | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.peer_id = peer_id


@dataclass(frozen=True)
class Policy:
    """Allow rules, OR'd: an exact ID, a whole trust domain, or an ID path prefix."""

    ids: frozenset[SpiffeId] = frozenset()
    trust_domains: frozenset[TrustDomain] = frozenset()
    path_prefixes: frozenset[SpiffeId] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.ids or self.trust_domains or self.path_prefixes)

    def allows(self, peer: SpiffeId) -> bool:
        if peer in self.ids or peer.trust_domain in self.trust_domains:
            return True
        return any(_under(peer, prefix) for prefix in self.path_prefixes)

    def describe(self) -> list[str]:
        """The rules as an operator wrote them, sorted, for logs."""
        return sorted(
            [f"id={i}" for i in self.ids]
            + [f"trust_domain={td}" for td in self.trust_domains]
            + [f"path_prefix={p}" for p in self.path_prefixes]
        )


def _under(peer: SpiffeId, prefix: SpiffeId) -> bool:
    if peer.trust_domain != prefix.trust_domain:
        return False
    return peer.path == prefix.path or peer.path.startswith(prefix.path + "/")


def parse_policy(
    ids: Iterable[str] = (), trust_domains: Iterable[str] = (), path_prefixes: Iterable[str] = ()
) -> Policy:
    """Read allow rules as given on the command line or in TOML."""
    return Policy(
        frozenset(_rule_id(text, "allowed SPIFFE ID") for text in ids),
        frozenset(_rule_trust_domain(text) for text in trust_domains),
        frozenset(_rule_prefix(text) for text in path_prefixes),
    )


def _rule_id(text: str, what: str) -> SpiffeId:
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise RuleError(f"{what} {text!r}: {exc}") from exc
    if spiffe_id.is_root:
        raise RuleError(
            f"{what} {text!r} names a whole trust domain, which no workload has: "
            "use an allow-trust-domain rule for that"
        )
    return spiffe_id


def _rule_trust_domain(text: str) -> TrustDomain:
    try:
        return TrustDomain.parse(text)
    except SpiffeIdError as exc:
        raise RuleError(f"allowed trust domain {text!r}: {exc}") from exc


def _rule_prefix(text: str) -> SpiffeId:
    if "*" in text:
        raise RuleError(
            f"allowed path prefix {text!r}: there are no wildcards; a prefix such as "
            "spiffe://example.org/ns/prod admits that path and every path below it"
        )
    # "spiffe://td/ns/" reads naturally as a directory; it means the same as "spiffe://td/ns".
    trimmed = text[:-1] if text.endswith("/") and not text.endswith("//") else text
    return _rule_id(trimmed, "allowed path prefix")


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the DER, the same digest `tally.spiffe.bundle.Bundle.fingerprints` keeps."""
    return cert.fingerprint(hashes.SHA256())


def check_chain(
    chain: Sequence[x509.Certificate],
    trusted: Mapping[TrustDomain, frozenset[bytes]],
    policy: Policy,
) -> SpiffeId:
    """Judge a chain OpenSSL already verified (leaf first, ending in the root it trusted).

    ``trusted`` maps each trust domain to the fingerprints of its bundle's roots.
    Returns the peer's SPIFFE ID, or raises :class:`Refused`.
    """
    if not chain:
        raise Refused("no_certificate", "the peer presented no certificate")
    leaf = chain[0]
    try:
        peer = validate_leaf(leaf)
    except ProfileError as exc:
        raise Refused(exc.reason, str(exc), _claimed_id(leaf)) from exc
    roots = trusted.get(peer.trust_domain)
    if roots is None:
        raise Refused(
            "unknown_trust_domain",
            f"{peer}: no bundle for trust domain {peer.trust_domain} is configured",
            peer,
        )
    if fingerprint(chain[-1]) not in roots:
        raise Refused(
            "wrong_trust_domain",
            f"{peer}: the chain ends in root {chain[-1].subject.rfc4514_string()!r}, "
            f"which is not in the bundle of {peer.trust_domain}",
            peer,
        )
    if not policy.allows(peer):
        raise Refused("not_allowed", f"{peer} is not allowed by the allow rules", peer)
    return peer


def _claimed_id(leaf: x509.Certificate) -> SpiffeId | None:
    """The one SPIFFE ID a refused leaf claims, for the log line; None if it has no such ID."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        return SpiffeId.parse(uris[0]) if len(uris) == 1 else None
    except (x509.ExtensionNotFound, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return None
    except ValueError:  # a malformed extension, or a URI that is not a SPIFFE ID
        return None
