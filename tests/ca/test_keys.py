"""The key manager on a real SQLite store and real key files, with an injected clock."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ca.keys import CAKeyError, KeyManager
from ca.schedule import MAX_NOT_BEFORE_CUSHION, Policy
from ca.store import Store
from tally.spiffe.spiffeid import TrustDomain

TD = TrustDomain.parse("example.org")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 29, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def manager(tmp_path: Path, clock: Clock, policy: Policy | None = None) -> KeyManager:
    store = Store.open(tmp_path / "ca.db")
    km = KeyManager(store, tmp_path, TD, policy or Policy(600, 10**6, 60), clock)
    km.load()
    km.tick()
    return km


def key_files(tmp_path: Path) -> set[str]:
    return {p.stem for p in (tmp_path / "keys").glob("*.pem")}


def test_first_start_makes_root_and_intermediate_with_0600_keys(tmp_path):
    km = manager(tmp_path, Clock())
    assert km.signer is not None and km.bundle is not None
    assert len(km.bundle.x509_authorities) == 1
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    for path in (tmp_path / "keys").glob("*.pem"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert km.signer.chain[0].issuer == km.bundle.x509_authorities[0].subject


def test_signing_certificates_start_before_they_are_made(tmp_path):
    """A peer whose clock is behind the CA's must not find a fresh root or intermediate
    not yet valid (the clock-skew drill found them starting at the very second they
    were made)."""
    clock = Clock()
    km = manager(tmp_path, clock)
    cushion = timedelta(seconds=MAX_NOT_BEFORE_CUSHION)
    assert km.bundle.x509_authorities[0].not_valid_before_utc == clock.now - cushion
    assert km.signer.chain[0].not_valid_before_utc == clock.now - cushion
    first = km.signer.chain[0]
    for _ in range(50):  # past two thirds of the intermediate's 600 s, tick by tick
        clock.advance(10)
        km.tick()
    second = km.signer.chain[0]
    assert second != first
    # Made when it was prepared (a third through the first one's life), then backdated.
    assert second.not_valid_before_utc < second.not_valid_after_utc - timedelta(seconds=600)


def test_rotation_over_time_deletes_keys_that_will_never_sign_again(tmp_path):
    clock = Clock()
    km = manager(tmp_path, clock)
    first = km.signer
    assert first is not None
    signers = {first.key_id}
    for _ in range(120):
        clock.advance(10)
        km.tick()
        assert km.signer is not None
        signers.add(km.signer.key_id)
        # Only the root, the active intermediate and at most one prepared one hold keys.
        assert key_files(tmp_path) <= {
            r.id for r in km._records if r.state in ("active", "prepared")
        }
    assert len(signers) >= 2
    assert first.key_id not in key_files(tmp_path)
    # A restart picks up exactly where it was.
    again = KeyManager(km.store, tmp_path, TD, km.policy, clock)
    again.load()
    assert again.signer is not None and again.signer.key_id == km.signer.key_id


def test_root_rotation_bumps_the_bundle_twice(tmp_path):
    clock = Clock()
    km = manager(tmp_path, clock, Policy(600, 10**6, 60))
    seq0 = km.bundle.sequence
    km.rotate_root("admin:uid=0")
    assert km.bundle.sequence == seq0 + 1 and len(km.bundle.x509_authorities) == 2
    with pytest.raises(CAKeyError, match="already waiting"):
        km.rotate_root("admin:uid=0")
    clock.advance(61)
    km.tick()
    assert km.signer.chain[0].issuer == km.bundle.x509_authorities[1].subject
    clock.advance(601)
    km.tick()
    assert len(km.bundle.x509_authorities) == 1
    assert km.bundle.sequence == seq0 + 2


def test_loose_key_file_refuses_start(tmp_path):
    km = manager(tmp_path, Clock())
    km.store.close()
    path = next((tmp_path / "keys").glob("*.pem"))
    os.chmod(path, 0o640)
    with pytest.raises(CAKeyError, match="0640"):
        manager(tmp_path, Clock())


def test_symlinked_key_file_refuses_start(tmp_path):
    km = manager(tmp_path, Clock())
    km.store.close()
    path = next((tmp_path / "keys").glob("*.pem"))
    target = tmp_path / "elsewhere.pem"
    path.rename(target)
    path.symlink_to(target)
    with pytest.raises(CAKeyError, match="symlink"):
        manager(tmp_path, Clock())


def test_nothing_signs_with_an_intermediate_whose_root_is_not_in_the_bundle(tmp_path):
    """With several servers a key table comes from the database; a signer is published
    only if its root is among the roots this server publishes."""
    from dataclasses import replace

    km = manager(tmp_path, Clock())
    assert km.signer is not None
    km._records = [replace(r, state="removed") if r.kind == "root" else r for r in km._records]
    km._publish()
    published = {"signer": km.signer, "bundle": km.bundle}  # read again after _publish
    assert published["signer"] is None
    assert not km.bundle.x509_authorities
