"""The CA's keys on disk and in memory, moved along by `ca.schedule`.

Rules:

1. Private keys live in ``<data dir>/keys/<id>.pem``, PKCS#8, mode 0600, in a
   directory of mode 0700.  The CA refuses to start if any key file it would
   load is readable by group or others, or is a symlink: a key that others
   could have read is a key to treat as leaked, and an operator must decide.
2. A key file is written and fsynced *before* the store records the key, so a
   crash can leave an orphan file (harmless, never loaded) but never a stored
   key without its private half.
3. Certificates live in the store; the bundle is derived from the key states,
   never kept separately.
4. What the signing hot path reads (`Signer`) is an immutable snapshot that is
   swapped in one assignment when a key changes.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca import schedule
from ca.store import AuditEvent, KeyRecord, Store
from ca.vault import Vault
from tally.ops.errors import OperatorError
from tally.spiffe import pem, x509profile
from tally.spiffe.bundle import Bundle
from tally.spiffe.spiffeid import TrustDomain

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class CAKeyError(OperatorError):
    """A key file is missing, unreadable or exposed, or a rotation asked for cannot
    happen.  An operator's fault to fix (`OperatorError`): at startup the CA stops
    with the one line that names the file; the admin API answers a refused rotation
    as ``409 cannot_rotate`` with the same line."""


@dataclass(frozen=True)
class Upstream:
    """An operator's CA that signs our intermediates instead of a root of our own."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    bundle_roots: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class Signer:
    """The active intermediate, ready to sign: never mutated once published."""

    key_id: str
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # intermediate first, then any upstream CA certs
    not_after: datetime
    leaf_signer: x509profile.LeafSigner
    chain_pem: bytes


def check_key_file(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise CAKeyError(f"key file {path} is missing") from exc
    if stat.S_ISLNK(st.st_mode):
        raise CAKeyError(f"key file {path} is a symlink; refusing to follow it")
    if st.st_mode & 0o077:
        raise CAKeyError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be readable "
            f"by group or others (chmod 600 {path})"
        )


def load_private_key(path: Path) -> PrivateKey:
    check_key_file(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CAKeyError(f"key file {path}: cannot load a private key ({exc})") from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise CAKeyError(f"key file {path}: unsupported key type {type(key).__name__}")
    return key


def write_private_key(path: Path, key: PrivateKey) -> None:
    data = pem.key_to_pem(key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_upstream(cert_path: Path, key_path: Path, bundle_path: Path | None) -> Upstream:
    try:
        certs = pem.chain_from_pem(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CAKeyError(f"upstream certificate {cert_path}: {exc}") from exc
    key = load_private_key(key_path)
    cert = certs[0]
    try:
        x509profile.validate_signing_cert(cert)
    except ValueError as exc:
        raise CAKeyError(f"upstream certificate {cert_path} cannot sign: {exc}") from exc
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CAKeyError(f"upstream key {key_path} does not match certificate {cert_path}")
    self_signed = cert.issuer == cert.subject
    if bundle_path is not None:
        try:
            roots = tuple(pem.chain_from_pem(bundle_path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise CAKeyError(f"upstream bundle {bundle_path}: {exc}") from exc
    elif self_signed:
        roots = (cert,)
    else:
        raise CAKeyError(
            f"upstream certificate {cert_path} is not self-signed; give its roots with "
            "--upstream-bundle"
        )
    chain = () if self_signed else tuple(certs)
    return Upstream(cert, key, chain, roots)


def _ts(dt: datetime) -> int:
    return int(dt.timestamp())


def _dt(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class KeyManager:
    """Holds the CA's keys and applies the schedule; not thread-safe, driven by one task."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        td: TrustDomain,
        policy: schedule.Policy,
        clock: Callable[[], datetime],
        upstream: Upstream | None = None,
        vault: Vault | None = None,
    ) -> None:
        self.vault = vault
        """None: key files in ``<data dir>/keys``; else sealed in the datastore (`ca.vault`)."""
        self.store = store
        self.keys_dir = data_dir / "keys"
        self.td = td
        self.policy = policy
        self.clock = clock
        self.upstream = upstream
        self._records: list[KeyRecord] = []
        self._private: dict[str, PrivateKey] = {}
        self.signer: Signer | None = None
        self.bundle: Bundle | None = None
        self.server_name = "ca"
        """Who holds the rotation lease when this server does (its server id in a cluster)."""

    # -- loading -----------------------------------------------------------------------

    def load(self) -> None:
        """Read stored keys and their private halves; refuse exposed key files."""
        if self.vault is None:
            self._check_keys_dir()
        self._records = self.store.list_keys()
        for rec in self._records:
            if rec.state not in ("prepared", "active"):
                continue
            self._load_private(rec)
        self._publish()

    def refresh(self) -> bool:
        """Take up key changes another CA server made (`ca.cluster`); True if any.

        Keys this server has not seen are unsealed; keys retired or removed are
        forgotten here (the server that retired them deleted their sealed rows).
        """
        records = self.store.list_keys()
        if records == self._records:
            return False
        self._records = records
        for rec in records:
            if rec.state in ("prepared", "active"):
                if rec.id not in self._private:
                    self._load_private(rec)
            else:
                self._private.pop(rec.id, None)
        self._publish()
        return True

    def _load_private(self, rec: KeyRecord) -> None:
        if rec.upstream:
            if self.upstream is not None:
                self._private[rec.id] = self.upstream.key
            return
        if self.vault is None:
            self._private[rec.id] = load_private_key(self._key_path(rec.id))
            return
        try:
            key = serialization.load_pem_private_key(self.vault.get(rec.id), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CAKeyError(f"sealed key {rec.id}: cannot load a private key ({exc})") from exc
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise CAKeyError(f"sealed key {rec.id}: unsupported key type {type(key).__name__}")
        self._private[rec.id] = key

    def _check_keys_dir(self) -> None:
        # Before mkdir, which a dangling link would fail as "File exists", and before the
        # mode check, which would report a link's own mode (0777).
        if self.keys_dir.is_symlink():
            raise CAKeyError(f"key directory {self.keys_dir} is a symlink; refusing to follow it")
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(os.lstat(self.keys_dir).st_mode)
        if mode & 0o077:
            raise CAKeyError(
                f"key directory {self.keys_dir} has mode {mode:04o}; it must be 0700 "
                f"(chmod 700 {self.keys_dir})"
            )
        for path in sorted(self.keys_dir.glob("*.pem")):
            check_key_file(path)

    def _key_path(self, key_id: str) -> Path:
        return self.keys_dir / f"{key_id}.pem"

    # -- the schedule ------------------------------------------------------------------

    def states(self) -> list[schedule.KeyState]:
        return [
            schedule.KeyState(
                r.id,
                r.kind,  # type: ignore[arg-type]
                r.state,  # type: ignore[arg-type]
                r.parent_id,
                r.not_before,
                r.not_after,
                r.created_at,
                r.activated_at,
            )
            for r in self._records
        ]

    def tick(self, actor: str = "ca") -> list[schedule.Step]:
        """Apply every step that is due now; returns what was done (for logs).

        With several CA servers (a sealed vault), only the one holding the rotation
        lease decides (`Store.hold_rotation`); the others take up its changes.
        """
        done: list[schedule.Step] = []
        if not self._may_rotate():
            self._publish()
            return done
        for _ in range(16):
            step = schedule.decide(self.states(), _ts(self.clock()), self.policy)
            if step is None:
                break
            self._apply(step, actor)
            done.append(step)
        self._publish()
        return done

    def _may_rotate(self) -> bool:
        if self.vault is None:
            return True
        self.refresh()
        return self.holds_lease()

    def holds_lease(self) -> bool:
        """Whether this server decides rotations now (`Store.hold_rotation`); the JWT
        keys follow the same lease."""
        return self.vault is None or self.store.hold_rotation(self.server_name)

    def _lease_or_refuse(self) -> None:
        if not self._may_rotate():
            holder = self.store.rotation_holder() or "another CA server"
            raise CAKeyError(
                f"key rotation is decided by {holder} now (it holds the rotation lease);"
                " ask that server, or retry once it is gone"
            )

    def rotate_intermediate(self, actor: str) -> schedule.Step:
        self._lease_or_refuse()
        step = schedule.Step("create_intermediate", activate=True, reason="operator request")
        self._apply(step, actor)
        self._publish()
        return step

    def rotate_root(self, actor: str) -> schedule.Step:
        if self.upstream is not None:
            raise CAKeyError("the root comes from --upstream-cert; rotate it in the upstream PKI")
        self._lease_or_refuse()
        if any(r.kind == "root" and r.state == "prepared" for r in self._records):
            raise CAKeyError("a new root is already waiting for its propagation window")
        step = schedule.Step("create_root", reason="operator request")
        self._apply(step, actor)
        self._publish()
        return step

    def _find(self, key_id: str | None) -> KeyRecord:
        for rec in self._records:
            if rec.id == key_id:
                return rec
        raise CAKeyError(f"no key {key_id}")

    def _apply(self, step: schedule.Step, actor: str) -> None:
        now = self.clock().replace(microsecond=0)

        def ev(event: str, rec: KeyRecord, **detail: object) -> AuditEvent:
            return AuditEvent(
                _iso(now),
                actor,
                event,
                str(self.td.id()),
                rec.id,
                {"kind": rec.kind, "reason": step.reason, **detail},
            )

        changed: list[KeyRecord] = []
        events: list[AuditEvent] = []
        forget: list[str] = []
        bump = False
        if step.kind in ("create_root", "create_intermediate"):
            if step.kind == "create_root":
                rec = self._create_root(now, activate=step.activate)
                bump = True
            else:
                rec = self._create_intermediate(now, activate=step.activate)
            changed.append(rec)
            events.append(ev("key.created", rec, state=rec.state))
        else:
            rec = self._find(step.key_id)
            if step.kind in ("activate_root", "activate_intermediate"):
                rec = replace(rec, state="active", activated_at=_ts(now))
                changed.append(rec)
                events.append(ev("key.activated", rec))
            else:
                rec = replace(rec, state="removed")
                changed.append(rec)
                events.append(ev("key.removed", rec))
                forget.append(rec.id)
                bump = step.kind == "remove_root"
        if rec.state == "active":
            for old in self._records:
                if old.kind == rec.kind and old.state == "active" and old.id != rec.id:
                    retired = replace(old, state="retired")
                    changed.append(retired)
                    events.append(ev("key.retired", retired))
                    forget.append(old.id)
        self.store.save_keys(changed, events, bump_bundle=bump)
        for new in changed:
            for i, old in enumerate(self._records):
                if old.id == new.id:
                    self._records[i] = new
                    break
            else:
                self._records.append(new)
        for key_id in forget:
            self._forget_private(key_id)

    def _forget_private(self, key_id: str) -> None:
        """A key that will never sign again is deleted: it can no longer leak."""
        if any(r.id == key_id and r.upstream for r in self._records):
            self._private.pop(key_id, None)
            return
        self._private.pop(key_id, None)
        if self.vault is None:
            self._key_path(key_id).unlink(missing_ok=True)
        else:
            self.vault.delete(key_id)

    def _new_key(self, key_id: str) -> PrivateKey:
        key = x509profile.generate_key()
        if self.vault is None:
            write_private_key(self._key_path(key_id), key)
        else:
            self.vault.put(key_id, pem.key_to_pem(key))
        self._private[key_id] = key
        return key

    def _create_root(self, now: datetime, *, activate: bool) -> KeyRecord:
        state = "active" if activate else "prepared"
        if self.upstream is not None:
            cert = self.upstream.cert
            key_id = "upstream-" + cert.fingerprint(hashes.SHA256())[:8].hex()
            self._private[key_id] = self.upstream.key
            return KeyRecord(
                key_id,
                "root",
                state,
                pem.chain_to_pem([cert]).decode(),
                None,
                True,
                _ts(cert.not_valid_before_utc),
                _ts(cert.not_valid_after_utc),
                _ts(now),
                _ts(now) if activate else None,
            )
        key_id = "root-" + secrets.token_hex(6)
        key = self._new_key(key_id)
        not_after = now + _seconds(self.policy.root_ttl)
        start = now - schedule.not_before_cushion(self.policy.root_ttl)
        cert = x509profile.build_root(key, self.td, start, not_after)
        return KeyRecord(
            key_id,
            "root",
            state,
            pem.chain_to_pem([cert]).decode(),
            None,
            False,
            _ts(now),
            _ts(not_after),
            _ts(now),
            _ts(now) if activate else None,
        )

    def _create_intermediate(self, now: datetime, *, activate: bool) -> KeyRecord:
        root = next(r for r in self._records if r.kind == "root" and r.state == "active")
        root_cert = pem.chain_from_pem(root.cert_pem.encode())[0]
        root_key = self._private[root.id]
        key_id = "int-" + secrets.token_hex(6)
        key = self._new_key(key_id)
        ttl = self.policy.intermediate_ttl
        not_after = min(now + _seconds(ttl), root_cert.not_valid_after_utc)
        start = now - schedule.not_before_cushion(ttl)
        cert = x509profile.build_intermediate(
            key.public_key(), self.td, root_cert, root_key, start, not_after
        )
        return KeyRecord(
            key_id,
            "intermediate",
            "active" if activate else "prepared",
            pem.chain_to_pem([cert]).decode(),
            root.id,
            False,
            _ts(now),
            _ts(cert.not_valid_after_utc),
            _ts(now),
            _ts(now) if activate else None,
        )

    # -- what others read --------------------------------------------------------------

    def _publish(self) -> None:
        roots: list[x509.Certificate] = []
        for rec in self._records:
            if rec.kind == "root" and rec.state in ("prepared", "active", "retired"):
                if rec.upstream and self.upstream is not None:
                    roots.extend(self.upstream.bundle_roots)
                else:
                    roots.extend(pem.chain_from_pem(rec.cert_pem.encode()))
        self.bundle = Bundle(self.td, tuple(roots), sequence=self.store.bundle_sequence())
        active = next(
            (r for r in self._records if r.kind == "intermediate" and r.state == "active"), None
        )
        if active is None or active.id not in self._private:
            self.signer = None
            return
        cert = pem.chain_from_pem(active.cert_pem.encode())[0]
        extra = self.upstream.chain if self.upstream is not None else ()
        if not extra and not _issued_by_any(cert, roots):
            # Never sign with a key whose root is not in the bundle we publish: a
            # peer could not verify what it signed.
            self.signer = None
            return
        key = self._private[active.id]
        chain = (cert, *extra)
        self.signer = Signer(
            active.id,
            cert,
            key,
            chain,
            cert.not_valid_after_utc,
            x509profile.LeafSigner(cert, key),
            pem.chain_to_pem(chain),
        )

    def key_summaries(self) -> list[dict[str, object]]:
        return [
            {
                "id": r.id,
                "kind": r.kind,
                "state": r.state,
                "parent_id": r.parent_id,
                "not_before": _iso(_dt(r.not_before)),
                "not_after": _iso(_dt(r.not_after)),
                "upstream": r.upstream,
            }
            for r in self._records
            if r.state != "removed"
        ]


def _issued_by_any(cert: x509.Certificate, roots: list[x509.Certificate]) -> bool:
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _seconds(n: int) -> timedelta:
    return timedelta(seconds=n)
