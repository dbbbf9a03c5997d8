"""`tally ca ...`: the daemon and the admin commands that talk to its socket.

Rules:

1. Admin commands only ever speak to the admin socket; they never open the
   datastore or the key files, so the CA's file permissions stay the only
   way in.
2. Each command prints text for people or, with ``--output json``, the API's
   JSON unchanged, for scripts.
3. A mistake ends with one line naming it (``tally: error: ...``) and a
   non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import trio

from ca.anchor import Anchor, AnchorError, parse_anchors
from tally.ops import collector
from tally.ops.config import add_arguments, load
from tally.ops.durations import DurationError, parse_duration
from tally.ops.errors import CommandError
from tally.ops.logs import setup_logging
from tally.ops.output import emit
from tally.wire import http

DEFAULT_ADMIN_SOCKET = "/run/tally/ca/admin.sock"


def _admin_socket_default() -> str:
    return os.environ.get("TALLY_CA_ADMIN_SOCKET", DEFAULT_ADMIN_SOCKET)


def call(
    socket_path: str, method: str, target: str, body: object | None = None, timeout: float = 30
) -> Any:
    """One admin API call; returns the decoded JSON or raises CommandError."""

    async def go() -> http.ClientResponse:
        async def connect() -> trio.abc.Stream:
            return await trio.open_unix_socket(socket_path)

        client = http.HttpClient(connect)
        try:
            return await client.request(method, target, json_body=body, timeout=timeout)
        finally:
            await client.aclose()

    if not os.path.exists(socket_path):
        raise CommandError(
            f"admin socket {socket_path} does not exist (is `tally ca run` running? "
            "set --admin-socket or TALLY_CA_ADMIN_SOCKET)"
        )
    try:
        resp = trio.run(go)
    except http.HttpClientError as exc:
        cause = exc.__cause__
        if isinstance(cause, PermissionError):
            raise CommandError(f"admin socket {socket_path}: permission denied") from exc
        raise CommandError(f"admin socket {socket_path}: {exc}") from exc
    try:
        data = resp.json()
    except ValueError as exc:
        raise CommandError(f"admin socket {socket_path}: answer is not JSON") from exc
    if resp.status >= 400:
        message = (
            data.get("error", "request failed") if isinstance(data, dict) else "request failed"
        )
        raise CommandError(str(message))
    return data


def _ttl(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise CommandError(str(exc)) from exc


# -- text renderers --------------------------------------------------------------------


def _entry_text(e: dict[str, Any]) -> str:
    lines = [
        f"Entry ID   : {e['id']}",
        f"SPIFFE ID  : {e['spiffe_id']}",
        f"Parent ID  : {e['parent_id']}",
        f"Revision   : {e['revision']}",
        f"TTL        : {e['ttl'] or 'default'}",
    ]
    lines += [f"Selector   : {s}" for s in e["selectors"]]
    lines += [f"DNS name   : {d}" for d in e["dns_names"]]
    if e.get("hint"):
        lines.append(f"Hint       : {e['hint']}")
    return "\n".join(lines)


def _when(epoch: int | None) -> str:
    """The API's Unix times, as an operator reads them."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _agent_text(a: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"Agent ID   : {a['spiffe_id']}",
            f"Status     : {a['status']}",
            f"SVID serial: {a['serial']}",
            f"Expires    : {_when(a['not_after'])}",
            f"Attested   : {_when(a['attested_at'])}",
        ]
    )


def _records_text(data: dict[str, Any]) -> str:
    rows = []
    for r in data["records"]:
        extra = " ".join(f"{k}={v}" for k, v in r["detail"].items() if v is not None)
        rows.append(
            f"{r['seq']:>6} {r['ts']} {r['event']:<20} {r['actor']} "
            f"{r['spiffe_id'] or '-'} {r['serial'] or '-'} {extra}".rstrip()
        )
    return "\n".join(rows) if rows else "no audit records"


# -- commands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from ca.server import CAServer
    from ca.settings import CASettings

    cfg = load(CASettings, args)
    setup_logging(cfg.log_level)
    server = CAServer(cfg, reload=lambda: load(CASettings, args))
    collector.freeze_loaded()
    collector.rare_full_passes()  # 10,000 parked connections: a full pass stops it for 1 s

    async def main() -> None:
        await server.run()

    trio.run(main)
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    data = call(
        args.admin_socket,
        "POST",
        "/v1/tokens",
        {"spiffe_id": args.spiffe_id, "ttl": _ttl(args.ttl)},
    )
    emit(
        args,
        data,
        lambda d: f"Token: {d['token']}\nAgent ID: {d['spiffe_id']}\nExpires: {d['expires_at']}",
    )
    return 0


def _entry_body(args: argparse.Namespace, *, create: bool) -> dict[str, object]:
    body: dict[str, object] = {}
    if args.spiffe_id is not None or create:
        body["spiffe_id"] = args.spiffe_id
    if args.parent_id is not None or create:
        body["parent_id"] = args.parent_id
    if args.selector or create:
        body["selectors"] = args.selector or []
    if args.ttl is not None:
        body["ttl"] = _ttl(args.ttl)
    if args.dns_name:
        body["dns_names"] = args.dns_name
    if args.hint is not None:
        body["hint"] = args.hint
    return body


def cmd_entry_create(args: argparse.Namespace) -> int:
    data = call(args.admin_socket, "POST", "/v1/entries", _entry_body(args, create=True))
    emit(args, data, _entry_text)
    return 0


def cmd_entry_update(args: argparse.Namespace) -> int:
    body = _entry_body(args, create=False)
    if not body:
        raise CommandError(
            "entry update: nothing to change (give --spiffe-id, --selector, --ttl, ...)"
        )
    data = call(args.admin_socket, "PATCH", f"/v1/entries/{quote(args.id, safe='')}", body)
    emit(args, data, _entry_text)
    return 0


def cmd_entry_list(args: argparse.Namespace) -> int:
    q = {k: v for k, v in (("spiffe_id", args.spiffe_id), ("parent_id", args.parent_id)) if v}
    data = call(args.admin_socket, "GET", "/v1/entries" + (f"?{urlencode(q)}" if q else ""))
    emit(
        args,
        data,
        lambda d: "\n\n".join(_entry_text(e) for e in d["entries"]) or "no entries",
    )
    return 0


def cmd_entry_show(args: argparse.Namespace) -> int:
    data = call(args.admin_socket, "GET", f"/v1/entries/{quote(args.id, safe='')}")
    emit(args, data, _entry_text)
    return 0


def cmd_entry_delete(args: argparse.Namespace) -> int:
    data = call(args.admin_socket, "DELETE", f"/v1/entries/{quote(args.id, safe='')}")
    emit(args, data, lambda d: f"Deleted entry {d['deleted']}")
    return 0


def cmd_agent_list(args: argparse.Namespace) -> int:
    data = call(args.admin_socket, "GET", "/v1/agents")
    emit(args, data, lambda d: "\n\n".join(_agent_text(a) for a in d["agents"]) or "no agents")
    return 0


def cmd_agent_show(args: argparse.Namespace) -> int:
    data = call(args.admin_socket, "GET", "/v1/agents/show?" + urlencode({"spiffe_id": args.id}))
    emit(args, data, _agent_text)
    return 0


def _agent_action(action: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        data = call(args.admin_socket, "POST", f"/v1/agents/{action}", {"spiffe_id": args.id})
        emit(args, data, lambda d: f"Agent {d['spiffe_id']} is now {d['status']}")
        return 0

    return cmd


def cmd_bundle_show(args: argparse.Namespace) -> int:
    if args.format == "spiffe":
        data = call(args.admin_socket, "GET", "/v1/bundle?format=spiffe")
        print(json.dumps(data, indent=2))
        return 0
    data = call(args.admin_socket, "GET", "/v1/bundle")
    emit(args, data, lambda d: d["bundle"].rstrip())
    return 0


def _write_private(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def cmd_x509_mint(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.exists():
        try:
            out.mkdir(mode=0o700, parents=True)
            out.chmod(0o700)
        except OSError as exc:
            raise CommandError(f"--out {out}: cannot create it ({exc.strerror})") from exc
    elif not out.is_dir():
        raise CommandError(f"--out {out}: not a directory")
    body = {"spiffe_id": args.spiffe_id, "ttl": _ttl(args.ttl), "dns_names": args.dns_name or []}
    data = call(args.admin_socket, "POST", "/v1/x509/mint", body)
    _write_private(out / "key.pem", data["private_key"].encode(), 0o600)
    _write_private(out / "svid.pem", data["cert_chain"].encode(), 0o644)
    _write_private(out / "bundle.pem", data["bundle"].encode(), 0o644)
    shown = {k: v for k, v in data.items() if k != "private_key"}
    shown["files"] = [str(out / n) for n in ("svid.pem", "key.pem", "bundle.pem")]
    emit(
        args,
        shown,
        lambda d: (
            f"SPIFFE ID: {d['spiffe_id']}\nSerial: {d['serial']}\nExpires: {d['not_after']}\n"
            f"Wrote {', '.join(d['files'])}"
        ),
    )
    return 0


def cmd_jwt_mint(args: argparse.Namespace) -> int:
    body = {"spiffe_id": args.spiffe_id, "audience": args.audience, "ttl": _ttl(args.ttl)}
    data = call(args.admin_socket, "POST", "/v1/jwt/mint", body)
    # The token goes to stdout only (it is what was asked for), never to a log.
    emit(args, data, lambda d: d["token"])
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    if args.root and args.jwt:
        raise CommandError("--root and --jwt rotate different keys; give one")
    if args.jwt:
        data = call(args.admin_socket, "POST", "/v1/rotate", {"jwt": True})
        emit(
            args,
            data,
            lambda d: (
                f"Rotated jwt ({d['reason']})\n"
                + "\n".join(
                    f"  jwt {k['alg']:<6} {k['state']:<9} {k['id']} signs from {k['activate_at']}"
                    for k in d["jwt_keys"]
                )
            ),
        )
        return 0
    data = call(args.admin_socket, "POST", "/v1/rotate", {"root": args.root})
    emit(
        args,
        data,
        lambda d: (
            f"Rotated {d['rotated']} ({d['reason']})\n"
            + "\n".join(
                f"  {k['kind']:<12} {k['state']:<9} {k['id']} until {k['not_after']}"
                for k in d["keys"]
            )
        ),
    )
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    q = {
        k: v
        for k, v in (
            ("since", args.since),
            ("spiffe_id", args.spiffe_id),
            ("event", args.event),
            ("limit", args.limit),
        )
        if v
    }
    data = call(args.admin_socket, "GET", "/v1/audit" + (f"?{urlencode(q)}" if q else ""))
    emit(args, data, _records_text)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.anchor is None:
        data = call(args.admin_socket, "GET", "/v1/audit/verify", timeout=300)
    else:
        anchors = _read_anchors(args.anchor)
        body = {"anchors": [a.to_json() for a in anchors]}
        data = call(args.admin_socket, "POST", "/v1/audit/verify", body, timeout=300)
    anchored = f" and matches {data['anchors']} signed anchor(s)" if "anchors" in data else ""
    emit(
        args,
        data,
        lambda d: (
            f"audit chain verified: {d['records']} records, unbroken{anchored}"
            if d["ok"]
            else f"audit chain BROKEN at record {d['bad_seq']}: {d['problem']}"
        ),
    )
    return 0 if data["ok"] else 1


def _read_anchors(path: Path) -> list[Anchor]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"--anchor {path}: cannot read it ({exc})") from exc
    try:
        return parse_anchors(text)
    except AnchorError as exc:
        raise CommandError(f"--anchor {path}: {exc}") from exc


def cmd_audit_anchor(args: argparse.Namespace) -> int:
    data = call(args.admin_socket, "GET", "/v1/audit/anchor")
    if args.output == "json":
        emit(args, data, str)
    else:  # the line to keep, as `verify --anchor` reads it
        print(json.dumps(data, separators=(",", ":")))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    data = call(args.admin_socket, "GET", "/v1/health", timeout=10)
    emit(args, data, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0 if data.get("status") == "ok" else 1


def _servers_text(d: dict[str, Any]) -> str:
    lines = []
    for s in d["servers"]:
        mark = "  (this server)" if s["this_server"] else ""
        lines.append(f"{s['id']}  {s['state']:<8}  {s['fingerprint']}{mark}")
    return "\n".join(lines) or "no CA servers"


def cmd_server_list(args: argparse.Namespace) -> int:
    emit(args, call(args.admin_socket, "GET", "/v1/servers"), _servers_text)
    return 0


def _server_action(action: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        data = call(args.admin_socket, "POST", f"/v1/servers/{action}", {"id": args.id})
        emit(args, data, _servers_text)
        return 0

    return cmd


def cmd_datastore_migrate(args: argparse.Namespace) -> int:
    """Runs here, not through the admin socket: the CA is stopped (`ca.migrate` rule 4)."""
    from ca.datastore import parse as parse_datastore
    from ca.migrate import migrate

    source = parse_datastore(args.source)
    target = parse_datastore(args.target)
    data_dir = Path(args.data_dir) if args.data_dir else None
    done = migrate(source, target, data_dir)
    emit(
        args,
        done,
        lambda d: (
            f"copied to {d['to']}: {d['audit_records']} audit records (chain verified),"
            f" {d['rows']['agents']} agents, {d['rows']['entries']} entries,"
            f" {d['keys_sealed']} keys sealed; this server is {d['server']}"
            f" ({d['server_key']}); start it with --datastore and the same --data-dir"
        ),
    )
    return 0


# -- argument wiring --------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin-socket",
        default=_admin_socket_default(),
        help="CA admin socket (default: $TALLY_CA_ADMIN_SOCKET or /run/tally/ca/admin.sock)",
    )
    p.add_argument("--output", choices=("text", "json"), default="text", help="output format")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ca.settings import CASettings

    ca = sub.add_parser("ca", help="the certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")

    run = ca_sub.add_parser("run", help="run the CA daemon")
    add_arguments(run, CASettings)
    run.set_defaults(func=cmd_run)

    def leaf(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help)
        _common(p)
        p.set_defaults(func=func)
        return p

    token = ca_sub.add_parser("token", help="join tokens for node attestation")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = leaf(token_sub, "create", cmd_token_create, "create a one-time join token")
    p.add_argument(
        "--spiffe-id", help="fix the agent's SPIFFE ID (default: .../agent/join_token/<id>)"
    )
    p.add_argument("--ttl", help="token lifetime, e.g. 10m (default: the CA's join_token_ttl)")

    entry = ca_sub.add_parser("entry", help="registration entries")
    entry_sub = entry.add_subparsers(dest="entry_command", required=True, metavar="COMMAND")
    for name, func, needs_id in (
        ("create", cmd_entry_create, False),
        ("update", cmd_entry_update, True),
    ):
        p = leaf(entry_sub, name, func, f"{name} a registration entry")
        if needs_id:
            p.add_argument("id", help="entry ID")
        p.add_argument("--spiffe-id", required=not needs_id, help="SPIFFE ID the workload gets")
        p.add_argument(
            "--parent-id", required=not needs_id, help="SPIFFE ID of the agent that serves it"
        )
        p.add_argument(
            "--selector",
            action="append",
            required=not needs_id,
            help="TYPE:VALUE, e.g. unix:uid:1000 (repeat; all must match)",
        )
        p.add_argument("--ttl", help="SVID lifetime, e.g. 1h")
        p.add_argument("--dns-name", action="append", help="DNS SAN to add (repeatable)")
        p.add_argument("--hint", help="hint passed to workloads")
    p = leaf(entry_sub, "list", cmd_entry_list, "list entries")
    p.add_argument("--spiffe-id")
    p.add_argument("--parent-id")
    p = leaf(entry_sub, "show", cmd_entry_show, "show one entry")
    p.add_argument("id")
    p = leaf(entry_sub, "delete", cmd_entry_delete, "delete an entry")
    p.add_argument("id")

    agent = ca_sub.add_parser("agent", help="attested agents")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")
    leaf(agent_sub, "list", cmd_agent_list, "list agents")
    agent_commands: list[tuple[str, Callable[[argparse.Namespace], int], str]] = [
        ("show", cmd_agent_show, "show one agent"),
        ("evict", _agent_action("evict"), "evict an agent: it must attest again with a new token"),
        ("ban", _agent_action("ban"), "ban an agent: it can never attest again"),
    ]
    for name, action, help in agent_commands:
        p = leaf(agent_sub, name, action, help)
        p.add_argument("id", help="the agent's SPIFFE ID")

    bundle = ca_sub.add_parser("bundle", help="the trust bundle")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    p = leaf(bundle_sub, "show", cmd_bundle_show, "print the trust bundle")
    p.add_argument("--format", choices=("pem", "spiffe"), default="pem")

    x509_p = ca_sub.add_parser("x509", help="X.509-SVIDs outside the agent flow")
    x509_sub = x509_p.add_subparsers(dest="x509_command", required=True, metavar="COMMAND")
    p = leaf(x509_sub, "mint", cmd_x509_mint, "mint an SVID and its key into a directory")
    p.add_argument("--spiffe-id", required=True)
    p.add_argument("--ttl")
    p.add_argument("--dns-name", action="append")
    p.add_argument(
        "--out",
        required=True,
        help="directory for svid.pem, key.pem, bundle.pem (created 0700 if missing)",
    )

    jwt_p = ca_sub.add_parser("jwt", help="JWT-SVIDs outside the agent flow")
    jwt_sub = jwt_p.add_subparsers(dest="jwt_command", required=True, metavar="COMMAND")
    p = leaf(jwt_sub, "mint", cmd_jwt_mint, "mint a JWT-SVID (audited) and print it")
    p.add_argument("--spiffe-id", required=True)
    p.add_argument(
        "--audience", action="append", required=True, help="the token's audience (repeatable)"
    )
    p.add_argument("--ttl", help="token lifetime, e.g. 5m (default: the CA's default_jwt_ttl)")

    p = leaf(
        ca_sub,
        "rotate",
        cmd_rotate,
        "rotate the signing key now (or, with --root, start a root rotation)",
    )
    p.add_argument(
        "--root",
        action="store_true",
        help="publish a new root; it is used after the propagation window",
    )
    p.add_argument(
        "--jwt",
        action="store_true",
        help="publish a new JWT signing key; it signs after jwt_propagation",
    )

    audit = ca_sub.add_parser("audit", help="the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = leaf(audit_sub, "list", cmd_audit_list, "list audit records")
    p.add_argument("--since", help="RFC 3339 time, e.g. 2026-11-29T00:00:00Z")
    p.add_argument("--spiffe-id")
    p.add_argument("--event", help="e.g. svid.issued, agent.evicted")
    p.add_argument("--limit", type=int, help="newest N records (default 1000)")
    p = leaf(audit_sub, "verify", cmd_audit_verify, "prove the audit chain unbroken")
    p.add_argument(
        "--anchor",
        type=Path,
        metavar="FILE",
        help="also prove the history matches signed anchors kept outside the datastore"
        " (JSON lines: `tally ca audit anchor` output, --audit-anchor-file, audit.anchor logs)",
    )
    leaf(
        audit_sub,
        "anchor",
        cmd_audit_anchor,
        "sign the audit chain's head now and print it; keep it outside the datastore",
    )

    leaf(ca_sub, "health", cmd_health, "ask the CA how it is")

    datastore = ca_sub.add_parser("datastore", help="the CA's datastore")
    ds_sub = datastore.add_subparsers(dest="datastore_command", required=True, metavar="COMMAND")
    p = ds_sub.add_parser(
        "migrate", help="copy a stopped SQLite deployment, keys and audit chain, into PostgreSQL"
    )
    p.add_argument("--from", dest="source", required=True, help="sqlite:///PATH/ca.db")
    p.add_argument(
        "--to", dest="target", required=True, help="postgresql://USER@HOST/DB (an empty one)"
    )
    p.add_argument(
        "--data-dir",
        help="the CA's data dir: its keys/ are sealed into the database, and the server"
        " run from it on PostgreSQL keeps its server.key there (default: the SQLite"
        " file's directory)",
    )
    p.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=cmd_datastore_migrate)

    server = ca_sub.add_parser("server", help="CA servers sharing a PostgreSQL datastore")
    server_sub = server.add_subparsers(dest="server_command", required=True, metavar="COMMAND")
    leaf(server_sub, "list", cmd_server_list, "list CA servers, approved and pending")
    for name, help in (
        ("approve", "let a pending server in: the cluster key is wrapped to its own key"),
        ("remove", "forget a server (it must be approved again to rejoin)"),
    ):
        p = leaf(server_sub, name, _server_action(name), help)
        p.add_argument("id", help="server id, as `tally ca server list` shows it")
