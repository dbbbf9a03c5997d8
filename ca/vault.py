"""Where the CA's private keys live: key files for one server, sealed rows for several.

One CA server on SQLite keeps each private key in ``<data dir>/keys/<id>.pem``
(`FileVault`, `ca.keys` rules 1-2).  Several servers on PostgreSQL must all
sign, so they share the keys through the database, sealed (`SealedVault`):

1. **Sealed under the cluster key.**  Each private key (root and
   intermediates) is stored as AES-256-GCM ciphertext under one random 32-byte
   *cluster key*, with the key's id as associated data, so a sealed key cannot
   be swapped onto another id.  The database never holds the cluster key in
   the clear: a dump, a backup or a read-only database user yields ciphertext.
2. **Wrapped to each server.**  Every CA server has an identity key of its
   own, ``<data dir>/server.key`` (EC P-256, mode 0600, made at first start and
   never copied anywhere).  The cluster key is stored once per approved server,
   wrapped to that server's public key (ECDH with a one-time key, HKDF-SHA256,
   AES-256-GCM; `wrap` / `unwrap`).  Only a server holding its own
   ``server.key`` can unwrap its copy.
3. **Joining takes an operator's approval, not a copied secret.**  The first
   server on an empty database makes the cluster key.  A new server registers
   its public key as *pending* and waits; an operator runs ``tally ca server
   approve ID`` against a server already in, which wraps the cluster key to the
   newcomer (audited as ``server.approved``).  No file that must stay secret
   is ever copied by hand: what crosses from server to server is a public key
   and a wrapped key only its owner can open.
4. **Removal.**  ``tally ca server remove ID`` deletes a server's row and its
   wrapped copy (audited), so it cannot join again with its old identity.  It
   does not make the cluster key unknown to a server that already held it:
   the cluster key is the secret, and one server's ``server.key`` plus read
   access to the database is what an attacker needs.  Re-sealing everything
   under a new cluster key is not implemented yet; the operator's guide says so.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tally.ops.errors import OperatorError


class VaultError(OperatorError):
    """A sealed key that cannot be opened, or a server identity that cannot be used."""


class Vault(Protocol):
    """Private keys by id: put before the store records the key, forget once retired."""

    def get(self, key_id: str) -> bytes: ...

    def put(self, key_id: str, key_pem: bytes) -> None: ...

    def put_once(self, key_id: str, key_pem: bytes) -> bytes: ...

    def delete(self, key_id: str) -> None: ...


class SealedStore(Protocol):
    """What `SealedVault` needs of `ca.store.Store`."""

    def get_sealed_key(self, key_id: str) -> bytes | None: ...

    def put_sealed_key(self, key_id: str, sealed: bytes) -> None: ...

    def put_sealed_key_once(self, key_id: str, sealed: bytes) -> None: ...

    def delete_sealed_key(self, key_id: str) -> None: ...


_NONCE = 12


def seal(cluster_key: bytes, key_id: str, plaintext: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return nonce + AESGCM(cluster_key).encrypt(nonce, plaintext, _aad(key_id))


def unseal(cluster_key: bytes, key_id: str, sealed: bytes) -> bytes:
    try:
        return AESGCM(cluster_key).decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(key_id))
    except (InvalidTag, ValueError):
        raise VaultError(
            f"sealed key {key_id} does not open with this cluster key (altered, or sealed"
            " by another cluster)"
        ) from None


def _aad(key_id: str) -> bytes:
    return b"tally-ca-key\x00" + key_id.encode()


class SealedVault:
    """Keys sealed in the datastore under the cluster key (rule 1)."""

    def __init__(self, store: SealedStore, cluster_key: bytes) -> None:
        self.store = store
        self._cluster_key = cluster_key

    def get(self, key_id: str) -> bytes:
        sealed = self.store.get_sealed_key(key_id)
        if sealed is None:
            raise VaultError(f"key {key_id} is recorded but its sealed private half is missing")
        return unseal(self._cluster_key, key_id, sealed)

    def put(self, key_id: str, key_pem: bytes) -> None:
        self.store.put_sealed_key(key_id, seal(self._cluster_key, key_id, key_pem))

    def put_once(self, key_id: str, key_pem: bytes) -> bytes:
        """A key every server must share, made by whichever server comes first: ours is
        stored only if none is yet, and the one stored is returned."""
        self.store.put_sealed_key_once(key_id, seal(self._cluster_key, key_id, key_pem))
        return self.get(key_id)

    def delete(self, key_id: str) -> None:
        self.store.delete_sealed_key(key_id)


# -- server identities and the wrapped cluster key (rules 2 and 3) ---------------------------


def new_cluster_key() -> bytes:
    return secrets.token_bytes(32)


def load_or_create_identity(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """This server's identity key, ``server.key`` in the data dir (made 0600 if absent)."""
    from ca.keys import load_private_key, write_private_key  # keys imports us for types

    path = data_dir / "server.key"
    if not path.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_key(path, ec.generate_private_key(ec.SECP256R1()))
    key = load_private_key(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise VaultError(f"server identity {path} is not an EC key")
    return key


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def server_id(public_key_pem: str) -> str:
    """A server's name: a digest of its public key, so it cannot be claimed by another."""
    der = serialization.load_pem_public_key(public_key_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "srv-" + hashlib.sha256(der).hexdigest()[:16]


def _wrap_key(shared: bytes, sid: str) -> bytes:
    info = b"tally-cluster-key\x00" + sid.encode()
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)


def wrap(cluster_key: bytes, public_key_pem: str) -> bytes:
    """The cluster key, openable only by the holder of ``public_key_pem``'s private key."""
    recipient = serialization.load_pem_public_key(public_key_pem.encode())
    if not isinstance(recipient, ec.EllipticCurvePublicKey):
        raise VaultError("a server's public key must be an EC key")
    one_time = ec.generate_private_key(recipient.curve)
    shared = one_time.exchange(ec.ECDH(), recipient)
    point = one_time.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    nonce = secrets.token_bytes(_NONCE)
    sid = server_id(public_key_pem)
    body = AESGCM(_wrap_key(shared, sid)).encrypt(nonce, cluster_key, sid.encode())
    return len(point).to_bytes(1, "big") + point + nonce + body


def unwrap(wrapped: bytes, identity: ec.EllipticCurvePrivateKey) -> bytes:
    sid = server_id(public_pem(identity))
    try:
        n = wrapped[0]
        point, rest = wrapped[1 : 1 + n], wrapped[1 + n :]
        peer = ec.EllipticCurvePublicKey.from_encoded_point(identity.curve, point)
        shared = identity.exchange(ec.ECDH(), peer)
        return AESGCM(_wrap_key(shared, sid)).decrypt(rest[:_NONCE], rest[_NONCE:], sid.encode())
    except (InvalidTag, ValueError, IndexError):
        raise VaultError(
            f"the cluster key wrapped for {sid} does not open with this server's server.key"
        ) from None


def identity_fingerprint(public_key_pem: str) -> str:
    """What an operator compares before approving: SHA-256 of the public key, in hex pairs."""
    der = serialization.load_pem_public_key(public_key_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))
