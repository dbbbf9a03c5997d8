"""The datastore's files are 0600 whatever the umask, and a looser one is refused."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.store import SIDE_FILES, AuditEvent, Store, StoreError, TokenRecord
from tally.app.launch import run_cli


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(db: Path) -> dict[str, int]:
    return {
        suffix or "db": stat.S_IMODE(os.stat(f"{db}{suffix}").st_mode)
        for suffix in SIDE_FILES
        if os.path.exists(f"{db}{suffix}")
    }


def test_new_datastore_and_side_files_are_private_under_umask_022(tmp_path: Path, umask_022):
    db = tmp_path / "ca.db"
    store = Store.open(db)
    try:
        token = TokenRecord("t1", b"h" * 32, None, expires_at=2, used_at=None, created_at=1)
        store.create_token(token, AuditEvent(ts="2026-01-01T00:00:00Z", actor="test", event="x"))
        found = modes(db)
    finally:
        store.close()
    assert set(found) == {"db", "-wal", "-shm"}, found
    assert set(found.values()) == {0o600}, found


@pytest.mark.parametrize("suffix", SIDE_FILES)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_looser_datastore_file_is_refused(tmp_path: Path, suffix: str, mode: int):
    db = tmp_path / "ca.db"
    Store.open(db).close()
    side = Path(f"{db}{suffix}")
    side.touch()
    os.chmod(side, mode)
    with pytest.raises(StoreError) as info:
        Store.open(db)
    assert str(side) in str(info.value) and f"{mode:04o}" in str(info.value)


def test_the_ca_refuses_to_start_on_a_readable_datastore_in_one_line(tmp_path: Path):
    data_dir = tmp_path / "ca"
    data_dir.mkdir(mode=0o700)
    db = data_dir / "ca.db"
    Store.open(db).close()
    os.chmod(db, 0o644)
    result = run_cli(
        "ca",
        "run",
        "--trust-domain",
        "example.org",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--admin-socket",
        str(tmp_path / "admin.sock"),
    )
    assert result.returncode == 1
    assert str(db) in result.stderr and "0644" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
