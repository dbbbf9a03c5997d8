"""What the agent keeps on disk: its own key and SVID, and the newest bundle.

Rules:

1. Only the agent's *own* key touches disk (mode 0600, in a 0700 directory),
   so a restart needs no new join token.  Workload keys never do.
2. Files are replaced atomically (write a temporary file, fsync, rename), so a
   crash leaves the old SVID or the new one, never half of either.  Key and
   SVID are written as one file, so they can never disagree.
3. A symlink where a state file should be is refused: a planted link must not
   make the agent write its key somewhere else.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tally.ops.errors import OperatorError
from tally.spiffe import pem

IDENTITY_FILE = "agent_svid.pem"
BUNDLE_FILE = "bundle.pem"


class StateError(OperatorError):
    """The agent's data dir or a state file in it is unsafe or damaged: a fault the
    operator must fix (a mode, a planted link, a file to remove), shown as one line."""


@dataclass(frozen=True)
class AgentIdentity:
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]


def prepare_dir(data_dir: Path) -> None:
    # Checked before mkdir too, so a dangling link is named as a link.
    if data_dir.is_symlink():
        raise StateError(f"data dir {data_dir} is a symlink; refusing to use it")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(data_dir)
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"data dir {data_dir} is a symlink; refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(data_dir, 0o700)


def _check_file(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{path} is a symlink; refusing to follow it")
    return True


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    _check_file(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_identity(data_dir: Path, ident: AgentIdentity) -> None:
    key_pem = ident.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(data_dir / IDENTITY_FILE, key_pem + pem.chain_to_pem(ident.chain), 0o600)


def load_identity(data_dir: Path) -> AgentIdentity | None:
    path = data_dir / IDENTITY_FILE
    if not _check_file(path):
        return None
    if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
        raise StateError(f"{path} is readable by group or others; chmod 600 {path}")
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
        chain = pem.chain_from_pem(data[data.index(b"-----BEGIN CERTIFICATE") :])
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise StateError(
            f"{path} is damaged ({exc}); remove it and attest with a new join token"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError(f"{path} holds an unexpected key type")
    return AgentIdentity(key, tuple(chain))


def save_bundle(data_dir: Path, roots: list[x509.Certificate], sequence: int) -> None:
    header = f"# tally bundle sequence {sequence}\n".encode()
    write_atomic(data_dir / BUNDLE_FILE, header + pem.chain_to_pem(roots), 0o644)


def load_bundle(data_dir: Path) -> tuple[list[x509.Certificate], int] | None:
    path = data_dir / BUNDLE_FILE
    if not _check_file(path):
        return None
    data = path.read_bytes()
    sequence = -1
    first = data.split(b"\n", 1)[0]
    if first.startswith(b"# tally bundle sequence "):
        sequence = int(first.rsplit(b" ", 1)[1])
    return pem.chain_from_pem(data[data.index(b"-----BEGIN") :]), sequence
