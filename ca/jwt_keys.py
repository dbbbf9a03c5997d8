"""The CA's JWT signing keys: made, published, used, retired and dropped on a schedule.

Rules:

1. **Published before use.**  A new key joins the bundle (the bundle's
   sequence goes up, agents push it to every ``FetchJWTBundles`` stream, the
   OIDC endpoint serves it) as *prepared*, and signs only from its
   ``activate_at``: half a rotation period later on the schedule, or
   ``jwt_propagation`` later when an operator asks for a rotation.  The one
   exception is the very first key, which signs at once: nothing was signed
   before it, so no validator can be missing it for an old token.
2. **Retired, then removed when its last token has expired.**  A retired key
   never signs again (its private half is deleted at once) but stays in the
   bundle until ``max_jwt_ttl`` after retirement, or later if this process
   signed something that lives longer, so every token it signed keeps
   validating to its end.
3. **Files like the X.509 keys** (`ca.keys`): ``<data dir>/keys/jwt-<kid>.pem``,
   PKCS#8, 0600, refused when looser or a symlink; written before the store
   records the key.
4. **Every key event is an audit record** (``key.created``, ``key.activated``,
   ``key.retired``, ``key.removed`` with ``kind: jwt``; the ``serial`` column
   holds the kid), in the same transaction as the change.
5. ES256 by default; RS256 (``jwt_key_type = "rsa"``) for OIDC consumers
   that accept only RSA.  A key type change applies to the next key made.

`decide` is pure and takes ``now``; `JwtKeyManager` applies its steps.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.keys import CAKeyError, load_private_key, write_private_key
from ca.settings import CASettings
from ca.store import AuditEvent, Store
from ca.vault import Vault
from tally.spiffe import jwt, pem
from tally.spiffe.spiffeid import TrustDomain

KeyType = Literal["ec", "rsa"]
State = Literal["prepared", "active", "retired", "removed"]
KEY_TYPES = ("ec", "rsa")


@dataclass(frozen=True)
class JwtKeyRecord:
    kid: str
    alg: str
    state: State
    created_at: int
    activate_at: int
    activated_at: int | None = None
    retired_at: int | None = None
    remove_at: int | None = None


@dataclass(frozen=True)
class JwtPolicy:
    rotation: int
    """Seconds a key signs before its successor takes over (``jwt_key_ttl``)."""
    propagation: int
    """Seconds an operator-requested key is published before it signs."""
    max_token_ttl: int
    key_type: KeyType = "ec"


StepKind = Literal["create", "create_active", "activate", "remove"]


@dataclass(frozen=True)
class JwtStep:
    kind: StepKind
    kid: str | None = None
    activate_at: int = 0
    reason: str = ""


def decide(keys: Sequence[JwtKeyRecord], now: int, policy: JwtPolicy) -> JwtStep | None:
    """The next step at ``now``, or None when the keys are as they should be."""
    live = [k for k in keys if k.state != "removed"]
    active = next((k for k in live if k.state == "active"), None)
    prepared = next((k for k in live if k.state == "prepared"), None)
    if active is None:
        if prepared is not None:
            return JwtStep("activate", prepared.kid, reason="no active JWT key")
        return JwtStep("create_active", activate_at=now, reason="first start")
    if prepared is not None and now >= prepared.activate_at:
        return JwtStep("activate", prepared.kid, reason="published long enough")
    started = active.activated_at if active.activated_at is not None else active.created_at
    if prepared is None and now >= started + policy.rotation // 2:
        return JwtStep(
            "create",
            activate_at=started + policy.rotation,
            reason="active JWT key half through its rotation period",
        )
    for key in live:
        if key.state == "retired" and key.remove_at is not None and now >= key.remove_at:
            return JwtStep("remove", key.kid, reason="every token it signed has expired")
    return None


@dataclass(frozen=True)
class JwtSigner:
    """The active key, ready to sign: never mutated once published."""

    kid: str
    alg: str
    key: jwt.PrivateKey


def sealed_id(kid: str) -> str:
    """A JWT key's name among the sealed keys, apart from the X.509 key ids; also its
    file's stem in ``<data dir>/keys`` on a single server."""
    return f"jwt-{kid}"


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class JwtKeyManager:
    """Holds the JWT keys and applies `decide`; driven by one task, like `ca.keys.KeyManager`.

    ``bundle`` and ``signer`` are immutable snapshots swapped in one assignment.
    """

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        td: TrustDomain,
        policy: JwtPolicy,
        clock: Callable[[], datetime],
        vault: Vault | None = None,
        may_rotate: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.keys_dir = data_dir / "keys"
        self.td = td
        self.policy = policy
        self.clock = clock
        self.vault = vault
        """None: key files in ``<data dir>/keys``; else sealed in the datastore, like the
        X.509 keys of several CA servers (`ca.vault`)."""
        self.may_rotate = may_rotate
        """With several servers: whether this one holds the rotation lease now; the
        others only take up what it decided (`refresh`)."""
        self._records: list[JwtKeyRecord] = []
        self._loaded = False
        self._private: dict[str, jwt.PrivateKey] = {}
        self._public: dict[str, jwt.PublicKey] = {}
        self._signed_until: dict[str, int] = {}
        self.signer: JwtSigner | None = None
        self.bundle = jwt.JwtBundle(td, {})

    def _path(self, kid: str) -> Path:
        return self.keys_dir / f"{sealed_id(kid)}.pem"

    def _now(self) -> int:
        return int(self.clock().timestamp())

    def load(self) -> None:
        """Read the stored records and the private halves of the keys that may sign;
        refuse an exposed key file (``ca.keys.load_private_key``).  Run after
        `ca.keys.KeyManager.load`, which checks the key directory itself."""
        self.refresh()

    def refresh(self) -> bool:
        """Take up the stored records (at start, or what another CA server decided);
        True if they changed.  Keys not seen yet are read, keys that will never sign
        again are forgotten."""
        raw = self.store.jwt_keys()
        records = [] if raw is None else json.loads(raw)
        fresh = [JwtKeyRecord(**{k: v for k, v in r.items() if k != "jwk"}) for r in records]
        if fresh == self._records and self._loaded:
            return False
        self._loaded = True
        self._records = fresh
        for rec in fresh:
            if rec.state in ("prepared", "active"):
                if rec.kid not in self._private:
                    key = self._read_private(rec.kid)
                    self._private[rec.kid] = key
                    self._public[rec.kid] = key.public_key()
            else:
                self._private.pop(rec.kid, None)
                if rec.state == "retired" and rec.kid not in self._public:
                    self._public[rec.kid] = self._stored_public(records, rec.kid)
        live = {r.kid for r in fresh}
        for kid in [k for k in self._public if k not in live]:
            self._public.pop(kid, None)
        self._publish()
        return True

    def _read_private(self, kid: str) -> jwt.PrivateKey:
        key: object
        if self.vault is None:
            key = load_private_key(self._path(kid))
            where = f"key file {self._path(kid)}"
        else:
            where = f"sealed JWT key {kid}"
            try:
                key = serialization.load_pem_private_key(
                    self.vault.get(sealed_id(kid)), password=None
                )
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise CAKeyError(f"{where}: cannot load a private key ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CAKeyError(f"{where}: not an EC or RSA key")
        return key

    def _write_private(self, kid: str, key: jwt.PrivateKey) -> None:
        if self.vault is None:
            write_private_key(self._path(kid), key)
        else:
            self.vault.put(sealed_id(kid), pem.key_to_pem(key))

    def _delete_private(self, kid: str) -> None:
        if self.vault is None:
            self._path(kid).unlink(missing_ok=True)
        else:
            self.vault.delete(sealed_id(kid))

    def _leased(self) -> bool:
        if self.may_rotate is None:
            return True
        self.refresh()
        return self.may_rotate()

    def _stored_public(self, records: list[dict[str, object]], kid: str) -> jwt.PublicKey:
        """A retired key's public half, from the JWK stored with its record."""
        for item in records:
            if item.get("kid") == kid and item.get("jwk"):
                doc = json.dumps({"keys": [item["jwk"]]}).encode()
                return jwt.JwtBundle.from_jwks(self.td, doc).keys[kid]
        raise CAKeyError(f"JWT key {kid} has no stored public key")

    def records(self) -> list[JwtKeyRecord]:
        return list(self._records)

    # -- the schedule --------------------------------------------------------------------

    def tick(self, actor: str = "ca") -> list[JwtStep]:
        done: list[JwtStep] = []
        if not self._leased():  # another CA server decides; its changes are taken up
            return done
        for _ in range(8):
            step = decide(self._records, self._now(), self.policy)
            if step is None:
                break
            self._apply(step, actor)
            done.append(step)
        return done

    def rotate(self, actor: str) -> JwtStep:
        """An operator's rotation: a new key published now, signing after the propagation
        window (rule 1)."""
        if not self._leased():
            raise CAKeyError(
                "JWT key rotation is decided by the CA server holding the rotation lease;"
                " ask that server, or retry once it is gone"
            )
        if any(r.state == "prepared" for r in self._records):
            raise CAKeyError("a new JWT key is already published and waiting to sign")
        now = self._now()
        step = JwtStep(
            "create", activate_at=now + self.policy.propagation, reason="operator request"
        )
        self._apply(step, actor)
        return step

    def _apply(self, step: JwtStep, actor: str) -> None:
        now = self._now()
        changed: list[JwtKeyRecord] = []
        events: list[AuditEvent] = []

        def ev(event: str, rec: JwtKeyRecord, **detail: object) -> None:
            events.append(
                AuditEvent(
                    _iso(now),
                    actor,
                    event,
                    str(self.td.id()),
                    rec.kid,
                    {"kind": "jwt", "alg": rec.alg, "reason": step.reason, **detail},
                )
            )

        new_private: tuple[str, jwt.PrivateKey] | None = None
        if step.kind in ("create", "create_active"):
            kid = secrets.token_urlsafe(12)
            key = _generate(self.policy.key_type)
            self._write_private(kid, key)  # before the store knows it (rule 3)
            new_private = (kid, key)
            activate = step.kind == "create_active"
            rec = JwtKeyRecord(
                kid,
                jwt.alg_for_key(key),
                "active" if activate else "prepared",
                now,
                step.activate_at,
                now if activate else None,
            )
            changed.append(rec)
            ev("key.created", rec, state=rec.state, activate_at=_iso(rec.activate_at))
        else:
            rec = next(r for r in self._records if r.kid == step.kid)
            if step.kind == "activate":
                rec = replace(rec, state="active", activated_at=now)
                changed.append(rec)
                ev("key.activated", rec)
            else:
                rec = replace(rec, state="removed")
                changed.append(rec)
                ev("key.removed", rec)
        if rec.state == "active":
            for old in self._records:
                if old.state == "active" and old.kid != rec.kid:
                    remove_at = max(
                        now + self.policy.max_token_ttl + jwt.LEEWAY,
                        self._signed_until.get(old.kid, 0) + jwt.LEEWAY,
                    )
                    retired = replace(old, state="retired", retired_at=now, remove_at=remove_at)
                    changed.append(retired)
                    ev("key.retired", retired, remove_at=_iso(remove_at))
        records = list(self._records)
        for new in changed:
            for i, old in enumerate(records):
                if old.kid == new.kid:
                    records[i] = new
                    break
            else:
                records.append(new)
        keep = [r for r in records if r.state != "removed"]
        if new_private is not None:
            self._public[new_private[0]] = new_private[1].public_key()
        try:
            self.store.save_jwt_keys(self._serialize(keep), events)
        except BaseException:
            if new_private is not None:
                self._public.pop(new_private[0], None)
            raise
        self._records = keep
        if new_private is not None:
            self._private[new_private[0]] = new_private[1]
        for r in changed:
            if r.state in ("retired", "removed"):
                # A key that will never sign again is deleted: it can no longer leak.
                self._private.pop(r.kid, None)
                self._delete_private(r.kid)
            if r.state == "removed":
                self._public.pop(r.kid, None)
        self._publish()

    def _serialize(self, records: Sequence[JwtKeyRecord]) -> str:
        out = []
        for r in records:
            item: dict[str, object] = asdict(r)
            public = self._public.get(r.kid)
            item["jwk"] = None if public is None else jwt.public_jwk(public, r.kid)
            out.append(item)
        return json.dumps(out, sort_keys=True)

    # -- what others read ----------------------------------------------------------------

    def _publish(self) -> None:
        published = {
            r.kid: self._public[r.kid]
            for r in sorted(self._records, key=lambda r: r.created_at)
            if r.state in ("prepared", "active", "retired") and r.kid in self._public
        }
        self.bundle = jwt.JwtBundle(self.td, published)
        active = next((r for r in self._records if r.state == "active"), None)
        if active is None or active.kid not in self._private:
            self.signer = None
        else:
            self.signer = JwtSigner(active.kid, active.alg, self._private[active.kid])

    def signed(self, kid: str, expires_at: int) -> None:
        """Note a token's expiry, so its key stays published at least that long (rule 2)."""
        if expires_at > self._signed_until.get(kid, 0):
            self._signed_until[kid] = expires_at

    def summaries(self) -> list[dict[str, object]]:
        return [
            {
                "id": r.kid,
                "kind": "jwt",
                "alg": r.alg,
                "state": r.state,
                "activate_at": _iso(r.activate_at),
                "remove_at": None if r.remove_at is None else _iso(r.remove_at),
            }
            for r in self._records
        ]


def _generate(key_type: KeyType) -> jwt.PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class JwtLimits:
    default_ttl: int = 300
    max_ttl: int = 3600
    issuer: str | None = None
    """The OIDC issuer URL, put in ``iss`` (cloud token exchanges match it)."""
    audit_window: int = 3600


MAX_AUDIENCES = 8
MAX_AUDIENCE_CHARS = 256


class AuditSampler:
    """JWT issuance in the audit chain without one record per token.

    A token is renewed at half its life (2.5 min by default), so one workload
    asking for one audience would add 24 records an hour.  Instead the first
    token of each (caller, SPIFFE ID, audiences) in each `window` is recorded
    (``jwt.issued``, with its kid, jti and expiry), carrying how many tokens of
    that same triple were signed since the previous record (``unrecorded``).
    So every identity and audience ever given a token is in the chain, with
    counts; a single token is in it only if it was the first of its window.
    Operator mints (``tally ca jwt mint``) are always recorded.  Memory is
    bounded: past `MAX_KEYS` triples, the ones with no token this window go.
    """

    MAX_KEYS = 50_000

    def __init__(self, window: int) -> None:
        self.window = window
        self._seen: dict[tuple[str, str, tuple[str, ...]], tuple[int, int]] = {}

    def observe(self, key: tuple[str, str, tuple[str, ...]], now: int) -> int | None:
        """None when this token is only counted; else the count to put in its record."""
        last = self._seen.get(key)
        if last is not None and now < last[0] + self.window:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if len(self._seen) >= self.MAX_KEYS:
            self._seen = {k: v for k, v in self._seen.items() if now < v[0] + self.window}
        self._seen[key] = (now, 0)
        return 0 if last is None else last[1]


def jwt_policy(cfg: CASettings) -> JwtPolicy:
    key_type: KeyType = "rsa" if cfg.jwt_key_type == "rsa" else "ec"
    return JwtPolicy(
        rotation=int(cfg.jwt_key_ttl),
        propagation=int(cfg.jwt_propagation),
        max_token_ttl=int(cfg.max_jwt_ttl),
        key_type=key_type,
    )


def jwt_limits(cfg: CASettings) -> JwtLimits:
    return JwtLimits(
        default_ttl=int(cfg.default_jwt_ttl),
        max_ttl=int(cfg.max_jwt_ttl),
        issuer=cfg.oidc_issuer,
        audit_window=int(cfg.jwt_audit_window),
    )
