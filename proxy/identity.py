"""Where the proxy's own certificate and its trust bundles come from: files or the Workload API.

Rules:

1. An identity is checked before it is published: the leaf is an X.509-SVID,
   the key is the leaf's key, the chain verifies against our own trust
   domain's bundle right now, and it is the SPIFFE ID the operator asked for.
   Anything less would be handed to every new handshake and fail them all, so
   a bad update is logged and the previous identity stays in use.
2. Sources only publish; they never touch TLS.  The proxy turns each
   published identity into a new TLS context (`proxy.hotswap`).
3. The file source polls the files' (inode, size, mtime) once a second and
   reloads on SIGHUP.  A half-finished replacement (new certificate, old key)
   fails rule 1 and is retried when the files change again, so writers need
   no particular order.
4. The Workload API source reconnects for ever with capped, jittered
   exponential backoff: a proxy waiting for its agent is more useful than one
   that crash-loops, and ``/readyz`` says what it is waiting for.  A stream
   that delivered an update resets the backoff, however it ended, so an agent
   restarted again and again is found again within a second each time (the
   next rotation must not be missed).  Each attempt's wait for the first
   answer is bounded, so a hung agent is noticed.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tally.ops.logs import get_logger
from tally.spiffe import pem, rotation, x509profile
from tally.spiffe.bundle import Bundle, BundleError
from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from tally.tls.contexts import PrivateKey

if TYPE_CHECKING:
    from tally.wire import workload_client as wl

log = get_logger("tally.proxy.identity")

POLL_INTERVAL_S = 1.0
FIRST_ANSWER_TIMEOUT_S = 30.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 2.0
"""Longest wait between tries at the agent's socket: a try is one local connect, so a
restarted agent is found within 2 s, however long it was down."""

Clock = Callable[[], datetime]
Signature = tuple[tuple[int, int, int], ...]


class IdentityError(ValueError):
    """An SVID, key or bundle that cannot be used; ``reason`` is a short fixed word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Our SVID and the bundles we trust peers by, checked (rule 1) and immutable."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    bundles: Mapping[TrustDomain, Bundle]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def roots(self) -> list[x509.Certificate]:
        return [cert for bundle in self.bundles.values() for cert in bundle.x509_authorities]

    def trusted(self) -> dict[TrustDomain, frozenset[bytes]]:
        return {td: bundle.fingerprints() for td, bundle in self.bundles.items()}

    def same_as(self, other: Identity | None) -> bool:
        """True when publishing ``self`` after ``other`` would change nothing."""
        return other is not None and self.chain == other.chain and self.trusted() == other.trusted()


def make_identity(
    chain: list[x509.Certificate] | tuple[x509.Certificate, ...],
    key: object,
    bundles: Mapping[TrustDomain, Bundle],
    *,
    want: SpiffeId | None,
    now: datetime,
) -> Identity:
    """Check an SVID with its key and bundles (rule 1) and return the identity."""
    if not chain:
        raise IdentityError("empty_chain", "the certificate chain is empty")
    try:
        spiffe_id = x509profile.validate_leaf(chain[0])
    except x509profile.ProfileError as exc:
        raise IdentityError(exc.reason, f"our own certificate: {exc}") from exc
    if want is not None and spiffe_id != want:
        raise IdentityError(
            "wrong_spiffe_id", f"the certificate is for {spiffe_id}, but --spiffe-id is {want}"
        )
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise IdentityError("bad_key", f"unsupported private key type {type(key).__name__}")
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise IdentityError("key_mismatch", f"the private key does not belong to {spiffe_id}")
    own = bundles.get(spiffe_id.trust_domain)
    if own is None or not own.x509_authorities:
        raise IdentityError(
            "no_bundle", f"no bundle for our own trust domain {spiffe_id.trust_domain}"
        )
    try:
        x509profile.verify_chain(chain, own.trust_domain, own.x509_authorities, now)
    except x509profile.ProfileError as exc:
        raise IdentityError(exc.reason, f"our own certificate chain: {exc}") from exc
    return Identity(spiffe_id, tuple(chain), key, dict(bundles))


def _public_der(public_key: object) -> bytes:
    assert isinstance(
        public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    )
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def from_workload(context: wl.X509Context, want: SpiffeId | None, now: datetime) -> Identity:
    """Pick our SVID from a Workload API update (``want``, or the first) and check it."""
    svid = context.svids[0]
    if want is not None:
        chosen = [s for s in context.svids if s.spiffe_id == str(want)]
        if not chosen:
            offered = ", ".join(s.spiffe_id for s in context.svids)
            raise IdentityError(
                "wrong_spiffe_id", f"the Workload API offers {offered} but not --spiffe-id {want}"
            )
        svid = chosen[0]
    bundles: dict[TrustDomain, Bundle] = {}
    try:
        for name, certs in context.bundles.items():
            td = TrustDomain.parse(name)
            bundles[td] = Bundle(td, tuple(certs))
    except (SpiffeIdError, BundleError) as exc:
        raise IdentityError("bad_bundle", f"Workload API bundle: {exc}") from exc
    return make_identity(svid.chain, svid.private_key, bundles, want=want, now=now)


# -- the file source ------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError("unreadable", f"{what} {path}: {exc.strerror or exc}") from exc


class FileSource:
    """An SVID from ``--cert``/``--key``/``--bundle``, e.g. written by `tally ca x509 mint`."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        bundle: Path,
        federated: Mapping[TrustDomain, Path],
        *,
        want: SpiffeId | None,
        clock: Clock,
    ) -> None:
        self.cert = cert
        self.key = key
        self.bundle = bundle
        self.federated = dict(federated)
        self.want = want
        self.clock = clock
        self.last_error: str | None = None
        self._poke = trio.Event()

    def describe(self) -> str:
        return f"files {self.cert}, {self.key}, {self.bundle}"

    def _paths(self) -> list[Path]:
        return [self.cert, self.key, self.bundle, *self.federated.values()]

    def signature(self) -> Signature:
        """What changes when any file is replaced or rewritten; missing files count too."""
        out = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                out.append((-1, -1, -1))
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def load(self) -> Identity:
        """Read and check all files (blocking; run it in a thread from async code)."""
        try:
            chain = pem.chain_from_pem(_read(self.cert, "--cert"))
        except x509profile.ProfileError as exc:
            raise IdentityError(exc.reason, f"--cert {self.cert}: {exc}") from exc
        try:
            key = pem.key_from_pem(_read(self.key, "--key"))
        except x509profile.ProfileError as exc:
            raise IdentityError(exc.reason, f"--key {self.key}: {exc}") from exc
        try:
            own_td = x509profile.validate_leaf(chain[0]).trust_domain
        except x509profile.ProfileError as exc:
            raise IdentityError(exc.reason, f"--cert {self.cert}: {exc}") from exc
        bundles = {own_td: self._bundle(own_td, self.bundle, "--bundle")}
        for td, path in self.federated.items():
            bundles[td] = self._bundle(td, path, "--federated-bundle")
        return make_identity(chain, key, bundles, want=self.want, now=self.clock())

    @staticmethod
    def _bundle(td: TrustDomain, path: Path, what: str) -> Bundle:
        try:
            return Bundle.from_pem(td, _read(path, what))
        except (BundleError, x509profile.ProfileError) as exc:
            raise IdentityError("bad_bundle", f"{what} {path}: {exc}") from exc

    def reload_now(self) -> None:
        """Re-read the files at the next opportunity even if they look unchanged (SIGHUP)."""
        self._poke.set()

    async def run(self, publish: Callable[[Identity], None], seen: Signature) -> None:
        """Poll for changes; ``seen`` is the signature of the files the caller loaded first."""
        while True:
            with trio.move_on_after(POLL_INTERVAL_S):
                await self._poke.wait()
            forced = self._poke.is_set()
            self._poke = trio.Event()
            current = self.signature()
            if current == seen and not forced:
                continue
            seen = current
            try:
                identity = await trio.to_thread.run_sync(self.load)
            except IdentityError as exc:
                self.last_error = str(exc)
                log.warning(
                    "identity.reload_failed", source="file", reason=exc.reason, error=str(exc)
                )
                continue
            self.last_error = None
            publish(identity)


# -- the Workload API source ------------------------------------------------------------


class WorkloadSource:
    """SVIDs and bundles streamed by a SPIFFE Workload API (a Tally agent, SPIRE, ...)."""

    def __init__(self, endpoint_socket: Path, *, want: SpiffeId | None, clock: Clock) -> None:
        self.endpoint_socket = endpoint_socket
        self.want = want
        self.clock = clock
        self.last_error: str | None = "no answer yet"
        # Whether the current connection delivered anything, and the wait before the
        # next one: a stream that delivered resets the backoff, however it ended.
        self._delivered = False
        self.retry_delay = 0.0

    def describe(self) -> str:
        return f"Workload API at {self.endpoint_socket}"

    async def run(self, publish: Callable[[Identity], None]) -> None:
        # Imported here: HTTP/2 and protobuf cost every proxy start, and the file source
        # never needs them.
        from tally.wire import workload_client as wl

        rng = random.Random()
        failures = 0
        while True:
            self._delivered = False
            try:
                await self._watch(publish)
            except (wl.WorkloadApiError, wl.EndpointError) as exc:
                self._failed("workload.error", exc)
            except trio.TooSlowError:
                self._failed(
                    "workload.error",
                    f"no answer within {FIRST_ANSWER_TIMEOUT_S:.0f}s "
                    "(is the agent running, and is there a registration entry for this workload?)",
                )
            # A stream that delivered was a success, however it ended: the agent was
            # restarted, and it is back within a second or two.
            failures = 0 if self._delivered else failures + 1
            self.retry_delay = rotation.backoff(
                failures, rng, base=BACKOFF_FIRST_S, cap=BACKOFF_MAX_S
            )
            await trio.sleep(self.retry_delay)

    def _failed(self, event: str, error: object) -> None:
        self.last_error = str(error)
        log.warning(event, socket=str(self.endpoint_socket), error=str(error))

    async def _watch(self, publish: Callable[[Identity], None]) -> None:
        """One connection: publish every good update until the stream ends."""
        from tally.wire import workload_client as wl

        async with wl.watch_x509(self.endpoint_socket) as updates:
            while True:
                limit = (
                    math.inf if self._delivered else trio.current_time() + FIRST_ANSWER_TIMEOUT_S
                )
                with trio.fail_at(limit):
                    context = await anext(updates, None)
                if context is None:
                    self._failed("workload.ended", "the Workload API ended the stream")
                    return
                self._delivered = True
                try:
                    identity = from_workload(context, self.want, self.clock())
                except IdentityError as exc:
                    self.last_error = str(exc)
                    log.warning(
                        "identity.update_rejected",
                        source="workload",
                        reason=exc.reason,
                        error=str(exc),
                    )
                    continue
                self.last_error = None
                publish(identity)
