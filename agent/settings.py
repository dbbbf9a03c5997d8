"""Everything an operator can set on `tally agent run`, declared once."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tally.ops.config import Address, ConfigError, Duration, Table, setting
from tally.ops.hook_rules import HOOKS_HELP, check_hooks
from tally.spiffe.spiffeid import SpiffeIdError, TrustDomain


@dataclass(frozen=True)
class AgentSettings:
    trust_domain: str = setting(help="trust domain of the CA, e.g. example.org")
    server: list[str] = setting(
        help="a CA server's agent API, HOST:PORT; repeat it for several servers (a name with"
        " several addresses counts as several); the agent moves to another when one fails"
    )
    trust_bundle: Path | None = setting(
        None,
        help="PEM roots to trust the CA by on first start (later starts use the bundle the "
        "agent keeps in its data dir)",
    )
    join_token: str | None = setting(
        None, help="one-time join token; needed only at first start or after eviction", secret=True
    )
    data_dir: Path = setting(
        Path("/var/lib/tally/agent"), help="the agent's own key and SVID (mode 0600) live here"
    )
    socket: Path = setting(
        Path("/run/tally/agent/agent.sock"),
        help="Workload API Unix socket (any local process may connect)",
    )
    workload_max_connections: int = setting(
        1024,
        help="Workload API connections served at once; past it a new one gets a GOAWAY"
        " and is closed",
    )
    workload_max_connections_per_uid: int = setting(
        128,
        help="Workload API connections one local uid may hold at once, so that one"
        " user's flood leaves the others served",
    )
    metrics: Address | None = setting(
        None, help="serve /healthz, /readyz and /metrics on HOST:PORT"
    )
    ca_timeout: Duration = setting(
        Duration(15),
        help="deadline for one call to the CA, once its connection is up (a new connection's"
        " handshake may also wait up to 75s for its turn in a busy CA's line)",
    )
    poll_wait: Duration = setting(
        Duration(50),
        help="how long the CA may hold the change-feed request (entries and bundle) open;"
        " under the idle cut of any load balancer between agent and CA",
    )
    drain_timeout: Duration = setting(
        Duration(10),
        help="on SIGTERM, how long Workload API calls may take to finish before the agent exits",
    )
    log_level: str = setting("info", help="debug, info, warning or error")
    hooks: list[Table] = setting([], flag="--hook", metavar="TABLE", help=HOOKS_HELP)

    def validate(self) -> None:
        check_hooks(self.hooks)
        try:
            TrustDomain.parse(self.trust_domain)
        except SpiffeIdError as exc:
            raise ConfigError(f"setting 'trust_domain': {exc}") from exc
        if not self.server:
            raise ConfigError("setting 'server' needs at least one HOST:PORT")
        for text in self.server:
            try:
                address = Address.parse(text)
            except ConfigError as exc:
                raise ConfigError(f"setting 'server': {exc}") from None
            if address.is_unix:
                raise ConfigError("setting 'server' must be HOST:PORT (the CA API runs over TCP)")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"setting 'log_level': unknown level {self.log_level!r}")
        if not 0 < self.poll_wait <= 55:
            raise ConfigError("setting 'poll_wait' must be between 1s and 55s")
        for name in ("workload_max_connections", "workload_max_connections_per_uid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting '{name}' must be at least 1")
        if self.ca_timeout < 1:
            raise ConfigError("setting 'ca_timeout' must be at least 1s")

    def server_addresses(self) -> list[Address]:
        """Every CA server to try: each name given, expanded to each of its addresses."""
        return expand_servers([Address.parse(text) for text in self.server])


def expand_servers(
    servers: list[Address], resolve: Callable[..., list[Any]] = socket.getaddrinfo
) -> list[Address]:
    """A DNS name with several addresses counts as several servers, so a name behind
    round-robin DNS gives the agent somewhere to fail over to.  A name that does not
    resolve now is kept as it is: the connection resolves it again."""
    out: list[Address] = []
    for address in servers:
        host, port = address.host, address.port
        found: list[Address] = []
        if host is not None and port is not None:
            try:
                infos = resolve(host, port, type=socket.SOCK_STREAM)
            except OSError:
                infos = []
            for info in infos:
                ip = str(info[4][0])
                text = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                candidate = Address.parse(text)
                if candidate not in found:
                    found.append(candidate)
        for candidate in found if len(found) > 1 else [address]:
            if candidate not in out:
                out.append(candidate)
    return out
