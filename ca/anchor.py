"""Audit anchors: the chain's head, signed by a key the datastore never holds.

The hash chain (`ca.audit`) catches an edit, a removal or a reordering, but
not someone who rewrites the whole datastore and recomputes every hash: the
rewritten chain is as consistent as the real one.  An anchor closes that gap.

Rules:

1. An anchor states "record ``seq`` of trust domain ``td``'s chain had hash
   ``hash`` at time ``at``", signed with Ed25519 by the CA's anchor key.
2. The anchor key lives in the CA's data dir (``audit-anchor.key``, 0600,
   refused when looser), never in the datastore, so whoever rewrites the
   datastore cannot sign a matching anchor.  Several CA servers share one,
   sealed in their datastore under the cluster key like their other keys:
   the datastore alone still cannot open it.  It never rotates: an anchor from
   a year ago must still verify.  ``key_id`` names it by its public key.
3. Anchors leave the CA as public data: a log line, the metrics, an optional
   append-only file, and `tally ca audit anchor`.  Kept anywhere the
   datastore's writer cannot reach, any one of them later proves (with
   `tally ca audit verify --anchor FILE`) whether the history it saw was
   rewritten.
4. A file of anchors is JSON, one object per line: an anchor as printed, or
   a whole ``audit.anchor`` log line, so that a log excerpt can be verified
   as it is.  Anything else is refused, naming the line.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ca.keys import CAKeyError, check_key_file, write_private_key
from ca.vault import Vault
from tally.spiffe import pem

KEY_FILE = "audit-anchor.key"
SEALED_ID = "audit-anchor"
MAX_ANCHORS = 1000
"""More in one file is refused.  The newest anchor alone covers the whole history
before it (every later hash depends on every earlier record), so a long log is
best cut to its last lines."""


class AnchorError(ValueError):
    """An anchor, or a file of them, that cannot be read; the message names it."""


@dataclass(frozen=True)
class Anchor:
    trust_domain: str
    seq: int
    hash: str
    at: str
    key_id: str
    signature: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def payload(trust_domain: str, seq: int, digest: str, at: str) -> bytes:
    """What is signed: a canonical form no other message of Tally's shares."""
    body = ["tally-audit-anchor-v1", trust_domain, seq, digest, at]
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()


def key_id_of(public: ed25519.Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class AnchorKey:
    """The CA's anchor signing key (rule 2)."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key()
        self.key_id = key_id_of(self.public)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> AnchorKey:
        """The key in ``data_dir``, made on first start; a loose mode is refused."""
        path = data_dir / KEY_FILE
        if not path.exists() and not path.is_symlink():
            write_private_key(path, ed25519.Ed25519PrivateKey.generate())
        check_key_file(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CAKeyError(f"key file {path}: cannot load the audit anchor key ({exc})") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise CAKeyError(f"key file {path}: the audit anchor key must be Ed25519")
        return cls(key)

    @classmethod
    def shared(cls, vault: Vault) -> AnchorKey:
        """Several CA servers sign with one anchor key, sealed in their datastore like
        their other keys (`ca.vault`), so an anchor from any of them verifies on all."""
        fresh = pem.key_to_pem(ed25519.Ed25519PrivateKey.generate())
        try:
            key = serialization.load_pem_private_key(vault.put_once(SEALED_ID, fresh), None)
        except (ValueError, TypeError) as exc:
            raise CAKeyError(f"sealed audit anchor key: cannot load it ({exc})") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise CAKeyError("sealed audit anchor key: not an Ed25519 key")
        return cls(key)

    def sign(self, trust_domain: str, seq: int, digest: str, at: str) -> Anchor:
        sig = self._key.sign(payload(trust_domain, seq, digest, at))
        return Anchor(
            trust_domain, seq, digest, at, self.key_id, base64.b64encode(sig).decode("ascii")
        )

    def problem(self, anchor: Anchor, trust_domain: str) -> str | None:
        """Why this CA cannot vouch for ``anchor``, or None when it signed it."""
        if anchor.trust_domain != trust_domain:
            return f"the anchor of record {anchor.seq} is for trust domain {anchor.trust_domain}"
        if anchor.key_id != self.key_id:
            return (
                f"the anchor of record {anchor.seq} was signed by key {anchor.key_id}, "
                f"not this CA's anchor key {self.key_id}"
            )
        try:
            sig = base64.b64decode(anchor.signature, validate=True)
            self.public.verify(
                sig, payload(anchor.trust_domain, anchor.seq, anchor.hash, anchor.at)
            )
        except (ValueError, InvalidSignature):
            return f"the anchor of record {anchor.seq} has a bad signature (forged or edited)"
        return None


_FIELDS = {
    "trust_domain": str,
    "seq": int,
    "hash": str,
    "at": str,
    "key_id": str,
    "signature": str,
}


def anchor_from(obj: Mapping[str, object], where: str) -> Anchor:
    """An anchor from its JSON object; a missing or mistyped field is named."""
    values: dict[str, object] = {}
    for name, kind in _FIELDS.items():
        value = obj.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "an integer" if kind is int else "a string"
            raise AnchorError(f"{where}: field {name!r} must be {what}")
        values[name] = value
    seq = values["seq"]
    assert isinstance(seq, int)
    if seq < 1:
        raise AnchorError(f"{where}: field 'seq' must be at least 1")
    digest = values["hash"]
    assert isinstance(digest, str)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise AnchorError(f"{where}: field 'hash' must be 64 lower-case hex digits")
    return Anchor(**values)  # type: ignore[arg-type]


def parse_anchors(text: str) -> list[Anchor]:
    """Rule 4: anchors from a file's text; blank lines are skipped."""
    found: list[Anchor] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AnchorError(f"{where}: not JSON ({exc.args[0]})") from exc
        if not isinstance(obj, dict):
            raise AnchorError(f"{where}: not a JSON object")
        if "event" in obj and obj.get("event") != "audit.anchor":
            raise AnchorError(f"{where}: a log line, but not an audit.anchor one")
        found.append(anchor_from(obj, where))
        if len(found) > MAX_ANCHORS:
            raise AnchorError(f"more than {MAX_ANCHORS} anchors")
    if not found:
        raise AnchorError("no anchors in it")
    return found
