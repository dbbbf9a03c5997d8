"""How a TLS handshake judges its peer, and the errors a refused or failed handshake ends with.

Rules:

1. Authorization happens *inside* the handshake.  OpenSSL first checks the peer's
   chain against the context's roots; when that succeeds it calls us once per chain
   depth, root first, and at depth 0 we run the caller's ``PeerVerifier`` on the
   chain we recorded.  A verifier that raises :class:`PeerRejected` makes OpenSSL
   fail the handshake itself, so a refused peer never gets a usable connection.
   When OpenSSL finds a fault above the leaf (an unknown issuer, say) we record
   the verdict but let it walk on down to the leaf and refuse there, so that
   every refusal names the SPIFFE ID the peer claimed (``PeerRejected.peer_id``):
   that is what an operator searches the logs for.
   The verdict is kept on the connection (pyOpenSSL's own error capture lives on the
   shared ``Context`` and would leak between concurrent handshakes) and raised by
   :meth:`tally.tls.stream.TLSStream.do_handshake` once OpenSSL gives up.
2. Refusals carry a short fixed reason for logs and metrics; OpenSSL's detail goes
   in the message, and a peer only ever sees a TLS alert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from cryptography import x509
from OpenSSL import SSL, crypto

# OpenSSL's own wording for a verification error code (X509_verify_cert_error_string)
# is reachable only through pyOpenSSL's binding; its X509StoreContextError uses the same.
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tally.spiffe import authz

# The one SPIFFE ID a leaf claims, read leniently (any leaf, even one we refuse).
from tally.spiffe.authz import _claimed_id as claimed_id
from tally.spiffe.spiffeid import SpiffeId, TrustDomain

log = logging.getLogger("tally.tls")

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h (part of the ABI, never renumbered).
_NOT_YET_VALID = 9
_EXPIRED = 10
_UNTRUSTED = frozenset(
    {
        2,  # unable to get issuer certificate
        18,  # self-signed leaf
        19,  # self-signed certificate in chain
        20,  # unable to get local issuer certificate
        21,  # unable to verify the first certificate
        27,  # certificate not trusted
    }
)
# OpenSSL's wording when the two sides share no protocol version (a TLS 1.2-only peer).
_VERSION_ERRORS = (
    "unsupported protocol",
    "no protocols available",
    "wrong version number",
    "protocol version",
)


class PeerRejected(Exception):
    """The peer was refused; ``reason`` is a short fixed word for logs and metrics.

    ``peer_id`` is the SPIFFE ID the peer's leaf claimed, when it had one, even if
    the refusal came before anyone trusted that claim (an expired or unknown
    certificate): a log line that names who knocked is worth more than one that
    does not.  Peers only ever see a TLS alert; the message is for our own logs.
    """

    def __init__(self, reason: str, message: str = "", peer_id: SpiffeId | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.peer_id = peer_id


class TLSError(Exception):
    """The TLS protocol failed (bad alert, unsupported version, corrupt record...).

    ``reason`` is set, to a fixed word like :attr:`PeerRejected.reason`, when the peer
    could never have got through (it speaks no TLS 1.3, or no TLS at all): servers
    log and count those as refusals rather than as failures.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


PeerVerifier = Callable[[list[x509.Certificate]], object]
"""Called with the verified chain, leaf first and ending in the trusted root.

Raise :class:`PeerRejected` to refuse the peer; the return value becomes
:attr:`TLSStream.peer_identity`.  Runs inside OpenSSL's callback: keep it fast, and
pure: its answer may depend on the chain only, because the context remembers it for
resumed handshakes with the same leaf.  Build a new context when the rules change.
"""


def _x509_error_text(code: int) -> str:
    raw = _lib.X509_verify_cert_error_string(code)
    return str(_ffi.string(raw).decode("ascii", "replace")) if raw != _ffi.NULL else str(code)


def rejection_for(code: int, text: str, depth: int, cert: x509.Certificate | None) -> PeerRejected:
    """Map an X.509 verification error to a fixed reason; the message keeps OpenSSL's detail."""
    if code == _EXPIRED:
        reason = "expired"
    elif code == _NOT_YET_VALID:
        reason = "not_yet_valid"
    elif code in _UNTRUSTED:
        reason = "untrusted"
    else:
        reason = f"invalid_chain: {text}"
    who = cert.subject.rfc4514_string() if cert is not None else "?"
    return PeerRejected(reason, f"{text} (certificate at depth {depth}, subject {who!r})")


def failure_reason(text: str) -> str | None:
    """The refusal reason for a handshake this peer could never pass, else None."""
    if "http request" in text:
        return "not_tls"
    if any(marker in text for marker in _VERSION_ERRORS):
        return "tls_version"
    return None


def run_verifier(verifier: PeerVerifier | None, chain: list[x509.Certificate]) -> object:
    """Run the caller's hook; a bug in it refuses the peer loudly instead of escaping into C."""
    if verifier is None:
        return None
    try:
        return verifier(chain)
    except PeerRejected:
        raise
    except Exception as exc:
        log.exception("peer verifier crashed; refusing the peer")
        raise PeerRejected("verifier_error", f"peer verifier raised {type(exc).__name__}") from exc


class PeerCheck:
    """Per-connection verification state, reachable from OpenSSL's callback via app data."""

    __slots__ = ("by_depth", "chain", "identity", "ran", "rejection", "verifier")

    def __init__(self, verifier: PeerVerifier | None) -> None:
        self.verifier = verifier
        self.by_depth: dict[int, x509.Certificate] = {}
        self.chain: list[x509.Certificate] | None = None
        self.identity: object = None
        self.rejection: PeerRejected | None = None
        self.ran = False

    def release(self) -> None:
        """Drop the certificates once the handshake has taken what it needs from them:
        the check lives as long as its connection (OpenSSL's app data)."""
        self.by_depth = {}
        self.chain = None

    def on_verify(self, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        self.ran = True
        current = cert.to_cryptography()
        self.by_depth[depth] = current
        if not ok and self.rejection is None:
            self.rejection = rejection_for(code, _x509_error_text(code), depth, current)
        if self.rejection is not None:
            if depth > 0:
                return True  # walk on to the leaf, which is refused (rule 1)
            if self.rejection.peer_id is None:
                self.rejection.peer_id = claimed_id(current)
            return False
        if depth != 0 or self.chain is not None:
            return True
        chain = [self.by_depth[d] for d in sorted(self.by_depth)]
        try:
            self.identity = run_verifier(self.verifier, chain)
        except PeerRejected as exc:
            self.rejection = exc
            return False
        self.chain = chain
        return True


def verify_callback(
    conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int
) -> bool:
    check = conn.get_app_data()
    if not isinstance(check, PeerCheck):  # a Connection we did not make: refuse
        return False
    return check.on_verify(cert, code, depth, ok)


def reverify(
    store: crypto.X509Store,
    leaf: x509.Certificate,
    presented: list[x509.Certificate],
    verifier: PeerVerifier | None,
) -> tuple[list[x509.Certificate], object]:
    """Check a resumed session's stored chain against ``store`` now, then run the verifier."""
    untrusted = [crypto.X509.from_cryptography(c) for c in presented]
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), untrusted)
    try:
        verified = [c.to_cryptography() for c in ctx.get_verified_chain()]
    except crypto.X509StoreContextError as exc:
        code, depth, text = exc.errors[0], exc.errors[1], str(exc.errors[2])
        cert = exc.certificate.to_cryptography() if exc.certificate is not None else None
        rejection = rejection_for(int(code), text, int(depth), cert)
        rejection.peer_id = claimed_id(leaf)
        raise rejection from exc
    return verified, run_verifier(verifier, verified)


def authz_verifier(
    trusted: Mapping[TrustDomain, frozenset[bytes]], policy: authz.Policy
) -> PeerVerifier:
    """A verifier that runs `authz.check_chain`: its refusal becomes :class:`PeerRejected`."""

    def verify(chain: list[x509.Certificate]) -> SpiffeId:
        try:
            return authz.check_chain(chain, trusted, policy)
        except authz.Refused as exc:
            raise PeerRejected(exc.reason, str(exc), exc.peer_id) from exc

    return verify
