"""Sealed keys and the wrapped cluster key (`ca.vault`): only the right server opens its copy,
and a sealed key neither opens altered nor under another key id."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.vault import (
    VaultError,
    load_or_create_identity,
    new_cluster_key,
    public_pem,
    seal,
    server_id,
    unseal,
    unwrap,
    wrap,
)


def test_the_cluster_key_opens_only_for_the_server_it_was_wrapped_to(tmp_path: Path):
    mine = load_or_create_identity(tmp_path / "a")
    other = load_or_create_identity(tmp_path / "b")
    assert (tmp_path / "a" / "server.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_identity(tmp_path / "a").private_numbers() == mine.private_numbers()
    key = new_cluster_key()
    wrapped = wrap(key, public_pem(mine))
    assert unwrap(wrapped, mine) == key
    with pytest.raises(VaultError, match=server_id(public_pem(other))):
        unwrap(wrapped, other)
    with pytest.raises(VaultError):
        unwrap(wrapped[:-1] + bytes([wrapped[-1] ^ 1]), mine)


def test_a_sealed_key_opens_unaltered_under_its_own_id_only():
    key = new_cluster_key()
    sealed = seal(key, "int-1", b"private key pem")
    assert unseal(key, "int-1", sealed) == b"private key pem"
    with pytest.raises(VaultError, match="int-2"):
        unseal(key, "int-2", sealed)  # moved onto another key's row
    with pytest.raises(VaultError):
        unseal(key, "int-1", sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:])
    with pytest.raises(VaultError):
        unseal(new_cluster_key(), "int-1", sealed)
