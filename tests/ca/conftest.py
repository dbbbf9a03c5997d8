"""A CA core on a temporary datastore (a SQLite file, then PostgreSQL) and real key files,
with a clock the test moves."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authority import Authority, Limits
from ca.datastore import Datastore
from ca.datastore import parse as parse_datastore
from ca.keys import KeyManager
from ca.schedule import Policy
from ca.store import Store
from tally.spiffe.spiffeid import TrustDomain

TD = TrustDomain.parse("example.org")
# default SVID TTL, maximum SVID TTL, agent SVID TTL, join token TTL
LIMITS = Limits(default_ttl=3600, max_ttl=86400, agent_ttl=3600, token_ttl=600)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 29, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def datastore(request: pytest.FixtureRequest, tmp_path: Path) -> Datastore:
    """Each test that uses the store runs on both engines: the SQLite file and a fresh
    schema in the worker's throwaway PostgreSQL (`tests.pg`)."""
    if request.param == "sqlite":
        return Datastore.sqlite(tmp_path / "ca.db")
    return parse_datastore(request.getfixturevalue("fresh_pg"))


@pytest.fixture
def store(datastore: Datastore) -> Iterator[Store]:
    s = Store.connect(datastore)
    yield s
    s.close()


@pytest.fixture
def authority(tmp_path: Path, store: Store, clock: Clock) -> Authority:
    keys = KeyManager(store, tmp_path, TD, Policy(86400, 10 * 365 * 86400, 3600), clock)
    keys.load()
    keys.tick()
    return Authority(store, keys, TD, LIMITS, clock)
