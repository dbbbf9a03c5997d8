"""A throwaway PostgreSQL 15 cluster for the tests: Debian's binaries, a temp dir, a Unix socket.

One cluster per pytest process (so one per xdist worker), started on first use
and stopped at the end of the session; a fresh database per test module
(`pg_database`), and a fresh schema per test where a test needs an empty
datastore (`fresh_pg`).  PostgreSQL refuses to run as root, so under root the
cluster runs as the ``postgres`` user, which owns the temp dir.  Without the
binaries, the PostgreSQL tests are skipped with the reason; nothing is mocked.

fsync is off: a test cluster that dies is thrown away anyway, and the suite's
disk stays quiet.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), Path("/usr/lib/postgresql/16/bin")]
_names = itertools.count(1)


def pg_bin() -> Path | None:
    for d in BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


@dataclass
class Cluster:
    bin_dir: Path
    root: Path
    socket_dir: Path
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, db: str) -> str:
        return f"postgresql://postgres@/{db}?host={self.socket_dir}"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-w", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        opts = (
            f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off"
            " -c full_page_writes=off -c synchronous_commit=off -c max_connections=200"
            " -c shared_buffers=16MB"
        )
        self.ctl("-l", str(self.root / "log"), "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self.ctl("-m", mode, "stop")

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self) -> str:
        name = f"tally_{os.getpid()}_{next(_names)}"
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, url: str) -> None:
        """Drop a database `create_database` made (named in ``url``), and its disk space."""
        from psycopg import conninfo

        name = conninfo.conninfo_to_dict(url)["dbname"]
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _start_cluster() -> Generator[Cluster, None, None]:
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL binaries (initdb, pg_ctl) are not installed: apt install postgresql"
        )
    root = Path(tempfile.mkdtemp(prefix="tally-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = Cluster(bin_dir, root, root, as_user)
    try:
        subprocess.run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                str(cluster.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """The worker's one PostgreSQL cluster (see the module docstring)."""
    yield from _start_cluster()


@pytest.fixture(scope="module")
def pg_database(pg_cluster: Cluster) -> str:
    """A database of the module's own, as a datastore URL."""
    return pg_cluster.url(pg_cluster.create_database())


@pytest.fixture
def fresh_pg(pg_database: str) -> str:
    """The module's database emptied for one test: a datastore never opened."""
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return pg_database
