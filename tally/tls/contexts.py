"""TLS 1.3 contexts: pyOpenSSL configurations built from in-memory keys, and their caches.

Rules:

1. Private keys never touch disk.  The stdlib ``ssl`` module loads keys only from
   files, so contexts are built with pyOpenSSL from ``cryptography`` objects.
2. TLS 1.3 only, in both directions.  Nothing here negotiates anything older.
3. A context is never mutated once built.  Rotating a certificate means building a
   new :class:`TLSContext` and handing the new reference to the next handshake;
   connections already up keep the context they started with (DESIGN "hot swap").

Resumption.  Servers hand out TLS 1.3 session tickets (stateful ones: the server's
session cache keeps the client's chain) and client contexts keep the last session
per server name, so a reconnect can skip certificate work.  A resumed
handshake carries no certificates, so OpenSSL's verify callback does not run; the
peer must still be judged by this context.  A context remembers the verdict it
reached on each leaf (by its exact DER) until the earliest expiry on the verified
chain, and a resumed handshake with that leaf takes the verdict; otherwise the
chain stored in the session is checked against the context's roots again (at the
current time, so an expired certificate is refused) and the verifier reruns.
The verdict depends only on the leaf, the context's roots and verifier (all
fixed) and the time (the expiry bound), so remembering it changes nothing but
the cost.  Sessions and verdicts never cross contexts: a rotation or a reload
of the allow rules starts with empty caches.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL, crypto

# Key exchange groups and two context flags are reachable only through pyOpenSSL's binding.
from OpenSSL._util import lib as _lib

from tally.tls.verify import PeerCheck, PeerRejected, PeerVerifier, reverify, verify_callback

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
ClientAuth = Literal["none", "optional", "required"]

CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
"""TLS 1.3 suites, best first: the order of Go's crypto/tls and BoringSSL (so of SPIRE,
ghostunnel and Envoy) on CPUs with AES instructions.  AES-128-GCM runs 10 AES rounds per
block where OpenSSL's first choice, AES-256-GCM, runs 14, and its key schedule hashes with
SHA-256, which current x86 and ARM CPUs compute in hardware.  128-bit keys are not a
connection's weak point; AES-256 stays second for peers that prefer it."""
GROUPS = "X25519MLKEM768:X25519:P-256"
"""Key exchange groups by default, best first (the proxy's ``tls_groups`` changes them).

A client sends a key share for the first only: the post-quantum hybrid, which Tally,
Go >= 1.24 and OpenSSL >= 3.5 peers all accept.  OpenSSL's default sends a second share,
plain X25519, which costs a client about a tenth of a resumed handshake's instructions
and is only used by peers without the hybrid; those now ask for X25519 with a
HelloRetryRequest, one round trip more, and get it."""
RECORD_SIZE = 1 << 14
"""TLS plaintext records are at most 16 KiB: OpenSSL returns one per read."""
SESSION_TIMEOUT_S = 300
"""How long a server honours a session ticket; clients keep at most this long too."""
_CLIENT_SESSIONS_MAX = 64
_VERIFIED_MAX = 4096
# SSL_MODE_NO_AUTO_CHAIN from ssl.h, which pyOpenSSL does not export: without it OpenSSL
# completes a leaf-only chain from the trust store and sends our roots along with it.
_MODE_NO_AUTO_CHAIN = 0x8


@dataclass(frozen=True, slots=True)
class _Verified:
    """A peer's chain as presented, what the verifier said, and until when that holds."""

    chain: tuple[x509.Certificate, ...]
    identity: object
    valid_until: float  # the earliest not_after on the verified chain, as a Unix time


class TLSContext:
    """An immutable TLS 1.3 configuration: our chain and key, the roots we trust, the verifier.

    Build one with :func:`server_context` or :func:`client_context`.  The only state
    that changes after construction is the client's session cache, which is a cache:
    losing it costs a full handshake, never correctness.
    """

    __slots__ = ("_client_auth", "_sessions", "_ssl", "_verified", "_verifier", "server_side")

    def __init__(
        self,
        ssl_context: SSL.Context,
        *,
        server_side: bool,
        client_auth: ClientAuth,
        verifier: PeerVerifier | None,
    ) -> None:
        self._ssl = ssl_context
        self.server_side = server_side
        self._client_auth = client_auth
        self._verifier = verifier
        self._sessions: OrderedDict[str, SSL.Session] = OrderedDict()
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    @property
    def client_auth(self) -> ClientAuth:
        return self._client_auth

    def _new_connection(
        self, sock: trio.socket.SocketType, server_hostname: str | None
    ) -> tuple[SSL.Connection, PeerCheck, bool]:
        """A fresh OpenSSL connection on `sock`; the flag says a session was offered."""
        # pyOpenSSL only asks the socket for its fileno(); trio's socket has one.
        conn = SSL.Connection(self._ssl, cast("socket.socket", sock))
        check = PeerCheck(self._verifier)
        conn.set_app_data(check)
        session = None
        if self.server_side:
            conn.set_accept_state()
        else:
            if server_hostname is not None:
                conn.set_tlsext_host_name(server_hostname.encode("idna"))
            session = self._sessions.get(server_hostname or "")
            if session is not None:
                conn.set_session(session)
            conn.set_connect_state()
        return conn, check, session is not None

    def _remember_session(self, server_hostname: str | None, session: SSL.Session) -> None:
        key = server_hostname or ""
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > _CLIENT_SESSIONS_MAX:
            self._sessions.popitem(last=False)

    def _forget_session(self, server_hostname: str | None) -> None:
        self._sessions.pop(server_hostname or "", None)

    def _remember_verified(
        self,
        leaf_der: bytes,
        chain: list[x509.Certificate],
        identity: object,
        verified: list[x509.Certificate],
    ) -> list[x509.Certificate]:
        """Remember a verdict; returns the chain to keep, the one remembered before when
        the peer presented the same certificates (so its connections share them)."""
        until = min(c.not_valid_after_utc for c in verified).timestamp()
        known = self._verified.get(leaf_der)
        kept = known.chain if known is not None and known.chain == tuple(chain) else tuple(chain)
        self._verified[leaf_der] = _Verified(kept, identity, until)
        self._verified.move_to_end(leaf_der)
        while len(self._verified) > _VERIFIED_MAX:
            self._verified.popitem(last=False)
        return list(kept)

    def _recall_verified(self, leaf_der: bytes) -> _Verified | None:
        """A verdict this context reached on the same leaf, while its chain is still valid."""
        known = self._verified.get(leaf_der)
        if known is None:
            return None
        if time.time() >= known.valid_until:
            del self._verified[leaf_der]
            return None
        return known

    def _reverify(
        self, leaf: x509.Certificate, presented: list[x509.Certificate]
    ) -> tuple[list[x509.Certificate], object]:
        """Check a resumed session's stored chain against our roots now, then run the verifier."""
        store = self._ssl.get_cert_store()
        if store is None:  # pragma: no cover - OpenSSL always gives a context a store
            raise PeerRejected("untrusted", "context has no certificate store")
        return reverify(store, leaf, presented, self._verifier)


def set_groups(ctx: SSL.Context, groups: str) -> None:
    """Set the key exchange groups, colon-separated and best first; ValueError names a bad one."""
    # pyOpenSSL has no call for this; its binding has (X25519MLKEM768 needs OpenSSL >= 3.5).
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii", "replace")) != 1:
        _lib.ERR_clear_error()
        raise ValueError(f"OpenSSL does not know all of the key exchange groups {groups!r}")


def _base_context(
    method: int,
    chain: Sequence[x509.Certificate],
    key: PrivateKey | None,
    roots: Sequence[x509.Certificate],
    groups: str,
) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    ctx.set_tls13_ciphersuites(CIPHERSUITES)
    set_groups(ctx, groups)
    # Idle connections give their record buffers back (about 34 KiB each); a
    # close without close_notify reads as a plain end of stream, as on TCP.
    ctx.set_mode(_MODE_NO_AUTO_CHAIN | SSL.MODE_RELEASE_BUFFERS)
    ctx.set_options(_lib.SSL_OP_IGNORE_UNEXPECTED_EOF)
    if chain:
        if key is None:
            raise ValueError("a certificate chain was given without its private key")
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        try:
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise ValueError(
                f"private key does not match certificate {chain[0].subject.rfc4514_string()!r}"
            ) from exc
    elif key is not None:
        raise ValueError("a private key was given without a certificate chain")
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always gives a context a store
        raise ValueError("OpenSSL context has no certificate store")
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    return ctx


def server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    *,
    roots: Sequence[x509.Certificate] = (),
    client_auth: ClientAuth = "required",
    verifier: PeerVerifier | None = None,
    groups: str = GROUPS,
) -> TLSContext:
    """A server context presenting ``chain`` (leaf first); clients are checked against ``roots``.

    ``client_auth="optional"`` requests a certificate and verifies one if sent; the
    verifier only runs for clients that present one.
    """
    if not chain:
        raise ValueError("a server needs a certificate chain, got an empty one")
    if client_auth not in ("none", "optional", "required"):
        raise ValueError(f"client_auth must be none, optional or required, got {client_auth!r}")
    if client_auth != "none" and not roots:
        raise ValueError(f"client_auth={client_auth} needs at least one root to verify clients")
    ctx = _base_context(SSL.TLS_SERVER_METHOD, chain, key, roots, groups)
    if client_auth == "none":
        ctx.set_verify(SSL.VERIFY_NONE)
    elif client_auth == "optional":
        ctx.set_verify(SSL.VERIFY_PEER, verify_callback)
    else:
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify_callback)
    # Stateful tickets: the server's session cache keeps the client's whole chain,
    # which a resumed handshake needs to check the client again (see "Resumption").
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_session_id(b"tally")
    ctx.set_timeout(SESSION_TIMEOUT_S)
    return TLSContext(ctx, server_side=True, client_auth=client_auth, verifier=verifier)


def client_context(
    *,
    roots: Sequence[x509.Certificate],
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKey | None = None,
    verifier: PeerVerifier | None = None,
    groups: str = GROUPS,
) -> TLSContext:
    """A client context that trusts ``roots`` and presents ``chain`` when the server asks.

    There is no hostname check: SPIFFE peers are named by their URI SAN, which is
    the verifier's job.  ``server_hostname`` on the stream only sets SNI.
    """
    ctx = _base_context(SSL.TLS_CLIENT_METHOD, chain, key, roots, groups)
    ctx.set_verify(SSL.VERIFY_PEER, verify_callback)
    ctx.set_timeout(SESSION_TIMEOUT_S)
    return TLSContext(ctx, server_side=False, client_auth="none", verifier=verifier)
