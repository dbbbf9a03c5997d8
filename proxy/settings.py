"""Everything an operator can set on `tally proxy server` and `tally proxy client`, declared once.

Rules:

1. Exactly one identity source: the Workload API (``--workload-socket``, or
   ``SPIFFE_ENDPOINT_SOCKET`` when nothing else is said) or the three files
   ``--cert``/``--key``/``--bundle``.  Giving both is refused rather than
   guessed at, because an operator who thinks the proxy rotates from the agent
   while it actually serves a file would find out when the file expires.
2. A server without an allow rule is refused: mutual TLS that admits any
   certificate of the trust domain is rarely what was meant, so "everybody in
   the trust domain" has to be written down (``--allow-trust-domain``).
3. A client names the server it expects (``--expect-id``); the server's
   certificate is otherwise only known to chain to a bundle.
4. Timeouts are durations with a floor above zero: there is no "0 = forever".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tally.ops.config import Address, ConfigError, Duration, Table, setting
from tally.ops.hook_rules import HOOKS_HELP, check_hooks
from tally.spiffe import authz
from tally.spiffe.peer_policy import RotationPolicy
from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 256


@dataclass(frozen=True)
class FileSourceSpec:
    cert: Path
    key: Path
    bundle: Path
    federated: Mapping[TrustDomain, Path]


@dataclass(frozen=True)
class WorkloadSourceSpec:
    endpoint_socket: Path
    """The Workload API endpoint socket, resolved from ``workload_socket`` or the environment."""


@dataclass(frozen=True)
class ProxySettings:
    """What both modes share."""

    listen: Address = setting(help="where to accept connections: HOST:PORT or a unix socket path")
    target: Address = setting(help="where to forward them: HOST:PORT or a unix socket path")
    workload_socket: str | None = setting(
        None,
        metavar="SOCKET",
        help="SPIFFE Workload API socket (unix:///path or /path); default $SPIFFE_ENDPOINT_SOCKET "
        "when no --cert is given",
    )
    spiffe_id: str | None = setting(
        None,
        metavar="ID",
        help="which of several SVIDs to present (default: the first one offered)",
    )
    cert: Path | None = setting(
        None, help="file source: PEM certificate chain, leaf first (reloaded when it changes)"
    )
    key: Path | None = setting(None, help="file source: PEM private key of --cert")
    bundle: Path | None = setting(None, help="file source: PEM roots of our own trust domain")
    federated_bundle: list[str] = setting(
        [],
        metavar="TD=PATH",
        help="file source: TRUST_DOMAIN=PATH, PEM roots of a federated trust domain",
    )
    http: bool = setting(False, help="HTTP/1.1 mode: per-request forwarding, keep-alive, XFCC")
    metrics: Address | None = setting(
        None, help="serve /healthz, /readyz and /metrics on HOST:PORT"
    )
    max_connections: int = setting(
        1024,
        help="connections served at once, by the whole proxy (with --workers, split between"
        " the workers exactly); further ones wait in the listen backlog",
    )
    workers: str = setting(
        "1",
        metavar="N",
        help="worker processes sharing the listener (SO_REUSEPORT), each with its own event"
        " loop: a number, or auto for one per CPU",
    )
    handshake_timeout: Duration = setting(Duration(10), help="deadline for a TLS handshake")
    idle_timeout: Duration = setting(
        Duration(300), help="close a connection after this long without a byte either way"
    )
    connect_timeout: Duration = setting(Duration(10), help="deadline to connect to --target")
    drain_timeout: Duration = setting(
        Duration(30), help="on SIGTERM, how long open connections may take to finish"
    )
    max_peer_lifetime: Duration | None = setting(
        None,
        help="refuse a peer whose certificate was issued to live longer than this "
        "(not_after - not_before): reason lifetime_exceeds_policy",
    )
    max_peer_age: Duration | None = setting(
        None,
        help="refuse a peer whose certificate was issued longer ago than this, and close its "
        "connections when it gets that old: reason stale_certificate",
    )
    allow_expired_peer_connections: bool = setting(
        False, help="keep connections open after the peer's certificate expires"
    )
    pool_size: int = setting(
        64, help="HTTP mode: idle connections kept open to the target for reuse (0: none)"
    )
    pool_idle_timeout: Duration = setting(
        Duration(30), help="HTTP mode: close a pooled connection idle for this long"
    )
    request_timeout: Duration = setting(
        Duration(60),
        help="HTTP mode: deadline for a whole request (head and body) to arrive from the client, "
        "counted from its first byte, however steadily it trickles; then 408 and close",
    )
    access_log: bool = setting(True, help="HTTP mode: one log line per request")
    tls_groups: str = setting(
        "X25519MLKEM768:X25519:P-256",
        metavar="LIST",
        help="TLS key exchange groups, colon-separated, best first; a client sends a key "
        "share for the first only (default: the post-quantum hybrid, then X25519, then P-256)",
    )
    log_level: str = setting("info", metavar="LEVEL", help="debug, info, warning or error")
    hooks: list[Table] = setting([], flag="--hook", metavar="TABLE", help=HOOKS_HELP)

    def validate(self) -> None:
        check_hooks(self.hooks)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"setting 'log_level': unknown level {self.log_level!r}")
        if self.max_connections < 1:
            raise ConfigError("setting 'max_connections' must be at least 1")
        count = self.worker_count()
        if count > self.max_connections:
            raise ConfigError(
                f"setting 'max_connections' ({self.max_connections}) must be at least"
                f" 'workers' ({count}): each worker serves one connection or more"
            )
        if self.pool_size < 0:
            raise ConfigError("setting 'pool_size' must be 0 or more")
        for name in (
            "handshake_timeout",
            "idle_timeout",
            "connect_timeout",
            "pool_idle_timeout",
            "request_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"setting '{name}' must be above 0s")
        for name in ("max_peer_lifetime", "max_peer_age"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"setting '{name}' must be above 0s (unset: no bound)")
        if self.spiffe_id is not None:
            try:
                SpiffeId.parse(self.spiffe_id)
            except SpiffeIdError as exc:
                raise ConfigError(f"setting 'spiffe_id': {exc}") from exc
        files = [self.cert, self.key, self.bundle]
        if any(f is not None for f in files) and not all(f is not None for f in files):
            raise ConfigError("settings 'cert', 'key' and 'bundle' go together (the file source)")
        if self.cert is not None and self.workload_socket is not None:
            raise ConfigError(
                "give either --workload-socket or --cert/--key/--bundle, not both: "
                "the proxy takes its identity from exactly one source"
            )
        if self.federated_bundle and self.cert is None:
            raise ConfigError(
                "setting 'federated_bundle' needs the file source; the Workload API "
                "sends federated bundles itself"
            )
        self._federated()
        self.policy()
        self._check_groups()

    def _check_groups(self) -> None:
        from OpenSSL import SSL  # imported here, as in `source`: only the proxy needs OpenSSL

        from tally.tls.contexts import set_groups

        try:
            set_groups(SSL.Context(SSL.TLS_METHOD), self.tls_groups)
        except ValueError as exc:
            raise ConfigError(f"setting 'tls_groups': {exc}") from exc

    def _federated(self) -> dict[TrustDomain, Path]:
        out: dict[TrustDomain, Path] = {}
        for item in self.federated_bundle:
            name, sep, path = item.partition("=")
            if not sep or not path:
                raise ConfigError(
                    f"setting 'federated_bundle': {item!r}: expected TRUST_DOMAIN=PATH"
                )
            try:
                td = TrustDomain.parse(name)
            except SpiffeIdError as exc:
                raise ConfigError(f"setting 'federated_bundle': {exc}") from exc
            out[td] = Path(path)
        return out

    def policy(self) -> authz.Policy:
        raise NotImplementedError

    def worker_count(self) -> int:
        """``workers`` as a number: ``auto`` is the CPUs this process may run on."""
        text = self.workers.strip().lower()
        if text == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
            raise ConfigError(
                f"setting 'workers': expected a whole number from 1 to {MAX_WORKERS} or auto,"
                f" got {self.workers!r}"
            )
        return int(text)

    def rotation_policy(self) -> RotationPolicy:
        """The bounds on peer certificates, read at every handshake so SIGHUP reaches the next."""
        return RotationPolicy(self.max_peer_lifetime, self.max_peer_age)

    def source(self, env: Mapping[str, str]) -> FileSourceSpec | WorkloadSourceSpec:
        """Where identities come from; ``env`` supplies SPIFFE_ENDPOINT_SOCKET."""
        # Imported here: HTTP/2 and protobuf cost every start, and the file source needs neither.
        from tally.wire.workload_client import EndpointError, endpoint_from_env, endpoint_socket_of

        if self.cert is not None and self.key is not None and self.bundle is not None:
            return FileSourceSpec(self.cert, self.key, self.bundle, self._federated())
        try:
            if self.workload_socket is not None:
                return WorkloadSourceSpec(endpoint_socket_of(self.workload_socket))
            return WorkloadSourceSpec(endpoint_from_env(env))
        except EndpointError as exc:
            raise ConfigError(
                f"no identity source: {exc}; or give --cert, --key and --bundle"
            ) from exc


@dataclass(frozen=True)
class ServerSettings(ProxySettings):
    """`tally proxy server`: mutual TLS in, plain traffic out to the service."""

    allow_id: list[str] = setting([], metavar="ID", help="admit this exact SPIFFE ID")
    allow_trust_domain: list[str] = setting(
        [], metavar="TD", help="admit every SPIFFE ID of this trust domain"
    )
    allow_path_prefix: list[str] = setting(
        [],
        metavar="PREFIX",
        help="admit spiffe://TD/PREFIX and every ID below it (whole path segments)",
    )

    require_jwt: str | None = setting(
        None,
        metavar="AUDIENCE",
        help="HTTP mode: each request needs Authorization: Bearer <JWT-SVID> for AUDIENCE"
        " whose SPIFFE ID passes the allow rules; else 401",
    )
    client_cert: bool = setting(
        True,
        help="require a client certificate (mutual TLS); --no-client-cert, with --require-jwt,"
        " accepts TLS clients without one (callers behind a load balancer), the token being"
        " then the only credential",
    )

    def validate(self) -> None:
        super().validate()
        if self.require_jwt is not None:
            _jwt_needs(self, "require_jwt", self.require_jwt)
        if not self.client_cert and self.require_jwt is None:
            raise ConfigError(
                "setting 'client_cert' = false (--no-client-cert) needs 'require_jwt': without"
                " a client certificate the token is the only credential"
            )

    def policy(self) -> authz.Policy:
        try:
            rules = authz.parse_policy(
                self.allow_id, self.allow_trust_domain, self.allow_path_prefix
            )
        except authz.RuleError as exc:
            raise ConfigError(f"allow rule: {exc}") from exc
        if rules.empty:
            raise ConfigError(
                "a server needs at least one allow rule: --allow-id, --allow-trust-domain "
                "or --allow-path-prefix"
            )
        return rules


@dataclass(frozen=True)
class ClientSettings(ProxySettings):
    """`tally proxy client`: plain traffic in from the app, mutual TLS out."""

    expect_id: list[str] = setting(
        [], metavar="ID", help="the server's SPIFFE ID must be one of these"
    )
    inject_jwt: str | None = setting(
        None,
        metavar="AUDIENCE",
        help="HTTP mode: send Authorization: Bearer <JWT-SVID for AUDIENCE> on every request,"
        " replacing the app's",
    )

    def validate(self) -> None:
        super().validate()
        if self.inject_jwt is not None:
            _jwt_needs(self, "inject_jwt", self.inject_jwt)

    def policy(self) -> authz.Policy:
        try:
            rules = authz.parse_policy(ids=self.expect_id)
        except authz.RuleError as exc:
            raise ConfigError(f"expected server: {exc}") from exc
        if rules.empty:
            raise ConfigError("a client needs --expect-id: the SPIFFE ID of the server")
        return rules


def _jwt_needs(cfg: ProxySettings, name: str, audience: str) -> None:
    """Bearer tokens need HTTP mode and the Workload API (files hold no JWT-SVIDs)."""
    if not audience or len(audience) > 256 or not audience.isprintable():
        raise ConfigError(f"setting '{name}': the audience must be 1 to 256 printable characters")
    if not cfg.http:
        raise ConfigError(f"setting '{name}' needs HTTP mode (--http)")
    if cfg.cert is not None:
        raise ConfigError(
            f"setting '{name}' needs the Workload API (JWT-SVIDs come from the agent),"
            " not --cert/--key/--bundle"
        )
