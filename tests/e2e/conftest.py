"""Fixtures that start the real `tally` daemons on temporary directories and loopback ports.

The CA's datastore engine is the ``ca_engine`` fixture: ``sqlite`` (the file in
its data dir) unless a module overrides it, as the modules about the CA itself
do, so that their tests run once on each engine::

    @pytest.fixture(scope="module", params=ENGINES)
    def ca_engine(request) -> str:
        return request.param

Module-scoped, so pytest runs a module's tests on one engine and then the
other, and a CA the module shares is started once per engine.  On
``postgresql`` every CA a test starts gets a fresh database on the xdist
worker's one throwaway cluster (tests/pg.py), so nothing leaks between tests.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tally.app.launch import Daemon, run_cli

pytestmark = pytest.mark.e2e


@dataclass
class CA:
    daemon: Daemon
    data_dir: Path
    admin_socket: str
    listen: str
    metrics: str
    trust_domain: str
    extra: list[str] = field(default_factory=list)
    datastore: str = ""  # a URL, or "" for the SQLite file in data_dir

    def cli(self, *args: str, check: bool = True):
        result = run_cli("ca", *args, "--admin-socket", self.admin_socket)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def json(self, *args: str):
        result = self.cli(*args, "--output", "json")
        return json.loads(result.stdout)

    def restart(self, *extra: str) -> None:
        self.daemon.stop()
        self.start_again(*extra)

    def sql(self, query: str, *params: object) -> list[tuple]:
        """Run SQL on the datastore behind the CA's back, as an intruder with the database would.

        ``?`` placeholders on both engines."""
        if not self.datastore:
            conn = sqlite3.connect(str(self.data_dir / "ca.db"))
            with conn:
                rows = conn.execute(query, params).fetchall()
            conn.close()
            return rows
        import psycopg

        with psycopg.connect(self.datastore, autocommit=True) as pg:
            cur = pg.execute(query.replace("?", "%s").encode(), params)
            return cur.fetchall() if cur.description else []

    def start_again(self, *extra: str) -> None:
        """Start on the same port and data dir (after stop or kill)."""
        start_ca(self, list(extra) or self.extra)


def ca_args(ca: CA, extra: list[str]) -> list[str]:
    return [
        "ca",
        "run",
        "--trust-domain",
        ca.trust_domain,
        "--data-dir",
        str(ca.data_dir),
        "--listen",
        ca.listen,
        "--admin-socket",
        ca.admin_socket,
        "--metrics",
        ca.metrics,
        *(["--datastore", ca.datastore] if ca.datastore else []),
        *extra,
    ]


def start_ca(ca: CA, extra: list[str]) -> None:
    ca.extra = extra
    ca.daemon = Daemon("ca", ca_args(ca, extra))
    started = ca.daemon.start("ca.started")
    ca.listen = started["listen"]
    ca.metrics = started.get("metrics", ca.metrics)


def make_ca(
    tmp_path: Path, *extra: str, trust_domain: str = "example.org", datastore: str = ""
) -> CA:
    ca = CA(
        daemon=Daemon("ca", []),
        data_dir=tmp_path / "ca",
        admin_socket=str(tmp_path / "admin.sock"),
        listen="127.0.0.1:0",
        metrics="127.0.0.1:0",
        trust_domain=trust_domain,
        datastore=datastore,
    )
    start_ca(ca, list(extra))
    return ca


ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def ca_engine() -> str:
    """The datastore engine of the CAs a test starts (see the module docstring)."""
    return "sqlite"


sqlite_only = pytest.mark.parametrize("ca_engine", ["sqlite"], indirect=True)
"""Marks a test, in a module on both engines, that is about the SQLite file itself."""


def new_datastore(engine: str, request: pytest.FixtureRequest) -> Callable[[], str]:
    """Makes datastore URLs for new CAs on ``engine`` ("" is SQLite's file).

    The worker's PostgreSQL cluster is asked for only when a test needs it, and
    each database it makes is dropped when the requesting fixture or test ends
    (finalizers run last-in first-out, so register the CA's stop after this)."""
    if engine == "sqlite":
        return lambda: ""
    cluster = request.getfixturevalue("pg_cluster")

    def make() -> str:
        url = cluster.url(cluster.create_database())
        request.addfinalizer(lambda: cluster.drop_database(url))
        return url

    return make


@pytest.fixture
def ca_factory(tmp_path: Path, ca_engine: str, request: pytest.FixtureRequest) -> Callable[..., CA]:
    datastore = new_datastore(ca_engine, request)

    def factory(*extra: str, trust_domain: str = "example.org", subdir: str = "") -> CA:
        base = tmp_path / subdir if subdir else tmp_path
        base.mkdir(exist_ok=True)
        ca = make_ca(base, *extra, trust_domain=trust_domain, datastore=datastore())
        # Finalizers run last-in first-out: the CA (whichever daemon a test left in
        # ca.daemon) stops before its database is dropped.
        request.addfinalizer(lambda: ca.daemon.stop())
        return ca

    return factory


@pytest.fixture
def ca(ca_factory) -> CA:
    return ca_factory()


def openssl_available() -> bool:
    return any(
        os.access(os.path.join(p, "openssl"), os.X_OK) for p in os.environ["PATH"].split(":")
    )


@dataclass
class Agent:
    daemon: Daemon
    data_dir: Path
    socket: str
    metrics: str
    spiffe_id: str
    args: list[str]

    def restart(self, *extra: str) -> None:
        self.daemon.stop()
        self.start(*extra)

    def start(self, *extra: str) -> None:
        self.daemon = Daemon("agent", [*self.args, *extra])
        started = self.daemon.start("agent.started")
        self.metrics = started.get("metrics", self.metrics)


def public_dir() -> Path:
    """A directory any uid may enter, for sockets that processes under other uids use."""
    path = Path(tempfile.mkdtemp(prefix="tally-e2e-"))
    path.chmod(0o755)
    return path


def start_agent(ca: CA, tmp_path: Path, name: str = "node-1", *extra: str) -> Agent:
    spiffe_id = f"spiffe://{ca.trust_domain}/agent/{name}"
    token = ca.json("token", "create", "--spiffe-id", spiffe_id)["token"]
    bundle = tmp_path / f"{name}-bundle.pem"
    bundle.write_text(ca.json("bundle", "show")["bundle"])
    sockdir = public_dir()
    args = [
        "agent",
        "run",
        "--trust-domain",
        ca.trust_domain,
        "--server",
        ca.listen,
        "--trust-bundle",
        str(bundle),
        "--data-dir",
        str(tmp_path / name),
        "--socket",
        str(sockdir / "agent.sock"),
        "--metrics",
        "127.0.0.1:0",
        *extra,
    ]
    agent = Agent(
        Daemon("agent", []), tmp_path / name, str(sockdir / "agent.sock"), "", spiffe_id, args
    )
    agent.start("--join-token", token)
    return agent


@pytest.fixture
def agent_factory(ca_factory, tmp_path: Path) -> Iterator:
    made: list[Agent] = []

    def factory(ca: CA, name: str = "node-1", *extra: str) -> Agent:
        agent = start_agent(ca, tmp_path, name, *extra)
        made.append(agent)
        return agent

    yield factory
    for agent in made:
        agent.daemon.stop()
        shutil.rmtree(Path(agent.socket).parent, ignore_errors=True)
