"""Suite-wide guards, and the interpreter for children that drop to another uid."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tally.app.launch import Daemon
from tests.dropped import build
from tests.pg import fresh_pg, pg_cluster, pg_database

__all__ = ["fresh_pg", "pg_cluster", "pg_database"]  # fixtures every test module may use

# Property tests judge behaviour, not speed (that lives in bench/): on 2 shared cores
# running the suite in parallel, a per-example deadline only measures the neighbours.
settings.register_profile("tally", deadline=None)
settings.load_profile("tally")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """How ``make test`` (``--dist loadgroup``) spreads the suite over its xdist workers.

    A file is one unit of work, so its module-scoped daemons start once.  The files
    marked ``drill`` (a whole mesh under load, with SVIDs of a few seconds) are one
    unit too, run one after another on one worker and sent out first: two drills side
    by side on two cores starve each other's renewals, which is a fault of the suite,
    not of the code under test.  The other files follow, most tests first.
    """

    def group(item: pytest.Item) -> str:
        return "drills" if item.get_closest_marker("drill") else item.nodeid.split("::")[0]

    sizes: dict[str, int] = {}
    for item in items:
        sizes[group(item)] = sizes.get(group(item), 0) + 1
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda item: (group(item) != "drills", -sizes[group(item)]))


@pytest.fixture(scope="session", autouse=True)
def no_daemon_ever_logs_a_secret() -> Iterator[None]:
    """Across every real daemon every test starts: no private key, no whole join token."""
    yield
    assert not Daemon.leaks, f"secret-shaped log lines: {sorted(set(Daemon.leaks))}"


@pytest.fixture(scope="session")
def dropped_python() -> Iterator[Path]:
    """An interpreter with py-spiffe that still imports after a drop to uid 65534.

    Every child that drops privileges runs this one, not ``sys.executable``: the
    clone (and its ``.venv``) may live where that uid cannot read (tests/dropped.py).
    Built once per session, so once per xdist worker that needs it: about 0.2 s
    with hard links, 1.5 s where it must copy, which is not worth a lock shared
    between workers.
    """
    dest = Path(tempfile.mkdtemp(prefix="tally-dropped-"))
    try:
        for parent in dest.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                pytest.fail(f"{parent} is closed to other users; point TMPDIR elsewhere")
        yield build(dest, "spiffe")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
