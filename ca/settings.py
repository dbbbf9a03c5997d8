"""Everything an operator can set on `tally ca run`, declared once.

The same declaration gives the TOML keys, the flags, the defaults, the
validation and the configuration reference in the docs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ca.datastore import Datastore, DatastoreUrlError
from ca.datastore import parse as parse_datastore
from tally.ops.config import Address, ConfigError, Duration, Table, is_loopback, setting
from tally.ops.hook_rules import HOOKS_HELP, check_hooks
from tally.spiffe.spiffeid import SpiffeId, SpiffeIdError, TrustDomain


def workers_for(setting: str) -> int:
    """The pool size the ``signing_workers`` setting asks for (``auto``: the CPUs this
    process may run on); raises ValueError for anything but ``auto`` or a count >= 0."""
    if setting == "auto":
        return len(os.sched_getaffinity(0))
    count = int(setting)
    if count < 0:
        raise ValueError("expected auto or a number of workers >= 0")
    return count


@dataclass(frozen=True)
class CASettings:
    trust_domain: str = setting(help="trust domain this CA issues for, e.g. example.org")
    data_dir: Path = setting(
        Path("/var/lib/tally/ca"), help="keys (mode 0600) and the SQLite datastore live here"
    )
    datastore: str | None = setting(
        None,
        secret=True,
        help="where the CA keeps its state: sqlite:///PATH, or postgresql://USER@HOST/DB for"
        " several CA servers on one database (default: the SQLite file ca.db in data_dir;"
        " keep a password in ~/.pgpass or TALLY_DATASTORE, never in this URL)",
    )
    listen: Address = setting(
        Address.parse("127.0.0.1:8443"), help="agent API address (TLS), HOST:PORT"
    )
    admin_socket: Path = setting(
        Path("/run/tally/ca/admin.sock"), help="admin API Unix socket (created with mode 0600)"
    )
    metrics: Address | None = setting(
        None, help="serve /healthz, /readyz and /metrics on HOST:PORT"
    )
    default_svid_ttl: Duration = setting(
        Duration(3600), help="lifetime of workload SVIDs whose entry sets none"
    )
    max_svid_ttl: Duration = setting(
        Duration(86400), help="longest SVID lifetime an entry or mint may ask for"
    )
    agent_svid_ttl: Duration = setting(Duration(3600), help="lifetime of agent SVIDs")
    intermediate_ttl: Duration = setting(
        Duration(86400), help="lifetime of each signing (intermediate) key"
    )
    root_ttl: Duration = setting(Duration(10 * 365 * 86400), help="lifetime of the CA's own root")
    root_propagation: Duration = setting(
        Duration(3600), help="how long a new root sits in the bundle before anything chains to it"
    )
    join_token_ttl: Duration = setting(Duration(600), help="default lifetime of join tokens")
    attest_burst: int = setting(
        10,
        help="failed node attestations one peer address may make at once;"
        " past them the agent API answers 429 without checking the token",
    )
    attest_refill: Duration = setting(
        Duration(6), help="after the burst, one more failed attestation per peer per this long"
    )
    token_max_failures: int = setting(
        5, help="wrong secrets tried against one join token's id before that token is revoked"
    )
    upstream_cert: Path | None = setting(
        None, help="an existing CA certificate (PEM) to sign our intermediates"
    )
    upstream_key: Path | None = setting(None, help="private key of --upstream-cert (mode 0600)")
    upstream_bundle: Path | None = setting(
        None, help="roots of the upstream PKI, when --upstream-cert is not self-signed"
    )
    default_jwt_ttl: Duration = setting(Duration(300), help="lifetime of JWT-SVIDs")
    max_jwt_ttl: Duration = setting(
        Duration(3600),
        help="longest JWT-SVID lifetime `tally ca jwt mint` may ask for; a retired JWT key"
        " stays published this long",
    )
    jwt_key_ttl: Duration = setting(
        Duration(86400),
        help="how long each JWT signing key signs; its successor is published half this"
        " long before it takes over",
    )
    jwt_key_type: str = setting("ec", help="JWT signing keys: ec (ES256) or rsa (RS256)")
    jwt_propagation: Duration = setting(
        Duration(300),
        help="how long a JWT key made by `tally ca rotate --jwt` is published before it signs",
    )
    jwt_audit_window: Duration = setting(
        Duration(3600),
        help="one jwt.issued audit record per caller, SPIFFE ID and audience per this long;"
        " the tokens between are counted in the next record",
    )
    oidc_listen: Address | None = setting(
        None, help="serve OIDC discovery (/.well-known/openid-configuration, /keys) on HOST:PORT"
    )
    oidc_issuer: str | None = setting(
        None, help="the OIDC issuer URL (https://NAME), also put in every JWT-SVID's iss"
    )
    oidc_cert: Path | None = setting(
        None,
        help="TLS certificate chain (PEM) for --oidc-listen; without it, plain HTTP on"
        " loopback only",
    )
    oidc_key: Path | None = setting(None, help="private key of --oidc-cert (mode 0600)")
    handshake_timeout: Duration = setting(Duration(10), help="TLS handshake deadline")
    request_timeout: Duration = setting(Duration(30), help="deadline to receive one request")
    max_connections: int = setting(
        32768,
        help="agent API connections served at once (each agent holds 1 at rest, 2 while"
        " it renews); the CA"
        " raises its open-file limit to fit at start",
    )
    overload_queue: int = setting(
        1024,
        help="agent calls waiting for the datastore past which new ones are answered 429"
        " with Retry-After and new connections are closed before their handshake"
        " (admission control for a reconnecting herd)",
    )
    signing_workers: str = setting(
        "auto",
        help="processes that check CSRs and sign workload SVIDs beside the CA's main process:"
        " auto (one per CPU the CA may use), a number, or 0 to sign in the main process",
    )
    admin_max_connections: int = setting(
        64,
        help="admin socket connections served at once; past it a new one is answered"
        " 503 and closed",
    )
    audit_anchor_every: Duration = setting(
        Duration(3600),
        help="sign the audit chain's head this often (and on every key event), publishing it"
        " as an audit.anchor log line, in the metrics and in --audit-anchor-file",
    )
    audit_anchor_file: Path | None = setting(
        None,
        help="append every signed audit anchor here as a JSON line; keep it where whoever"
        " can write the datastore cannot (another disk, a log shipper)",
    )
    console: Address | None = setting(
        None,
        help="serve the live, read-only web console on HOST:PORT; a loopback address unless"
        " console_cert, console_key and console_admin_id are set",
    )
    console_cert: Path | None = setting(
        None,
        help="the console's TLS certificate chain (PEM); with it the console serves HTTPS"
        " and asks every browser for a client certificate",
    )
    console_key: Path | None = setting(None, help="private key of --console-cert (mode 0600)")
    console_admin_id: list[str] = setting(
        [],
        metavar="ID",
        help="SPIFFE ID (of this trust domain) whose client certificate may open the console",
    )
    log_level: str = setting("info", help="debug, info, warning or error")
    hooks: list[Table] = setting([], flag="--hook", metavar="TABLE", help=HOOKS_HELP)
    audit_verify_every: Duration | None = setting(
        None,
        help="verify the audit chain this often; a break logs audit.broken (a hook event)",
    )

    def _validate_console(self) -> None:
        """The console is public data, but a fleet's map all the same: off loopback it
        needs TLS and an admin's client certificate, and the CA says so before starting."""
        if (self.console_cert is None) != (self.console_key is None):
            raise ConfigError("settings 'console_cert' and 'console_key' go together")
        tls = self.console_cert is not None
        if tls and not self.console_admin_id:
            raise ConfigError(
                "setting 'console_cert' needs at least one 'console_admin_id':"
                " the SPIFFE IDs whose client certificates may open the console"
            )
        if self.console_admin_id and not tls:
            raise ConfigError("setting 'console_admin_id' needs 'console_cert' and 'console_key'")
        td = TrustDomain.parse(self.trust_domain)
        for text in self.console_admin_id:
            try:
                sid = SpiffeId.parse(text)
            except SpiffeIdError as exc:
                raise ConfigError(f"setting 'console_admin_id': {exc}") from exc
            if sid.trust_domain != td:
                raise ConfigError(f"setting 'console_admin_id': {text} is not in trust domain {td}")
        if self.console is None:
            return
        if self.console.is_unix:
            raise ConfigError("setting 'console': expected HOST:PORT (a browser needs TCP)")
        if not tls and not is_loopback(self.console.host):
            raise ConfigError(
                f"setting 'console': {self.console} is not a loopback address; off loopback"
                " the console needs console_cert, console_key and console_admin_id"
                " (client-certificate authentication)"
            )

    def validate(self) -> None:
        check_hooks(self.hooks)
        if self.audit_verify_every is not None and self.audit_verify_every < 1:
            raise ConfigError("setting 'audit_verify_every' must be at least 1s")
        if self.datastore is not None:
            try:
                parse_datastore(self.datastore)
            except DatastoreUrlError as exc:
                raise ConfigError(f"setting 'datastore': {exc}") from None
        try:
            TrustDomain.parse(self.trust_domain)
        except SpiffeIdError as exc:
            raise ConfigError(f"setting 'trust_domain': {exc}") from exc
        self._validate_console()
        if self.default_svid_ttl > self.max_svid_ttl:
            raise ConfigError(
                "setting 'default_svid_ttl' is above 'max_svid_ttl'"
                f" ({self.default_svid_ttl:.0f}s > {self.max_svid_ttl:.0f}s)"
            )
        if self.default_jwt_ttl > self.max_jwt_ttl:
            raise ConfigError(
                "setting 'default_jwt_ttl' is above 'max_jwt_ttl'"
                f" ({self.default_jwt_ttl:.0f}s > {self.max_jwt_ttl:.0f}s)"
            )
        if self.jwt_key_type not in ("ec", "rsa"):
            raise ConfigError(
                f"setting 'jwt_key_type': expected ec or rsa, got {self.jwt_key_type!r}"
            )
        self._validate_oidc()
        if self.root_propagation >= self.root_ttl / 3:
            raise ConfigError("setting 'root_propagation' must be under a third of 'root_ttl'")
        if (self.upstream_cert is None) != (self.upstream_key is None):
            raise ConfigError("settings 'upstream_cert' and 'upstream_key' go together")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"setting 'log_level': unknown level {self.log_level!r}")
        try:
            workers_for(self.signing_workers)
        except ValueError:
            raise ConfigError(
                "setting 'signing_workers': expected auto or a number of processes >= 0,"
                f" got {self.signing_workers!r}"
            ) from None
        if self.max_connections < 1:
            raise ConfigError("setting 'max_connections' must be at least 1")
        for name in (
            "attest_burst",
            "token_max_failures",
            "admin_max_connections",
            "overload_queue",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting '{name}' must be at least 1")
        if self.audit_anchor_every < 1:
            raise ConfigError("setting 'audit_anchor_every' must be at least 1s")
        if self.attest_refill <= 0:
            raise ConfigError("setting 'attest_refill' must be above 0s")
        for name in (
            "default_svid_ttl",
            "max_svid_ttl",
            "agent_svid_ttl",
            "intermediate_ttl",
            "default_jwt_ttl",
            "jwt_key_ttl",
            "jwt_audit_window",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting '{name}' must be at least 1s")

    def where(self) -> Datastore:
        """The datastore these settings name (validated already)."""
        if self.datastore is None:
            return Datastore.sqlite(self.data_dir / "ca.db")
        return parse_datastore(self.datastore)

    def _validate_oidc(self) -> None:
        if self.oidc_issuer is not None:
            parts = urlsplit(self.oidc_issuer)
            if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
                raise ConfigError(
                    f"setting 'oidc_issuer': expected https://NAME[/PATH], got {self.oidc_issuer!r}"
                )
        if (self.oidc_cert is None) != (self.oidc_key is None):
            raise ConfigError("settings 'oidc_cert' and 'oidc_key' go together")
        if self.oidc_listen is None:
            return
        if self.oidc_issuer is None:
            raise ConfigError("setting 'oidc_listen' needs 'oidc_issuer' (https://NAME)")
        if self.oidc_listen.host is None:
            raise ConfigError("setting 'oidc_listen' must be HOST:PORT")
        if self.oidc_cert is None and not is_loopback(self.oidc_listen.host):
            raise ConfigError(
                "setting 'oidc_listen': plain HTTP is served on loopback only (behind a TLS"
                " terminator); give 'oidc_cert' and 'oidc_key' to listen on"
                f" {self.oidc_listen.host}"
            )
