"""Suite-wide guards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tally.app.launch import Daemon


@pytest.fixture(scope="session", autouse=True)
def no_daemon_ever_logs_a_secret() -> Iterator[None]:
    """Across every real daemon every test starts: no private key, no whole join token."""
    yield
    assert not Daemon.leaks, f"secret-shaped log lines: {sorted(set(Daemon.leaks))}"
